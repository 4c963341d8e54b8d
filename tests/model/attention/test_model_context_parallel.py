"""Whole Llama model (Megatron-Core GPTModel with megalong's attention): CP=2 and TP=2 x CP=2 equal CP=1.

One job of four processes runs the layouts in turn. The CP=1 run saves its freshly
initialised weights, rounded to bf16 values (so that a bf16 model holds exactly the same
weights); the parallel runs load them, shard the same packed batch with ``shard_for_cp``, and
compute the token-averaged loss over the CP-sharded labels and loss mask. Gradients are
summed in fp32 over the CP group (as the data-parallel reduction would) and gathered over TP
before they are compared parameter by parameter.

In fp32 every layout equals CP=1 to reordering. In bf16 (as real runs train), one process,
TP=2, CP=2 (ring and all-to-all) and TP=2 x CP=2 are each compared with the fp32 CP=1 run on
the same weights, within the bounds of :mod:`megalong.gpucheck.tolerances` (bf16 roundings of
every layer's forward and backward counted, plus those TP's reductions and CP's merges add).
"""

import pytest
import torch

from megalong.gpucheck.compare import relative_error
from megalong.gpucheck.tolerances import bf16_forward_bound, bf16_gradient_bound
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


def _full_gradient(name: str, param, grad, tp_group, tp_size: int) -> torch.Tensor:
    """``param``'s gradient ``grad`` (this rank's shard) gathered over TP into the whole tensor."""
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


def _run_layout(tp: int, cp: int, weights_dir: str, save: bool, comms, params_dtype: str = "fp32") -> dict:
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
        model_cfg = preset_config("test-tiny", attention_backend="sdpa", cp_comm=comm, params_dtype=params_dtype)
        chunks = build_model(model_cfg, parallel, on_gpu=False)
        if save:
            with torch.no_grad():
                for param in chunks[0].parameters():
                    param.copy_(param.to(torch.bfloat16))
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
            grad = param.grad.float()
            torch.distributed.all_reduce(grad, group=cp_group)
            grads[name] = _full_gradient(name, param, grad, tp_group, tp)
        label = f"TP={tp} CP={cp} {comm}" + (" bf16" if params_dtype == "bf16" else "")
        results[label] = {"loss": (totals[0] / totals[1]).item(), "grads": grads}
    return results


def _model_worker(weights_dir: str) -> dict:
    """Four processes, the layouts in turn: CP=1 (x4 data parallel), CP=2 (x2), TP=2 x CP=2; then
    in bf16 those and TP=2 (x2)."""
    results = _run_layout(1, 1, weights_dir, True, ("ring",))
    results.update(_run_layout(1, 2, weights_dir, False, ("ring", "a2a")))
    results.update(_run_layout(2, 2, weights_dir, False, ("ring", "a2a")))
    for tp, cp, comms in BF16_LAYOUTS:
        results.update(_run_layout(tp, cp, weights_dir, False, comms, params_dtype="bf16"))
    return results if torch.distributed.get_rank() == 0 else None


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_processes(_model_worker, 4, args=(str(tmp_path_factory.mktemp("cp-model") / "weights"),))[0]


def test_model_loss_and_gradients_match_cp1(results):
    results = {label: result for label, result in results.items() if not label.endswith("bf16")}
    reference = results.pop("TP=1 CP=1 ring")
    assert sorted(results) == ["TP=1 CP=2 a2a", "TP=1 CP=2 ring", "TP=2 CP=2 a2a", "TP=2 CP=2 ring"]
    for label, result in results.items():
        assert result["loss"] == pytest.approx(reference["loss"], rel=RTOL), label
        assert result["grads"].keys() == reference["grads"].keys()
        for name, grad in reference["grads"].items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=RTOL, atol=RTOL * grad.abs().max().item(),
                                       msg=lambda m: f"{label}: gradient of {name}: {m}")


# (TP, CP, CP kernels) run in bf16.
BF16_LAYOUTS = [(1, 1, ("ring",)), (2, 1, ("ring",)), (1, 2, ("ring", "a2a")), (2, 2, ("ring", "a2a"))]
LAYERS = 4  # test-tiny


def test_bf16_model_loss_and_gradients_are_within_bf16_rounding_of_fp32(results):
    """Each bf16 layout against the fp32 CP=1 run on the same weights: the loss within the
    forward bound (relative), every parameter's gradient within the gradient bound (norm-wise)."""
    reference = results["TP=1 CP=1 ring"]
    bf16 = {label: result for label, result in results.items() if label.endswith("bf16")}
    assert len(bf16) == sum(len(comms) for _, _, comms in BF16_LAYOUTS)
    for (tp, cp, comms) in BF16_LAYOUTS:
        for comm in comms:
            label = f"TP={tp} CP={cp} {comm} bf16"
            result = bf16[label]
            loss_error = abs(result["loss"] / reference["loss"] - 1)
            assert loss_error <= bf16_forward_bound(LAYERS, cp=cp, tp=tp), (label, loss_error)
            assert result["grads"].keys() == reference["grads"].keys()
            bound = bf16_gradient_bound(LAYERS, cp=cp, tp=tp)
            errors = {name: relative_error(result["grads"][name], grad) for name, grad in reference["grads"].items()}
            outside = {name: error for name, error in errors.items() if not error <= bound}
            assert not outside, f"{label}: gradients outside {bound:.3g}: {outside}"
