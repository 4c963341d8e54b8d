"""Every bound the checks apply, derived from the rounding the computation does.

The model. A number rounded to a floating-point format with ``p`` significand bits (the
implicit one included) carries a relative error of at most its unit roundoff ``u = 2^-p``:

* bf16 (8 significand bits):          u = 2^-8
* FP8 E4M3 (4, the forward tensors):  u = 2^-4
* FP8 E5M2 (3, the gradients in TE's "hybrid" format): u = 2^-3
* fp32 (24):                          u = 2^-24 (the references; negligible next to the above)

A computation that rounds ``n_i`` times to formats of unit roundoff ``u_i`` (each GEMM
accumulates in fp32 and rounds its output once) has a relative error that grows like
``sqrt(sum_i n_i u_i^2)``: the rounding errors are independent with mean zero, so they add
in quadrature (the probabilistic rounding-error analysis of Higham and Mary, SIAM J. Sci.
Comput. 41(5), 2019: ``sqrt(n) u`` with high probability, against the worst case ``n u``).
Each error is taken at its maximum ``u`` rather than at its standard deviation ``u/sqrt(3)``,
which leaves a factor sqrt(3) for the spread of a norm over a finite tensor. The checks
compare tensors norm-wise (``||got - ref|| / ||ref||``), where this bound applies; an element
near zero is a cancellation and is judged with its tensor, not alone.

What the counts assume: a layer maps relative errors of its input to about the same relative
error of its output (residual connections and RMSNorm keep the gain near one; true of the
freshly initialised and briefly trained small models checked here); and no cancellation
beyond a random walk in the sums over tokens that make parameter gradients.

What a wrong kernel does is far outside these bounds: a missing document mask changes
attention outputs by O(1), a transposed or stale FP8 scale changes a gradient by a factor,
a dropped CP chunk removes part of a sum.
"""

from __future__ import annotations

import math
from typing import Iterable

U_BF16 = 2.0**-8
U_E4M3 = 2.0**-4
U_E5M2 = 2.0**-3

# Roundings to bf16 in one transformer layer (Transformer Engine or Megatron-Core local
# layers in bf16; every GEMM accumulates in fp32 and rounds its output once).
LAYER_FORWARD_ROUNDINGS = {
    "input RMSNorm output": 1,
    "QKV weight (stored in bf16) and output": 2,
    "RoPE output": 1,
    "attention probabilities before P.V, attention output": 2,
    "output projection weight and output": 2,
    "residual add": 1,
    "pre-MLP RMSNorm output": 1,
    "FC1 weight and output": 2,
    "SwiGLU output": 1,
    "FC2 weight and output": 2,
    "second residual add": 1,
}
LAYER_BACKWARD_ROUNDINGS = {
    "FC2 dgrad and wgrad": 2,
    "SwiGLU backward": 1,
    "FC1 dgrad and wgrad": 2,
    "pre-MLP RMSNorm backward (input, weight)": 2,
    "residual gradient sum": 1,
    "output projection dgrad and wgrad": 2,
    "attention dS before the dQ/dK products, dQ/dK/dV outputs": 2,
    "RoPE backward": 1,
    "QKV dgrad and wgrad": 2,
    "input RMSNorm backward (input, weight)": 2,
    "second residual gradient sum": 1,
}
# Outside the layers: embedding, final norm, output layer and the logits.
MODEL_FORWARD_ROUNDINGS = {"embedding weight": 1, "final RMSNorm output": 1, "output weight": 1, "logits": 1}
MODEL_BACKWARD_ROUNDINGS = {"logit gradient": 1, "output dgrad and wgrad": 2, "final RMSNorm backward": 2,
                            "embedding gradient": 1}
# Context parallelism: each of the 2 x CP chunk steps of a ring merges a partial attention output
# (forward) and partial dK/dV (backward) into the result, one rounding each. An all-to-all moves
# values without rounding; the count is kept for it too (an upper bound).
CP_ROUNDINGS_PER_STEP = 1
# Tensor parallelism: the row-parallel GEMMs (output projection, FC2) sum partial outputs across
# TP ranks in bf16 (all-reduce, or reduce-scatter with sequence parallelism), and the
# column-parallel ones (QKV, FC1) sum their input gradients in backward: 2 roundings per layer
# each way.
TP_ROUNDINGS_PER_LAYER = 2
# Weights a layer stores (4 GEMM weights, 2 norm weights), and outside the layers (embedding,
# final norm, output layer): what a bf16 copy of fp32 weights rounds.
LAYER_WEIGHTS, MODEL_WEIGHTS = 6, 3
# FP8 GEMMs of one layer (QKV, projection, FC1, FC2): forward quantizes both operands (input
# and weight) to E4M3; backward quantizes the incoming gradient once (E5M2 in the "hybrid"
# format, E4M3 in "e4m3"), used by both the dgrad and the wgrad GEMM.
FP8_GEMMS_PER_LAYER = 4


def quadrature(terms: Iterable[tuple[int, float]]) -> float:
    """Relative error of a computation rounding ``n`` times at unit roundoff ``u``, per (n, u)."""
    return math.sqrt(sum(n * u * u for n, u in terms))


def _count(table: dict) -> int:
    return sum(table.values())


def _parallel_roundings(layers: int, cp: int, tp: int) -> int:
    return (layers * 2 * cp * CP_ROUNDINGS_PER_STEP if cp > 1 else 0) + (layers * TP_ROUNDINGS_PER_LAYER if tp > 1 else 0)


def bf16_forward_roundings(layers: int, cp: int = 1, tp: int = 1) -> int:
    return (layers * _count(LAYER_FORWARD_ROUNDINGS) + _count(MODEL_FORWARD_ROUNDINGS)
            + _parallel_roundings(layers, cp, tp))


def bf16_backward_roundings(layers: int, cp: int = 1, tp: int = 1) -> int:
    return (layers * _count(LAYER_BACKWARD_ROUNDINGS) + _count(MODEL_BACKWARD_ROUNDINGS)
            + _parallel_roundings(layers, cp, tp))


def bf16_forward_bound(layers: int, cp: int = 1, tp: int = 1) -> float:
    """Logits or loss of a bf16 model against the same weights in fp32."""
    return quadrature([(bf16_forward_roundings(layers, cp, tp), U_BF16)])


def bf16_gradient_bound(layers: int, cp: int = 1, tp: int = 1) -> float:
    """A parameter gradient of a bf16 model against fp32 (forward and backward roundings)."""
    return quadrature([(bf16_forward_roundings(layers, cp, tp) + bf16_backward_roundings(layers, cp, tp), U_BF16)])


def weight_rounding_bound(layers: int) -> float:
    """Logits of fp32 computation on bf16-rounded weights against the fp32 weights."""
    return quadrature([(layers * LAYER_WEIGHTS + MODEL_WEIGHTS, U_BF16)])


def _fp8_backward_u(fmt: str) -> float:
    if fmt not in ("hybrid", "e4m3"):
        raise ValueError(f"unknown FP8 format {fmt!r}")
    return U_E5M2 if fmt == "hybrid" else U_E4M3


def fp8_forward_bound(layers: int) -> float:
    """Logits of an FP8 model against fp32: the E4M3 operands of every forward GEMM, plus bf16."""
    return quadrature([(2 * FP8_GEMMS_PER_LAYER * layers, U_E4M3), (bf16_forward_roundings(layers), U_BF16)])


def fp8_gradient_bound(layers: int, fmt: str = "hybrid") -> float:
    """A parameter gradient of an FP8 model against bf16: every forward operand in E4M3, every
    backward GEMM's incoming gradient in the backward format, plus both models' bf16 roundings
    (their sum bounds the difference of the two)."""
    bf16 = bf16_forward_roundings(layers) + bf16_backward_roundings(layers)
    return quadrature([(2 * FP8_GEMMS_PER_LAYER * layers, U_E4M3),
                       (FP8_GEMMS_PER_LAYER * layers, _fp8_backward_u(fmt)),
                       (2 * bf16, U_BF16)])


def attention_forward_bound(cp: int = 1) -> float:
    """Output of one bf16 attention call (inputs already bf16) against fp32: the probabilities
    rounded before P.V and the output, plus the CP merges."""
    return quadrature([(2 + (2 * cp * CP_ROUNDINGS_PER_STEP if cp > 1 else 0), U_BF16)])


def attention_gradient_bound(cp: int = 1) -> float:
    """dQ, dK, dV of one bf16 attention call against fp32: the forward roundings, dS rounded
    before the dQ/dK products, the gradient outputs, plus the CP merges of the backward."""
    merges = 2 * 2 * cp * CP_ROUNDINGS_PER_STEP if cp > 1 else 0
    return quadrature([(2 + 2 + merges, U_BF16)])


def training_loss_bound(forward: float, gradient: float, first_loss: float, loss: float) -> float:
    """How far the loss of step k may be from a reference run's, both from the same weights on
    the same data, each within ``forward`` (loss) and ``gradient`` (gradients) of exact.

    Step 1: both losses are within ``forward`` of the exact one: ``2 * forward * loss``. Later
    steps add the effect of the updates: to first order the loss moves by <g, update>, and an
    Adam update differs by at most the gradients' relative difference (``2 * gradient``) except
    where a gradient element is so small that its sign flips, which moves the loss by at most
    that element times the step, second order. So the loss decrease so far,
    ``first_loss - loss``, differs by at most ``2 * gradient`` of itself.
    """
    return 2 * forward * abs(loss) + 2 * gradient * abs(first_loss - loss)
