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
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megalong import compat
from megalong.checkpoint import layout, weights
from megalong.checkpoint.layout import MODEL_SUBDIR, OPTIMIZER_SUBDIR, RNG_SUBDIR, RUN_CONFIG_FILE, TRAIN_STATE_FILE
from megalong.config.loader import dump_yaml
from megalong.runtime import torch_adam

log = logging.getLogger(__name__)


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


def unwrap(chunk):
    """The GPTModel inside a Megatron DDP wrapper."""
    from megatron.core.distributed import DistributedDataParallel

    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


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


def _rng_state(on_gpu: bool) -> dict:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if on_gpu:
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(state: dict, on_gpu: bool) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and on_gpu:
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
    on_gpu: bool = False,
) -> Path:
    """Save a complete training checkpoint (collective: every rank calls it).

    ``on_gpu`` (the runtime's answer) adds the CUDA generator to the saved RNG states.

    With ``async_queue`` (Megatron-Core's ``AsyncCallsQueue``) the model and optimizer
    tensors are written in the background; the checkpoint is renamed into place and
    ``latest`` updated when the queue finalizes the write (``maybe_finalize_async_calls``).
    """
    from megatron.core import dist_checkpointing

    started = time.monotonic()
    step = state.step  # the state object moves on while a background write runs
    final = layout.iteration_dir(save_dir, step)
    tmp = layout.staging_dir(final)
    if _rank() == 0:
        log.info("Saving checkpoint of step %d to %s%s ...", step, final,
                 " in the background" if async_queue is not None else "")
        if tmp.exists():
            shutil.rmtree(tmp)  # a leftover of a job killed while saving
        for sub in (MODEL_SUBDIR, OPTIMIZER_SUBDIR, RNG_SUBDIR):
            (tmp / sub).mkdir(parents=True)
    _barrier()

    # Small files first, synchronously (their content is fixed now).
    torch.save(_rng_state(on_gpu), tmp / RNG_SUBDIR / f"rank_{_rank():05d}.pt")
    if _rank() == 0:
        layout.write_model_config(tmp, model_config)
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
    # In the background: Megatron-Core's own writer, whichever release (megalong.compat).
    writer = compat.async_save_kwargs() if background else {}
    model_request = dist_checkpointing.save(
        _model_sharded_state(model_chunks), str(tmp / MODEL_SUBDIR), async_sharded_save=background, **writer)
    optimizer_request = dist_checkpointing.save(
        optimizer_state, str(tmp / OPTIMIZER_SUBDIR), async_sharded_save=background, **writer)

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
            layout.write_latest(save_dir, final)
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
    for sub in (MODEL_SUBDIR, OPTIMIZER_SUBDIR):
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
    removed = []
    for path in layout.iterations(save_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def load_checkpoint(
    directory: str | Path,
    model_chunks: list,
    optimizer=None,
    optimizer_format: str = "fully_reshardable",
    restore_rng_for_layout: Optional[str] = None,
    on_gpu: bool = False,
) -> TrainState:
    """Load weights (and the optimizer state and RNG when asked) saved at any layout.

    ``optimizer=None`` loads weights only. RNG states are restored only when
    ``restore_rng_for_layout`` equals the layout the checkpoint was saved at.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    directory = Path(directory)
    state = read_train_state(directory) if layout.is_training_checkpoint(directory) else TrainState()
    model_path = directory / MODEL_SUBDIR
    if not model_path.is_dir():
        raise FileNotFoundError(f"no model weights at {model_path}")
    if optimizer is not None:
        optimizer_path = directory / OPTIMIZER_SUBDIR
        if not optimizer_path.is_dir():
            raise FileNotFoundError(f"no optimizer state at {optimizer_path}")
        weights.refuse_unreadable(optimizer_path)
        torch_adam.materialize_state(optimizer)
        optimizer_state = optimizer.sharded_state_dict(
            _model_sharded_state(model_chunks), is_loading=True,
            metadata=_optimizer_metadata(optimizer_format),
        )
        loaded = dist_checkpointing.load(optimizer_state, str(optimizer_path), strict=StrictHandling.RAISE_ALL)
        torch_adam.load_state_dict(optimizer, loaded)
    weights.load_model_state([unwrap(c) for c in model_chunks], model_path)

    if restore_rng_for_layout is not None:
        rng_file = directory / RNG_SUBDIR / f"rank_{_rank():05d}.pt"
        if state.layout == restore_rng_for_layout and rng_file.is_file():
            _restore_rng(torch.load(rng_file, weights_only=False), on_gpu)
        elif _rank() == 0:
            log.info(
                "Random-number states not restored: the checkpoint was saved at layout %s, this job "
                "runs at %s (they are per-rank); generators stay seeded from the run's seed.",
                state.layout or "unknown", restore_rng_for_layout,
            )
    return state
