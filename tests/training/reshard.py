"""The resharding matrix: save at one parallel layout, resume at another (module-level so
spawned processes can import it).

Every layout trains the same six steps from the same initial weights and batches. A run
at each layout saves at step ``SAVED_AT`` and goes on uninterrupted: for the target
layouts its steps 4-6 are the reference, for the source layouts its step-3 checkpoint is
what the resumed runs start from. A control run resumes at the target layout and then
forgets its optimizer state (:func:`train_forgetting_optimizer`): what a resume that did
not carry the Adam moments or their step count would train like.

The runs are batched by process count into the training fixtures (tests/training/conftest.py):
sources and references first, resumed runs after.
"""

from __future__ import annotations

from pathlib import Path

from tests.training.helpers import short_run

SAVED_AT, STEPS = 3, 6
# Layout name -> parallel section, and its process count. Every layout uses Megatron-Core's
# distributed optimizer (megalong's default), which at DP=2 shards the Adam state over DP.
LAYOUTS = {
    "one-process": ({}, 1),
    "dp2": ({"distributed_optimizer": True}, 2),
    "cp2": ({"context_parallel": 2}, 2),
    "tp2": ({"tensor_parallel": 2}, 2),
    "pp2": ({"pipeline_parallel": 2}, 2),
    "tp2-dp-reshardable": ({"tensor_parallel": 2}, 2),
}
# The step-SAVED_AT save is periodic: by default (checkpoint.optimizer_format: auto) its
# optimizer state is dp_reshardable, which loads at any data- and context-parallel size (the
# pairs between one-process, dp2 and cp2) but only at the TP and PP it was saved at. The runs
# resumed at another TP or PP save every checkpoint fully reshardable, as a user who plans to
# must ask; "tp2-dp-reshardable" keeps the default, and its resume at one process is refused.
FULLY_RESHARDABLE = ("tp2", "pp2")
# (saved at, resumed at). Layouts with sequence parallelism resume to and from one process
# in tests/training/test_sequence_parallel.py (its own runs).
PAIRS = [("dp2", "one-process"), ("one-process", "dp2"), ("cp2", "one-process"), ("one-process", "cp2"),
         ("tp2", "one-process"), ("pp2", "one-process")]
TARGETS = ("one-process", "dp2", "cp2")


def _run(workdir: Path, name: str, layout: str, **sections) -> dict:
    base = {"parallel": LAYOUTS[layout][0], "schedule": {"train_steps": STEPS}}
    return short_run(workdir, f"matrix/{name}", **base, **sections)


def uninterrupted(workdir: Path, layout: str) -> dict:
    """Six steps at ``layout``, saving at step SAVED_AT (and at the end)."""
    save = {"save_dir": str(checkpoints(workdir, layout)), "save_interval": SAVED_AT, "keep_last": 0}
    if layout in FULLY_RESHARDABLE:
        save["optimizer_format"] = "fully_reshardable"
    return _run(workdir, layout, layout, checkpoint=save)


def checkpoints(workdir: Path, layout: str) -> Path:
    return workdir / "matrix" / layout / "ckpt"


def saved(workdir: Path, layout: str) -> Path:
    return checkpoints(workdir, layout) / f"iter_{SAVED_AT:07d}"


def resumed(workdir: Path, source: str, target: str) -> dict:
    """At ``target``, from the step-SAVED_AT checkpoint written at ``source`` (steps 4-6)."""
    return _run(workdir, f"{source}-to-{target}", target, checkpoint={"resume": str(saved(workdir, source))})


def forgetting(workdir: Path, target: str, forget: str) -> tuple:
    """A control call: resume at ``target`` from its own step-SAVED_AT checkpoint, then
    forget the optimizer state (``forget``: see :func:`train_forgetting_optimizer`)."""
    run = _run(workdir, f"forget-{forget}-{target}", target, checkpoint={"resume": str(saved(workdir, target))})
    return train_forgetting_optimizer, (run, forget)


def calls(workdir: Path, processes: int, stage: str) -> list:
    """The (function, args) calls of one process count: ``stage`` "first" (the uninterrupted
    runs) or "resume" (resumed runs and controls at layouts of that many processes)."""
    from tests.training.broken import train_catching
    from tests.training.helpers import train_from_dict

    if stage == "first":
        return [(train_from_dict, (uninterrupted(workdir, name),))
                for name, (_, count) in LAYOUTS.items() if count == processes]
    found = [(train_from_dict, (resumed(workdir, s, t),)) for s, t in PAIRS if LAYOUTS[t][1] == processes]
    found += [forgetting(workdir, t, "all") for t in TARGETS if LAYOUTS[t][1] == processes]
    if processes == 1:
        found.append(forgetting(workdir, "one-process", "step"))
        found.append((train_catching, (resumed(workdir, "tp2-dp-reshardable", "one-process"),)))
    return found


def train_forgetting_optimizer(run_dict: dict, forget: str) -> int:
    """Entry point for run_processes: ``megalong.training.train`` of a resuming run, whose
    optimizer, once the checkpoint is loaded, forgets its Adam moments and step counts
    (``forget="all"``: torch's Adam starts them again at the next step) or only the step
    counts (``"step"``: the moments stay, their bias correction is a first step's)."""
    import torch

    from megalong.config import from_dict
    from megalong.runtime import init_distributed
    from megalong.runtime.distributed import read_launch_env
    from megalong.training import RunConfig
    from megalong.training.trainer import Trainer

    run = from_dict(RunConfig, run_dict, "test recipe")
    run.validate(read_launch_env().world_size)
    trainer = Trainer(run, init_distributed(run.parallel, device=run.runtime.device)).setup()
    for inner in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        states = inner.optimizer.state
        if forget == "all":
            states.clear()
        else:
            for state in states.values():
                state["step"] = torch.zeros_like(state["step"])
    return trainer.fit()
