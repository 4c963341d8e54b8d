"""AdamW, the learning-rate schedule and Megatron DDP, all from Megatron-Core.

megalong only translates its recipe sections into Megatron-Core's own objects:
``DistributedDataParallel`` (gradient buckets, optional overlap of the reduce with the
backward pass), ``get_megatron_optimizer`` (AdamW with decoupled weight decay, global
grad-norm clipping, optionally the distributed optimizer that shards its state over DP)
and ``OptimizerParamScheduler`` (linear warmup, cosine decay to ``min_lr``).
"""

from __future__ import annotations

import contextlib

import torch

from megalong.training.config import RunConfig


def wrap_with_ddp(model_chunks: list, run: RunConfig) -> list:
    """Wrap each model chunk in Megatron-Core DDP (gradients in contiguous fp32 buffers)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.utils import get_model_config

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=run.runtime.overlap_grad_reduce,
        overlap_param_gather=run.runtime.overlap_param_gather,
        # With several chunks the interleaved schedule starts the gathers (Trainer.setup sets
        # param_sync_func); a bucket's forward hook then only waits for its own.
        align_param_gather=run.runtime.overlap_param_gather and len(model_chunks) > 1,
        bucket_size=run.runtime.ddp_bucket_size,
        use_distributed_optimizer=run.parallel.distributed_optimizer,
        # Per-token loss: gradients are summed, then divided by the global token count.
        average_in_collective=False,
        check_for_nan_in_grad=True,
    )
    config = get_model_config(model_chunks[0])
    return [
        DistributedDataParallel(
            config=config,
            ddp_config=ddp_config,
            module=chunk,
            # Only the first chunk buckets its gradients (as Megatron-LM does).
            disable_bucketing=index > 0,
        )
        for index, chunk in enumerate(model_chunks)
    ]


def build_optimizer(model_chunks: list, run: RunConfig):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    params_dtype = torch.bfloat16 if run.model.params_dtype == "bf16" else torch.float32
    config = OptimizerConfig(
        optimizer="adam",
        lr=run.optimizer.lr,
        min_lr=run.optimizer.min_lr,
        weight_decay=run.optimizer.weight_decay,
        adam_beta1=run.optimizer.adam_beta1,
        adam_beta2=run.optimizer.adam_beta2,
        adam_eps=run.optimizer.adam_eps,
        clip_grad=run.optimizer.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        params_dtype=params_dtype,
        use_distributed_optimizer=run.parallel.distributed_optimizer,
        overlap_param_gather=run.runtime.overlap_param_gather,
        decoupled_weight_decay=True,
    )
    return get_megatron_optimizer(config, model_chunks)


def build_scheduler(optimizer, run: RunConfig):
    """Warmup then decay, counted in optimizer steps."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    steps = run.schedule.train_steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=run.optimizer.lr,
        min_lr=run.optimizer.min_lr,
        lr_warmup_steps=run.schedule.warmup_steps(),
        lr_decay_steps=steps,
        lr_decay_style=run.schedule.lr_decay_style,
        start_wd=run.optimizer.weight_decay,
        end_wd=run.optimizer.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
        # On resume the checkpoint's schedule wins; a new stage builds a fresh one instead.
        use_checkpoint_opt_param_scheduler=True,
    )


def current_lr(optimizer) -> float:
    for group in optimizer.param_groups:
        return float(group["lr"])
    return 0.0


@contextlib.contextmanager
def hyperparameters_kept(optimizer):
    """Keep this run's optimizer hyperparameters through a load of another run's optimizer state.

    Megatron-Core's parameter groups carry the run's learning rates (``max_lr``, ``min_lr``,
    which its LR scheduler reads) next to torch's own (``lr``, ``betas``, ``eps``,
    ``weight_decay``), and loading a state dict replaces the groups' values with the saved
    run's. A new stage that carries the previous stage's Adam moments (ProLong's stage 2,
    ``init.load_optimizer: true``) would then follow the previous stage's schedule: stage 2's
    5e-6 silently replaced by stage 1's 1e-5. What carries over is the per-parameter state
    (the moments, and the step count, which Apex's and TE's Adam keep in the group: it is
    left as loaded); every other group value is set back to this run's.
    """
    configured = [{k: v for k, v in group.items() if k not in ("params", "step")} for group in optimizer.param_groups]
    yield
    groups = optimizer.param_groups
    if len(groups) != len(configured):
        raise RuntimeError(f"the loaded optimizer state has {len(groups)} parameter groups, this run {len(configured)}")
    for group, values in zip(groups, configured):
        group.update(values)
