"""Training checkpoints: everything needed to continue a run exactly where it stopped.

Layout of ``<save_dir>/iter_0001000/`` (a superset of a weights directory, so
``megalong convert`` and ``megalong eval`` take it directly)::

    model/             the model weights (Megatron-Core dist checkpoint; any TP/PP/CP/DP)
    model.yaml         the resolved ModelConfig
    optimizer/         the optimizer state (dist checkpoint; the distributed optimizer in
                       Megatron-Core's "fully_reshardable" format, so it also loads at any layout)
    rng/rank_*.pt      each rank's random-number generator states
    train_state.json   step, samples and tokens consumed (= the data position: the stream is
                       deterministic in the step), LR-schedule state, the layout it was saved at
    run.yaml           the resolved RunConfig of the run that saved it

Writes are atomic: everything goes to ``iter_XXXXXXX.tmp`` and is renamed into place
once every rank has finished; only then does the ``latest`` marker (itself written to a
temporary file and renamed) point at it, and checkpoints beyond ``keep_last`` are removed.
A job killed at any moment leaves either the previous checkpoint or the new one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megalong.checkpoint import weights
from megalong.config.loader import dump_yaml

log = logging.getLogger(__name__)

LATEST_FILE = "latest"
OPTIMIZER_SUBDIR = "optimizer"
RNG_SUBDIR = "rng"
TRAIN_STATE_FILE = "train_state.json"
RUN_CONFIG_FILE = "run.yaml"
_ITER_PATTERN = re.compile(r"^iter_(\d{7,})$")


@dataclass
class TrainState:
    """Where a run stands; saved as train_state.json."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    scheduler: dict = field(default_factory=dict)
    # "tp,pp,cp,dp,vp" of the job that saved (RNG states are only restored on the same layout).
    layout: str = ""
    saved_at: float = 0.0
    # The stream's description and fingerprint (a resume onto different data is refused).
    data: str = ""
    data_fingerprint: str = ""


def iteration_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"iter_{step:07d}"


def unwrap(chunk):
    """The GPTModel inside a Megatron DDP wrapper."""
    from megatron.core.distributed import DistributedDataParallel

    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_latest(save_dir: str | Path) -> Optional[Path]:
    """The checkpoint the `latest` marker points at, or None when there is none yet."""
    marker = Path(save_dir) / LATEST_FILE
    if not marker.is_file():
        return None
    name = marker.read_text(encoding="utf-8").strip()
    path = Path(save_dir) / name
    if not _ITER_PATTERN.match(name) or not (path / TRAIN_STATE_FILE).is_file():
        raise FileNotFoundError(f"{marker} points at {name!r}, which is not a complete checkpoint")
    return path


def is_training_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / TRAIN_STATE_FILE).is_file()


def has_optimizer_state(directory: str | Path) -> bool:
    return (Path(directory) / OPTIMIZER_SUBDIR).is_dir()


def read_train_state(directory: str | Path) -> TrainState:
    path = Path(directory) / TRAIN_STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise FileNotFoundError(f"cannot read {path}: {err}") from None
    return TrainState(**data)


def _model_sharded_state(model_chunks: list) -> dict:
    return weights.sharded_model_state([unwrap(c) for c in model_chunks])


def _optimizer_metadata(optimizer_format: str) -> dict:
    return {"distrib_optim_sharding_type": optimizer_format, "chained_optim_avoid_prefix": True}


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(
    save_dir: str | Path,
    state: TrainState,
    model_chunks: list,
    optimizer,
    model_config,
    run_config,
    optimizer_format: str = "fully_reshardable",
    keep_last: int = 0,
    async_queue=None,
) -> Path:
    """Save a complete training checkpoint (collective: every rank calls it).

    With ``async_queue`` (Megatron-Core's ``AsyncCallsQueue``) the model and optimizer
    tensors are written in the background; the checkpoint is renamed into place and
    ``latest`` updated when the queue finalizes the write (``maybe_finalize_async_calls``).
    """
    from megatron.core import dist_checkpointing

    started = time.monotonic()
    step = state.step  # the state object moves on while a background write runs
    final = iteration_dir(save_dir, step)
    tmp = weights.staging_dir(final)
    if _rank() == 0:
        log.info("Saving checkpoint of step %d to %s%s ...", step, final,
                 " in the background" if async_queue is not None else "")
        if tmp.exists():
            shutil.rmtree(tmp)  # a leftover of a job killed while saving
        for sub in (weights.MODEL_SUBDIR, OPTIMIZER_SUBDIR, RNG_SUBDIR):
            (tmp / sub).mkdir(parents=True)
    _barrier()

    # Small files first, synchronously (their content is fixed now).
    torch.save(_rng_state(), tmp / RNG_SUBDIR / f"rank_{_rank():05d}.pt")
    if _rank() == 0:
        weights.write_model_config(tmp, model_config)
        (tmp / RUN_CONFIG_FILE).write_text(dump_yaml(run_config), encoding="utf-8")
        state.saved_at = time.time()
        (tmp / TRAIN_STATE_FILE).write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")

    # dist_checkpointing.save consumes the state dict it is given: the optimizer's sharded
    # state (built from the model's) gets a model state dict of its own.
    optimizer_state = optimizer.sharded_state_dict(
        _model_sharded_state(model_chunks), is_loading=False,
        metadata=_optimizer_metadata(optimizer_format),
    )
    background = async_queue is not None
    model_request = dist_checkpointing.save(
        _model_sharded_state(model_chunks), str(tmp / weights.MODEL_SUBDIR), async_sharded_save=background)
    optimizer_request = dist_checkpointing.save(
        optimizer_state, str(tmp / OPTIMIZER_SUBDIR), async_sharded_save=background)

    def publish() -> None:
        _barrier()
        broken = _unloadable_parts(tmp) if _rank() == 0 else []
        if broken:
            # Never point `latest` at a checkpoint a resume would fail on; the run goes on
            # and the next save tries again.
            log.error("Checkpoint of step %d is NOT published: %s. It stays in %s for inspection; "
                      "`latest` still names the previous checkpoint.", step, "; ".join(broken), tmp)
        elif _rank() == 0:
            if final.exists():  # a checkpoint of this step from an earlier, interrupted attempt
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(Path(save_dir) / LATEST_FILE, final.name + "\n")
            removed = prune_checkpoints(save_dir, keep_last)
            log.info(
                "Saved checkpoint of step %d (%.1f s after it started)%s", step,
                time.monotonic() - started,
                f"; removed old checkpoints: {', '.join(removed)}" if removed else "",
            )
        _barrier()

    if background:
        request = _one_after_the_other(model_request, optimizer_request)
        request.add_finalize_fn(publish)  # after both writes and their metadata, on every rank
        async_queue.schedule_async_request(request)
    else:
        publish()
    return final


def _unloadable_parts(directory: Path) -> list[str]:
    """What would make the distributed checkpoints in ``directory`` fail to load: a stored
    chunk that their metadata lists but whose bytes it does not locate."""
    from torch.distributed.checkpoint import FileSystemReader

    problems = []
    for sub in (weights.MODEL_SUBDIR, OPTIMIZER_SUBDIR):
        try:
            metadata = FileSystemReader(str(directory / sub)).read_metadata()
        except Exception as err:  # reported, not raised: the other ranks wait at a barrier
            problems.append(f"{sub}/.metadata cannot be read ({type(err).__name__}: {err})")
            continue
        located = {(index.fqn, tuple(index.offset or ())) for index in metadata.storage_data}
        unlocated = sorted(
            (key, list(chunk.offsets)) for key, item in metadata.state_dict_metadata.items()
            for chunk in getattr(item, "chunks", ()) if (key, tuple(chunk.offsets)) not in located
        )
        if unlocated:
            key, offsets = unlocated[0]
            problems.append(f"{sub}/.metadata lists {len(unlocated)} stored chunk(s) it does not locate "
                            f"(first: {key} at offset {offsets})")
    return problems


def _one_after_the_other(first, second):
    """One Megatron-Core async request that writes ``first`` and then ``second`` and
    finalizes them in the same order.

    Megatron-Core's async writers hand their results to the finalization through a single
    queue per process, and each finalization takes the next result from it. Two requests
    in flight at once may finish in either order and then swap results: a checkpoint whose
    metadata lists the other checkpoint's tensors, which cannot be loaded (seen here as the
    optimizer state of a TP=2 save listing the model's tensors). In one request the writes
    run one after the other in the same background process, so the results arrive in order.
    """
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

    def staged_args(request) -> list:
        args = list(request.async_fn_args)
        if request.preload_fn is not None:
            args[1] = request.preload_fn()  # Megatron-Core's convention: the write buckets
        return args

    def write_both(_rank, staged, _results_queue) -> None:
        for request, args in zip((first, second), staged):
            if request.async_fn is not None:
                request.async_fn(*args, **request.async_fn_kwargs)

    # The caller stages (preloads) the tensors when it schedules the request, before the
    # background process starts, as it would for each request alone.
    return AsyncRequest(write_both, (None, None, None), list(first.finalize_fns) + list(second.finalize_fns),
                        preload_fn=lambda: [staged_args(first), staged_args(second)])


def prune_checkpoints(save_dir: str | Path, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the latest one)."""
    if keep_last <= 0:
        return []
    save_dir = Path(save_dir)
    steps = sorted(
        int(m.group(1)) for p in save_dir.iterdir()
        if p.is_dir() and (m := _ITER_PATTERN.match(p.name))
    )
    removed = []
    for step in steps[:-keep_last]:
        path = iteration_dir(save_dir, step)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer real per-parameter state before a checkpoint is loaded into it.

    Megatron-Core's distributed optimizer reads Adam's per-parameter ``step`` while building
    the state dict to load into; without Apex or Transformer Engine (torch's Adam: the CPU
    path) a never-stepped optimizer has none and it fails. One step with zero gradients and
    a learning rate of zero creates the state without changing any weight; the load then
    overwrites all of it.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        if torch_optimizer is None or len(torch_optimizer.state) > 0:
            continue
        saved_lrs = []
        for group in torch_optimizer.param_groups:
            saved_lrs.append(group["lr"])
            group["lr"] = 0.0
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        torch_optimizer.step()
        torch_optimizer.zero_grad(set_to_none=True)
        for group, lr in zip(torch_optimizer.param_groups, saved_lrs):
            group["lr"] = lr


def _distributed_optimizers_on_torch_adam(optimizer) -> list:
    """Megatron-Core distributed optimizers in ``optimizer`` that run torch's own Adam(W)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [
        inner for inner in getattr(optimizer, "chained_optimizers", [optimizer])
        if isinstance(inner, DistributedOptimizer)
        and isinstance(getattr(inner, "optimizer", None), (torch.optim.Adam, torch.optim.AdamW))
    ]


def _load_optimizer_state(optimizer, loaded: dict) -> None:
    """``optimizer.load_state_dict(loaded)``, with two fixes for torch's Adam (no Apex/TE).

    Megatron-Core's fully reshardable loader copies every per-parameter state entry of the
    destination, but torch's Adam keeps its ``step`` there (Apex/TE keep it in the param
    groups) and the loaded entries carry none: the copy fails with KeyError 'step'. And it
    restores ``step`` as ONE tensor shared by all parameters, which torch's Adam then
    increments once per parameter per step (wrong bias correction after a resume). On this
    path each parameter's entry is completed with its own step, and the step tensors are
    unshared after loading. GPU runs with Transformer Engine or Apex never take this path.
    """
    patched = []
    for dist_opt in _distributed_optimizers_on_torch_adam(optimizer):
        original = dist_opt._set_main_param_and_optimizer_states

        def with_step(model_param, tensors, _opt=dist_opt, _original=original):
            group_index, group_order = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[group_index]["params"][group_order]
            step = _opt.optimizer.state[main_param].get("step")
            if step is not None and "step" not in tensors:
                tensors = {**tensors, "step": step.detach().clone()}
            return _original(model_param, tensors)

        dist_opt._set_main_param_and_optimizer_states = with_step
        patched.append(dist_opt)
    try:
        optimizer.load_state_dict(loaded)
    finally:
        for dist_opt in patched:
            del dist_opt._set_main_param_and_optimizer_states
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        if isinstance(torch_optimizer, torch.optim.Optimizer):
            for state in torch_optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].detach().clone()


def load_checkpoint(
    directory: str | Path,
    model_chunks: list,
    optimizer=None,
    optimizer_format: str = "fully_reshardable",
    restore_rng_for_layout: Optional[str] = None,
) -> TrainState:
    """Load weights (and the optimizer state and RNG when asked) saved at any layout.

    ``optimizer=None`` loads weights only. RNG states are restored only when
    ``restore_rng_for_layout`` equals the layout the checkpoint was saved at.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    directory = Path(directory)
    state = read_train_state(directory) if is_training_checkpoint(directory) else TrainState()
    model_path = directory / weights.MODEL_SUBDIR
    if not model_path.is_dir():
        raise FileNotFoundError(f"no model weights at {model_path}")
    if optimizer is not None:
        optimizer_path = directory / OPTIMIZER_SUBDIR
        if not optimizer_path.is_dir():
            raise FileNotFoundError(f"no optimizer state at {optimizer_path}")
        _materialize_optimizer_state(optimizer)
        optimizer_state = optimizer.sharded_state_dict(
            _model_sharded_state(model_chunks), is_loading=True,
            metadata=_optimizer_metadata(optimizer_format),
        )
        loaded = dist_checkpointing.load(optimizer_state, str(optimizer_path), strict=StrictHandling.RAISE_ALL)
        _load_optimizer_state(optimizer, loaded)
    loaded = dist_checkpointing.load(_model_sharded_state(model_chunks), str(model_path), strict=StrictHandling.RAISE_ALL)
    chunks = [unwrap(c) for c in model_chunks]
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded)
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded[f"model{i}"])

    if restore_rng_for_layout is not None:
        rng_file = directory / RNG_SUBDIR / f"rank_{_rank():05d}.pt"
        if state.layout == restore_rng_for_layout and rng_file.is_file():
            _restore_rng(torch.load(rng_file, weights_only=False))
        elif _rank() == 0:
            log.info(
                "Random-number states not restored: the checkpoint was saved at layout %s, this job "
                "runs at %s (they are per-rank); generators stay seeded from the run's seed.",
                state.layout or "unknown", restore_rng_for_layout,
            )
    return state
