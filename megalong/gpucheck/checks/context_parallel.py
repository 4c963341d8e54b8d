"""Transformer Engine's context parallelism on packed documents, over NCCL with one GPU per rank.

Kernel level (``cp.te-ring``, ``cp.te-a2a``, ``cp.te-wide``): q, k, v and the output gradient
are drawn once (bf16, the same on every rank) for micro-batch 2 of packed documents: runs of
one-token documents, lengths that are not multiples of 2 x CP (TE pads every document to
one), documents crossing the CP chunks, one long document. The reference is the definition
(``reference_attention``: the whole document mask written out) in fp32 over the whole
sequence; each rank runs megalong's ``TEContextParallelKernel`` (tokens exchanged into TE's
THD layout, TE's ring or all-to-all, exchanged back) on its load-balanced share. Output and
dq/dk/dv, norm-wise over all ranks, must be within the bf16 attention bounds with CP merges
(tolerances.attention_*_bound).
The ring runs with a single KV head (4 query heads); the all-to-all with CP KV heads, one per
rank after the exchange. Where megalong refuses the all-to-all on this TE version (2.9:
not on packed documents; 2.10+: heads not divisible by CP), ``check_for_machine`` must refuse
it with the documented message; the refused kernel is not run, so ``cp.te-a2a`` is then
reported as skipped (with the reason), never as passed; a configuration with one KV head for
CP=2 is always checked for refusal on 2.10+.

``cp.megalong``: megalong's own context parallelism, the same way at CP=2 with 4 query heads
and one KV head: its ring (the PyTorch block kernel, what attention_backend sdpa or flash
runs with cp_comm ring) and its all-to-all (KV heads repeated to the CP size, then flash-attn
when it imports, else sdpa: what megalong's refusal of TE's all-to-all recommends instead).

Model level (``cp.model``): the whole model at CP=2 (TE layers, bf16, TE's ring and
all-to-all) against the fp32 reference at CP=1, loss and every gradient (summed over the CP
ranks, as DDP does) within the bf16 bounds with CP merges.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megalong.gpucheck import cases, runs
from megalong.gpucheck.checks.model_backends import candidate_config, compare_with_reference, reference, samples
from megalong.gpucheck.compare import gradients
from megalong.gpucheck.records import CheckResult
from megalong.gpucheck.tolerances import attention_forward_bound, attention_gradient_bound

def _global_relative_error(got: torch.Tensor, ref: torch.Tensor, group) -> float:
    """||got - ref|| / ||ref|| over the shards of every rank of ``group``."""
    sums = torch.tensor([float(((got.double() - ref.double()) ** 2).sum()), float((ref.double() ** 2).sum())],
                        dtype=torch.float64, device=got.device)
    dist.all_reduce(sums, group=group)
    return math.sqrt(float(sums[0]) / float(sums[1])) if float(sums[1]) else math.inf


def kernel_errors(ctx, attention, query_heads: int, kv_heads: int, seq_length: int) -> dict:
    """Relative errors of ``attention(q, k, v, layout)``, a CP kernel run on this rank's
    load-balanced share, against the definition in fp32 over the whole sequence."""
    from megalong.data.cp_shard import load_balanced_index
    from megalong.model.attention.reference import reference_attention

    group, cp, rank = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    layout, scale = cases.attention_layout(seq_length), 1.0 / math.sqrt(cases.HEAD_DIM)
    q, k, v, grad_out = cases.attention_inputs(ctx.device, seq_length, query_heads, kv_heads)
    reference = cases.attention_with_gradients(lambda a, b, c: reference_attention(a, b, c, layout.doc_ids, scale),
                                               [t.float() for t in (q, k, v)], grad_out.float())
    index = load_balanced_index(seq_length, cp, rank).to(ctx.device)
    got = cases.attention_with_gradients(lambda a, b, c: attention(a, b, c, layout),
                                         [t.index_select(0, index) for t in (q, k, v)], grad_out.index_select(0, index))
    names = ("output", "dq", "dk", "dv")
    return {name: _global_relative_error(g.float(), r.index_select(0, index), group)
            for name, g, r in zip(names, got, reference)}


def host_syncs_of_a_later_layer(ctx, attention, query_heads: int, kv_heads: int, seq_length: int) -> list[str]:
    """Where megalong's own code makes the host wait for the GPU when a second layer runs
    ``attention`` forward and backward on the same micro-batch (its plan made by the first):
    torch's CUDA sync debug mode warns at every synchronising call (a copy from pageable host
    memory, a value read on the host); those whose calling line is in megalong's model code
    are listed. Transformer Engine's own synchronisations are not megalong's to remove and are
    not listed. Autograd replays the backward pass's warnings at the ``backward()`` call (in
    the check's own code), so only the forward's are placed; the CPU test
    (tests/model/attention/test_context_parallel_attention.py) counts the backward's calls."""
    import warnings

    from megalong.data.cp_shard import load_balanced_index

    layout = cases.attention_layout(seq_length)
    q, k, v, grad_out = cases.attention_inputs(ctx.device, seq_length, query_heads, kv_heads)
    index = load_balanced_index(seq_length, dist.get_world_size(), dist.get_rank()).to(ctx.device)
    shares = [t.index_select(0, index) for t in (q, k, v, grad_out)]
    cases.attention_with_gradients(lambda a, b, c: attention(a, b, c, layout), shares[:3], shares[3])  # layer 1
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            cases.attention_with_gradients(lambda a, b, c: attention(a, b, c, layout), shares[:3], shares[3])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sorted({f"{w.filename}:{w.lineno}" for w in caught
                   if "synchroniz" in str(w.message) and "/megalong/model/" in w.filename})


def refusal_failure(cp: int, query_heads: int, kv_heads: int) -> tuple[str | None, str | None]:
    """(megalong's documented reason to refuse TE's all-to-all here or None, a failure or None):
    when there is a reason, ``check_for_machine`` must raise it, word for word."""
    from megalong.config.loader import ConfigError
    from megalong.config.parallel import ParallelConfig
    from megalong.model.backends import check_for_machine, te_context_parallel_problem, transformer_engine_version

    problem = te_context_parallel_problem(transformer_engine_version(), "a2a", query_heads, kv_heads, cp)
    if problem is None:
        return None, None
    model = cases.model_config(cases.MODEL, num_attention_heads=query_heads, num_query_groups=kv_heads,
                               hidden_size=query_heads * cases.HEAD_DIM, transformer_impl="transformer_engine",
                               params_dtype="bf16", attention_backend="te", cp_comm="a2a")
    try:
        check_for_machine(model, ParallelConfig(context_parallel=cp), on_gpu=True)
    except ConfigError as err:
        if str(err) != problem:
            return problem, f"refused with another message than the documented one: {err}"
        return problem, None
    return problem, f"{query_heads} query / {kv_heads} KV heads at CP={cp} with TE's all-to-all was not refused"


def _judge_kernel(label: str, query_heads: int, kv_heads: int, errors: dict, cp: int,
                  failures: list[str], figures: dict) -> None:
    bounds = {"output": attention_forward_bound(cp), **{g: attention_gradient_bound(cp) for g in ("dq", "dk", "dv")}}
    key = f"{label.replace(' ', '_')}_cp{cp}_q{query_heads}_kv{kv_heads}"
    figures[key] = {"relative_errors": errors, "bounds": bounds}
    for name, error in errors.items():
        if not error <= bounds[name]:
            failures.append(f"{label} CP={cp} ({query_heads}/{kv_heads} heads): {name} relative error "
                            f"{error:.3g} > bound {bounds[name]:.3g}")


def _kernel_check(ctx, name: str, cp_comm: str) -> CheckResult:
    from megalong.model.attention.te import TEContextParallelKernel

    cp = ctx.world_size
    seq_length = 2048 * max(1, cp // 2)
    failures, figures = [], {"cp": cp, "seq_length": seq_length, "micro_batch": 2}
    # The ring: a single KV head (GQA 4:1). The all-to-all: one KV head per rank after the exchange.
    query_heads, kv_heads = (4, 1) if cp_comm == "ring" else (2 * cp, cp)
    if cp_comm == "a2a":
        for heads in ((4, 1), (query_heads, kv_heads)):  # fewer KV heads than ranks; the case run
            problem, failure = refusal_failure(cp, *heads)
            if problem is not None:
                figures[f"refused_q{heads[0]}_kv{heads[1]}"] = problem
                failures += [failure] if failure else []
        refused = figures.get(f"refused_q{query_heads}_kv{kv_heads}")
        if refused is not None:  # TE 2.9: megalong refuses every a2a; no kernel ran, nothing is proven about it
            if failures:
                return CheckResult(name, "failed", "; ".join(failures), figures)
            return CheckResult(name, "skipped", f"TE's all-to-all at CP={cp} not run: megalong refuses it on this "
                                                f"Transformer Engine ({refused}); the refusal itself was checked word "
                                                f"for word", figures)
    kernel = TEContextParallelKernel(cases.HEAD_DIM, 1.0 / math.sqrt(cases.HEAD_DIM), 1, dist.group.WORLD, cp_comm)
    errors = kernel_errors(ctx, kernel, query_heads, kv_heads, seq_length)
    _judge_kernel(f"TE {cp_comm}", query_heads, kv_heads, errors, cp, failures, figures)
    # The plan is made once per micro-batch: a later layer must not make the host wait.
    figures["megalong_host_syncs_in_a_later_layer"] = syncs = host_syncs_of_a_later_layer(
        ctx, kernel, query_heads, kv_heads, seq_length)
    if syncs:
        failures.append(f"TE {cp_comm}: megalong's code synchronises with the GPU in every layer, at {', '.join(syncs[:4])}")
    return CheckResult.judged(name, failures, figures, f"TE {cp_comm} at CP={cp} with {query_heads} query / "
                                                       f"{kv_heads} KV heads within the bf16 attention bounds")


def check_megalong(ctx) -> CheckResult:
    """megalong's own ring and all-to-all (see the module docstring)."""
    from functools import partial

    from megalong.model.attention import local, ring, ulysses

    cp, group = ctx.world_size, dist.group.WORLD
    seq_length, scale = 2048 * max(1, cp // 2), 1.0 / math.sqrt(cases.HEAD_DIM)
    flash = ctx.on_gpu and ctx.machine.missing("flash-attn") is None
    whole_sequence = partial(local.flash_attention if flash else local.sdpa_attention, softmax_scale=scale)
    kernels = {
        "megalong ring": lambda q, k, v, layout: ring.ring_attention(q, k, v, layout, group, scale),
        f"megalong all-to-all ({'flash' if flash else 'sdpa'})":
            lambda q, k, v, layout: ulysses.ulysses_attention(q, k, v, layout, group, whole_sequence),
    }
    failures, figures = [], {"cp": cp, "seq_length": seq_length, "micro_batch": 2}
    for label, kernel in kernels.items():
        _judge_kernel(label, 4, 1, kernel_errors(ctx, kernel, 4, 1, seq_length), cp, failures, figures)
    return CheckResult.judged("cp.megalong", failures, figures,
                              f"{' and '.join(kernels)} at CP={cp} with 4 query / 1 KV heads within the bf16 "
                              "attention bounds")


def check_ring(ctx) -> CheckResult:
    return _kernel_check(ctx, "cp.te-ring", "ring")


def check_a2a(ctx) -> CheckResult:
    return _kernel_check(ctx, "cp.te-a2a", "a2a")


def check_wide(ctx) -> CheckResult:
    ring, a2a = _kernel_check(ctx, "cp.te-wide", "ring"), _kernel_check(ctx, "cp.te-wide", "a2a")
    failures = [r.reason for r in (ring, a2a) if r.status == "failed"]
    # The ring ran; an all-to-all megalong refuses on this TE did not, and the reason says so.
    return CheckResult.judged("cp.te-wide", failures, {"ring": ring.figures, "a2a": a2a.figures,
                                                      "a2a_status": a2a.status},
                              f"{ring.reason}; {'all-to-all skipped: ' if a2a.status == 'skipped' else ''}{a2a.reason}")


def check_model(ctx) -> CheckResult:
    from megalong.checkpoint.weights import load_weights
    from megalong.config.parallel import ParallelConfig
    from megatron.core import parallel_state

    cp = 2
    ref = reference(ctx)  # fp32, CP=1 (every rank computes it whole)
    results, failures, figures = [], [], {}
    for cp_comm in ("ring", "a2a"):
        problem, failure = refusal_failure(cp, cases.MODEL.num_attention_heads, cases.MODEL.num_query_groups) \
            if cp_comm == "a2a" else (None, None)
        if problem is not None:
            figures[f"{cp_comm}_refused"] = problem
            failures += [failure] if failure else []
            results.append(f"{cp_comm}: NOT run (megalong refuses TE's all-to-all on this TE, as documented)")
            continue
        parallel = ParallelConfig(context_parallel=cp)
        ctx.use_layout(parallel)
        try:
            chunks = runs.build(candidate_config(ctx, "te", cp_comm=cp_comm), ctx, parallel, seed=runs.SEED + 1)
            load_weights(chunks, ref["weights"])
            group = parallel_state.get_context_parallel_group()
            batch = runs.micro_batch(samples(ctx), ctx, cp, parallel_state.get_context_parallel_rank())
            loss = runs.loss_and_backward(chunks[0], batch, group)
            result = compare_with_reference(f"cp.model[{cp_comm}]", loss, gradients(chunks[0]), ref, cp=cp)
        finally:
            ctx.use_layout(ParallelConfig())
        figures[cp_comm] = result.figures
        if result.status == "failed":
            failures.append(f"{cp_comm}: {result.reason}")
        results.append(f"{cp_comm}: {result.reason}")
    return CheckResult.judged("cp.model", failures, figures, " | ".join(results))
