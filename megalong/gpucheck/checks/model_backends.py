"""The whole model, forward and backward, with each attention backend against the fp32 reference.

Reference: Megatron-Core's local layers in fp32 with megalong's sdpa attention (TF32 off).
Candidate: the same weights (through a checkpoint, as a run would load them) in bf16, with
Transformer Engine's layers when TE imports (its linears, norms and fused attention are
what runs on GPUs) and the backend under test as core attention. Input: micro-batch 2 of
packed documents (one-token documents, odd lengths; one long document in the second
sample). The loss must agree within the bf16 forward bound and every parameter's gradient
within the bf16 gradient bound (megalong.gpucheck.tolerances). A backend that ignored the
document boundaries would change the attention weights' gradients by O(1).
"""

from __future__ import annotations

from megalong.gpucheck import cases, runs
from megalong.gpucheck.compare import check_within, compare_gradients, gradients
from megalong.gpucheck.records import CheckResult
from megalong.gpucheck.tolerances import bf16_forward_bound, bf16_gradient_bound

GPU_SEQ_LENGTH, CPU_SEQ_LENGTH = 4096, 512
REFERENCE = cases.model_config(cases.MODEL, transformer_impl="local", params_dtype="fp32", attention_backend="sdpa")


def samples(ctx):
    seq = GPU_SEQ_LENGTH if ctx.on_gpu else CPU_SEQ_LENGTH
    return cases.synthetic_samples(cases.micro_batch_lengths(seq), cases.MODEL.vocab_size, seed=11)


def reference(ctx) -> dict:
    """Weights saved once, and the fp32 loss and gradients on the micro-batch (cached per group)."""

    def compute():
        chunks = runs.build(REFERENCE, ctx)
        weights = runs.save_fresh(chunks, ctx.work_dir / "model-reference", REFERENCE)
        loss = runs.loss_and_backward(chunks[0], runs.micro_batch(samples(ctx), ctx))
        return {"weights": weights, "loss": loss, "grads": gradients(chunks[0])}

    return ctx.cached("model-reference", compute)


def candidate_config(ctx, backend: str, **overrides):
    impl = "transformer_engine" if ctx.on_gpu and ctx.machine.missing("te") is None else "local"
    return cases.model_config(cases.MODEL, transformer_impl=impl, params_dtype="bf16", attention_backend=backend,
                              **overrides)


def compare_with_reference(name: str, loss: float, grads: dict, ref: dict, cp: int = 1,
                           figures: dict | None = None) -> CheckResult:
    layers = cases.MODEL.num_layers
    failures: list[str] = []
    loss_bound, grad_bound = bf16_forward_bound(layers, cp), bf16_gradient_bound(layers, cp)
    loss_error = check_within("loss relative error", abs(loss - ref["loss"]) / abs(ref["loss"]), loss_bound, failures)
    grad_figures, grad_failures = compare_gradients(grads, ref["grads"], grad_bound)
    figures = {**(figures or {}), "loss": loss, "reference_loss": ref["loss"], "loss_relative_error": loss_error,
               "loss_bound": loss_bound, **grad_figures}
    return CheckResult.judged(
        name, failures + grad_failures, figures,
        f"loss {loss:.5f} vs fp32 {ref['loss']:.5f} (relative {loss_error:.1e} <= {loss_bound:.1e}); "
        f"every gradient within {grad_bound:.1e} (worst {grad_figures['gradient_worst_relative_error']:.1e}, "
        f"{grad_figures['gradient_worst_parameter']})")


def _check_backend(ctx, backend: str) -> CheckResult:
    from megalong.checkpoint.weights import load_weights

    name = f"model.{backend}"
    ref = reference(ctx)
    config = candidate_config(ctx, backend)
    chunks = runs.build(config, ctx, seed=runs.SEED + 1)  # other initial weights: loading must replace them
    load_weights(chunks, ref["weights"])
    model = chunks[0]
    used = {"attention_backend": runs.core_attention(model).backend, "layers": runs.layer_implementation(model)}
    if used != {"attention_backend": backend, "layers": config.transformer_impl}:
        return CheckResult(name, "failed", f"the model was not built as asked: asked {backend} attention with "
                                           f"{config.transformer_impl} layers, got {used}")
    all_samples = samples(ctx)
    loss = runs.loss_and_backward(model, runs.micro_batch(all_samples, ctx))
    figures = {**used, "device": str(ctx.device), "params_dtype": "bf16", "micro_batch": len(all_samples),
               "seq_length": all_samples[0].seq_length,
               "documents_per_sample": [len(s.cu_seqlens) - 1 for s in all_samples]}
    return compare_with_reference(name, loss, gradients(model), ref, figures=figures)


def check_sdpa(ctx) -> CheckResult:
    return _check_backend(ctx, "sdpa")


def check_flash(ctx) -> CheckResult:
    return _check_backend(ctx, "flash")


def check_te(ctx) -> CheckResult:
    return _check_backend(ctx, "te")
