"""The training loss: token-averaged cross entropy over the whole global batch.

ProLong averages over every loss token of a global batch (sum of per-token losses over
all micro-batches, data-parallel and context-parallel ranks, divided by the number of
loss tokens), not a mean of per-sequence means. Megatron-Core does exactly that when
``TransformerConfig.calculate_per_token_loss`` is on (megalong's model builder sets it):
the forward step returns ``(loss_sum, num_tokens, report)``, the pipeline schedule adds
up the token counts, and ``finalize_model_grads`` all-reduces them over DP x CP and
divides the summed gradients by the total. :func:`masked_loss_sum` is that forward-step
half; :func:`global_token_average` turns the reports of one step into the logged loss.

Padded vocabulary. Megatron pads the vocabulary to a multiple of
``make_vocab_size_divisible_by x TP``; those extra logits are not tokens and must not take
probability mass. :func:`exclude_padded_vocab` makes the output chunk's cross entropy see
them at the lowest representable value (softmax weight exactly zero, gradient zero), so
the loss and its gradients equal a softmax over the real vocabulary only.
"""

from __future__ import annotations

import torch


def masked_loss_sum(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Megatron-Core loss_func: (sum of masked token losses, loss-token count, report).

    ``per_token_loss`` [B, S] comes from GPTModel called with labels; ``loss_mask`` [B, S]
    is 0 at each document's last token (no prediction across a boundary) and outside SFT
    assistant turns.
    """
    losses = per_token_loss.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().detach().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def global_token_average(reports: list, group=None) -> tuple[float, int]:
    """(token-averaged loss, loss tokens) of one global batch from this rank's micro-batch reports.

    Collective over ``group`` (the data-parallel x context-parallel group); call it on the
    last pipeline stage, where the reports exist.
    """
    if reports:
        total = torch.stack([r["lm loss"] for r in reports]).sum(dim=0).double()
    else:
        total = torch.zeros(2, dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total, group=group)
    loss_sum, tokens = float(total[0]), int(round(float(total[1])))
    return (loss_sum / tokens if tokens else float("nan")), tokens


def exclude_padded_vocab(output_chunk, real_vocab_size: int, tp_size: int, tp_rank: int) -> bool:
    """Make the cross entropy of ``output_chunk`` ignore padded vocabulary entries.

    Overrides ``compute_language_model_loss`` on this one GPTModel instance (the hook
    Megatron-Core's GPTModel calls with the [S, B, V/TP] logits of this TP rank); returns
    whether this rank holds padded columns at all.
    """
    if not getattr(output_chunk, "post_process", False):
        return False
    padded = output_chunk.vocab_size
    per_rank = padded // tp_size
    first_padded_local = real_vocab_size - tp_rank * per_rank
    if first_padded_local >= per_rank:
        return False  # every column on this rank is a real token
    first_padded_local = max(first_padded_local, 0)
    original = type(output_chunk).compute_language_model_loss

    def compute_language_model_loss(labels, logits):
        # Logits are not saved by the output projection's backward, so writing into them is
        # safe; the lowest finite value (not -inf) keeps a rank of only padding NaN-free.
        logits[..., first_padded_local:] = torch.finfo(logits.dtype).min
        return original(output_chunk, labels, logits)

    output_chunk.compute_language_model_loss = compute_language_model_loss
    return True
