"""The whole model, forward and backward, with each attention backend against the fp32 reference.

Reference: Megatron-Core's local layers in fp32 with megalong's sdpa attention (TF32 off);
``model.reference`` first checks that attention against the definition on this device.
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
from megalong.gpucheck.compare import check_within, compare_gradients, gradients, relative_error
from megalong.gpucheck.records import CheckResult
from megalong.gpucheck.tolerances import U_BF16, bf16_forward_bound, bf16_gradient_bound

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


def check_reference(ctx) -> CheckResult:
    """The reference's attention: megalong's sdpa path in fp32 on this device against the
    definition (``reference_attention``, the whole document mask written out), output and
    dq/dk/dv, on the micro-batch of packed documents the kernel checks use."""
    import math

    from megalong.model.attention.local import sdpa_attention
    from megalong.model.attention.reference import reference_attention

    seq = GPU_SEQ_LENGTH if ctx.on_gpu else CPU_SEQ_LENGTH
    heads = (REFERENCE.num_attention_heads, REFERENCE.num_query_groups)
    layout, scale = cases.attention_layout(seq), 1.0 / math.sqrt(cases.HEAD_DIM)
    q, k, v, grad_out = (t.float() for t in cases.attention_inputs(ctx.device, seq, *heads))
    got = cases.attention_with_gradients(lambda a, b, c: sdpa_attention(a, b, c, layout, scale), [q, k, v], grad_out)
    ref = cases.attention_with_gradients(lambda a, b, c: reference_attention(a, b, c, layout.doc_ids, scale),
                                         [q, k, v], grad_out)
    # The model checks count the reference as exact next to their bf16 bounds; this holds when
    # its attention is within one bf16 rounding of the definition (both are fp32, so what
    # separates them is summation order, far below that). A wrong mask is off by O(1).
    failures: list[str] = []
    errors = {name: check_within(f"fp32 sdpa {name} relative error", relative_error(g, r), U_BF16, failures)
              for name, g, r in zip(("output", "dq", "dk", "dv"), got, ref)}
    return CheckResult.judged(
        "model.reference", failures, {"device": str(ctx.device), "seq_length": seq, "relative_errors": errors,
                                      "bound": U_BF16},
        f"fp32 sdpa attention within {U_BF16:.1e} of the definition (worst {max(errors.values()):.1e})")


def check_sdpa(ctx) -> CheckResult:
    return _check_backend(ctx, "sdpa")


def check_flash(ctx) -> CheckResult:
    return _check_backend(ctx, "flash")


def check_te(ctx) -> CheckResult:
    return _check_backend(ctx, "te")
