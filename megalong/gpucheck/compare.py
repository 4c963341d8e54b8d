"""Comparisons of tensors, gradients and logits, norm-wise (see :mod:`megalong.gpucheck.tolerances`)."""

from __future__ import annotations

import math
import torch

from megalong.convert.adapter import FC1_NORM, QKV_NORM

# Megatron-Core's local layers keep the two pre-norms as modules of their own; Transformer
# Engine fuses them into the following linear. The checkpoint keys are the TE names (see
# megalong.convert.adapter), so gradients are keyed by those names whatever the layers.
_LOCAL_TO_CHECKPOINT_NAMES = {"input_layernorm.weight": QKV_NORM, "pre_mlp_layernorm.weight": FC1_NORM}


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64 (inf when ref is zero and got is not)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if got.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(got.shape)} vs {tuple(ref.shape)}")
    diff, norm = float(torch.linalg.vector_norm(got - ref)), float(torch.linalg.vector_norm(ref))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def cosine(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double().cpu().flatten(), ref.detach().double().cpu().flatten()
    denominator = float(torch.linalg.vector_norm(got) * torch.linalg.vector_norm(ref))
    return float(got @ ref) / denominator if denominator else (1.0 if torch.equal(got, ref) else 0.0)


def checkpoint_name(parameter_name: str) -> str:
    """The Transformer Engine / checkpoint name of a parameter of either layer implementation."""
    for local, te in _LOCAL_TO_CHECKPOINT_NAMES.items():
        if parameter_name.endswith("." + local):
            return parameter_name[: -len(local)] + te
    return parameter_name


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of every parameter's gradient, keyed by checkpoint name."""
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            raise RuntimeError(f"parameter {name} has no gradient after backward")
        grads[checkpoint_name(name)] = param.grad.detach().float().cpu()
    return grads


def compare_gradients(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], bound: float,
                      label: str = "gradient") -> tuple[dict, list[str]]:
    """Per-parameter relative errors of ``got`` against ``ref``.

    Returns (figures, failures): the worst parameters by name, and one failure line per
    parameter outside ``bound``, or missing on either side. The cosines are reported for
    reading, not judged: a relative error e already bounds the cosine from below by
    sqrt(1 - e^2), so a cosine criterion could never fail on its own.
    """
    failures = []
    missing = sorted(set(ref) ^ set(got))
    if missing:
        failures.append(f"{label}s of {', '.join(missing[:5])} exist on one side only")
    errors, cosines = {}, {}
    for name in sorted(set(ref) & set(got)):
        errors[name] = relative_error(got[name], ref[name])
        cosines[name] = cosine(got[name], ref[name])
        if not errors[name] <= bound:  # also catches NaN
            failures.append(f"{label} of {name}: relative error {errors[name]:.3g} > bound {bound:.3g}")
    worst = max(errors, key=lambda n: errors[n] if math.isfinite(errors[n]) else math.inf, default=None)
    figures = {
        f"{label}_bound": bound,
        f"{label}_worst_relative_error": errors.get(worst) if worst else None,
        f"{label}_worst_parameter": worst,
        f"{label}_relative_errors": errors,
        f"{label}_min_cosine": min(cosines.values(), default=None),
        f"{label}_cosines": cosines,
    }
    return figures, failures


def check_within(label: str, value: float, bound: float, failures: list[str]) -> float:
    """Append a failure when ``value`` (an error) is not within ``bound``; returns ``value``."""
    if not value <= bound:  # NaN fails too
        failures.append(f"{label}: {value:.3g} > bound {bound:.3g}")
    return value


def top_two_margin(logits: torch.Tensor) -> float:
    """Gap between the largest and second largest logit: below the logits' error, greedy
    decoding of two correct implementations may legitimately disagree."""
    top = torch.topk(logits.detach().float().flatten(), 2).values
    return float(top[0] - top[1])
