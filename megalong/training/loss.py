"""The training loss: token-averaged cross entropy over the whole global batch.

ProLong averages over every loss token of a global batch (sum of per-token losses over
all micro-batches, data-parallel and context-parallel ranks, divided by the number of
loss tokens), not a mean of per-sequence means. Megatron-Core does exactly that when
``TransformerConfig.calculate_per_token_loss`` is on (megalong's model builder sets it):
the forward step returns ``(loss_sum, num_tokens, report)``, the pipeline schedule adds
up the token counts, and ``finalize_model_grads`` all-reduces them over DP x CP and
divides the summed gradients by the total. :func:`masked_loss_sum` is that forward-step
half; ``Trainer._reduce_step_figures`` sums the reports of one step into the logged loss.

The per-token losses themselves (cross entropy over the real vocabulary only, optionally
in chunks) come from :class:`megalong.model.gpt.MegalongGPTModel`.
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
