"""The CPU kernel profile against the attention code it models (fast, one process).

The measured acceptance test (test_memory_measured.py) checks whole training steps; this
checks the attention terms of ``CPU_LOCAL`` directly: what megalong's tiled SDPA attention
saves for its backward pass, storage by storage.
"""

import pytest
import torch

from megalong.config import ParallelConfig
from megalong.model import ModelConfig
from megalong.model.attention import local
from megalong.model.attention.blocks import DEFAULT_TILE
from megalong.model.attention.layout import DocumentLayout
from megalong.model.presets import resolve
from megalong.plan import memory

ATTENTION_TERMS = ("attention masks", "attention output tiles", "softmax statistics")


def test_profile_tile_is_the_attention_tile():
    assert memory.CPU_LOCAL.attention_tile == DEFAULT_TILE


@pytest.mark.parametrize("seq", [1, 100, 256, 257, 600, 1024])
def test_mask_elements_follow_the_key_spans(seq):
    spans = local.key_spans(DocumentLayout.causal(1, seq), DEFAULT_TILE)
    expected = sum((q_end - q_start) * (q_end - k_start) for q_start, q_end, k_start in spans)
    assert memory.tiled_mask_elements(seq, DEFAULT_TILE) == expected


@pytest.mark.parametrize("seq,batch", [(200, 1), (256, 2), (600, 1)])
def test_tiled_attention_saves_what_the_profile_counts(seq, batch):
    model = resolve(ModelConfig(preset="test-tiny"))
    a, g, d = model.num_attention_heads, model.num_query_groups, model.head_dim
    query = torch.randn(seq, batch, a, d, requires_grad=True)
    key = torch.randn(seq, batch, g, d, requires_grad=True)
    value = torch.randn(seq, batch, g, d, requires_grad=True)
    inputs = {t.untyped_storage().data_ptr() for t in (query, key, value)}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in inputs:  # q, k, v are counted as the layer's own tensors
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        local.sdpa_attention(query, key, value, DocumentLayout.causal(batch, seq), d ** -0.5)

    dims = memory._dims(model, ParallelConfig(), memory.TrainingShape(seq_length=seq, micro_batch=batch),
                        memory.FP32)
    parts = memory.layer_activations(dims, memory.CPU_LOCAL, memory.FP32)
    assert sum(saved.values()) == sum(parts[name] for name in ATTENTION_TERMS)
    recomputed = memory.layer_activations(dims, memory.CPU_LOCAL, memory.FP32, recompute_attention=True)
    assert not set(ATTENTION_TERMS) & set(recomputed)
