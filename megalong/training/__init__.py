"""Training: configuration, loop, loss, optimizer and schedule, checkpoints, signals, metrics."""

from megalong.training.config import RunConfig
from megalong.training.signals import REQUEUE_EXIT_CODE


def train(run: RunConfig, stream=None) -> int:
    """Start the distributed runtime for ``run``, train, and return the exit code.

    The configuration is validated first (:meth:`RunConfig.validate`), before any process
    group, model or data exists. ``stream`` (optional) replaces the one built from
    ``run.data``: a :class:`megalong.training.batches.TrainingStream`.
    """
    from megalong.runtime.distributed import init_distributed, read_launch_env
    from megalong.training.trainer import Trainer

    run.validate(read_launch_env().world_size)
    runtime = init_distributed(
        run.parallel, device=run.runtime.device, timeout_minutes=run.runtime.distributed_timeout_minutes
    )
    return Trainer(run, runtime, stream=stream).setup().fit()


__all__ = ["REQUEUE_EXIT_CODE", "RunConfig", "train"]
