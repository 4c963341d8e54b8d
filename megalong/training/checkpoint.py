"""Training checkpoints: everything needed to continue a run exactly where it stopped.

Layout of ``<save_dir>/iter_0001000/`` (a superset of a weights directory, so
``megalong convert`` and ``megalong eval`` take it directly)::

    model/             the model weights (Megatron-Core dist checkpoint; any TP/PP/CP/DP)
    model.yaml         the resolved ModelConfig
    optimizer/         the optimizer state (dist checkpoint; the distributed optimizer's in one of
                       the formats of OPTIMIZER_FORMATS, recorded in the checkpoint: see
                       save_format for which save gets which)
    rng/rank_*.pt      each rank's random-number generator states
    train_state.json   step, samples and tokens consumed, where each data domain's shuffle began
                       and stands (with the step, the data position: the stream is deterministic
                       in them), LR-schedule state, the layout it was saved at, the stages that
                       made the weights
    run.yaml           the resolved RunConfig of the run that saved it
    checksums.json     size and CRC-32 of every file above (megalong.checkpoint.checksums)

Writes are atomic: everything goes to ``iter_XXXXXXX.tmp`` and is renamed into place
once every rank has finished and the checksums are recorded; only then does the ``latest``
marker (itself written to a temporary file and renamed) point at it, and checkpoints beyond
``keep_last`` are removed. A job killed at any moment leaves either the previous checkpoint
or the new one. A write that fails (a full disk, a quota) raises :class:`CheckpointError` on
every rank after removing the staging directory: ``latest`` still names the previous
checkpoint. Before a checkpoint is loaded, :func:`verify_checkpoint` compares its files with
the recorded checksums, so a file damaged later is named instead of loaded.
"""

from __future__ import annotations

import contextlib
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
import torch.distributed.checkpoint.api

from megalong import compat
from megalong.checkpoint import checksums, layout, weights
from megalong.checkpoint.layout import MODEL_SUBDIR, OPTIMIZER_SUBDIR, RNG_SUBDIR, RUN_CONFIG_FILE, TRAIN_STATE_FILE
from megalong.config.loader import dump_yaml
from megalong.runtime import torch_adam
from megalong.training.optimizer import align_param_groups

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written, or that is damaged; the message names the
    file and what became of ``latest``."""


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
    # Per data domain, where its shuffle began and where it stands (megalong.data.positions):
    # what a resume restores, and where a later stage sharing the domain goes on from.
    data_positions: dict = field(default_factory=dict)
    # The stages that made these weights, oldest first, this run last (megalong.checkpoint.lineage).
    stages: list = field(default_factory=list)


def unwrap(chunk):
    """The GPTModel inside a Megatron DDP wrapper."""
    from megatron.core.distributed import DistributedDataParallel

    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _from_every_rank(value) -> list:
    """``value`` of every rank, on every rank (a collective)."""
    if not torch.distributed.is_initialized():
        return [value]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _from_rank0(value):
    """Rank 0's ``value``, on every rank (a collective; a broadcast, so each rank receives one
    copy rather than one per rank)."""
    if not torch.distributed.is_initialized():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def read_train_state(directory: str | Path) -> TrainState:
    path = Path(directory) / TRAIN_STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise FileNotFoundError(f"cannot read {path}: {err}") from None
    return TrainState(**data)


def _model_sharded_state(model_chunks: list) -> dict:
    return weights.sharded_model_state([unwrap(c) for c in model_chunks])


# How the distributed optimizer lays its state out in ``optimizer/`` (Megatron-Core's
# ``distrib_optim_*`` metadata of ``DistributedOptimizer.sharded_state_dict``). Measured on the
# CPU in benchmarks/checkpoint_memory.py; what a user gives up with each: docs/train.md.
OPTIMIZER_FORMATS = {
    # Each rank writes and reads its own shard of the fp32 weights and Adam moments as it lies
    # in the optimizer's buffers: no gathering, host memory near that shard, every rank writes
    # in parallel. Loads only at the same tensor- and pipeline-parallel sizes (and virtual
    # pipeline), at any data- or context-parallel size.
    "dp_reshardable": {"distrib_optim_sharding_type": "dp_reshardable"},
    # The state in the model's own shapes, which loads at any layout. Saving gathers the
    # state of each TP x PP shard on its first data-parallel rank (over gloo: the
    # memory-efficient mode; the default mode gathers it on every rank), which writes it;
    # loading reads the whole TP x PP shard's state on every rank and keeps its share.
    "fully_reshardable": {"distrib_optim_sharding_type": "fully_reshardable",
                          "distrib_optim_fully_reshardable_mem_efficient": True},
}
# What optimizer/ of a checkpoint without recorded metadata holds (megalong wrote only this
# format before it recorded which).
_UNRECORDED_FORMAT = "fully_reshardable"


def save_format(configured: str, step: int, train_steps: int) -> str:
    """The optimizer format of the save of ``step``: the configured one, or with "auto" (the
    default) ``fully_reshardable`` for the save of the run's last step (the stage's output,
    what a next stage or a resume at another layout loads) and ``dp_reshardable`` for the
    others (periodic, or on a stop signal: resumed by the same job at the same layout), whose
    host memory stays near each rank's own shard."""
    if configured != "auto":
        return configured
    return "fully_reshardable" if step >= train_steps else "dp_reshardable"


def _optimizer_metadata(optimizer_format: str) -> dict:
    return {**OPTIMIZER_FORMATS[optimizer_format], "chained_optim_avoid_prefix": True}


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(inner, DistributedOptimizer)
               for inner in getattr(optimizer, "chained_optimizers", [optimizer]))


def saved_optimizer_format(directory: str | Path) -> str:
    """The format ``optimizer/`` of the checkpoint ``directory`` was saved in (recorded in its
    metadata; checkpoints that do not record it are fully reshardable)."""
    from megatron.core import dist_checkpointing

    saved = dist_checkpointing.load_content_metadata(str(Path(directory) / OPTIMIZER_SUBDIR)) or {}
    return saved.get("distrib_optim_sharding_type", _UNRECORDED_FORMAT)


def _parallel_sizes(layout_tag: str) -> dict:
    """{"tp": 2, "pp": 1, ...} of a TrainState.layout tag "tp2,pp1,cp1,dp4,vp1"."""
    sizes = {}
    for part in layout_tag.split(","):
        name = part.rstrip("0123456789")
        if name and part[len(name):]:
            sizes[name] = int(part[len(name):])
    return sizes


def _refuse_unreshardable(directory: Path, saved_layout: str, model_chunks: list) -> None:
    """A dp_reshardable optimizer state loads only at the TP, PP and virtual-pipeline sizes it
    was saved at; elsewhere Megatron-Core fails with a bare assertion. Say it in words."""
    from megatron.core import parallel_state as ps

    saved = _parallel_sizes(saved_layout)
    here = {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "vp": len(model_chunks)}
    differ = [name for name in here if name in saved and saved[name] != here[name]]
    if not differ:
        return
    names = {"tp": "tensor_parallel", "pp": "pipeline_parallel", "vp": "virtual_pipeline"}
    raise CheckpointError(
        f"{directory / OPTIMIZER_SUBDIR} holds the distributed optimizer's state in the dp_reshardable format "
        f"(a periodic or stop-signal save; saved at {saved_layout}), which loads only at the same "
        f"{', '.join(names[n] for n in here)} (any data- or context-parallel size); this job has "
        + ", ".join(f"{names[n]}={here[n]} (saved: {saved[n]})" for n in differ)
        + ". Resume at the saved sizes; or continue from a fully reshardable checkpoint (the save of a run's last "
        "step is one; checkpoint.optimizer_format=fully_reshardable makes every save one); or start a new stage "
        f"from its weights with a fresh optimizer (init.weights={directory} init.load_optimizer=false).")


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

    ``optimizer_format`` (a key of :data:`OPTIMIZER_FORMATS`; :func:`save_format` chooses it)
    is how the distributed optimizer writes its state, recorded in the checkpoint; a
    non-distributed optimizer's state is always in the model's shapes (fully reshardable).
    ``on_gpu`` (the runtime's answer) adds the CUDA generator to the saved RNG states.

    With ``async_queue`` (Megatron-Core's ``AsyncCallsQueue``) the model and optimizer
    tensors are written in the background; the checkpoint is renamed into place and
    ``latest`` updated when the queue finalizes the write (``maybe_finalize_async_calls``),
    which is also where a failed background write raises :class:`CheckpointError`.
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

    def abandon(what: str) -> None:
        """Stop with an error that says what failed; nothing of this save is kept or published."""
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space a full disk needs back
        raise CheckpointError(
            f"Checkpoint of step {step} could not be written to {tmp}: {what}{_write_conditions(tmp.parent)}. "
            f"Its partial files were removed and nothing was published: {_latest_description(save_dir)}. "
            f"Training stops here; once the cause is fixed, rerunning resumes from that checkpoint."
        )

    # Small files first, synchronously (their content is fixed now). Each rank writes its own
    # RNG file: every rank learns whether all of them succeeded before any goes on.
    try:
        torch.save(_rng_state(on_gpu), tmp / RNG_SUBDIR / f"rank_{_rank():05d}.pt")
        if _rank() == 0:
            layout.write_model_config(tmp, model_config)
            (tmp / RUN_CONFIG_FILE).write_text(dump_yaml(run_config), encoding="utf-8")
            state.saved_at = time.time()
            (tmp / TRAIN_STATE_FILE).write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
        failure = None
    except OSError as err:
        failure = f"rank {_rank()}: {err}"
    failures = [f for f in _from_every_rank(failure) if f]
    if failures:
        abandon("; ".join(failures))

    # dist_checkpointing.save consumes the state dict it is given: the optimizer's sharded
    # state (built from the model's) gets a model state dict of its own.
    if not _is_distributed(optimizer):
        optimizer_format = _UNRECORDED_FORMAT
    metadata = _optimizer_metadata(optimizer_format)
    optimizer_state = optimizer.sharded_state_dict(
        _model_sharded_state(model_chunks), is_loading=False, metadata=metadata)
    background = async_queue is not None
    # In the background: Megatron-Core's own writer, whichever release (megalong.compat).
    writer = compat.async_save_kwargs() if background else {}
    # A failed write raises on every rank: Megatron-Core gathers the writers' results and
    # broadcasts whether any failed (the failure itself is known on the coordinator, rank 0).
    try:
        model_request = dist_checkpointing.save(
            _model_sharded_state(model_chunks), str(tmp / MODEL_SUBDIR), async_sharded_save=background, **writer)
        optimizer_request = dist_checkpointing.save(
            optimizer_state, str(tmp / OPTIMIZER_SUBDIR), async_sharded_save=background,
            content_metadata=metadata, **writer)
    except _WRITE_FAILURES as err:
        abandon(_reason(err))

    def publish() -> None:
        failure = _record_checksums(tmp)
        if failure:
            abandon(failure)
        broken = _unloadable_parts(tmp) if _rank() == 0 else []
        if broken:
            # Never point `latest` at a checkpoint a resume would fail on; the run goes on
            # and the next save tries again.
            log.error("Checkpoint of step %d is NOT published: %s. It stays in %s for inspection; "
                      "`latest` still names the previous checkpoint.", step, "; ".join(broken), tmp)
        elif _rank() == 0:
            try:
                if final.exists():  # a checkpoint of this step from an earlier, interrupted attempt
                    shutil.rmtree(final)
                os.replace(tmp, final)
                layout.write_latest(save_dir, final)
            except OSError as err:
                failure = str(err)
        failure = _from_rank0(failure)  # rank 0's outcome, and a barrier: the rename is done
        if failure:
            raise CheckpointError(
                f"Checkpoint of step {step} was written but could not be published: {failure}"
                f"{_write_conditions(tmp.parent)}. {_latest_description(save_dir)}; training stops here."
            )
        if _rank() == 0 and not broken:
            removed = prune_checkpoints(save_dir, keep_last)
            log.info(
                "Saved checkpoint of step %d (%.1f s after it started)%s", step,
                time.monotonic() - started,
                f"; removed old checkpoints: {', '.join(removed)}" if removed else "",
            )

    if background:
        write_finalizers = list(model_request.finalize_fns) + list(optimizer_request.finalize_fns)

        def finish_and_publish() -> None:  # on every rank, after both background writes
            try:
                for finalize in write_finalizers:
                    finalize()
            except _WRITE_FAILURES as err:
                abandon(_reason(err))
            publish()

        async_queue.schedule_async_request(_one_after_the_other(model_request, optimizer_request, finish_and_publish))
    else:
        publish()
    return final


def _record_checksums(tmp: Path) -> Optional[str]:
    """Write checksums.json into the staged checkpoint (collective): each rank checksums the
    files it wrote (:func:`megalong.checkpoint.checksums.owner`), rank 0 writes them all.
    Returns what failed, the same on every rank (None when all went well)."""
    world = _world_size()
    files = _from_rank0(checksums.checkpoint_files(tmp) if _rank() == 0 else None)
    try:
        mine, failure = checksums.records(tmp, [f for f in files if checksums.owner(f, world) == _rank()]), None
    except OSError as err:
        mine, failure = {}, f"rank {_rank()}: {err}"
    gathered = _from_every_rank((mine, failure))
    failure = "; ".join(f for _, f in gathered if f) or None
    if _rank() == 0 and failure is None:
        try:
            checksums.write(tmp, {name: record for part, _ in gathered for name, record in part.items()})
        except OSError as err:
            failure = f"rank 0: {err}"
    return _from_rank0(failure)


def verify_checkpoint(directory: str | Path) -> list[str]:
    """What makes the checkpoint ``directory`` unfit to load, one sentence per damaged file
    naming it (collective: each rank checks its share; every rank gets the same list).

    Its files are compared with the sizes and checksums recorded when it was published;
    a checkpoint without them (written by an earlier megalong, or a converted weights
    directory) is checked by loading only, which is logged.
    """
    directory = Path(directory)
    try:
        recorded = checksums.read(directory) if _rank() == 0 else None
        problem = None
    except ValueError as err:
        recorded, problem = None, str(err)
    recorded, problem = _from_rank0((recorded, problem))
    if problem:
        return [problem]
    if recorded is None:
        if _rank() == 0:
            log.info("%s has no %s (a converted weights directory, or a checkpoint of an earlier megalong): "
                     "not verified before loading", directory, layout.CHECKSUMS_FILE)
        return []
    world = _world_size()
    started = time.monotonic()
    mine = [f for f in recorded if checksums.owner(f, world) == _rank()]
    found = sorted(p for part in _from_every_rank(checksums.problems(directory, recorded, mine)) for p in part)
    if _rank() == 0 and not found:
        log.info("Verified %d files (%s bytes) of %s against their checksums in %.1f s", len(recorded),
                 f"{sum(r['bytes'] for r in recorded.values()):,}", directory.name, time.monotonic() - started)
    return found


# torch's CheckpointException (what dist_checkpointing raises for a failed write) derives
# from BaseException, not Exception.
_WRITE_FAILURES = (Exception, torch.distributed.checkpoint.api.CheckpointException)


def _reason(err: BaseException) -> str:
    """The underlying reason of a failed dist_checkpointing write or read, without its tracebacks."""
    if isinstance(err, torch.distributed.checkpoint.api.CheckpointException):
        reasons = []
        for rank, failure in sorted(err.failures.items()):
            cause = failure[0] if isinstance(failure, tuple) else failure
            while getattr(cause, "__cause__", None) is not None:
                cause = cause.__cause__
            reasons.append(f"rank {rank}: {type(cause).__name__}: {cause}".strip())
        return "; ".join(reasons) or "a write failed on another rank (rank 0's log says which)"
    return f"{type(err).__name__}: {err}"


def _write_conditions(directory: Path) -> str:
    """What usually makes a write fail, as this process sees it: free space, a file-size limit."""
    import resource

    notes = []
    try:
        notes.append(f"{shutil.disk_usage(directory).free / 2**30:,.2f} GiB free on that file system")
    except OSError:
        pass
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        notes.append(f"this process may not write files over {limit:,} bytes (ulimit -f)")
    return f" ({'; '.join(notes)})" if notes else ""


def _latest_description(save_dir: str | Path) -> str:
    target = layout.latest_target(save_dir)
    return f"`latest` still names {target.name}" if target is not None else "no checkpoint was published before"


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


def _one_after_the_other(first, second, finalize):
    """One Megatron-Core async request that writes ``first`` and then ``second``, then runs
    ``finalize`` (which runs their own finalizations in the same order).

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
    return AsyncRequest(write_both, (None, None, None), [finalize],
                        preload_fn=lambda: [staged_args(first), staged_args(second)])


def prune_checkpoints(save_dir: str | Path, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints up to the one ``latest``
    names (never that one). Checkpoints newer than ``latest`` (left when it was set back to an
    older one) are not counted and not deleted: the run replaces them as it reaches their steps."""
    if keep_last <= 0:
        return []
    latest = layout.latest_target(save_dir)
    newest = layout.iteration_step(latest) if latest is not None else None
    candidates = [p for p in layout.iterations(save_dir) if newest is None or layout.iteration_step(p) <= newest]
    removed = []
    for path in candidates[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def load_checkpoint(
    directory: str | Path,
    model_chunks: list,
    optimizer,
    load_optimizer_state: bool = True,
    restore_rng_for_layout: Optional[str] = None,
    on_gpu: bool = False,
    hyperparameters_of: str = "checkpoint",
) -> TrainState:
    """Load weights (and the optimizer state and RNG when asked) saved at any layout into
    ``model_chunks`` and ``optimizer``, the optimizer built over them.

    With ``load_optimizer_state=False`` (a new stage with a fresh optimizer) the optimizer's
    own copy of the weights is refreshed from the loaded ones. A mixed-precision optimizer
    (bf16 parameters) keeps fp32 master weights taken from the parameters when it was built
    and copies them into the model at every step (Megatron-Core's float16 and distributed
    optimizers alike): without the refresh, the first step would put the random
    initialization back, and the run would train from scratch with nothing in the log to
    say so. Megatron-LM calls the same ``reload_model_params`` whenever it loads weights
    without optimizer state. (An fp32 optimizer updates the parameters themselves: the
    refresh changes nothing there.) RNG states are restored only when
    ``restore_rng_for_layout`` equals the layout the checkpoint was saved at. The optimizer's
    hyperparameters (learning rates, betas, weight decay) after loading its state are the
    checkpoint's (``hyperparameters_of="checkpoint"``, a resume) or this run's (``"run"``, a new
    stage carrying the moments): :func:`megalong.training.optimizer.align_param_groups`. The optimizer
    state is read in the format the checkpoint records (:func:`saved_optimizer_format`); a
    dp_reshardable one at other TP / PP sizes is refused with the ways out.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    directory = Path(directory)
    state = read_train_state(directory) if layout.is_training_checkpoint(directory) else TrainState()
    model_path = directory / MODEL_SUBDIR
    if not model_path.is_dir():
        raise FileNotFoundError(f"no model weights at {model_path}")
    if load_optimizer_state:
        optimizer_path = directory / OPTIMIZER_SUBDIR
        if not optimizer_path.is_dir():
            raise FileNotFoundError(f"no optimizer state at {optimizer_path}")
        weights.refuse_unreadable(optimizer_path)
        optimizer_format = saved_optimizer_format(directory)
        if optimizer_format == "dp_reshardable":
            _refuse_unreshardable(directory, state.layout, model_chunks)
        torch_adam.materialize_state(optimizer)
        optimizer_state = optimizer.sharded_state_dict(
            _model_sharded_state(model_chunks), is_loading=True,
            metadata=_optimizer_metadata(optimizer_format),
        )
        with _naming_unreadable(optimizer_path):
            loaded = dist_checkpointing.load(optimizer_state, str(optimizer_path), strict=StrictHandling.RAISE_ALL)
        align_param_groups(optimizer, loaded, keep=hyperparameters_of)
        # Without autograd: Megatron-Core's dp_reshardable loader (core_v0.16.1 to 0.19) copies into
        # the fp32 master weights outside no_grad, which fails when they are views of fp32 model
        # parameters ("a view of a leaf Variable that requires grad is being used in an in-place
        # operation"); its fully reshardable loader is already decorated with no_grad.
        with torch.no_grad():
            torch_adam.load_state_dict(optimizer, loaded)
    with _naming_unreadable(model_path):
        weights.load_model_state([unwrap(c) for c in model_chunks], model_path)
    if not load_optimizer_state:
        optimizer.reload_model_params()

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


@contextlib.contextmanager
def _naming_unreadable(path: Path):
    """Turn torch's read failures (which name no file: a truncated one is a bare EOFError)
    into an error naming the checkpoint part; :func:`verify_checkpoint` names the file when
    checksums were recorded."""
    try:
        yield
    except torch.distributed.checkpoint.api.CheckpointException as err:
        raise CheckpointError(f"{path} cannot be loaded: {_reason(err)}") from err
