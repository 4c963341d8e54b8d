"""Layout enumeration and ranking: invalid layouts never proposed; 512K needs CP."""

import pytest

from megalong.model.presets import preset_config
from megalong.plan.hardware import gpu_spec
from megalong.plan.memory import GB, BF16, GPU_TE, TrainingShape, estimate
from megalong.config import ParallelConfig
from megalong.plan.planner import Layout, PlanRequest, check_layout, plan

LLAMA3_8B = preset_config("llama3-8b")


def _independently_valid(layout: Layout, request: PlanRequest) -> list[str]:
    """Every rule of the issue, checked here without the planner's code."""
    m = request.model
    problems = []
    tp, pp, cp, dp = layout.tensor_parallel, layout.pipeline_parallel, layout.context_parallel, layout.data_parallel
    v = layout.virtual_pipeline or 1
    if m.num_attention_heads % tp or m.num_query_groups % tp:
        problems.append("heads or KV heads not divisible by TP")
    if tp > request.gpus_per_node or request.gpus_per_node % tp:
        problems.append("TP leaves the node")
    if m.num_layers % (pp * v):
        problems.append("layers not divisible by PP x virtual")
    if layout.virtual_pipeline and pp == 1:
        problems.append("virtual stages without PP")
    if cp > 1 and request.seq_length % (2 * cp):
        problems.append("seq not divisible by 2 CP")
    if request.global_batch % (dp * layout.micro_batch):
        problems.append("global batch not divisible by DP x mb")
    if tp * pp * cp * dp != request.world_size:
        problems.append("layout does not cover the world")
    return problems


@pytest.mark.parametrize("seq_length,global_batch,nodes,gpu", [
    (65536, 64, 1, "h100"), (131072, 32, 2, "h200"), (524288, 16, 1, "h100"), (524288, 16, 4, "a100"),
])
def test_no_proposed_layout_breaks_a_rule_and_all_fit(seq_length, global_batch, nodes, gpu):
    request = PlanRequest(model=LLAMA3_8B, seq_length=seq_length, global_batch=global_batch, nodes=nodes,
                          gpus_per_node=8, gpu=gpu_spec(gpu), loss_chunk_tokens=8192)
    result = plan(request)
    assert result.candidates, "expected at least one layout to fit"
    usable = request.gpu.memory_gb * GB * (1 - request.memory_headroom)
    for candidate in result.candidates:
        assert _independently_valid(candidate.layout, request) == []
        assert candidate.memory.total <= usable
    times = [c.time.total_s for c in result.candidates]
    assert times == sorted(times)
    # Every rejected layout has a reason, and the invalid ones really are invalid.
    for rejection in result.rejections:
        assert rejection.reason
        if rejection.reason.startswith("invalid"):
            assert _independently_valid(rejection.layout, request) or "duplicate" in rejection.reason \
                or "FP8" in rejection.reason or "interleaved" in rejection.reason, rejection.reason


def test_invalid_layouts_are_named():
    request = PlanRequest(model=LLAMA3_8B, seq_length=65536, global_batch=64, nodes=2, gpus_per_node=8,
                          gpu=gpu_spec("a100"))
    base = dict(pipeline_parallel=1, context_parallel=1, virtual_pipeline=None, micro_batch=1, recompute=None,
                distributed_optimizer=True, precision="bf16")
    assert "node" in check_layout(Layout(tensor_parallel=16, data_parallel=1, **base), request)
    assert "KV heads" in check_layout(Layout(tensor_parallel=16, data_parallel=1, **{**base}),
                                      PlanRequest(**{**request.__dict__, "gpus_per_node": 16}))
    assert "2 x CP" in check_layout(Layout(tensor_parallel=1, data_parallel=1, **{**base, "context_parallel": 16}),
                                    PlanRequest(**{**request.__dict__, "seq_length": 65544}))
    assert "global batch" in check_layout(Layout(tensor_parallel=1, data_parallel=16, **{**base, "micro_batch": 8}),
                                          request)
    assert "FP8" in check_layout(Layout(tensor_parallel=1, data_parallel=16, **{**base, "precision": "fp8"}), request)
    assert "virtual" in check_layout(
        Layout(tensor_parallel=1, data_parallel=2, **{**base, "pipeline_parallel": 8, "virtual_pipeline": 8}), request)


@pytest.mark.parametrize("nodes", [1, 2, 8])
def test_prolong_stage2_on_80gb_gpus_uses_context_parallelism(nodes):
    # ProLong stage 2: Llama-3-8B, 524,288-token sequences, 8M tokens (16 sequences) per
    # step, 8 x 80 GB GPUs per node.
    request = PlanRequest(model=LLAMA3_8B, seq_length=524288, global_batch=16, nodes=nodes, gpus_per_node=8,
                          gpu=gpu_spec("h100", 80), loss_chunk_tokens=8192)
    best = plan(request).best
    assert best is not None
    assert best.layout.context_parallel > 1, best.layout.describe()


def test_memory_shrinks_with_recomputation_and_parallelism():
    def total(recompute=None, **parallel):
        shape = TrainingShape(seq_length=65536, recompute=recompute, loss_chunk_tokens=8192)
        return estimate(LLAMA3_8B, ParallelConfig(**parallel), shape, world_size=8, precision=BF16,
                        profile=GPU_TE).total
    assert total("full") < total("selective") <= total(None)
    assert total(tensor_parallel=2, sequence_parallel=True) < total()
    assert total(context_parallel=2) < total()
    # With flash attention there is no s^2 term: doubling the sequence at most doubles activations.
    short = estimate(LLAMA3_8B, ParallelConfig(), TrainingShape(seq_length=32768), world_size=8).activations
    long = estimate(LLAMA3_8B, ParallelConfig(), TrainingShape(seq_length=65536), world_size=8).activations
    assert 1.8 < long / short <= 2.01


def test_korthikanti_selective_formula_for_a_gpt_layer():
    # Korthikanti et al. eq. 6 (TP with SP, selective recomputation): 34 sbh / t bytes for a
    # GPT layer. Our Llama accounting with fused kernels, MHA (g = a), f = 4h gives the same
    # order: norms 2x2 + GEMM inputs 2x2, qkv 6, rotated q,k 4, proj 2, MLP 8h x 3 (2 bytes).
    from megalong.plan.memory import _Dims, layer_activations
    from dataclasses import replace
    from megalong.plan.memory import GPU_TE

    s, b, h, t = 4096, 1, 4096, 8
    dims = _Dims(s=s, b=b, h=h, a=32, g=32, d=128, f=4 * h, t=t, sp=t, e=2)
    parts = layer_activations(dims, replace(GPU_TE, fused_rope=True), BF16, recompute_attention=True)
    per_sbh = sum(parts.values()) / (s * b * h / t)
    assert 30 <= per_sbh <= 48, per_sbh


def test_check_fits_names_the_layout_and_the_verdict():
    from megalong.plan import check_fits

    shape = TrainingShape(seq_length=524288, num_microbatches=16, recompute="full", loss_chunk_tokens=8192)
    too_big = check_fits(LLAMA3_8B, ParallelConfig(), shape, world_size=8, gpu=gpu_spec("h100"))
    assert not too_big.fits and "does NOT fit" in too_big.message and "megalong plan" in too_big.message
    ok = check_fits(LLAMA3_8B, ParallelConfig(tensor_parallel=4, context_parallel=2, sequence_parallel=True),
                    shape, world_size=8, gpu=gpu_spec("h100"))
    assert ok.fits, ok.message
