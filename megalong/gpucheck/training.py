"""Short training runs through megalong's own Trainer, for the checks that train."""

from __future__ import annotations

import dataclasses

import torch

from megalong.model.config import ModelConfig


def run_config(model: ModelConfig, *, seq_length: int, steps: int, global_batch: int, micro_batch: int,
               lr: float, initial_weights: str | None, parallel: dict | None = None, device: str = "cuda",
               warmup_steps: int | None = None, decay: str = "cosine", loss_chunk_tokens: int = 0,
               clip_grad: float = 1.0):
    """A RunConfig for ``steps`` steps of ``model`` (fields as the YAML recipes spell them)."""
    from megalong.config.loader import from_dict
    from megalong.training.config import RunConfig

    model_fields = {k: v for k, v in dataclasses.asdict(model).items() if v is not None}
    return from_dict(RunConfig, {
        "name": "gpu-check",
        "model": model_fields,
        "parallel": parallel or {},
        "data": {"seq_length": seq_length},
        "optimizer": {"lr": lr, "min_lr": lr / 10, "weight_decay": 0.1, "clip_grad": clip_grad},
        "schedule": {"train_steps": steps, "global_batch_size": global_batch, "micro_batch_size": micro_batch,
                     "lr_warmup_steps": max(1, steps // 10) if warmup_steps is None else warmup_steps,
                     "lr_decay_style": decay},
        "loss": {"chunk_tokens": loss_chunk_tokens},
        "init": {"weights": initial_weights},
        "logging": {"log_interval": 1_000_000},
        "runtime": {"device": device},
    }, "gpu_check")


def start_trainer(run, runtime, samples: list):
    """megalong's Trainer for ``run``, set up, training on ``samples`` in order (cycling)."""
    from megalong.training.batches import FixedSampleStream
    from megalong.training.trainer import Trainer

    stream = FixedSampleStream(samples, run.schedule.global_batch_size, runtime.data_parallel_size,
                               "packed samples (gpu_check)")
    return Trainer(run, runtime, stream=stream).setup()


@torch.no_grad()
def mean_loss(model, micro_batches: list) -> float:
    """Token-averaged loss over ``micro_batches`` (forward only; FP8 models compute in FP8)."""
    from megalong.training.loss import masked_loss_sum

    was_training = model.training
    model.eval()
    total = count = 0.0
    for mb in micro_batches:
        per_token = model(mb.tokens, mb.position_ids, None, labels=mb.labels, packed_seq_params=mb.packed_seq_params)
        loss_sum, tokens, _ = masked_loss_sum(mb.loss_mask, per_token)
        total += float(loss_sum)
        count += float(tokens)
    model.train(was_training)
    return total / count


def free_gpu_memory() -> None:
    """After the caller dropped its references: collect, and hand cached blocks back to CUDA."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
