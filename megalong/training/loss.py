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

Chunked cross entropy. At 64K-512K tokens the last stage's logits [S, B, V/TP] (plus their
fp32 softmax, saved for backward) dominate memory. :func:`chunk_cross_entropy` makes the
output projection and the cross entropy run over ``chunk_tokens`` logit rows at a time,
each chunk recomputed in backward (``torch.utils.checkpoint``), so only one chunk's logits
exist at any moment. Each chunk goes through Megatron-Core's own pieces, unchanged: the
output layer's ``ColumnParallelLinear.forward`` (sequence-parallel all-gather, tied
weights) and the model's ``compute_language_model_loss`` (``vocab_parallel_cross_entropy``,
with the padded-vocabulary exclusion above when installed).
"""

from __future__ import annotations

import inspect

import torch
from torch.utils.checkpoint import checkpoint


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
        # Written outside autograd: the padded columns' gradient is exactly zero anyway (softmax
        # weight 0, never a target), and recording the write would cost a full-size copy of
        # the logits' gradient in backward (autograd's CopySlices).
        with torch.no_grad():
            logits[..., first_padded_local:] = torch.finfo(logits.dtype).min
        return original(output_chunk, labels, logits)

    output_chunk.compute_language_model_loss = compute_language_model_loss
    return True


class _OutputLayerInput:
    """What the output layer hands ``compute_language_model_loss`` under chunking: its
    inputs, from which the loss makes the logits chunk by chunk."""

    __slots__ = ("hidden", "weight", "runtime_gather_output")

    def __init__(self, hidden, weight, runtime_gather_output):
        self.hidden, self.weight, self.runtime_gather_output = hidden, weight, runtime_gather_output


def chunk_cross_entropy(output_chunk, chunk_tokens: int) -> bool:
    """Compute the loss of ``output_chunk`` over ``chunk_tokens`` logit rows at a time.

    ``chunk_tokens`` counts rows of this rank's logits (tokens of the micro-batch after the
    sequence-parallel gather, over all its sequences), as the planner does; with sequence
    parallelism each rank contributes ``chunk_tokens // TP`` of its own positions to a
    chunk. Returns True where it was installed (a last pipeline stage, ``chunk_tokens`` > 0).

    Hooks three attributes of this one GPTModel instance, each delegating to Megatron-Core:
    ``forward`` notes whether this call computes a loss (labels given, no inference);
    ``output_layer.forward`` then hands back its inputs instead of logits; and
    ``compute_language_model_loss`` (Megatron's own, or :func:`exclude_padded_vocab`'s:
    install that first) runs the original output-layer forward and cross entropy per chunk.
    Calls without labels (logits wanted) are untouched.
    """
    if not chunk_tokens or not getattr(output_chunk, "post_process", False):
        return False
    config = output_chunk.config
    if getattr(config, "mtp_num_layers", None) or getattr(config, "defer_embedding_wgrad_compute", False):
        raise ValueError("loss.chunk_tokens does not support multi-token prediction or deferred "
                         "embedding wgrad computation")
    layer = output_chunk.output_layer
    project = layer.forward
    cross_entropy = output_chunk.compute_language_model_loss
    model_forward = output_chunk.forward
    signature = inspect.signature(model_forward)
    sp = layer.tp_group.size() if layer.sequence_parallel else 1
    per_rank = max(1, chunk_tokens // sp)
    computing_loss = [False]

    def forward(*args, **kwargs):
        call = signature.bind(*args, **kwargs).arguments
        computing_loss[0] = (call.get("labels") is not None and call.get("inference_context") is None
                             and call.get("inference_params") is None)
        try:
            return model_forward(*args, **kwargs)
        finally:
            computing_loss[0] = False

    def output_layer_forward(input_, weight=None, runtime_gather_output=None):
        if not computing_loss[0]:
            return project(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        return _OutputLayerInput(input_, weight, runtime_gather_output), None

    def compute_language_model_loss(labels, logits):
        if not isinstance(logits, _OutputLayerInput):
            return cross_entropy(labels, logits)
        inputs = logits

        def chunk_loss(hidden, targets):
            chunk_logits, _ = project(hidden, weight=inputs.weight,
                                      runtime_gather_output=inputs.runtime_gather_output)
            return cross_entropy(targets, chunk_logits)

        s, b, h = inputs.hidden.shape
        rows = s * b  # this rank's positions x sequences, in the [s, b] order of the hidden states
        if rows <= per_rank:  # one chunk: nothing to gain from recomputing it
            return chunk_loss(inputs.hidden, labels)
        # Labels [b, sp*s] -> [sp, s*b]: row r holds the targets of sequence-parallel rank r's
        # positions, in the order its flattened hidden states have them.
        targets = labels.transpose(0, 1).reshape(sp, rows)
        losses = []
        pieces = inputs.hidden.reshape(rows, 1, h).split(per_rank)
        for start, piece in zip(range(0, rows, per_rank), pieces):
            # The output layer gathers the pieces of every rank: [sp * n, 1, h], rank-major.
            chunk_targets = targets[:, start:start + piece.shape[0]].reshape(1, -1)
            if torch.is_grad_enabled():
                # Non-reentrant: the backward graph is the forward's own, so the output weight's
                # gradient arrives summed over the chunks in one accumulation (Megatron DDP's
                # overlapped grad reduce counts on one per backward); only saved tensors are
                # recomputed.
                loss = checkpoint(
                    chunk_loss, piece, chunk_targets, use_reentrant=False, preserve_rng_state=False)
            else:
                loss = chunk_loss(piece, chunk_targets)
            losses.append(loss.view(sp, -1))  # [1, sp * n] -> [sp, n]
        return torch.cat(losses, dim=1).view(sp * s, b).transpose(0, 1).contiguous()

    output_chunk.forward = forward
    layer.forward = output_layer_forward
    output_chunk.compute_language_model_loss = compute_language_model_loss
    output_chunk.loss_chunk_tokens = per_rank * sp
    return True

