"""Functions run in real spawned processes (megalong.runtime.launch.run_processes)."""

from __future__ import annotations

import dataclasses

import torch


def _forward_logits(chunk, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Full-vocabulary logits [B, S, V] on the last pipeline stage's TP rank 0; None elsewhere.

    Pipeline stages hand the hidden states on with plain point-to-point sends (one
    micro-batch, forward only), which is all a parity check needs.
    """
    from megatron.core import parallel_state, tensor_parallel

    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    first = parallel_state.is_pipeline_first_stage()
    last = parallel_state.is_pipeline_last_stage()
    with torch.no_grad():
        if not first:
            hidden = torch.empty(tokens.shape[1], tokens.shape[0], chunk.config.hidden_size)
            torch.distributed.recv(hidden, parallel_state.get_pipeline_model_parallel_prev_rank())
            chunk.set_input_tensor(hidden)
        out = chunk(tokens, position_ids, None)
        if not last:
            torch.distributed.send(out.contiguous(), parallel_state.get_pipeline_model_parallel_next_rank())
            return None
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(out)
    if parallel_state.get_tensor_model_parallel_rank() != 0:
        return None
    return logits[..., :vocab_size].clone()


def logits_at_layouts(weights_dirs: list[str], tokens: torch.Tensor, layouts: list[tuple[int, int]]):
    """For each (TP, PP) layout and weights dir: load with load_weights and return logits."""
    from megalong.checkpoint.layout import read_model_config
    from megalong.checkpoint.weights import load_weights
    from megalong.config.parallel import ParallelConfig
    from megalong.model.llama import build_model
    from megalong.runtime import init_distributed, set_seed

    results = {}
    for tp, pp in layouts:
        parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
        init_distributed(parallel)
        set_seed(1234)  # seeds Megatron-Core's model-parallel RNG tracker, which attention needs
        for i, directory in enumerate(weights_dirs):
            model_cfg = dataclasses.replace(read_model_config(directory), transformer_impl="local", params_dtype="fp32")
            chunks = build_model(model_cfg, parallel, on_gpu=False)
            load_weights(chunks, directory)
            logits = _forward_logits(chunks[0], tokens, model_cfg.vocab_size)
            if logits is not None:
                results[(tp, pp, i)] = logits
    return results


def greedy_after_save(model_cfg, directory: str, prompt: torch.Tensor, new_tokens: int, tp: int, seed: int):
    """Build a randomly initialised model at TP=tp, save it with save_weights (standing in for a
    trained checkpoint), and generate greedily with megalong's own forward."""
    from megalong.checkpoint.weights import save_weights
    from megalong.config.parallel import ParallelConfig
    from megalong.model.llama import build_model
    from megalong.runtime import init_distributed, set_seed

    parallel = ParallelConfig(tensor_parallel=tp)
    init_distributed(parallel)
    set_seed(seed)
    chunks = build_model(model_cfg, parallel, on_gpu=False)
    save_weights(chunks, directory, model_cfg)
    tokens = prompt.clone()
    margins = []
    for _ in range(new_tokens):
        logits = _forward_logits(chunks[0], tokens, model_cfg.vocab_size)
        if logits is None:  # other TP ranks follow rank 0's choice
            choice = torch.zeros(1, dtype=torch.long)
        else:
            top2 = logits[0, -1].topk(2).values
            margins.append(float(top2[0] - top2[1]))
            choice = logits[0, -1].argmax().reshape(1)
        torch.distributed.broadcast(choice, 0)
        tokens = torch.cat([tokens, choice.reshape(1, 1)], dim=1)
    return tokens, margins


def parity_session(logit_args: tuple, greedy_args: tuple):
    """Both checks in one pair of processes (process start-up dominates these tests)."""
    greedy = greedy_after_save(*greedy_args)
    return logits_at_layouts(*logit_args), greedy
