"""megalong's GPTModel: Megatron-Core's, with the loss Llama-3 long-context training needs.

Two overrides, both on the last pipeline stage, both in this one class:

Padded vocabulary. Megatron pads the vocabulary to a multiple of
``make_vocab_size_divisible_by x TP``; those extra logits are not tokens and must not take
probability mass. :meth:`compute_language_model_loss` sets them to the lowest
representable value before Megatron-Core's cross entropy (softmax weight exactly zero,
gradient zero), so loss and gradients equal a softmax over the real vocabulary only.

Chunked cross entropy. At 64K-512K tokens the last stage's logits [S, B, V/TP] (plus their
fp32 softmax, saved for backward) dominate memory. With ``loss_chunk_tokens`` the output
projection and the cross entropy run over that many logit rows at a time, each chunk
recomputed in backward (``torch.utils.checkpoint``), so only one chunk's logits exist at any
moment. :meth:`forward` tells the output layer (a :class:`LossDeferringOutputLayer`) that
this call computes a loss; the layer then hands its inputs to
:meth:`compute_language_model_loss` instead of logits, which runs Megatron-Core's own
output-layer forward (sequence-parallel all-gather, tied weights) and cross entropy chunk by
chunk. Calls without labels (logits wanted) are untouched.

These are the places a Megatron-Core upgrade would break first (the forward's keyword names,
the output layer's class and forward signature): keep them here.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear
from torch.utils.checkpoint import checkpoint


class DeferredLogits(NamedTuple):
    """What the output layer hands the loss under chunking: its inputs, from which the loss
    makes the logits chunk by chunk."""

    hidden: torch.Tensor
    weight: Optional[torch.Tensor]
    runtime_gather_output: Optional[bool]


class LossDeferringOutputLayer(ColumnParallelLinear):
    """Megatron-Core's output layer that, while ``defer_to_loss`` is set, returns its inputs
    (:class:`DeferredLogits`) instead of computing the logits of the whole micro-batch."""

    defer_to_loss: bool = False

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if self.defer_to_loss:
            return DeferredLogits(input_, weight, runtime_gather_output), None
        return self.project(input_, weight=weight, runtime_gather_output=runtime_gather_output)

    def project(self, input_, weight=None, runtime_gather_output=None):
        """Megatron-Core's output-layer forward: (logits, bias)."""
        return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)


class MegalongGPTModel(GPTModel):
    """GPTModel whose loss ignores the padded vocabulary and can run in chunks.

    ``real_vocab_size``: the tokenizer's vocabulary (``vocab_size`` is the padded one).
    ``loss_chunk_tokens``: logit rows per loss chunk (0 = Megatron-Core's full logits); see
    :meth:`set_loss_chunk_tokens`.
    """

    def __init__(self, *args, real_vocab_size: int, loss_chunk_tokens: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.real_vocab_size = real_vocab_size
        self.loss_chunk_tokens = 0
        self._first_padded_column: Optional[int] = None
        if not self.post_process:
            return
        tp_group = self.output_layer.tp_group
        per_rank = self.vocab_size // tp_group.size()
        first_padded = real_vocab_size - tp_group.rank() * per_rank
        if first_padded < per_rank:  # this rank holds padded columns
            self._first_padded_column = max(first_padded, 0)
        if type(self.output_layer) is not ColumnParallelLinear:
            raise TypeError(f"megalong expects Megatron-Core's ColumnParallelLinear output layer, "
                            f"got {type(self.output_layer).__name__}")
        # The same module, state and weights; only its forward gains the deferral above.
        self.output_layer.__class__ = LossDeferringOutputLayer
        self.set_loss_chunk_tokens(loss_chunk_tokens)

    def set_loss_chunk_tokens(self, chunk_tokens: int) -> None:
        """Compute the loss over ``chunk_tokens`` logit rows at a time (0 = all at once).

        ``chunk_tokens`` counts rows of this rank's logits (tokens of the micro-batch after the
        sequence-parallel gather, over all its sequences), as the planner does; with sequence
        parallelism each rank contributes ``chunk_tokens // TP`` of its own positions to a chunk.
        """
        if chunk_tokens < 0:
            raise ValueError(f"loss chunk size must be >= 0, got {chunk_tokens}")
        if not chunk_tokens or not self.post_process:
            self.loss_chunk_tokens = 0
            return
        if self.config.mtp_num_layers or getattr(self.config, "defer_embedding_wgrad_compute", False):
            raise ValueError("loss.chunk_tokens does not support multi-token prediction or deferred "
                             "embedding wgrad computation")
        per_rank = max(1, chunk_tokens // self._sequence_parallel_size())
        self.loss_chunk_tokens = per_rank * self._sequence_parallel_size()

    def _sequence_parallel_size(self) -> int:
        layer = self.output_layer
        return layer.tp_group.size() if layer.sequence_parallel else 1

    def forward(self, *args, labels=None, **kwargs):
        if len(args) > 4:
            raise TypeError("MegalongGPTModel.forward: pass labels and later arguments by keyword")
        computing_loss = (labels is not None and self.loss_chunk_tokens > 0
                          and kwargs.get("inference_context") is None and kwargs.get("inference_params") is None)
        if not computing_loss:
            return super().forward(*args, labels=labels, **kwargs)
        self.output_layer.defer_to_loss = True
        try:
            return super().forward(*args, labels=labels, **kwargs)
        finally:
            self.output_layer.defer_to_loss = False

    def compute_language_model_loss(self, labels, logits):
        if isinstance(logits, DeferredLogits):
            return self._chunked_loss(labels, logits)
        return self._cross_entropy(labels, logits)

    def _cross_entropy(self, labels, logits):
        if self._first_padded_column is not None:
            # Logits are not saved by the output projection's backward, so writing into them is
            # safe; the lowest finite value (not -inf) keeps a rank of only padding NaN-free.
            # Written outside autograd: the padded columns' gradient is exactly zero anyway
            # (softmax weight 0, never a target), and recording the write would cost a full-size
            # copy of the logits' gradient in backward (autograd's CopySlices).
            with torch.no_grad():
                logits[..., self._first_padded_column:] = torch.finfo(logits.dtype).min
        return super().compute_language_model_loss(labels, logits)

    def _chunked_loss(self, labels, inputs: DeferredLogits):
        sp = self._sequence_parallel_size()
        per_rank = self.loss_chunk_tokens // sp
        def chunk_loss(hidden, targets):
            chunk_logits, _ = self.output_layer.project(hidden, weight=inputs.weight, runtime_gather_output=inputs.runtime_gather_output)
            return self._cross_entropy(targets, chunk_logits)

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
                loss = checkpoint(chunk_loss, piece, chunk_targets, use_reentrant=False, preserve_rng_state=False)
            else:
                loss = chunk_loss(piece, chunk_targets)
            losses.append(loss.view(sp, -1))  # [1, sp * n] -> [sp, n]
        return torch.cat(losses, dim=1).view(sp * s, b).transpose(0, 1).contiguous()
