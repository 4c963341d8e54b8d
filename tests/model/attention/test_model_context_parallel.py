"""Whole Llama model (Megatron-Core GPTModel with megalong's attention): CP=2 and TP=2 x CP=2 equal CP=1.

One job of four processes runs the three layouts in turn. The CP=1 run saves its
freshly initialised weights; the parallel runs load them, shard the same packed batch with ``shard_for_cp``, and compute the
token-averaged loss over the CP-sharded labels and loss mask. Gradients are summed over
the CP group (as the data-parallel reduction would) and gathered over TP before they are
compared parameter by parameter.
"""

import pytest
import torch

from megalong.runtime.launch import run_processes
from tests.model.attention.cases import random_boundaries
from tests.numerics import reordering_rtol

SEQ_LENGTH = 64
BATCH = 2
VOCAB = 512
# Longest sums: the 512-entry vocabulary (softmax; output and embedding gradients) and
# 4 layers of hidden/FFN sums (<= 128 terms each); CP reorders the attention's and the
# gradients' sums over the 128 tokens. Relative to each tensor's largest element.
RTOL = reordering_rtol(512)


def _batch() -> dict:
    generator = torch.Generator().manual_seed(7)
    cu_seqlens = [random_boundaries(SEQ_LENGTH, generator, style) for style in ("mixed", "short")]
    stream = torch.randint(0, VOCAB, (BATCH, SEQ_LENGTH + 1), generator=generator)
    loss_mask = torch.ones(BATCH, SEQ_LENGTH)
    position_ids = torch.zeros(BATCH, SEQ_LENGTH, dtype=torch.long)
    for b, cu in enumerate(cu_seqlens):
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
            loss_mask[b, end - 1] = 0.0  # never predict across a document boundary
            position_ids[b, start:end] = torch.arange(end - start)
    return {
        "tokens": stream[:, :-1], "labels": stream[:, 1:], "loss_mask": loss_mask,
        "position_ids": position_ids, "cu_seqlens": cu_seqlens,
    }


def _full_gradient(name: str, param, tp_group, tp_size: int) -> torch.Tensor:
    grad = param.grad.detach().clone()
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return grad
    shards = [torch.empty_like(grad) for _ in range(tp_size)]
    torch.distributed.all_gather(shards, grad, group=tp_group)
    dim = param.partition_dim
    if "linear_fc1" in name:
        # SwiGLU: every TP shard holds [its gate rows; its up rows].
        gates = [s.chunk(2, dim=dim)[0] for s in shards]
        ups = [s.chunk(2, dim=dim)[1] for s in shards]
        return torch.cat(gates + ups, dim=dim)
    return torch.cat(shards, dim=dim)


def _run_layout(tp: int, cp: int, weights_dir: str, save: bool, comms) -> dict:
    from megatron.core import parallel_state

    from megalong.checkpoint.weights import load_weights, save_weights
    from megalong.config.parallel import ParallelConfig
    from megalong.data.cp_shard import shard_for_cp
    from megalong.model import preset_config
    from megalong.model.attention import packed_seq_params_for
    from megalong.model.llama import build_model
    from megalong.runtime import init_distributed, set_seed

    parallel = ParallelConfig(tensor_parallel=tp, context_parallel=cp)
    init_distributed(parallel)  # re-initialises Megatron-Core's groups for this layout
    set_seed(1234)
    cp_group = parallel_state.get_context_parallel_group()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    batch = _batch()
    local = shard_for_cp(batch, cp, parallel_state.get_context_parallel_rank())
    packed = packed_seq_params_for(batch["cu_seqlens"], SEQ_LENGTH)

    results = {}
    for comm in comms:
        model_cfg = preset_config("test-tiny", attention_backend="sdpa", cp_comm=comm)
        chunks = build_model(model_cfg, parallel, on_gpu=False)
        if save:
            save_weights(chunks, weights_dir, model_cfg)
        else:
            load_weights(chunks, weights_dir)
        model = chunks[0]
        losses = model(local["tokens"], local["position_ids"], attention_mask=None,
                       labels=local["labels"], packed_seq_params=packed)
        loss_sum = (losses.float() * local["loss_mask"]).sum()
        totals = torch.stack([loss_sum.detach(), local["loss_mask"].sum()])
        torch.distributed.all_reduce(totals, group=cp_group)
        # Token-averaged over the whole (CP-sharded) sequence: divide by the global count.
        (loss_sum / totals[1]).backward()
        grads = {}
        for name, param in model.named_parameters():
            torch.distributed.all_reduce(param.grad, group=cp_group)
            grads[name] = _full_gradient(name, param, tp_group, tp)
        results[f"TP={tp} CP={cp} {comm}"] = {"loss": (totals[0] / totals[1]).item(), "grads": grads}
    return results


def _model_worker(weights_dir: str) -> dict:
    """Four processes, three layouts in turn: CP=1 (x4 data parallel), CP=2 (x2), TP=2 x CP=2."""
    results = _run_layout(1, 1, weights_dir, True, ("ring",))
    results.update(_run_layout(1, 2, weights_dir, False, ("ring", "a2a")))
    results.update(_run_layout(2, 2, weights_dir, False, ("ring", "a2a")))
    return results if torch.distributed.get_rank() == 0 else None


def test_model_loss_and_gradients_match_cp1(tmp_path):
    results = run_processes(_model_worker, 4, args=(str(tmp_path / "weights"),))[0]
    reference = results.pop("TP=1 CP=1 ring")
    assert sorted(results) == ["TP=1 CP=2 a2a", "TP=1 CP=2 ring", "TP=2 CP=2 a2a", "TP=2 CP=2 ring"]
    for label, result in results.items():
        assert result["loss"] == pytest.approx(reference["loss"], rel=RTOL), label
        assert result["grads"].keys() == reference["grads"].keys()
        for name, grad in reference["grads"].items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=RTOL, atol=RTOL * grad.abs().max().item(),
                                       msg=lambda m: f"{label}: gradient of {name}: {m}")
