"""The state-dict adapter: QKV grouping, gate/up fusion, vocab padding, exact inverses."""

import pytest
import torch

from megalong.convert.adapter import LlamaStateDictAdapter, StateDictMismatchError, checkpoint_key
from megalong.model.config import ModelConfig


def _config(heads=8, groups=2, tied=False, vocab=517):
    return ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=heads,
                       num_query_groups=groups, vocab_size=vocab, max_position_embeddings=64, rope_theta=1e4,
                       tie_word_embeddings=tied, norm_epsilon=1e-5, make_vocab_size_divisible_by=128)


def _random_hf(adapter, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in adapter.hf_shapes().items()}


@pytest.mark.parametrize("heads,groups,tied", [(4, 4, True), (4, 2, False), (8, 2, True), (8, 1, False)])
def test_from_hf_then_to_hf_is_bit_exact(heads, groups, tied):
    adapter = LlamaStateDictAdapter(_config(heads, groups, tied))
    hf = _random_hf(adapter, torch.bfloat16)
    megatron = adapter.from_hf(hf)
    assert {n: tuple(t.shape) for n, t in megatron.items()} == adapter.megatron_shapes()
    back = adapter.to_hf(megatron)
    assert back.keys() == hf.keys()
    for name in hf:
        assert back[name].dtype == hf[name].dtype and torch.equal(back[name], hf[name]), name
    assert ("output_layer.weight" in megatron) == (not tied)


def test_qkv_is_grouped_by_kv_head():
    """Group g holds its query heads, then key head g, then value head g (what TP splits by)."""
    cfg = _config(heads=8, groups=2)
    adapter = LlamaStateDictAdapter(cfg)
    hd, hidden = cfg.head_dim, cfg.hidden_size
    # Label every row by (projection, head).
    q = torch.arange(8).repeat_interleave(hd).float()[:, None].expand(-1, hidden) + 100
    k = torch.arange(2).repeat_interleave(hd).float()[:, None].expand(-1, hidden) + 200
    v = torch.arange(2).repeat_interleave(hd).float()[:, None].expand(-1, hidden) + 300
    names = adapter.hf_sources("decoder.layers.1.self_attention.linear_qkv.weight")
    fused = adapter.from_hf(dict(zip(names, (q, k, v))))["decoder.layers.1.self_attention.linear_qkv.weight"]
    row_labels = fused[::hd, 0].tolist()
    assert row_labels == [100, 101, 102, 103, 200, 300, 104, 105, 106, 107, 201, 301]


def test_fc1_is_gate_then_up_and_vocab_padded_with_zeros():
    cfg = _config()
    adapter = LlamaStateDictAdapter(cfg)
    hf = _random_hf(adapter)
    megatron = adapter.from_hf(hf)
    fc1 = megatron["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[:48], hf["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(fc1[48:], hf["model.layers.0.mlp.up_proj.weight"])
    emb = megatron["embedding.word_embeddings.weight"]
    assert emb.shape == (640, 32) and torch.equal(emb[:517], hf["model.embed_tokens.weight"])
    assert not emb[517:].any()
    assert megatron["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"] is hf[
        "model.layers.0.input_layernorm.weight"]


def test_to_hf_strips_any_padding():
    adapter = LlamaStateDictAdapter(_config(), padded_vocab_size=768)  # padded for TP=2
    table = torch.randn(768, 32)
    assert torch.equal(adapter.to_hf({"output_layer.weight": table})["lm_head.weight"], table[:517])


def test_partial_groups_and_wrong_shapes_are_errors():
    adapter = LlamaStateDictAdapter(_config())
    hf = _random_hf(adapter)
    with pytest.raises(StateDictMismatchError, match="k_proj"):
        adapter.from_hf({"model.layers.0.self_attn.q_proj.weight": hf["model.layers.0.self_attn.q_proj.weight"]})
    with pytest.raises(StateDictMismatchError, match="o_proj.*shape"):
        adapter.from_hf({"model.layers.0.self_attn.o_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(StateDictMismatchError, match="unexpected"):
        adapter.from_hf({"model.layers.9.mlp.down_proj.weight": torch.zeros(32, 48)})


def test_checkpoint_keys_stack_layers():
    assert checkpoint_key("decoder.layers.12.mlp.linear_fc1.weight") == ("decoder.layers.mlp.linear_fc1.weight", 12)
    assert checkpoint_key("embedding.word_embeddings.weight") == ("embedding.word_embeddings.weight", None)
