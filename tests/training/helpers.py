"""Shared pieces of the training tests (module-level so spawned processes can import them)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

TEXT_FACTORY = "tests.training.text_stream:text_stream"


def tiny_run(tmp: Path, **sections) -> dict:
    """A test-tiny recipe on stdlib text as a plain dict; ``sections`` update it (nested)."""
    run = {
        "name": "test",
        "seed": 1234,
        "model": {"preset": "test-tiny", "transformer_impl": "local"},
        "parallel": {},
        "data": {"seq_length": 64},
        "data_factory": TEXT_FACTORY,
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "weight_decay": 0.1, "clip_grad": 1.0},
        "schedule": {"train_steps": 5, "global_batch_size": 4, "micro_batch_size": 1,
                     "lr_warmup_steps": 1},
        "checkpoint": {"save_dir": None, "save_interval": 0, "keep_last": 2},
        "logging": {"metrics_file": str(tmp / "metrics.jsonl")},
        "runtime": {"device": "cpu"},
    }
    return merge(run, sections)


def merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def train_from_dict(run_dict: dict) -> int:
    """Entry point for run_processes: train a run given as a dict, return the exit code."""
    from megalong.config import from_dict
    from megalong.training import RunConfig, train

    return train(from_dict(RunConfig, run_dict, "test recipe"))


def read_losses(metrics_file: Path) -> dict[int, float]:
    """step -> loss; a later line for the same step (a resumed run) replaces an earlier one."""
    losses = {}
    for line in Path(metrics_file).read_text().splitlines():
        row = json.loads(line)
        losses[row["step"]] = row["loss"]
    return losses


def read_rows(metrics_file: Path) -> list[dict]:
    return [json.loads(line) for line in Path(metrics_file).read_text().splitlines()]


def save_initial_weights(directory: str, model_overrides: dict | None = None) -> None:
    """Entry point for run_processes (1 process): write freshly initialized test-tiny weights."""
    from megalong.checkpoint.weights import save_weights
    from megalong.config import ParallelConfig
    from megalong.model import preset_config
    from megalong.model.llama import build_model
    from megalong.runtime import init_distributed, set_seed

    parallel = ParallelConfig()
    init_distributed(parallel, device="cpu")
    set_seed(99)
    model = preset_config("test-tiny", transformer_impl="local", **(model_overrides or {}))
    save_weights(build_model(model, parallel, on_gpu=False), directory, model)
