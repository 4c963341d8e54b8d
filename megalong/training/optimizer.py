"""AdamW, the learning-rate schedule and Megatron DDP, all from Megatron-Core.

megalong only translates its recipe sections into Megatron-Core's own objects:
``DistributedDataParallel`` (gradient buckets, optional overlap of the reduce with the
backward pass), ``get_megatron_optimizer`` (AdamW with decoupled weight decay, global
grad-norm clipping, optionally the distributed optimizer that shards its state over DP)
and ``OptimizerParamScheduler`` (linear warmup, cosine decay to ``min_lr``).
"""

from __future__ import annotations

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


# What defines a Megatron-Core parameter group besides its hyperparameters: two runs of the same
# model build the same groups, in the same order, with these the same.
_GROUP_IDENTITY = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


def align_param_groups(optimizer, loaded, keep: str) -> None:
    """Give the parameter groups of ``loaded`` (an optimizer state dict read from a checkpoint)
    and of ``optimizer`` the same hyperparameters before ``optimizer.load_state_dict(loaded)``:
    this run's (``keep="run"``: a new stage carrying the previous stage's Adam moments) or the
    checkpoint's (``keep="checkpoint"``: a resume, where the checkpoint's schedule wins).

    Megatron-Core's parameter groups carry the learning rates its scheduler reads (``max_lr``,
    ``min_lr``) next to torch's own (``lr``, ``betas``, ``eps``, ``weight_decay``), and a load
    replaces a group's values with the saved ones: a new stage would follow the previous
    stage's schedule (ProLong's stage 2 at stage 1's 1e-5 instead of its 5e-6). From 0.19 on,
    Megatron-Core also pairs saved and current groups by those values, so a stage whose
    learning rate differs could not load the moments at all (KeyError). Groups are paired by
    position (both runs build them in the same order from the same model), checked on what
    defines them (``_GROUP_IDENTITY``). The step count, which Apex's and TE's Adam keep in the
    group, is state, not a hyperparameter: it carries over as saved.
    """
    if keep not in ("run", "checkpoint"):
        raise ValueError(f"keep must be 'run' or 'checkpoint', not {keep!r}")
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(inners) == 1:
        saved_dicts = [loaded]
    else:
        saved_dicts = [loaded[k] for k in sorted(loaded)] if isinstance(loaded, dict) else list(loaded)
    for inner, saved_dict in zip(inners, saved_dicts):
        saved_groups = (saved_dict["optimizer"] if "optimizer" in saved_dict else saved_dict)["param_groups"]
        groups = inner.optimizer.param_groups
        if len(saved_groups) != len(groups):
            raise RuntimeError(f"the checkpoint's optimizer has {len(saved_groups)} parameter groups, this run's "
                               f"{len(groups)}: they were not built for the same model")
        for group, saved in zip(groups, saved_groups):
            if any(group.get(key) != saved.get(key) for key in _GROUP_IDENTITY):
                raise RuntimeError("the checkpoint's optimizer parameter groups do not pair with this run's: "
                                   + ", ".join(f"{key} {saved.get(key)} vs {group.get(key)}" for key in _GROUP_IDENTITY))
            target, source = (saved, group) if keep == "run" else (group, saved)
            target.update({k: v for k, v in source.items() if k not in ("params", "step")})
