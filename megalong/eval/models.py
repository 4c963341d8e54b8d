"""Language models the evaluation can run: a Hugging Face export or a megalong weights dir.

Both expose the same two operations on token ids:

* ``greedy_generate(prompt_ids, max_new_tokens, stop_ids)`` -> generated ids (greedy);
* ``token_losses(ids)`` -> float64 array of the negative log-likelihood of ``ids[1:]``,
  each token given everything before it.

The Hugging Face runner uses transformers with its KV cache and computes only the logits
it needs (the last position while generating, chunks of positions for losses), so it is
the one for long contexts. The megalong runner builds the model with Megatron-Core in this
one process (TP = PP = CP = 1) and decodes with Megatron-Core's static KV cache; its
losses materialize the logits of every position and its attention is whatever the model's
layer spec gives (the local spec computes full [S, S] scores). Fine for small models and
short prompts (tests, quickstart); for 128K+ evaluations of real models use the HF export.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

MODEL_KINDS = ("auto", "hf", "megalong")
# Positions whose logits the HF runner materializes at once when computing losses.
_LOSS_CHUNK = 1024


def detect_kind(path: str | Path) -> str:
    """'megalong' for a weights/training checkpoint dir, 'hf' for a Hugging Face model dir."""
    path = Path(path)
    if (path / "model.yaml").is_file() and (path / "model").is_dir():
        return "megalong"
    if (path / "config.json").is_file():
        return "hf"
    raise FileNotFoundError(
        f"{path} is neither a megalong weights directory (model.yaml + model/) "
        f"nor a Hugging Face model directory (config.json)"
    )


def open_model(path: str | Path, kind: str = "auto", device: str = "auto"):
    """Load the model at ``path`` for evaluation."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind {kind!r} is not one of {list(MODEL_KINDS)}")
    if kind == "auto":
        kind = detect_kind(path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return HuggingFaceModel(path, device) if kind == "hf" else MegalongModel(path, device)


class HuggingFaceModel:
    kind = "hf"

    def __init__(self, path: str | Path, device: str):
        from transformers import AutoModelForCausalLM

        self.path = Path(path)
        self.device = torch.device(device)
        # "auto" keeps the dtype the export was saved in (bf16 for real models). The keyword
        # is `dtype` since transformers 4.56 and `torch_dtype` before.
        import transformers

        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        self.model = AutoModelForCausalLM.from_pretrained(str(path), **{dtype_kw: "auto"}).to(self.device).eval()
        self.vocab_size = int(self.model.config.vocab_size)
        self.max_length = getattr(self.model.config, "max_position_embeddings", None)
        log.info("Loaded Hugging Face model %s (%s, %s) on %s", self.path,
                 type(self.model).__name__, self.model.dtype, self.device)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "class": type(self.model).__name__,
                "dtype": str(self.model.dtype), "device": str(self.device)}

    def chat_template_present(self) -> bool:
        config = self.path / "tokenizer_config.json"
        if not config.is_file():
            return False
        import json

        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))

    @torch.inference_mode()
    def greedy_generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
        ids = torch.tensor([prompt_ids], device=self.device)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        generated: list[int] = []
        for _ in range(max_new_tokens):
            next_id = int(out.logits[0, -1, : self.vocab_size].argmax())
            if next_id in stop_ids:
                break
            generated.append(next_id)
            out = self.model(
                input_ids=torch.tensor([[next_id]], device=self.device),
                past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1,
            )
        return generated

    @torch.inference_mode()
    def token_losses(self, ids: list[int]) -> np.ndarray:
        tokens = torch.tensor([ids], device=self.device)
        hidden = self.model.get_decoder()(input_ids=tokens, use_cache=False).last_hidden_state[0]
        head = self.model.get_output_embeddings()
        targets = tokens[0, 1:]
        losses = []
        for start in range(0, len(ids) - 1, _LOSS_CHUNK):
            end = min(start + _LOSS_CHUNK, len(ids) - 1)
            logits = head(hidden[start:end]).float()
            losses.append(torch.nn.functional.cross_entropy(logits, targets[start:end], reduction="none"))
        return torch.cat(losses).double().cpu().numpy()


class MegalongModel:
    kind = "megalong"

    def __init__(self, path: str | Path, device: str):
        from megalong.checkpoint.layout import read_model_config
        from megalong.checkpoint.weights import load_weights
        from megalong.config.parallel import ParallelConfig
        from megalong.model.llama import build_model
        from megalong.runtime import init_distributed, set_seed

        self.path = Path(path)
        # The weights' shape; FP8 and the layer implementations are chosen for this machine.
        self.config = read_model_config(self.path).for_inference()
        # One process, no model parallelism: the evaluation holds the whole model.
        self.runtime = init_distributed(ParallelConfig(), device=device)
        # Megatron-Core's attention forks its model-parallel RNG tracker even without dropout.
        set_seed(0)
        chunks = build_model(self.config, ParallelConfig(), on_gpu=self.runtime.on_gpu)
        load_weights(chunks, self.path)
        self.model = chunks[0].eval()
        self.device = self.runtime.device
        self.vocab_size = int(self.config.vocab_size)
        self.max_length = int(self.config.max_position_embeddings)
        log.info("Loaded megalong weights %s on %s", self.path, self.device)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "preset": self.config.preset,
                "params_dtype": self.config.params_dtype, "device": str(self.device)}

    def chat_template_present(self) -> bool:
        return False

    def _inputs(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        positions = torch.arange(len(ids), dtype=torch.long, device=self.device).unsqueeze(0)
        return tokens, positions

    @torch.inference_mode()
    def greedy_generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
        """Greedy decoding with Megatron-Core's static KV cache (last-position logits only)."""
        from megatron.core.inference.contexts import StaticInferenceContext

        context = StaticInferenceContext(max_batch_size=1, max_sequence_length=len(prompt_ids) + max_new_tokens)
        tokens, positions = self._inputs(prompt_ids)
        generated: list[int] = []
        for _ in range(max_new_tokens):
            # Inference mode needs the full-vocabulary logits gathered (a no-op without TP).
            logits = self.model(tokens, positions, None, inference_context=context, runtime_gather_output=True)
            next_id = int(logits[0, -1, : self.vocab_size].argmax())
            if next_id in stop_ids:
                break
            generated.append(next_id)
            context.sequence_len_offset += tokens.size(1)
            tokens = torch.tensor([[next_id]], dtype=torch.long, device=self.device)
            positions = torch.tensor([[context.sequence_len_offset]], dtype=torch.long, device=self.device)
        return generated

    @torch.inference_mode()
    def greedy_generate_recompute(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
        """Reference decoding without a cache: the whole sequence again for every token."""
        ids = list(prompt_ids)
        generated: list[int] = []
        for _ in range(max_new_tokens):
            tokens, positions = self._inputs(ids)
            logits = self.model(tokens, positions, attention_mask=None)  # [1, S, padded vocab]
            next_id = int(logits[0, -1, : self.vocab_size].argmax())
            if next_id in stop_ids:
                break
            generated.append(next_id)
            ids.append(next_id)
        return generated

    @torch.inference_mode()
    def token_losses(self, ids: list[int]) -> np.ndarray:
        tokens, positions = self._inputs(ids[:-1])
        targets = torch.tensor(ids[1:], dtype=torch.long, device=self.device)
        # Softmax over the real vocabulary only: the rows Megatron pads the vocabulary with
        # are not tokens (and do not exist in the Hugging Face export).
        logits = self.model(tokens, positions, attention_mask=None)[0, :, : self.vocab_size]
        losses = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
        return losses.double().cpu().numpy()
