"""Shared pieces of the training tests (module-level so spawned processes can import them)."""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEXT_FACTORY = "tests.training.text_stream:text_stream"

# Different layouts sum in a different order: each step's gradients differ by fp32 reordering,
# <= 512 u = 3e-5 of a tensor's largest gradient (tests/numerics.py). Adam (eps 1e-8) passes
# that on as lr * eps / g^2 * dg, small unless |g| is itself at rounding level; such an element
# (a ~3e-5 share of them) may step the other way, but moves the loss by at most |g| * 2 lr,
# ~1e-10. So the losses agree to far below 1e-5 relative to first order in every step (seen:
# ~1e-7 after 12 steps, the rest is the steps compounding); a wrong reduction is off by >1e-2.
REL_TOLERANCE = 1e-5

# test_parallel's eight-process layout: every parallel dimension at 2.
EIGHT_PROCESS_LAYOUT = {"tensor_parallel": 2, "pipeline_parallel": 2, "context_parallel": 2,
                        "distributed_optimizer": True}


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


def uneven_run(workdir, name, **sections):
    """Three steps on batches of very different loss-token counts."""
    return tiny_run(
        workdir / name, init={"weights": str(workdir / "initial-weights")},
        data_factory="tests.training.text_stream:uneven_stream",
        schedule={"train_steps": 3, "global_batch_size": 4}, **sections,
    )


def reference_run(workdir, name="reference", **sections):
    """Twelve steps on stdlib text from the shared initial weights."""
    return tiny_run(
        workdir / name, init={"weights": str(workdir / "initial-weights")},
        schedule={"train_steps": 12, "global_batch_size": 8, "lr_warmup_steps": 2}, **sections,
    )


def short_run(workdir, name, **sections) -> dict:
    """Four steps (or as set) on stdlib text from the shared initial weights."""
    base = dict(init={"weights": str(workdir / "initial-weights")},
                schedule={"train_steps": 4, "global_batch_size": 4, "lr_warmup_steps": 1})
    return tiny_run(workdir / name, **merge(base, sections))


def reshard_runs(workdir) -> tuple[dict, dict]:
    """Save at TP=2 every 2 steps; then continue from step 2 at PP=2 with 2 virtual stages."""
    # Resumed at another layout: every save fully reshardable (periodic ones are dp_reshardable by default).
    save = {"save_dir": str(workdir / "reshard" / "checkpoints"), "save_interval": 2, "keep_last": 0,
            "optimizer_format": "fully_reshardable"}
    # The TP=2 run writes its checkpoints in the background (async save); the resume reads them.
    tp2_save = {**save, "async_save": True}
    tp2 = short_run(workdir, "reshard", parallel={"tensor_parallel": 2}, checkpoint=tp2_save)
    pp2 = short_run(workdir, "reshard-pp2", parallel={"pipeline_parallel": 2, "virtual_pipeline": 2},
                    checkpoint=save)
    return tp2, pp2


def stage_runs(workdir) -> tuple[dict, dict, dict]:
    """Stage 1 (2 steps), then stage 2 from its final checkpoint with RoPE theta 1.28e8 and
    twice the sequence length, carrying the optimizer state or not."""
    stage1 = short_run(workdir, "stage1", checkpoint={"save_dir": str(workdir / "stage1" / "ckpt")},
                       schedule={"train_steps": 2})
    stage2 = [
        short_run(
            workdir, f"stage2-{carry}", model={"rope_theta": 1.28e8}, data={"seq_length": 128},
            init={"weights": str(workdir / "stage1" / "ckpt" / "iter_0000002"), "load_optimizer": carry},
            checkpoint={"save_dir": str(workdir / f"stage2-{carry}" / "ckpt")},
            schedule={"train_steps": 2, "lr_warmup_steps": 0},
        )
        for carry in (True, False)
    ]
    return stage1, stage2[0], stage2[1]


def point_latest(save_dir: str, name: str) -> None:
    """Make ``latest`` point at an older checkpoint (rank 0; collective barrier)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        (Path(save_dir) / "latest").write_text(name + "\n")
    if dist.is_initialized():
        dist.barrier()


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


def in_sequence(calls: list) -> list:
    """Entry point for run_processes: call several (function, args) pairs one after the
    other in the same processes and return their results. Starting a process (imports,
    process groups) costs far more than a tiny run, so the tests batch their runs."""
    return [fn(*args) for fn, args in calls]


def first_step_reference(run_dict: dict) -> dict:
    """Entry point for run_processes (1 process): the first step's loss computed by hand.

    Loads the run's initial weights into a plain (no DDP) model, takes the logits of each
    sample of step 0 and averages torch's cross entropy over every loss token of the
    global batch; also returns the mean of per-sample means (what the loss must NOT be).
    """
    import torch
    import torch.nn.functional as F

    from megalong.checkpoint.weights import load_weights
    from megalong.config import from_dict
    from megalong.model.llama import build_model
    from megalong.runtime import init_distributed, set_seed
    from megalong.training import RunConfig
    from megalong.training.batches import MicroBatcher, load_factory

    run = from_dict(RunConfig, run_dict, "test recipe")
    init_distributed(run.parallel, device="cpu")
    set_seed(run.seed)
    model_cfg = run.resolved_model()
    chunks = build_model(model_cfg, run.parallel, on_gpu=False)
    load_weights(chunks, run.init.weights)
    stream = load_factory(run.data_factory)(run, 1)
    # The trainer's own micro-batching, so that document masking (when built) is the same.
    batcher = MicroBatcher(1, 1, 0, torch.device("cpu"))
    sums, counts, means = 0.0, 0.0, []
    with torch.no_grad():
        for sample in stream.batch_for_step(0, 0):
            mb = batcher.split([sample], 1)[0]
            logits = chunks[0](mb.tokens, mb.position_ids, None, packed_seq_params=mb.packed_seq_params)
            logits = logits[0, :, : model_cfg.vocab_size]
            losses = F.cross_entropy(logits.double(), torch.from_numpy(sample.labels), reduction="none")
            mask = torch.from_numpy(sample.loss_mask).double()
            sums += float((losses * mask).sum())
            counts += float(mask.sum())
            means.append(float((losses * mask).sum() / mask.sum()))
    return {"token_average": sums / counts, "mean_of_means": sum(means) / len(means)}


def padded_vocab_check() -> dict:
    """In one process: a 500-token model (padded to 512) vs torch's CE over the real 500."""
    import torch
    import torch.nn.functional as F

    from megalong.config import ParallelConfig
    from megalong.model import preset_config
    from megalong.model.llama import build_model
    from megalong.runtime import init_distributed, set_seed

    parallel = ParallelConfig()
    init_distributed(parallel, device="cpu")
    set_seed(3)
    model_cfg = preset_config("test-tiny", transformer_impl="local", vocab_size=500)
    model = build_model(model_cfg, parallel, on_gpu=False)[0]
    tokens = torch.randint(0, 500, (2, 32))
    labels = torch.randint(0, 500, (2, 32))
    positions = torch.arange(32)[None].expand(2, -1)
    with torch.no_grad():
        # Make the padded rows of the output layer large, so any mass they took would show.
        model.output_layer.weight[500:] = 0.5
        logits = model(tokens, positions, None)
        ours = model(tokens, positions, None, labels=labels)
    reference = F.cross_entropy(logits[..., :500].reshape(-1, 500), labels.reshape(-1), reduction="none")
    # What a plain cross entropy over all 512 logits (Megatron-Core's own) would give.
    full_vocab_loss = F.cross_entropy(logits.reshape(-1, 512), labels.reshape(-1), reduction="none")
    return {
        "padded": model.vocab_size,
        "first_padded_column": model._first_padded_column,
        "ours_vs_reference": float((ours.reshape(-1) - reference).abs().max()),
        "full_vocab_vs_reference": float((full_vocab_loss.reshape(-1) - reference).abs().max()),
    }


def start_training_command(recipe: Path, log: Path, file_size_limit: int = 0) -> subprocess.Popen:
    """``python -m megalong train RECIPE`` in the background, its output appended to ``log``.
    ``file_size_limit``: the process may not write files over that many bytes (RLIMIT_FSIZE,
    with SIGXFSZ ignored: a write past it fails as on a full disk)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "megalong", "train", str(recipe)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=functools.partial(limit_file_size, file_size_limit) if file_size_limit else None)


def limit_file_size(limit: int) -> None:
    """Make this process's writes past ``limit`` bytes fail with EFBIG, as on a full disk
    (SIGXFSZ, which would kill it instead, ignored)."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 300) -> None:
    """Until the metrics file has a line of ``step`` (or later); fails if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and any(r["step"] >= step for r in read_rows(metrics)):
            return
        assert proc.poll() is None, f"training exited early with code {proc.returncode}"
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")
