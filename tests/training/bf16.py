"""Runs of the bf16 training tests (module-level so spawned processes can import them).

Every real megalong run is bf16. With bf16 parameters Megatron-Core's optimizers keep fp32
master weights of their own, taken from the parameters when the optimizer is built and
copied into the model at every step: what a run starts from is the master copy, not only
the model's weights. These runs start from a Hugging Face bf16 model converted with
``megalong convert hf-to-megatron`` (test-tiny's shape), as ProLong's stage 1 starts from
Llama-3-8B-Instruct, and check what each run starts from with a step at learning rate 0:
AdamW at lr 0 moves no weight (the update and the decoupled decay are both multiplied by
it), so the weights a zero-lr run saves are exactly the weights it started from, and its
fp32 master weights are exactly the master weights it started with.

* a stage from the converted weights, one zero-lr step, back to Hugging Face: bitwise equal
  to the original, at one process without the distributed optimizer, at DP=2 with it
  (through the ``megalong train`` command), and at TP=2 x PP=2 x CP=2;
* stage 1 -> stage 2 with ``load_optimizer: true`` -> SFT with ``load_optimizer: false``:
  each next stage, probed with a zero-lr step, starts from exactly the weights (and, when
  carried, the fp32 master weights) the previous stage saved;
* resumed at another layout and saved before any step: the checkpoint (bf16 weights, fp32
  master weights, Adam moments) is bitwise the one it resumed from.
"""

from __future__ import annotations

from pathlib import Path

from tests.training.helpers import merge, short_run, train_from_dict

# test-tiny as a Hugging Face Llama (megalong.model.presets), saved in bf16.
HF_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, rope_theta=10000.0)
ZERO_LR = {"lr": 0.0, "min_lr": 0.0}
# A Megatron layout per process count for the one-zero-lr-step runs from the converted weights.
ZERO_LR_LAYOUTS = {
    "one-process": ({"distributed_optimizer": False}, 1),  # Megatron-Core's Float16Optimizer
    "dp2": ({"distributed_optimizer": True}, 2),
    "tp2-pp2-cp2": ({"tensor_parallel": 2, "pipeline_parallel": 2, "context_parallel": 2}, 8),
}


def hf_start(workdir: Path) -> Path:
    return workdir / "bf16" / "hf"


def converted(workdir: Path) -> Path:
    return workdir / "bf16" / "converted"


def prepare_initial_weights(workdir: Path) -> None:
    """A random bf16 Llama saved by transformers, converted with ``megalong convert`` (in-process)."""
    import torch

    from megalong.cli.main import main
    from tests.convert.tiny_models import save_hf_model

    save_hf_model(hf_start(workdir), dtype=torch.bfloat16, **HF_SHAPE)
    assert main(["convert", "hf-to-megatron", str(hf_start(workdir)), str(converted(workdir))]) == 0


def _bf16_run(workdir: Path, name: str, **sections) -> dict:
    base = {"model": {"params_dtype": "bf16"}, "init": {"weights": str(converted(workdir))},
            "checkpoint": {"save_dir": str(run_dir(workdir, name) / "ckpt")}}
    run = short_run(workdir, f"bf16/{name}", **merge(base, sections))
    run["model"].pop("preset")  # the shape comes from the converted checkpoint's model.yaml
    return run


def run_dir(workdir: Path, name: str) -> Path:
    return workdir / "bf16" / name


def final_checkpoint(workdir: Path, name: str, step: int) -> Path:
    return run_dir(workdir, name) / "ckpt" / f"iter_{step:07d}"


def zero_lr_from_hf(workdir: Path, layout: str) -> dict:
    """One step at lr 0 from the converted Hugging Face weights at ``layout``."""
    parallel, _ = ZERO_LR_LAYOUTS[layout]
    return _bf16_run(workdir, f"zero-lr-{layout}", parallel=parallel, optimizer=ZERO_LR,
                     schedule={"train_steps": 1, "lr_warmup_steps": 0})


# The stage chain, at DP=2 with the distributed optimizer: stage 1 from the converted weights;
# stage 2 from stage 1 carrying the optimizer (twice the length, RoPE theta 1.28e8); SFT from
# stage 2 with a fresh optimizer. Each "probe" is the next stage's start with one zero-lr step.
DP2 = {"distributed_optimizer": True}
STAGE_STEPS = 2
# Stage 2's own learning rate (stage 1 runs at helpers.tiny_run's 3e-3): what stage 2 must follow
# although it carries stage 1's optimizer state.
STAGE2_LR = {"lr": 1e-3, "min_lr": 1e-4}


def stage_chain(workdir: Path) -> list[dict]:
    stage1 = _bf16_run(workdir, "stage1", parallel=DP2, schedule={"train_steps": STAGE_STEPS})
    stage1_final = str(final_checkpoint(workdir, "stage1", STAGE_STEPS))
    stage2 = dict(model={"rope_theta": 1.28e8}, data={"seq_length": 128}, parallel=DP2,
                  init={"weights": stage1_final, "load_optimizer": True})
    probe2 = _bf16_run(workdir, "stage2-probe", optimizer=ZERO_LR, schedule={"train_steps": 1, "lr_warmup_steps": 0},
                       **stage2)
    stage2_run = _bf16_run(workdir, "stage2", optimizer=STAGE2_LR, schedule={"train_steps": STAGE_STEPS,
                                                                          "lr_warmup_steps": 0}, **stage2)
    sft = dict(model={"rope_theta": 1.28e8}, parallel=DP2,
               init={"weights": str(final_checkpoint(workdir, "stage2", STAGE_STEPS)), "load_optimizer": False})
    probe_sft = _bf16_run(workdir, "sft-probe", optimizer=ZERO_LR, schedule={"train_steps": 1, "lr_warmup_steps": 0},
                          **sft)
    return [stage1, probe2, stage2_run, probe_sft]


# Resharding: a bf16 run saved at a source layout, resumed at a target layout and saved there
# before any step (resume_and_save).
RESHARD_SOURCES = {"tp2": ({"tensor_parallel": 2}, 2), "one-process": ({}, 1)}
RESHARD_PAIRS = [("stage1", "one-process"), ("tp2", "one-process"), ("one-process", "tp2"), ("one-process", "dp2")]
TARGETS = {"one-process": ({}, 1), "tp2": ({"tensor_parallel": 2}, 2), "dp2": (DP2, 2)}


def reshard_source(workdir: Path, layout: str) -> dict:
    """Two steps at ``layout`` from the converted weights, saved at the end."""
    parallel, _ = RESHARD_SOURCES[layout]
    return _bf16_run(workdir, f"source-{layout}", parallel=parallel, schedule={"train_steps": STAGE_STEPS})


def source_checkpoint(workdir: Path, source: str) -> Path:
    return final_checkpoint(workdir, source if source == "stage1" else f"source-{source}", STAGE_STEPS)


def resharded(workdir: Path, source: str, target: str) -> dict:
    parallel, _ = TARGETS[target]
    return _bf16_run(workdir, f"{source}-to-{target}", parallel=parallel, schedule={"train_steps": STAGE_STEPS},
                     checkpoint={"resume": str(source_checkpoint(workdir, source))})


def resume_and_save(run_dict: dict) -> int:
    """Entry point for run_processes: set up a resuming run (it loads its checkpoint) and save
    at once, before any step (0 when saved)."""
    from megalong.config import from_dict
    from megalong.runtime import init_distributed
    from megalong.runtime.distributed import read_launch_env
    from megalong.training import RunConfig
    from megalong.training.trainer import Trainer

    run = from_dict(RunConfig, run_dict, "test recipe")
    run.validate(read_launch_env().world_size)
    trainer = Trainer(run, init_distributed(run.parallel, device=run.runtime.device)).setup()
    trainer.save()
    trainer.finish_pending_saves()
    return 0


def calls(workdir: Path, processes: int, stage: str) -> list:
    """The (function, args) calls of one process count: ``stage`` "first" or "resume" (the
    batches of tests/training/conftest.py)."""
    found = []
    if stage == "first":
        found += [(train_from_dict, (zero_lr_from_hf(workdir, name),))
                  for name, (_, count) in ZERO_LR_LAYOUTS.items() if count == processes and name != "dp2"]
        found += [(train_from_dict, (reshard_source(workdir, name),))
                  for name, (_, count) in RESHARD_SOURCES.items() if count == processes]
        if processes == 2:
            found += [(train_from_dict, (run,)) for run in stage_chain(workdir)]
    else:
        found += [(resume_and_save, (resharded(workdir, s, t),)) for s, t in RESHARD_PAIRS
                  if TARGETS[t][1] == processes]
    return found
