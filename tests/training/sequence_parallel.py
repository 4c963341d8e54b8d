"""The sequence-parallelism runs (module-level so spawned processes can import them).

Every ProLong recipe trains with tensor parallelism and sequence parallelism, with context
parallelism at long lengths. These runs put that shape in miniature on the CPU, from the same
initial weights on the same batches as one process, in bf16 (what every real run uses) and
fp32: TP=2 with sequence parallelism (2 processes), TP=2 x CP=2 with it (4 processes), and
TP=2 x PP=2 with two virtual stages with it (4 processes: pipeline messages of 1/TP of the
sequence).

* Step-1 gradients: one step at learning rate 0 without clipping and without the distributed
  optimizer, so every rank keeps whole reduced gradients in Megatron DDP's buffers. They are
  saved through a checkpoint (which brings TP shards into the one-process layout), and every
  rank returns its own gradients of the parameters it holds whole (the norms).
* Training: four steps saving at step 2; every rank returns the parameters it holds whole.
  Then resumed from step 2 at the same layout (exact resume) and across the boundary between
  sequence parallelism and one process (resharding).

The runs are batched by process count, one start each: 1, 2 and 4 processes, then 1 again for
the resumes at one process and the loading of the gradients
(tests/training/test_sequence_parallel.py).
"""

from __future__ import annotations

from pathlib import Path

from tests.training.helpers import merge, short_run

SAVED_AT, STEPS = 2, 4
DTYPES = ("bf16", "fp32")
SP = {"tensor_parallel": 2, "sequence_parallel": True}
# Layout name -> parallel section, process count, dtypes trained (four steps). Runs at four
# processes cost the most: there, training runs in fp32 only (the sharp comparison), and bf16
# is compared through the step-1 gradients.
LAYOUTS = {
    "one-process": ({}, 1, DTYPES),
    "tp2-sp": (SP, 2, DTYPES),
    "tp2-sp-cp2": ({**SP, "context_parallel": 2}, 4, ("fp32",)),
    "tp2-sp-pp2-vp2": ({**SP, "pipeline_parallel": 2, "virtual_pipeline": 2}, 4, ("fp32",)),
}
SEQUENCE_PARALLEL = [name for name in LAYOUTS if name != "one-process"]
# The step-1 gradients are compared at these layouts, in both dtypes.
GRADIENT_LAYOUTS = ("one-process", "tp2-sp", "tp2-sp-cp2")
# Exact resume: (layout, dtype), resumed from its own step-SAVED_AT checkpoint.
EXACT_RESUMES = [("tp2-sp", "bf16"), ("tp2-sp-cp2", "fp32")]
# Resharding, in fp32: (saved at, resumed at).
RESHARDS = [("tp2-sp", "one-process"), ("tp2-sp-cp2", "one-process"), ("one-process", "tp2-sp")]


def processes(layout: str) -> int:
    return LAYOUTS[layout][1]


def initial_weights(workdir: Path) -> Path:
    return workdir / "initial-weights"


def _run(workdir: Path, name: str, layout: str, dtype: str, **sections) -> dict:
    base = {"model": {"params_dtype": dtype}, "parallel": LAYOUTS[layout][0],
            "init": {"weights": str(initial_weights(workdir))}, "schedule": {"train_steps": STEPS}}
    return short_run(workdir, name, **merge(base, sections))


def run_name(layout: str, dtype: str) -> str:
    return f"{layout}-{dtype}"


def resumed_name(source: str, target: str, dtype: str) -> str:
    return f"{source}-to-{target}-{dtype}"


def _checkpoints(workdir: Path, layout: str, dtype: str) -> Path:
    return workdir / run_name(layout, dtype) / "ckpt"


def uninterrupted(workdir: Path, layout: str, dtype: str) -> dict:
    save = {"save_dir": str(_checkpoints(workdir, layout, dtype)), "save_interval": SAVED_AT, "keep_last": 0}
    if dtype == "fp32" and layout in {source for source, _ in RESHARDS}:
        # A periodic save resumes at another TP only in the fully reshardable format (the
        # default keeps periodic saves dp_reshardable: tests/training/reshard.py).
        save["optimizer_format"] = "fully_reshardable"
    return _run(workdir, run_name(layout, dtype), layout, dtype, checkpoint=save)


def resumed(workdir: Path, source: str, target: str, dtype: str) -> dict:
    """At ``target``, from the step-SAVED_AT checkpoint written at ``source``."""
    saved = _checkpoints(workdir, source, dtype) / f"iter_{SAVED_AT:07d}"
    return _run(workdir, resumed_name(source, target, dtype), target, dtype, checkpoint={"resume": str(saved)})


def gradients_dir(workdir: Path, layout: str, dtype: str) -> Path:
    return workdir / "gradients" / run_name(layout, dtype)


def gradient_run(workdir: Path, layout: str, dtype: str) -> dict:
    """One step at learning rate 0 without clipping: the optimizer leaves the gradients in
    Megatron DDP's buffers as the backward and ``finalize_model_grads`` made them."""
    return _run(workdir, f"gradient-runs/{run_name(layout, dtype)}", layout, dtype,
                parallel={"distributed_optimizer": False}, optimizer={"lr": 0.0, "min_lr": 0.0, "clip_grad": 0.0},
                schedule={"train_steps": 1, "lr_warmup_steps": 0})


def _trainer(run_dict: dict):
    """``megalong.training.train`` up to a set-up Trainer, kept for the caller to look into."""
    from megalong.config import from_dict
    from megalong.runtime import init_distributed
    from megalong.training import RunConfig, preflight
    from megalong.training.trainer import Trainer

    run = from_dict(RunConfig, run_dict, "test recipe")
    _, _, device = preflight(run)
    return Trainer(run, init_distributed(run.parallel, device=device)).setup()


def _held_whole(trainer, value) -> dict:
    """``value(param)`` of each parameter every TP rank holds whole (not split over TP: the
    norms), by (model chunk, name)."""
    from megalong.training.checkpoint import unwrap

    return {(index, name): value(param).detach().clone()
            for index, chunk in enumerate(trainer.model) for name, param in unwrap(chunk).named_parameters()
            if not getattr(param, "tensor_model_parallel", False)}


def train_keeping_whole_parameters(run_dict: dict) -> dict:
    """Entry point for run_processes: train ``run_dict``; the exit code, this rank's pipeline
    rank and its parameters held whole after the last step."""
    from megatron.core import parallel_state

    trainer = _trainer(run_dict)
    code = trainer.fit()
    return {"code": code, "pipeline_rank": parallel_state.get_pipeline_model_parallel_rank(),
            "whole": _held_whole(trainer, lambda param: param)}


def first_step_gradients(run_dict: dict, directory: str) -> dict:
    """Entry point for run_processes: step 1 of a :func:`gradient_run`; saves its gradients as
    a checkpoint in ``directory`` and returns the step's loss and this rank's gradients of the
    parameters held whole."""
    from megalong.training.checkpoint import unwrap
    from tests.model.parity_workers import _save_gradients

    trainer = _trainer(run_dict)
    loss = trainer.train_step(0).loss
    whole = _held_whole(trainer, lambda param: param.main_grad)
    _save_gradients([unwrap(chunk) for chunk in trainer.model], directory)
    return {"loss": loss, "whole": whole}


def load_gradients(directories: list[str]) -> list[dict]:
    """Entry point for run_processes (1 process): the gradients each :func:`first_step_gradients`
    saved, in the one-process layout."""
    from tests.model.parity_workers import load_states

    return load_states(directories)


def gradient_directories(workdir: Path) -> dict:
    """(layout, dtype) -> where its step-1 gradients are saved, in the order load_gradients reads them."""
    return {(layout, dtype): str(gradients_dir(workdir, layout, dtype))
            for layout in GRADIENT_LAYOUTS for dtype in DTYPES}


def workdir_of(training_workdir: Path) -> Path:
    """Where these runs live, inside the training tests' shared directory (tests/training/conftest.py)."""
    return training_workdir / "sequence-parallel"


def calls(workdir: Path, count: int, stage: str) -> dict:
    """The calls of one process start, by name (the tests find their results by it): ``stage``
    "first" (initial weights, gradient and uninterrupted runs, exact resumes, resumes from one
    process) or "last" (one process: the resumes from sequence parallelism, the gradients)."""
    from tests.training.helpers import save_initial_weights

    found = {}
    if stage == "last":
        for source, target in RESHARDS:
            if processes(target) == count and processes(source) > 1:
                found[resumed_name(source, target, "fp32")] = (train_keeping_whole_parameters,
                                                               (resumed(workdir, source, target, "fp32"),))
        found["gradients"] = (load_gradients, (list(gradient_directories(workdir).values()),))
        return found
    if count == 1:
        found["initial-weights"] = (save_initial_weights, (str(initial_weights(workdir)),))
    for layout, (_, layout_count, dtypes) in LAYOUTS.items():
        if layout_count != count:
            continue
        for dtype in DTYPES:
            if layout in GRADIENT_LAYOUTS:
                found[f"gradients-{run_name(layout, dtype)}"] = (
                    first_step_gradients, (gradient_run(workdir, layout, dtype), str(gradients_dir(workdir, layout, dtype))))
            if dtype in dtypes:
                found[run_name(layout, dtype)] = (train_keeping_whole_parameters, (uninterrupted(workdir, layout, dtype),))
    for layout, dtype in EXACT_RESUMES:
        if processes(layout) == count:
            found[resumed_name(layout, layout, dtype)] = (train_keeping_whole_parameters,
                                                          (resumed(workdir, layout, layout, dtype),))
    for source, target in RESHARDS:
        if processes(target) == count and processes(source) == 1 and count > 1:
            found[resumed_name(source, target, "fp32")] = (train_keeping_whole_parameters,
                                                           (resumed(workdir, source, target, "fp32"),))
    return found
