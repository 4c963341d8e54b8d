"""Tiny random Llama-3 models (real 128,256-token vocabulary) saved as megalong weights."""

from __future__ import annotations

LLAMA3_VOCAB = 128256

# Small enough that a forward over a few hundred tokens takes milliseconds on one core,
# with the real vocabulary so that prompts from the real Llama-3 tokenizer fit.
TINY_SHAPE = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                  num_query_groups=2, max_position_embeddings=2048,
                  # Untied: a random model with tied embeddings just repeats its last input token.
                  tie_word_embeddings=False)


def save_random_model(directory: str, seed: int = 1234) -> str:
    """Build llama3-tiny (shrunk) with Megatron-Core and save it with save_weights (rank fn)."""
    import torch

    from megalong.checkpoint.weights import save_weights
    from megalong.config.parallel import ParallelConfig
    from megalong.model import preset_config
    from megalong.model.llama import build_model
    from megalong.runtime import init_distributed, set_seed

    init_distributed(ParallelConfig(), device="cpu")
    set_seed(seed)
    model_cfg = preset_config("llama3-tiny", **TINY_SHAPE)
    chunks = build_model(model_cfg, ParallelConfig(), on_gpu=False)
    # Megatron initializes norms to 1 and output-adjacent projections with a scaled std;
    # bump the weights a little so greedy outputs and losses are far from uniform.
    with torch.no_grad():
        for name, param in chunks[0].named_parameters():
            if "layernorm" not in name and "norm" not in name:
                param.mul_(3.0)
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


def megalong_generate(directory: str, prompt: list[int], max_new_tokens: int) -> list[int]:
    from megalong.eval.models import MegalongModel

    return MegalongModel(directory, "cpu").greedy_generate(prompt, max_new_tokens, [])


def save_and_check_random_model(directory: str) -> dict:
    """Save a random model, then load it back through the megalong runner (rank fn).

    One spawned process does both because starting one costs more than either job.
    """
    save_random_model(directory)
    return megalong_runner_checks(directory)


def megalong_runner_checks(directory: str) -> dict:
    """Causality, decoding and chunked losses of the megalong runner: what the parity test
    cannot show."""
    import numpy as np
    import torch

    from megalong.eval.models import MegalongModel
    from tests.eval.chunked_losses import LargestAllocation

    model = MegalongModel(directory, "cpu", loss_chunk_tokens=CHECK_CHUNK)
    ids = [int(t) for t in np.random.default_rng(2).integers(0, model.vocab_size, size=120)]
    with LargestAllocation() as chunked_alloc:
        full = model.token_losses(ids)
    prefix = model.token_losses(ids[:40])
    # The reference: every position's logits at once, the final hidden states captured on
    # their way into the output layer (for the tolerance's dot-product term).
    captured = []
    hook = model.model.output_layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    tokens, positions = model._inputs(ids[:-1])
    with torch.no_grad(), LargestAllocation() as full_alloc:
        logits = model.model(tokens, positions, attention_mask=None)[0, :, : model.vocab_size].float()
        reference = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
    hook.remove()
    hidden, weight = captured[0].reshape(-1, captured[0].shape[-1]).float(), model.model.output_layer.weight.float()
    generated = model.greedy_generate(ids, 6, stop_ids=[])
    recomputed = model.greedy_generate_recompute(ids, 6, stop_ids=[])
    tokens, positions = model._inputs(ids)
    with torch.no_grad():
        first = int(model.model(tokens, positions, attention_mask=None)[0, -1, : model.vocab_size].argmax())
    stopped = model.greedy_generate(ids, 6, stop_ids=[generated[0]])
    return {"full": full.tolist(), "prefix": prefix.tolist(), "generated": generated,
            "recomputed": recomputed, "first": first, "stopped": stopped,
            "reference": reference.tolist(), "max_abs_logit": float(logits.abs().max()),
            "max_abs_dot": float((hidden.abs() @ weight.abs().t()).max()),
            "hidden_size": int(weight.shape[1]), "padded_vocab": int(weight.shape[0]),
            "chunked_bytes": chunked_alloc.nbytes, "chunked_op": chunked_alloc.op,
            "full_logits_bytes": full_alloc.nbytes, "full_logits_op": full_alloc.op}
