"""Hugging Face Llama directory -> megalong weights directory (streaming).

The output is ``<out>/model/`` (a Megatron-Core torch_dist checkpoint keyed exactly as
``GPTModel.sharded_state_dict()`` keys it, global layer numbers, vocab padded for TP=1)
plus ``<out>/model.yaml``; it loads with ``load_weights`` into a model built at any TP/PP
(Megatron-Core re-pads the vocab for other TP sizes: its embedding and output keys allow
a shape mismatch and the extra rows stay zero).

Memory and speed: each Megatron tensor is produced only when its turn to be written is
next, by reading its Hugging Face rows straight into place (q/k/v and gate/up need no
intermediate copies), while the tensor before it is being written; so peak memory is
about the two largest tensors (the embedding table and one of a layer's), not the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megalong.checkpoint.layout import MODEL_SUBDIR, write_model_config
from megalong.convert import dist_io
from megalong.convert.adapter import (
    HF_EMBEDDING, HF_OUTPUT, LlamaStateDictAdapter, StateDictMismatchError, checkpoint_key,
)
from megalong.convert.hf_checkpoint import HFCheckpoint
from megalong.convert.hf_config import model_config_from_hf
from megalong.convert.output_dir import staged_output
from megalong.convert.progress import Progress, human_bytes

log = logging.getLogger("megalong.convert")

# Buffers older transformers versions saved; they are recomputed from the config.
_SKIPPABLE_SUFFIXES = ("rotary_emb.inv_freq",)
# Megatron-Core linear layers that carry an ``_extra_state`` object (None for local layers,
# FP8 scaling state for Transformer Engine layers, which they rebuild when it is None).
_EXTRA_STATE_LAYERS = (
    "self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2",
)


@dataclass
class ConversionReport:
    output: Path
    tensors: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)


def _check_tensors(hf: HFCheckpoint, adapter: LlamaStateDictAdapter) -> list[str]:
    """Every expected tensor is present with the config's shape; returns skipped names."""
    expected = adapter.hf_shapes()
    available = set(hf.names())
    missing = [n for n in expected if n not in available]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise StateDictMismatchError(f"{hf.directory}: tensors the config needs are missing: {shown}")
    for name, shape in expected.items():
        if hf.shape(name) != shape:
            raise StateDictMismatchError(
                f"{hf.directory}: {name} in {hf.file_of(name).name} has shape {list(hf.shape(name))}, "
                f"but config.json implies {list(shape)} (config does not match the weights)"
            )
    skipped, unexpected = [], []
    for name in sorted(available - set(expected)):
        if name.endswith(_SKIPPABLE_SUFFIXES) or (name == HF_OUTPUT and adapter.model.tie_word_embeddings):
            skipped.append(name)
        else:
            unexpected.append(name)
    if unexpected:
        raise StateDictMismatchError(
            f"{hf.directory}: tensors that this Llama config has no place for: {', '.join(unexpected[:5])}"
            + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        )
    return skipped


def _producer(hf: HFCheckpoint, adapter: LlamaStateDictAdapter, name: str, stacked: bool):
    sources = adapter.hf_sources(name)
    dtypes = {hf.dtype(s) for s in sources}
    if len(dtypes) != 1:
        raise StateDictMismatchError(f"{name}: its sources {sources} have different dtypes {sorted(map(str, dtypes))}")
    dtype = dtypes.pop()
    check_tied = HF_EMBEDDING in sources and adapter.model.tie_word_embeddings and HF_OUTPUT in hf.names()
    blocks = adapter.row_blocks(name)

    def produce() -> torch.Tensor:
        # Each run of source rows is read straight into its place in the fused tensor:
        # no intermediate copies of q/k/v or gate/up.
        tensor = adapter.new_fused(name, dtype)
        for block in blocks:
            hf.read_rows(block.source, block.source_start, tensor.narrow(0, block.start, block.rows))
        if check_tied:
            # A tied checkpoint that also stores lm_head must store the same table.
            if not torch.equal(hf.read(HF_OUTPUT), tensor[: adapter.model.vocab_size]):
                raise StateDictMismatchError(
                    f"{hf.directory}: tie_word_embeddings is true but lm_head.weight differs from "
                    "model.embed_tokens.weight"
                )
        return tensor.unsqueeze(0) if stacked else tensor

    return produce, dtype


def convert_hf_to_megatron(hf_dir: str | Path, output: str | Path) -> ConversionReport:
    """Convert a Hugging Face Llama directory into a megalong weights directory."""
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"output {output} already exists; choose a new path or remove it first")
    hf = HFCheckpoint(hf_dir)
    model = model_config_from_hf(hf.config, str(Path(hf_dir) / "config.json"))
    if hf.generation_config is not None:
        model.extra["hf"]["generation_config"] = hf.generation_config
    model.validate()
    adapter = LlamaStateDictAdapter(model)
    skipped = _check_tensors(hf, adapter)
    for name in skipped:
        log.info("skipping %s (%s)", name, "same table as the tied embedding" if name == HF_OUTPUT else "recomputed from the config")

    pieces: list[dist_io.TensorPiece] = []
    objects: list[dist_io.ObjectPiece] = []
    L = model.num_layers
    for name, shape in adapter.megatron_shapes().items():
        key, layer = checkpoint_key(name)
        produce, dtype = _producer(hf, adapter, name, stacked=layer is not None)
        if layer is None:
            pieces.append(dist_io.TensorPiece(key, shape, (0,) * len(shape), shape, dtype, produce))
        else:
            pieces.append(dist_io.TensorPiece(
                key, (L, *shape), (layer,) + (0,) * len(shape), (1, *shape), dtype, produce,
            ))
    for layer in range(L):
        for module in _EXTRA_STATE_LAYERS:
            key = f"decoder.layers.{module}._extra_state"
            objects.append(dist_io.ObjectPiece(dist_io.sharded_object_key(key, (layer,), (L,)), None))

    total = sum(p.nbytes for p in pieces)
    log.info(
        "Converting %s -> %s: %d layers, hidden %d, %d/%d heads, vocab %d (padded to %d), RoPE theta %r%s, %s",
        hf_dir, output, L, model.hidden_size, model.num_attention_heads, model.num_query_groups,
        model.vocab_size, adapter.padded_vocab_size, model.rope_theta,
        f", llama3 scaling x{model.rope_scaling.factor:g}" if model.rope_scaling else "", human_bytes(total),
    )
    progress = Progress("hf-to-megatron", total)
    report = ConversionReport(output=output, skipped=skipped)

    def written(piece, tensor):
        report.tensors += 1
        report.bytes_written += piece.nbytes  # the writer checked the tensor against the piece
        progress.advance(piece.nbytes, piece.key)

    with staged_output(output) as tmp:
        dist_io.write_checkpoint(tmp / MODEL_SUBDIR, pieces, objects, on_written=written)
        write_model_config(tmp, model)
    report.seconds = progress.elapsed()
    log.info("Wrote %s: %d tensors, %s in %.1f s", output, report.tensors, human_bytes(report.bytes_written), report.seconds)
    return report
