"""Tiny random Llama-3 models (real 128,256-token vocabulary) saved as megalong weights."""

from __future__ import annotations

from pathlib import Path

LLAMA3_VOCAB = 128256

# Small enough that a forward over a few hundred tokens takes milliseconds on one core,
# with the real vocabulary so that prompts from the real Llama-3 tokenizer fit.
TINY_SHAPE = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                  num_query_groups=2, max_position_embeddings=2048,
                  # Untied: a random model with tied embeddings just repeats its last input token.
                  tie_word_embeddings=False)


def save_random_model(directory: str, seed: int = 1234, padding_scale: float = 1.0, **shape) -> str:
    """Build llama3-tiny (shrunk, ``shape`` overriding TINY_SHAPE) with Megatron-Core and save
    it with save_weights (rank fn). ``padding_scale`` multiplies the output-layer rows of
    Megatron's vocabulary padding (large ones make a softmax that counts them visibly wrong)."""
    import torch

    from megalong.checkpoint.weights import save_weights
    from megalong.config.parallel import ParallelConfig
    from megalong.model import preset_config
    from megalong.model.llama import build_model
    from megalong.runtime import init_distributed, set_seed

    init_distributed(ParallelConfig(), device="cpu")
    set_seed(seed)
    model_cfg = preset_config("llama3-tiny", **{**TINY_SHAPE, **shape})
    chunks = build_model(model_cfg, ParallelConfig(), on_gpu=False)
    # Megatron initializes norms to 1 and output-adjacent projections with a scaled std;
    # bump the weights a little so greedy outputs and losses are far from uniform.
    with torch.no_grad():
        for name, param in chunks[0].named_parameters():
            if "layernorm" not in name and "norm" not in name:
                param.mul_(3.0)
        chunks[0].output_layer.weight[model_cfg.vocab_size:].mul_(padding_scale)
    save_weights(chunks, directory, model_cfg)
    return directory


def save_tiny_hf_model(directory, seed: int = 0):
    """A tiny random LlamaForCausalLM with the real vocabulary, saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=LLAMA3_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_theta=500000.0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(5.0)  # far from uniform predictions
    model.save_pretrained(directory)
    return directory


# Positions per loss chunk in the runner checks: several chunks over the 119 targets, the last short.
CHECK_CHUNK = 16


def megalong_losses(directory: str, documents: list[list[int]]) -> list[list[float]]:
    """Per-token losses of each document from the megalong runner (rank fn)."""
    from megalong.eval.models import MegalongModel

    model = MegalongModel(directory, "cpu")
    return [model.token_losses(ids).tolist() for ids in documents]


def bf16_and_fp32_losses(directory: str, documents: list[list[int]]) -> dict:
    """Save a random tiny model in bf16 at ``directory`` and a copy whose model.yaml says fp32
    (the same, bf16-representable weights; rank fn); per-token losses of each from the megalong
    runner, and what the runner reports of its bf16 model."""
    import shutil

    import yaml

    from megalong.eval.models import MegalongModel

    save_random_model(directory, params_dtype="bf16")
    fp32 = directory + "-as-fp32"
    shutil.copytree(directory, fp32)
    config_file = Path(fp32) / "model.yaml"
    config_file.write_text(yaml.safe_dump({**yaml.safe_load(config_file.read_text()), "params_dtype": "fp32"}))
    bf16_model = MegalongModel(directory, "cpu")
    return {"bf16": [bf16_model.token_losses(ids).tolist() for ids in documents], "described": bf16_model.describe(),
            "fp32": megalong_losses(fp32, documents)}


def megalong_generate(directory: str, prompt: list[int], max_new_tokens: int) -> list[int]:
    from megalong.eval.models import MegalongModel

    return MegalongModel(directory, "cpu").greedy_generate(prompt, max_new_tokens, [])


def save_and_check_random_model(directory: str) -> dict:
    """Save a random model, then load it back through the megalong runner (rank fn); the same
    for a model whose vocabulary Megatron pads (128,256 real rows padded to 129,000, the
    padding rows 10x larger: counted in the softmax they would add O(10) to every loss).

    One spawned process does all because starting one costs more than either job.
    """
    save_random_model(directory)
    checks = megalong_runner_checks(directory)
    padded = directory + "-padded-vocab"
    save_random_model(padded, padding_scale=10.0, make_vocab_size_divisible_by=1000)
    checks["padded_vocab"] = chunked_against_full_logits(padded, _check_ids())
    return checks


def _check_ids() -> list[int]:
    import numpy as np

    return [int(t) for t in np.random.default_rng(2).integers(0, LLAMA3_VOCAB, size=120)]


def chunked_against_full_logits(directory: str, ids: list[int]) -> dict:
    """The megalong runner's chunked losses and the largest tensor they allocate, beside the
    same from every position's logits at once (over the real vocabulary), with what the
    tolerance needs (rank fn part)."""
    import torch

    from megalong.eval.models import MegalongModel
    from tests.eval.chunked_losses import LargestAllocation

    model = MegalongModel(directory, "cpu", loss_chunk_tokens=CHECK_CHUNK)
    with LargestAllocation() as chunked_alloc:
        chunked = model.token_losses(ids)
    # The final hidden states are captured on their way into the output layer (for the
    # tolerance's dot-product term).
    captured = []
    hook = model.model.output_layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    tokens, positions = model._inputs(ids[:-1])
    with torch.no_grad(), LargestAllocation() as full_alloc:
        logits = model.model(tokens, positions, attention_mask=None)[0, :, : model.vocab_size].float()
        reference = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
    hook.remove()
    # Only the real vocabulary's logits enter the losses.
    hidden = captured[0].reshape(-1, captured[0].shape[-1]).float()
    weight = model.model.output_layer.weight[: model.vocab_size].float()
    return {"chunked": chunked.tolist(), "reference": reference.tolist(), "vocab_size": model.vocab_size,
            "max_abs_logit": float(logits.abs().max()), "max_abs_dot": float((hidden.abs() @ weight.abs().t()).max()),
            "hidden_size": int(weight.shape[1]), "padded_vocab": int(model.model.output_layer.weight.shape[0]),
            "chunked_bytes": chunked_alloc.nbytes, "chunked_op": chunked_alloc.op,
            "full_logits_bytes": full_alloc.nbytes, "full_logits_op": full_alloc.op}


def megalong_runner_checks(directory: str) -> dict:
    """Causality, decoding and chunked losses of the megalong runner: what the parity test
    cannot show."""
    import torch

    from megalong.eval.models import MegalongModel

    ids = _check_ids()
    checks = {"losses": chunked_against_full_logits(directory, ids)}
    model = MegalongModel(directory, "cpu", loss_chunk_tokens=CHECK_CHUNK)
    full = model.token_losses(ids)
    prefix = model.token_losses(ids[:40])
    generated = model.greedy_generate(ids, 6, stop_ids=[])
    recomputed = model.greedy_generate_recompute(ids, 6, stop_ids=[])
    tokens, positions = model._inputs(ids)
    with torch.no_grad():
        first = int(model.model(tokens, positions, attention_mask=None)[0, -1, : model.vocab_size].argmax())
    stopped = model.greedy_generate(ids, 6, stop_ids=[generated[0]])
    return {**checks, "full": full.tolist(), "prefix": prefix.tolist(), "generated": generated,
            "recomputed": recomputed, "first": first, "stopped": stopped}
