"""Ring and all-to-all context parallelism against the explicit-mask reference, in real processes.

Each rank computes the reference on the full sequence (same seeded inputs everywhere),
then megalong's CP attention on its load-balanced shard, and reports the largest
differences of the output and of the q/k/v gradients at its own positions: in fp32, and in
bf16 (as real runs call it) against the float64 definition within the bf16 bounds of
tests/model/attention/precision.py.
"""

import math

import torch

from megalong.runtime.launch import run_processes
from tests.model.attention.cases import make_inputs

# (seed, boundary styles, query heads, kv heads, cp_comm, tile)
CASES = [
    (0, ("mixed", "short"), 4, 2, "ring", 4),
    (1, ("mixed", "single"), 4, 2, "ring", 64),
    (2, ("short", "mixed"), 4, 1, "ring", 3),
    (4, ("aligned", "short"), 4, 2, "ring", 8),
    (0, ("mixed", "short"), 4, 2, "a2a", 4),
    (3, ("single", "mixed"), 8, 2, "a2a", 8),
]
SEQ_LENGTH = 64
HEAD_DIM = 8


def _cp_attention_worker(cp_sizes, cases) -> dict:
    """Four processes: CP=2 as two groups of two, then CP=4 over all of them."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://")
    world, rank = dist.get_world_size(), dist.get_rank()
    results = {}
    for cp_size in cp_sizes:
        groups = [dist.new_group(list(range(start, start + cp_size))) for start in range(0, world, cp_size)]
        results[cp_size] = _check_cases(cp_size, groups[rank // cp_size], cases)
        results[f"bf16 CP={cp_size}"] = _check_bf16(cp_size, groups[rank // cp_size])
    dist.destroy_process_group()  # here, so the launcher need not import Megatron-Core to shut down
    return results


def _check_cases(cp_size: int, group, cases) -> list:
    import torch.distributed as dist

    from megalong.data.cp_shard import load_balanced_index
    from megalong.model.attention.layout import DocumentLayout
    from megalong.model.attention.reference import reference_attention

    # The attention only needs a process group (Megatron-Core's parallel state is
    # exercised by the whole-model tests).
    rank = dist.get_rank(group)
    scale = 1.0 / math.sqrt(HEAD_DIM)
    errors = []
    for seed, styles, query_heads, kv_heads, comm, tile in cases:
        cu_seqlens, q, k, v, grad_out = make_inputs(
            SEQ_LENGTH, 2, query_heads, kv_heads, HEAD_DIM, seed=seed, styles=styles
        )
        layout = DocumentLayout.from_sample_cu_seqlens(cu_seqlens, SEQ_LENGTH)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        reference = reference_attention(*full, layout.doc_ids, scale)
        reference.backward(grad_out)

        index = load_balanced_index(SEQ_LENGTH, cp_size, rank)
        shard = [t[index].clone().requires_grad_() for t in (q, k, v)]
        out = _cp_kernels(group, layout, scale, tile)[comm](*shard)
        out.backward(grad_out[index])
        errors.append({
            "out": (out - reference[index]).abs().max().item(),
            **{f"d{name}": (s.grad - f.grad[index]).abs().max().item()
               for name, s, f in zip("qkv", shard, full)},
        })
    errors.append(_thd_relayout_errors(cp_size, rank, group))
    errors.append(_te_kernel_per_layer_host_calls(group))
    return errors


def _cp_kernels(group, layout, scale: float, tile: int) -> dict:
    """megalong's two CP kernels over ``group``: ring, and all-to-all around the sdpa kernel."""
    from megalong.model.attention.local import sdpa_attention
    from megalong.model.attention.ring import ring_attention
    from megalong.model.attention.ulysses import ulysses_attention

    return {
        "ring": lambda q, k, v: ring_attention(q, k, v, layout, group, scale, tile),
        "a2a": lambda q, k, v: ulysses_attention(
            q, k, v, layout, group, lambda q_, k_, v_, layout_: sdpa_attention(q_, k_, v_, layout_, scale, tile)),
    }


def _check_bf16(cp_size: int, group) -> dict:
    """Norm-wise errors of each CP kernel in bf16 at this rank's positions, and its bounds' verdict."""
    import torch.distributed as dist

    from megalong.data.cp_shard import load_balanced_index
    from megalong.model.attention.layout import DocumentLayout
    from tests.model.attention import precision

    cu_seqlens, q, k, v, grad_out = precision.bf16_inputs()
    layout = DocumentLayout.from_sample_cu_seqlens(cu_seqlens, precision.SEQ_LENGTH)
    reference = precision.reference_outputs(q, k, v, grad_out, layout.doc_ids)
    index = load_balanced_index(precision.SEQ_LENGTH, cp_size, dist.get_rank(group))
    local_reference = {name: value[index] for name, value in reference.items()}
    found = {}
    for comm, kernel in _cp_kernels(group, layout, precision.SCALE, tile=64).items():
        got = precision.run_kernel(kernel, q[index], k[index], v[index], grad_out[index])
        errors = precision.errors(got, local_reference)
        found[comm] = {"errors": errors, "outside": precision.within_bounds(errors, cp=cp_size)}
    return found


def _thd_relayout_errors(cp_size: int, rank: int, group) -> dict:
    """The exchange into Transformer Engine's THD CP layout, checked against cp_shard's padding."""
    from tests.data.cp_helpers import pad_documents_for_thd, shard_thd_for_cp
    from megalong.data.cp_shard import load_balanced_index
    from megalong.model.attention.layout import DocumentLayout
    from megalong.model.attention.thd_relayout import from_thd, thd_plan, to_thd

    cu_seqlens, x, _, _, _ = make_inputs(SEQ_LENGTH, 2, 3, 1, 4, seed=11)
    batch, seq = 2, SEQ_LENGTH
    layout = DocumentLayout.from_sample_cu_seqlens(cu_seqlens, seq)
    ids = torch.arange(batch * seq).view(batch, seq)
    padded = pad_documents_for_thd(
        {"tokens": ids, "labels": ids, "loss_mask": torch.ones(batch, seq),
         "position_ids": ids, "cu_seqlens": cu_seqlens}, cp_size, pad_token_id=-1)
    x_flat = x.transpose(0, 1).reshape(batch * seq, 3, 4)
    weights, grad_full = [], torch.zeros_like(x_flat)
    for r in range(cp_size):
        shard_ids = shard_thd_for_cp(padded, cp_size, r)["tokens"][0]
        w = torch.randn(shard_ids.numel(), 3, 4, generator=torch.Generator().manual_seed(r))
        grad_full[shard_ids[shard_ids >= 0]] = w[shard_ids >= 0]
        weights.append((shard_ids, w))
    shard_ids, w = weights[rank]
    expected = torch.where((shard_ids >= 0)[:, None, None], x_flat[shard_ids.clamp_min(0)], torch.zeros(()))

    plan = thd_plan(layout, cp_size, rank)
    pos = load_balanced_index(seq, cp_size, rank)
    local = x[pos].clone().requires_grad_()
    thd = to_thd(local, plan, group)
    (thd * w).sum().backward()
    local_ids = (torch.arange(batch)[None, :] * seq + pos[:, None])  # [s_local, b]
    back = from_thd(thd.detach(), plan, pos.numel(), batch, group)
    return {
        "thd values": (thd.detach() - expected).abs().max().item(),
        "thd boundaries": float(not (torch.equal(plan.cu_seqlens, padded["cu_seqlens"])
                                     and torch.equal(plan.cu_seqlens_padded, padded["cu_seqlens_padded"]))),
        "thd round trip": (back - local.detach()).abs().max().item(),
        "thd gradient": (local.grad - grad_full[local_ids]).abs().max().item(),
    }


def _te_kernel_per_layer_host_calls(group) -> dict:
    """megalong's side of Transformer Engine's context parallelism (TEContextParallelKernel: the
    THD plan, the exchanges, the arguments TE gets) over 1 and 4 layers of one micro-batch,
    forward and backward, with a stand-in for TE's attention (TE runs only on GPUs). Counted:
    the calls that copy between host and device or read a tensor's value on a GPU
    (tests.model.attention.host_calls); on the CPU no copy happens, but the calls are what
    would. The plan is made and moved once per micro-batch, so one layer and four must make the
    same calls: a per-layer copy adds to the count with every layer."""
    from megalong.data.cp_shard import load_balanced_index
    from megalong.model.attention.layout import DocumentLayout
    from megalong.model.attention.te import TEContextParallelKernel
    from tests.model.attention.host_calls import HostCalls

    cu_seqlens, q, k, v, grad_out = make_inputs(SEQ_LENGTH, 2, 4, 2, HEAD_DIM, seed=5, styles=("mixed", "short"))
    cp, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    index = load_balanced_index(SEQ_LENGTH, cp, rank)
    seen_by_te = []

    def stand_in_for_te(query, key, value, **arguments):  # [thd, heads, dim] in, TE's THD layout
        seen_by_te.append(arguments)
        return query * 2 + (key + value).mean(dim=1, keepdim=True)

    calls = {}
    for layers in (1, 4):
        layout = DocumentLayout.from_sample_cu_seqlens(cu_seqlens, SEQ_LENGTH)  # a new micro-batch
        kernels = [TEContextParallelKernel(HEAD_DIM, 1.0, number, group, "ring") for number in range(layers)]
        for kernel in kernels:
            kernel.kernels["q4_kv2"] = stand_in_for_te
        x = q[index].clone().requires_grad_()
        with HostCalls() as counted:
            hidden = x
            for kernel in kernels:
                hidden = kernel(hidden, k[index], v[index], layout).view_as(x)
            hidden.backward(grad_out[index].view_as(x))
        calls[layers] = counted.calls
    first, *rest = seen_by_te[1:]  # the four layers of the second micro-batch
    same_tensors = all(a[key] is first[key] for a in rest
                       for key in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"))
    return {
        "extra host calls of 3 more layers": float(sum(calls[4].values()) - sum(calls[1].values())),
        "boundaries not the same tensors in every layer": float(not same_tensors),
        "pad_between_seqs not given as a bool": float(not all(type(a.get("pad_between_seqs")) is bool
                                                             for a in seen_by_te)),
    }


def test_cp_attention_matches_reference():
    results = run_processes(_cp_attention_worker, 4, args=((2, 4), CASES))
    for rank, per_cp in enumerate(results):
        assert sorted(per_cp, key=str) == [2, 4, "bf16 CP=2", "bf16 CP=4"]
        for cp_size in (2, 4):
            for comm, found in per_cp[f"bf16 CP={cp_size}"].items():
                assert found["outside"] == [], f"bf16 {comm} at CP={cp_size} rank {rank}: {found['errors']}"
            errors = per_cp[cp_size]
            assert len(errors) == len(CASES) + 2
            for case, error in zip(CASES + ["THD relayout", "TE kernel's host calls per layer"], errors):
                for name, value in error.items():
                    assert value < 1e-5, f"CP={cp_size} rank {rank} case {case}: {name} differs by {value:.3g}"
