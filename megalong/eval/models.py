"""Language models the evaluation can run: a Hugging Face export or a megalong weights dir.

Both expose the same two operations on token ids:

* ``greedy_generate(prompt_ids, max_new_tokens, stop_ids)`` -> generated ids (greedy);
* ``token_losses(ids)`` -> float64 array of the negative log-likelihood of ``ids[1:]``,
  each token given everything before it.

Losses never materialize the logits of every position: at 128K-512K tokens and a 128,256-entry
vocabulary those would take 67-269 GB in fp32. Both runners push the final hidden states
through the output layer and the cross entropy ``loss_chunk_tokens`` positions at a time
(no backward, so nothing is kept), so the logits that exist at once are [chunk, vocabulary]
whatever the length. The Hugging Face runner loops over chunks of its decoder's output; the
megalong runner uses the chunked cross entropy training uses
(:class:`megalong.model.gpt.MegalongGPTModel`, Megatron's padded vocabulary excluded),
which does the same inside Megatron-Core's forward.

The Hugging Face runner uses transformers with its KV cache (the last position's logits
only while generating). The megalong runner builds the model with Megatron-Core in this one
process (TP = PP = CP = 1), decodes with Megatron-Core's static KV cache, and attends with
megalong's own core attention (tiled SDPA on CPU, Transformer Engine or flash-attn on GPUs),
so neither computes [S, S] scores; each needs the whole model on one device.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from megalong.eval.config import DEFAULT_LOSS_CHUNK

log = logging.getLogger(__name__)

MODEL_KINDS = ("auto", "hf", "megalong")


def resolve_model(path: str | Path, kind: str = "auto") -> tuple[Path, str]:
    """Which model ``path`` means, and its kind: a Hugging Face directory (config.json) is
    itself; anything else is a megalong checkpoint as :func:`megalong.checkpoint.layout.resolve`
    reads it (a weights or ``iter_*`` directory, or a save directory's ``latest``)."""
    from megalong.checkpoint.layout import is_weights_dir, resolve

    path = Path(path)
    if kind == "hf" or (kind == "auto" and (path / "config.json").is_file() and not is_weights_dir(path)):
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path, "hf"
    try:
        return resolve(path), "megalong"
    except FileNotFoundError as err:
        if kind == "megalong":
            raise
        raise FileNotFoundError(f"{err}; nor is it a Hugging Face model directory (no config.json)") from None


def open_model(path: str | Path, kind: str = "auto", device: str = "auto",
               loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK):
    """Load the model at ``path`` for evaluation."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind {kind!r} is not one of {list(MODEL_KINDS)}")
    if kind == "auto":
        path, kind = resolve_model(path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    runner = HuggingFaceModel if kind == "hf" else MegalongModel
    return runner(path, device, loss_chunk_tokens)


def _check_chunk(loss_chunk_tokens: int) -> int:
    if int(loss_chunk_tokens) < 1:
        raise ValueError(f"loss chunk must be at least 1 token, got {loss_chunk_tokens}")
    return int(loss_chunk_tokens)


class HuggingFaceModel:
    kind = "hf"

    def __init__(self, path: str | Path, device: str, loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK):
        from transformers import AutoModelForCausalLM

        self.path = Path(path)
        self.device = torch.device(device)
        self.loss_chunk_tokens = _check_chunk(loss_chunk_tokens)
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
        # The decoder alone: [S, hidden], without the [S, vocabulary] logits of the full model.
        hidden = self.model.get_decoder()(input_ids=tokens, use_cache=False).last_hidden_state[0, :-1]
        head = self.model.get_output_embeddings()
        targets = tokens[0, 1:]
        losses = torch.empty(len(targets), dtype=torch.float64)
        for start in range(0, len(targets), self.loss_chunk_tokens):
            end = min(start + self.loss_chunk_tokens, len(targets))
            logits = head(hidden[start:end]).float()
            losses[start:end] = torch.nn.functional.cross_entropy(logits, targets[start:end], reduction="none").cpu()
            del logits  # before the next chunk's are made: one chunk of logits (and its log-softmax) at a time
        return losses.numpy()


class MegalongModel:
    kind = "megalong"

    def __init__(self, path: str | Path, device: str, loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK):
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
        # Calls with labels return per-token losses computed loss_chunk_tokens positions at a
        # time, with a softmax over the real vocabulary only (the rows Megatron pads the
        # vocabulary with are not tokens, and do not exist in the Hugging Face export); calls
        # without labels (decoding) return logits. Both from megalong's GPTModel.
        self.loss_chunk_tokens = _check_chunk(loss_chunk_tokens)
        chunks = build_model(self.config, ParallelConfig(), on_gpu=self.runtime.on_gpu,
                             loss_chunk_tokens=self.loss_chunk_tokens)
        load_weights(chunks, self.path)
        self.model = chunks[0].eval()
        self.device = self.runtime.device
        self.vocab_size = int(self.config.vocab_size)
        self.max_length = int(self.config.max_position_embeddings)
        log.info("Loaded megalong weights %s on %s", self.path, self.device)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "preset": self.config.preset,
                "params_dtype": self.config.params_dtype, "device": str(self.device)}

    def _inputs(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        positions = torch.arange(len(ids), dtype=torch.long, device=self.device).unsqueeze(0)
        return tokens, positions

    @torch.inference_mode()
    def greedy_steps(self, prompt_ids: list[int], max_new_tokens: int):
        """Greedy decoding with Megatron-Core's static KV cache, one step at a time: yields the
        logits at the last position ([real vocabulary], on the device) and the token chosen
        from them. The prompt goes through the model once, then one token per step."""
        from megatron.core.inference.contexts import StaticInferenceContext

        context = StaticInferenceContext(max_batch_size=1, max_sequence_length=len(prompt_ids) + max_new_tokens)
        tokens, positions = self._inputs(prompt_ids)
        for _ in range(max_new_tokens):
            # Inference mode needs the full-vocabulary logits gathered (a no-op without TP).
            logits = self.model(tokens, positions, None, inference_context=context, runtime_gather_output=True)
            last = logits[0, -1, : self.vocab_size]
            next_id = int(last.argmax())
            yield last, next_id
            context.sequence_len_offset += tokens.size(1)
            tokens = torch.tensor([[next_id]], dtype=torch.long, device=self.device)
            positions = torch.tensor([[context.sequence_len_offset]], dtype=torch.long, device=self.device)

    def greedy_generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
        """Greedy decoding with Megatron-Core's static KV cache (last-position logits only)."""
        generated: list[int] = []
        for _, next_id in self.greedy_steps(prompt_ids, max_new_tokens):
            if next_id in stop_ids:
                break
            generated.append(next_id)
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
        labels = torch.tensor([ids[1:]], dtype=torch.long, device=self.device)
        losses = self.model(tokens, positions, attention_mask=None, labels=labels)  # [1, S-1], chunked
        return losses[0].double().cpu().numpy()
