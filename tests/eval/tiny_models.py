"""Tiny random Llama-3 models (real 128,256-token vocabulary) saved as megalong weights."""

from __future__ import annotations

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
    """Causality and decoding of the megalong runner: what the parity test cannot yet show."""
    import numpy as np
    import torch

    from megalong.eval.models import MegalongModel

    model = MegalongModel(directory, "cpu")
    ids = [int(t) for t in np.random.default_rng(2).integers(0, model.vocab_size, size=120)]
    full = model.token_losses(ids)
    prefix = model.token_losses(ids[:40])
    generated = model.greedy_generate(ids, 6, stop_ids=[])
    recomputed = model.greedy_generate_recompute(ids, 6, stop_ids=[])
    tokens, positions = model._inputs(ids)
    with torch.no_grad():
        first = int(model.model(tokens, positions, attention_mask=None)[0, -1, : model.vocab_size].argmax())
    stopped = model.greedy_generate(ids, 6, stop_ids=[generated[0]])
    return {"full": full.tolist(), "prefix": prefix.tolist(), "generated": generated,
            "recomputed": recomputed, "first": first, "stopped": stopped}
