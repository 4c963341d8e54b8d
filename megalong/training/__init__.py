"""Training: configuration, loop, loss, optimizer and schedule, checkpoints, signals, metrics."""

from megalong.training.config import RunConfig
from megalong.training.signals import REQUEUE_EXIT_CODE


def preflight(run: RunConfig, world_size: int | None = None):
    """Everything checked before a process group, model or data exists: the recipe
    (:meth:`RunConfig.validate`), this Megatron-Core (async saving, tested versions) and what
    this machine's kernels can run. Returns ``(launch, model, device)``; ``world_size``
    overrides the launcher's (``megalong train --check --world-size``)."""
    import dataclasses

    from megalong import compat
    from megalong.model.backends import check_for_machine
    from megalong.runtime.distributed import read_launch_env, resolve_device, set_cuda_device_max_connections

    set_cuda_device_max_connections(run.parallel)  # before anything creates a CUDA context
    launch = read_launch_env()
    if world_size is not None:
        launch = dataclasses.replace(launch, world_size=world_size)
    model = run.validate(launch.world_size)
    # Here, not in validate: `megalong submit` validates on a login node, whose Megatron-Core
    # may not be the one the job runs with.
    compat.check_for_training(run.checkpoint.async_save, log_warning=launch.rank == 0)
    device = resolve_device(run.runtime.device)
    check_for_machine(model, run.parallel, on_gpu=device == "cuda")
    return launch, model, device


def train(run: RunConfig, stream=None) -> int:
    """Start the distributed runtime for ``run``, train, and return the exit code.

    :func:`preflight` runs first, before any process group, model or data exists. ``stream``
    (optional) replaces the one built from ``run.data``: a
    :class:`megalong.training.batches.TrainingStream`.
    """
    from megalong.runtime.distributed import init_distributed
    from megalong.training.trainer import Trainer

    _, _, device = preflight(run)
    runtime = init_distributed(run.parallel, device=device, timeout_minutes=run.runtime.distributed_timeout_minutes)
    return Trainer(run, runtime, stream=stream).setup().fit()


__all__ = ["REQUEUE_EXIT_CODE", "RunConfig", "preflight", "train"]
