"""The Llama state-dict adapter: Hugging Face names <-> Megatron-Core GPTModel names.

The whole interface is :meth:`LlamaStateDictAdapter.from_hf` and
:meth:`LlamaStateDictAdapter.to_hf`, each a function from a (possibly partial) flat
state dict to the other side's flat state dict, so they work on one layer as well as on
a whole model. The fusion rules are stated once, as runs of rows
(:meth:`LlamaStateDictAdapter.row_blocks`): both directions follow them, and the
streaming converter uses them to read each run straight into place.

Megatron-side names are the ones GPTModel's Transformer Engine layers use, with
global layer numbers, e.g. ``decoder.layers.3.self_attention.linear_qkv.weight``;
Megatron-Core's local layers store their checkpoints under the same names, so
:func:`checkpoint_key` turns a name into the key of the distributed checkpoint (layers
stacked along a leading axis) at any implementation and parallel layout.

What is not a renaming:

* Q, K and V are fused into ``linear_qkv`` grouped by key/value head: for each of the
  ``num_query_groups`` groups, that group's query heads, then its key head, then its
  value head. Tensor parallelism splits this tensor by whole groups.
* gate and up projections are fused into ``linear_fc1`` as ``[gate; up]``.
* The vocabulary is padded with zero rows to Megatron's padded size on the way in and
  stripped on the way out. Tied embeddings (Llama-3.2) have no ``output_layer``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch

from megalong.model.config import ModelConfig

HF_EMBEDDING = "model.embed_tokens.weight"
HF_FINAL_NORM = "model.norm.weight"
HF_OUTPUT = "lm_head.weight"
MEGATRON_EMBEDDING = "embedding.word_embeddings.weight"
MEGATRON_FINAL_NORM = "decoder.final_layernorm.weight"
MEGATRON_OUTPUT = "output_layer.weight"

# Per-layer names (without the "model.layers.{i}." / "decoder.layers.{i}." prefix).
_HF_LAYER = {
    "input_norm": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "post_norm": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}
QKV_NORM = "self_attention.linear_qkv.layer_norm_weight"
QKV = "self_attention.linear_qkv.weight"
PROJ = "self_attention.linear_proj.weight"
FC1_NORM = "mlp.linear_fc1.layer_norm_weight"
FC1 = "mlp.linear_fc1.weight"
FC2 = "mlp.linear_fc2.weight"
MEGATRON_LAYER_NAMES = (QKV_NORM, QKV, PROJ, FC1_NORM, FC1, FC2)
# Megatron per-layer name -> the HF per-layer names it is made of, in fusion order.
_SOURCES = {
    QKV_NORM: ("input_norm",),
    QKV: ("q", "k", "v"),
    PROJ: ("o",),
    FC1_NORM: ("post_norm",),
    FC1: ("gate", "up"),
    FC2: ("down",),
}

_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MEGATRON_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class RowBlock:
    """Rows ``[source_start, source_start + rows)`` of a Hugging Face tensor are rows
    ``[start, start + rows)`` of the Megatron tensor."""

    source: str
    source_start: int
    start: int
    rows: int


class StateDictMismatchError(ValueError):
    """Weights that do not fit the model config (missing, unexpected or misshapen tensors)."""


def checkpoint_key(name: str) -> tuple[str, int | None]:
    """(distributed-checkpoint key, layer index or None) of a Megatron-side name."""
    match = _MEGATRON_LAYER_RE.match(name)
    if match:
        return f"decoder.layers.{match.group(2)}", int(match.group(1))
    return name, None


class LlamaStateDictAdapter:
    """Maps Llama weights between Hugging Face and Megatron-Core for one ModelConfig."""

    def __init__(self, model: ModelConfig, padded_vocab_size: int | None = None):
        self.model = model
        self.padded_vocab_size = padded_vocab_size or model.padded_vocab_size(1)
        if self.padded_vocab_size < model.vocab_size:
            raise ValueError(f"padded vocab {self.padded_vocab_size} < vocab_size {model.vocab_size}")
        self.head_dim = model.head_dim
        self.groups = model.num_query_groups
        self.heads_per_group = model.num_attention_heads // model.num_query_groups

    # ---- the shapes of both sides -------------------------------------------------------

    def _hf_layer_shapes(self) -> dict[str, tuple[int, ...]]:
        m, h = self.model, self.model.hidden_size
        q_rows, kv_rows = m.num_attention_heads * self.head_dim, self.groups * self.head_dim
        return {
            "input_norm": (h,), "q": (q_rows, h), "k": (kv_rows, h), "v": (kv_rows, h), "o": (h, q_rows),
            "post_norm": (h,), "gate": (m.ffn_hidden_size, h), "up": (m.ffn_hidden_size, h),
            "down": (h, m.ffn_hidden_size),
        }

    def _megatron_layer_shapes(self) -> dict[str, tuple[int, ...]]:
        m, h = self.model, self.model.hidden_size
        qkv_rows = (m.num_attention_heads + 2 * self.groups) * self.head_dim
        return {
            QKV_NORM: (h,), QKV: (qkv_rows, h), PROJ: (h, m.num_attention_heads * self.head_dim),
            FC1_NORM: (h,), FC1: (2 * m.ffn_hidden_size, h), FC2: (h, m.ffn_hidden_size),
        }

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every Hugging Face tensor of this model, in release order, with its shape."""
        m, h = self.model, self.model.hidden_size
        layer = self._hf_layer_shapes()
        shapes = {HF_EMBEDDING: (m.vocab_size, h)}
        for i in range(m.num_layers):
            for part, suffix in _HF_LAYER.items():
                shapes[f"model.layers.{i}.{suffix}"] = layer[part]
        shapes[HF_FINAL_NORM] = (h,)
        if not m.tie_word_embeddings:
            shapes[HF_OUTPUT] = (m.vocab_size, h)
        return shapes

    def megatron_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every Megatron-side tensor of this model (global, unsharded), with its shape."""
        m, h = self.model, self.model.hidden_size
        layer = self._megatron_layer_shapes()
        shapes = {MEGATRON_EMBEDDING: (self.padded_vocab_size, h)}
        for i in range(m.num_layers):
            for name in MEGATRON_LAYER_NAMES:
                shapes[f"decoder.layers.{i}.{name}"] = layer[name]
        shapes[MEGATRON_FINAL_NORM] = (h,)
        if not m.tie_word_embeddings:
            shapes[MEGATRON_OUTPUT] = (self.padded_vocab_size, h)
        return shapes

    def megatron_shape(self, megatron_name: str) -> tuple[int, ...]:
        """The (global, unsharded) shape of one Megatron-side tensor."""
        h = self.model.hidden_size
        if megatron_name in (MEGATRON_EMBEDDING, MEGATRON_OUTPUT):
            return (self.padded_vocab_size, h)
        if megatron_name == MEGATRON_FINAL_NORM:
            return (h,)
        return self._megatron_layer_shapes()[self._layer_part(megatron_name)[1]]

    def hf_source_shapes(self, megatron_name: str) -> dict[str, tuple[int, ...]]:
        """The Hugging Face tensors ``megatron_name`` is made of, in fusion order, with shapes."""
        h = self.model.hidden_size
        if megatron_name in (MEGATRON_EMBEDDING, MEGATRON_OUTPUT):
            return {self.hf_sources(megatron_name)[0]: (self.model.vocab_size, h)}
        if megatron_name == MEGATRON_FINAL_NORM:
            return {HF_FINAL_NORM: (h,)}
        layer, suffix = self._layer_part(megatron_name)
        shapes = self._hf_layer_shapes()
        return {f"model.layers.{layer}.{_HF_LAYER[part]}": shapes[part] for part in _SOURCES[suffix]}

    def _layer_part(self, megatron_name: str) -> tuple[int, str]:
        match = _MEGATRON_LAYER_RE.match(megatron_name)
        if not match or match.group(2) not in _SOURCES:
            raise KeyError(f"not a Llama Megatron tensor name: {megatron_name!r}")
        return int(match.group(1)), match.group(2)

    def hf_sources(self, megatron_name: str) -> list[str]:
        """The Hugging Face tensors that ``megatron_name`` is made of."""
        if megatron_name == MEGATRON_EMBEDDING:
            return [HF_EMBEDDING]
        if megatron_name == MEGATRON_FINAL_NORM:
            return [HF_FINAL_NORM]
        if megatron_name == MEGATRON_OUTPUT:
            return [HF_OUTPUT]
        layer, suffix = self._layer_part(megatron_name)
        return [f"model.layers.{layer}.{_HF_LAYER[part]}" for part in _SOURCES[suffix]]

    # ---- the two conversions ------------------------------------------------------------

    def from_hf(self, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hugging Face tensors -> Megatron tensors. Partial dicts convert the complete groups
        they contain (a layer's q, k and v together); a lone member of a group is an error."""
        hf_shapes = self.hf_shapes()
        for name, tensor in hf_state.items():
            if name not in hf_shapes:
                raise StateDictMismatchError(f"unexpected Hugging Face tensor {name!r} for this config")
            if tuple(tensor.shape) != hf_shapes[name]:
                raise StateDictMismatchError(
                    f"Hugging Face tensor {name!r} has shape {list(tensor.shape)}, the config says "
                    f"{list(hf_shapes[name])}"
                )
        out: dict[str, torch.Tensor] = {}
        for megatron_name in self.megatron_shapes():
            sources = self.hf_sources(megatron_name)
            present = [s for s in sources if s in hf_state]
            if not present:
                continue
            if len(present) != len(sources):
                missing = sorted(set(sources) - set(present))
                raise StateDictMismatchError(f"{megatron_name} needs {', '.join(missing)} as well")
            out[megatron_name] = self._fuse(megatron_name, {s: hf_state[s] for s in sources})
        return out

    def to_hf(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Megatron tensors -> Hugging Face tensors (any subset of names)."""
        shapes = self.megatron_shapes()
        out: dict[str, torch.Tensor] = {}
        for name, tensor in state.items():
            if name not in shapes:
                raise StateDictMismatchError(f"unexpected Megatron tensor {name!r} for this config")
            expected = shapes[name]
            if name in (MEGATRON_EMBEDDING, MEGATRON_OUTPUT):
                # Any padding is accepted: the checkpoint may come from a different TP size.
                if tensor.dim() != 2 or tensor.shape[1] != expected[1] or tensor.shape[0] < self.model.vocab_size:
                    raise StateDictMismatchError(
                        f"Megatron tensor {name!r} has shape {list(tensor.shape)}, expected "
                        f"[>= {self.model.vocab_size}, {expected[1]}]"
                    )
            elif tuple(tensor.shape) != expected:
                raise StateDictMismatchError(
                    f"Megatron tensor {name!r} has shape {list(tensor.shape)}, the config says {list(expected)}"
                )
            for hf_name, part in zip(self.hf_sources(name), self._split(name, tensor)):
                out[hf_name] = part
        return out

    # ---- fusion rules -------------------------------------------------------------------

    def row_blocks(self, megatron_name: str) -> list[RowBlock]:
        """Where each Hugging Face source of ``megatron_name`` lies in it, as runs of whole rows
        (the first dimension; elements of a 1-D tensor). Rows no block covers are vocabulary
        padding, zero. Every fusion rule is stated here once, and both directions and the
        streaming converter (which reads each run straight into place) follow it."""
        sources = self.hf_sources(megatron_name)
        if megatron_name in (MEGATRON_EMBEDDING, MEGATRON_OUTPUT):
            return [RowBlock(sources[0], 0, 0, self.model.vocab_size)]
        if megatron_name.endswith(QKV):
            q, k, v = sources
            q_rows = self.heads_per_group * self.head_dim
            group_rows = q_rows + 2 * self.head_dim
            blocks = []
            for g in range(self.groups):
                blocks += [
                    RowBlock(q, g * q_rows, g * group_rows, q_rows),
                    RowBlock(k, g * self.head_dim, g * group_rows + q_rows, self.head_dim),
                    RowBlock(v, g * self.head_dim, g * group_rows + q_rows + self.head_dim, self.head_dim),
                ]
            return blocks
        if megatron_name.endswith(FC1):
            gate, up = sources
            rows = self.model.ffn_hidden_size
            return [RowBlock(gate, 0, 0, rows), RowBlock(up, 0, rows, rows)]
        (source,) = sources
        return [RowBlock(source, 0, 0, self.hf_source_shapes(megatron_name)[source][0])]

    def _fuse(self, megatron_name: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        blocks = self.row_blocks(megatron_name)
        first = tensors[blocks[0].source]
        shape = self.megatron_shape(megatron_name)
        if len(blocks) == 1 and tuple(first.shape) == shape:
            return first  # a renaming: no copy
        out = self.new_fused(megatron_name, first.dtype)
        for block in blocks:
            out.narrow(0, block.start, block.rows).copy_(tensors[block.source].narrow(0, block.source_start, block.rows))
        return out

    def new_fused(self, megatron_name: str, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised Megatron tensor to fill block by block (vocabulary padding zeroed)."""
        shape = self.megatron_shape(megatron_name)
        out = torch.empty(shape, dtype=dtype)
        covered = sum(block.rows for block in self.row_blocks(megatron_name))
        if covered < shape[0]:
            out[covered:].zero_()  # only the embedding and output tables have uncovered rows, at the end
        return out

    def _split(self, megatron_name: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        blocks = self.row_blocks(megatron_name)
        shapes = self.hf_source_shapes(megatron_name)
        if len(blocks) == 1 and tensor.shape[0] == blocks[0].rows:
            return [tensor]  # a renaming: no copy
        parts = {name: tensor.new_empty(shape) for name, shape in shapes.items()}
        for block in blocks:
            parts[block.source].narrow(0, block.source_start, block.rows).copy_(tensor.narrow(0, block.start, block.rows))
        return [parts[name] for name in self.hf_sources(megatron_name)]


def layer_index(hf_name: str) -> int | None:
    """The layer number of a Hugging Face tensor name, or None for non-layer tensors."""
    match = _HF_LAYER_RE.match(hf_name)
    return int(match.group(1)) if match else None


def group_by_layer(names: Iterable[str]) -> list[list[str]]:
    """Consecutive runs of Megatron names that belong to the same layer (None = no layer)."""
    groups: list[list[str]] = []
    last: object = object()
    for name in names:
        _, layer = checkpoint_key(name)
        if layer != last or not groups:
            groups.append([])
            last = layer
        groups[-1].append(name)
    return groups
