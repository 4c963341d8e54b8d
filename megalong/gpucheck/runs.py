"""Building models and running them the way the trainer does, for the checks."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch

from megalong.config.parallel import ParallelConfig
from megalong.model.config import ModelConfig

SEED = 1234


def build(model: ModelConfig, ctx, parallel: Optional[ParallelConfig] = None, seed: int = SEED) -> list:
    """This rank's model chunks, initialised from ``seed`` (identical on every rank)."""
    from megalong.model.llama import build_model
    from megalong.runtime import set_seed

    set_seed(seed)
    return build_model(model, parallel or ParallelConfig(), on_gpu=ctx.on_gpu)


def save_fresh(chunks: list, directory: Path, model: ModelConfig) -> Path:
    """``save_weights`` into ``directory``, replacing what an earlier run of the checks left there."""
    from megalong.checkpoint.weights import save_weights

    if (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0) and directory.exists():
        shutil.rmtree(directory)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return save_weights(chunks, directory, model)


def micro_batch(samples, ctx, cp_size: int = 1, cp_rank: int = 0):
    """One micro-batch of all ``samples``, sharded for CP and moved to the device: the
    trainer's own MicroBatcher."""
    from megalong.training.batches import MicroBatcher

    return MicroBatcher(len(samples), cp_size, cp_rank, ctx.device).split(samples, 1)[0]


def step_forward(model, *args, **kwargs):
    """``model(*args, **kwargs)`` as the first micro-batch of a training step runs it.

    Megatron-Core's schedule calls ``set_is_first_microbatch()`` before a step's first
    micro-batch (``schedules.forward_step``): Transformer Engine's linears then quantize their
    weights to FP8 again, with the current scales. After that call they set the flag to False
    and reuse the cached FP8 weights (TE's ``is_first_microbatch=False``), so a forward run by
    hand without it would compute with weights quantized at their first call, at the initial
    scale 1.0, before any update or load. Every forward the checks run goes through here. A
    no-op without FP8.
    """
    model.set_is_first_microbatch()
    return model(*args, **kwargs)


def forward_loss(model, mb, cp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's share of the token-averaged loss, the global loss-token count), as the
    trainer computes them (masked sum of per-token losses over the tokens of all CP ranks)."""
    from megalong.training.loss import masked_loss_sum

    per_token = step_forward(model, mb.tokens, mb.position_ids, None, labels=mb.labels,
                             packed_seq_params=mb.packed_seq_params)
    loss_sum, count, _ = masked_loss_sum(mb.loss_mask, per_token)
    count = count.to(torch.float64)
    if cp_group is not None:
        torch.distributed.all_reduce(count, group=cp_group)
    return loss_sum / count, count


def loss_and_backward(model, mb, cp_group=None) -> float:
    """Forward and backward of one micro-batch; gradients summed over the CP group (what
    Megatron's DDP does), so every rank ends with the full gradients. Returns the loss."""
    loss, _ = forward_loss(model, mb, cp_group)
    loss.backward()
    value = loss.detach().to(torch.float64)
    if cp_group is not None:
        torch.distributed.all_reduce(value, group=cp_group)
        for param in model.parameters():
            summed = param.grad.float()  # summed in fp32, rounded once like an unsplit gradient
            torch.distributed.all_reduce(summed, group=cp_group)
            param.grad = summed.to(param.grad.dtype)
    return float(value)


@torch.no_grad()
def logits(model, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """fp32 CPU logits [S, vocab] of one sequence (plain causal attention), padded vocabulary cut."""
    device = next(model.parameters()).device
    ids = tokens.to(device)[None]
    positions = torch.arange(ids.shape[1], device=device)[None]
    return step_forward(model, ids, positions, None)[0, :, :vocab_size].float().cpu()


def core_attention(model):
    """The first layer's core attention module (megalong's DocumentAttention)."""
    return model.decoder.layers[0].self_attention.core_attention


def layer_implementation(model) -> str:
    """"transformer_engine" or "local", from the class of the first layer's QKV linear."""
    cls = type(model.decoder.layers[0].self_attention.linear_qkv)
    return "transformer_engine" if cls.__module__.startswith("megatron.core.extensions.transformer_engine") else "local"
