"""Single-process checks of the kernels, the block skipping and the public helpers."""

import math

import pytest
import torch

from megalong.model.attention import packed_seq_params_for, resolve_backend
from megalong.model.attention.blocks import plan_blocks
from megalong.data.cp_shard import load_balanced_index
from megalong.model.attention.layout import DocumentLayout, document_ids
from megalong.model.attention.local import sdpa_attention
from megalong.model.attention.reference import reference_attention
from megalong.model.attention.ring import ring_attention
from tests.model.attention.cases import make_inputs


def _check_against_reference(attention, seed, styles, tile, dtype=torch.float64, tol=1e-10):
    cu_seqlens, q, k, v, grad_out = make_inputs(48, 2, 4, 2, 8, seed=seed, styles=styles, dtype=dtype)
    layout = DocumentLayout.from_sample_cu_seqlens(cu_seqlens, 48)
    scale = 1.0 / math.sqrt(8)
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = reference_attention(*ref_inputs, layout.doc_ids, scale)
    expected.backward(grad_out)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*inputs, layout, scale, tile)
    out.backward(grad_out)
    assert (out - expected).abs().max() < tol
    for mine, theirs in zip(inputs, ref_inputs):
        assert (mine.grad - theirs.grad).abs().max() < tol


@pytest.mark.parametrize("tile", [1, 5, 16, 256])
@pytest.mark.parametrize("styles", [("mixed", "short"), ("single", "single")])
def test_sdpa_backend_matches_reference(tile, styles):
    _check_against_reference(sdpa_attention, 0, styles, tile)


@pytest.mark.parametrize("tile", [1, 5, 256])
def test_block_kernel_without_cp_matches_reference(tile):
    def ring_single(q, k, v, layout, scale, tile):
        return ring_attention(q, k, v, layout, None, scale, tile)

    _check_against_reference(ring_single, 1, ("mixed", "short"), tile)


def test_fp32_matches_reference_to_1e5():
    _check_against_reference(sdpa_attention, 2, ("mixed", "short"), 8, torch.float32, 1e-5)


def test_block_skipping_follows_documents():
    seq = 1024
    # 16 documents of 64 tokens: only diagonal tiles of 64 are visible.
    layout = DocumentLayout.from_sample_cu_seqlens([torch.arange(0, seq + 1, 64)], seq)
    pos = load_balanced_index(seq, 1, 0)
    plan = plan_blocks(pos, layout.doc_ids, pos, layout.doc_ids, tile=64)
    assert plan.visible_pairs == 16 and plan.total_pairs == 256
    # One document: plain causal, the lower triangle of tiles.
    causal = DocumentLayout.causal(1, seq)
    plan = plan_blocks(pos, causal.doc_ids, pos, causal.doc_ids, tile=64)
    assert plan.visible_pairs == 16 * 17 // 2


def test_cp_rank_sees_no_key_of_a_later_chunk():
    # Rank 0 of CP=2 holds chunks 0 and 3; rank 1's chunks 1 and 2 lie between them.
    layout = DocumentLayout.causal(1, 16)
    q_pos, k_pos = load_balanced_index(16, 2, 0), load_balanced_index(16, 2, 1)
    plan = plan_blocks(q_pos, layout.local_doc_ids(2, 0), k_pos, layout.local_doc_ids(2, 1), tile=4)
    assert [row[:2] for row in plan.rows] == [(4, 8)]  # only chunk 3 looks at rank 1's keys


def test_document_ids_reject_bad_boundaries():
    assert document_ids(torch.tensor([0, 2, 5]), 5).tolist() == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="from 0 to the sequence length 6"):
        document_ids(torch.tensor([0, 2, 5]), 6)
    with pytest.raises(ValueError, match="rise strictly"):
        document_ids(torch.tensor([0, 2, 2, 5]), 5)


def test_packed_seq_params_keep_rope_global():
    params = packed_seq_params_for([torch.tensor([0, 3, 8]), torch.tensor([0, 8])], 8)
    assert params.qkv_format == "sbhd"  # Megatron-Core then applies RoPE at global positions
    assert params.max_seqlen_q == params.max_seqlen_kv == 8  # sizes Megatron's RoPE table
    assert params.cu_seqlens_q.tolist() == [0, 3, 8, 16]
    assert params.layout.doc_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [2] * 8]  # ids unique per batch
    assert packed_seq_params_for(None, 8) is None
    with pytest.raises(ValueError, match="sample 1"):
        packed_seq_params_for([torch.tensor([0, 8]), torch.tensor([0, 9])], 8)


def test_backend_choice():
    assert resolve_backend("auto", on_gpu=False) == "sdpa"
    assert resolve_backend("sdpa", on_gpu=False) == "sdpa"
    with pytest.raises(ValueError, match="needs a GPU"):
        resolve_backend("te", on_gpu=False)
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend("xformers", on_gpu=False)


def test_core_attention_spec_per_choice():
    from megalong.model import preset_config
    from megalong.model.attention import core_attention_spec
    from megalong.model.attention.core import DocumentAttention
    from megalong.model.llama import ModelChoice

    spec = core_attention_spec(ModelChoice("local", on_gpu=False), preset_config("test-tiny", cp_comm="a2a"))
    assert spec.module is DocumentAttention
    assert spec.params == {"backend": "sdpa", "cp_comm": "a2a"}


def test_core_attention_refuses_a_dense_mask_and_wrong_shapes():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megalong.model.attention.core import DocumentAttention

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               attention_dropout=0.0, hidden_dropout=0.0)
    attention = DocumentAttention(config, layer_number=2, backend="sdpa", cp_comm="ring")
    q, k = torch.randn(8, 1, 4, 8), torch.randn(8, 1, 2, 8)
    assert attention(q, k, k).shape == (8, 1, 32)  # no params: one causal document per sample
    with pytest.raises(ValueError, match="attention_mask=None"):
        attention(q, k, k, torch.ones(1, 1, 8, 8, dtype=torch.bool))
    params = packed_seq_params_for([torch.tensor([0, 4, 8])] * 2, 8)
    with pytest.raises(ValueError, match="2 sample"):
        attention(q, k, k, packed_seq_params=params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_and_written_out_block_kernels_agree(dtype):
    """The two block-kernel paths, including query rows that see no key in the block."""
    from megalong.model.attention.blocks import block_backward, block_forward

    generator = torch.Generator().manual_seed(4)
    q = torch.randn(2, 2, 3, 24, 8, generator=generator, dtype=dtype)  # [b, hkv, g, sq, d]
    k, v = (torch.randn(2, 2, 20, 8, generator=generator, dtype=dtype) for _ in range(2))
    q_pos, k_pos = torch.arange(10, 34), torch.arange(0, 20)
    q_doc = torch.tensor([[0] * 4 + [1] * 20, [0] * 12 + [2] * 12])
    k_doc = torch.tensor([[0] * 20, [0] * 20])  # sample 0's document 1 sees nothing here
    plan = plan_blocks(q_pos, q_doc, k_pos, k_doc, tile=5)
    fused = block_forward(q, k, v, q_pos, q_doc, k_pos, k_doc, 0.3, plan, fused=True)
    math_ = block_forward(q, k, v, q_pos, q_doc, k_pos, k_doc, 0.3, plan, fused=False)
    assert torch.equal(torch.isinf(fused[1]), torch.isinf(math_[1])) and torch.isinf(fused[1]).any()
    finite = torch.isfinite(math_[1])
    assert (fused[1][finite] - math_[1][finite]).abs().max() < 1e-5
    assert (fused[0] - math_[0]).abs().max() < 1e-5
    # Backward against a "final" lse/out that includes other blocks: here this block only.
    dout = torch.randn(q.shape, generator=generator, dtype=dtype)
    out, lse = math_[0], torch.where(finite, math_[1], torch.zeros_like(math_[1]))
    delta = (dout * out).sum(-1)
    grads_fused = block_backward(dout, q, k, v, out, lse, delta, q_pos, q_doc, k_pos, k_doc, 0.3, plan, fused=True)
    grads_math = block_backward(dout, q, k, v, out, lse, delta, q_pos, q_doc, k_pos, k_doc, 0.3, plan, fused=False)
    for a, b in zip(grads_fused, grads_math):
        assert (a - b).abs().max() < 1e-5


def test_ring_skips_steps_no_rank_needs():
    from megalong.model.attention.ring import needed_steps

    def steps(cu):
        return needed_steps(DocumentLayout.from_sample_cu_seqlens([torch.tensor(cu)], 64), 4, tile=4)

    assert steps(list(range(0, 65, 8))) == [0]  # documents = CP chunks: no communication at all
    # Documents straddling chunk edges: rank r needs rank r-1 (its first chunk) and rank
    # r+1 = r-3 (its second chunk), never the rank two away.
    assert steps([0, 6, 10, 14, 18, 22, 26, 30, 34, 38, 42, 46, 50, 54, 58, 62, 64]) == [0, 1, 3]
    assert steps([0, 64]) == [0, 1, 2, 3]  # one document: the full ring
