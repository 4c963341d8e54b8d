"""How close is `megalong plan` to measured runs: published GPU throughput, and memory.

    python benchmarks/plan_accuracy.py                # published runs (default; CPU, about a minute)
    python benchmarks/plan_accuracy.py --fit          # refit the efficiency constants, then the same
    python benchmarks/plan_accuracy.py --cpu-memory   # memory: tiny models, real gloo training steps
    python benchmarks/plan_accuracy.py --gpu          # memory: one GPU, Llama-3-8B shape, few layers (needs TE)

Published runs (megalong/plan/published_runs.yaml): for each row the planner gets the row's
model, sequence, batch, GPU and precision with its layout pinned (the dimensions the source
gives, as `megalong plan --layout` does) and predicts the fastest layout that fits. Printed:
planner / published tokens/s per GPU for every row, then the median and the worst error of
the rows the constants were fitted on, of the held-out rows (never used by the fit), and of
both, and the memory verdict for every layout the sources ran on 80 GB GPUs (the run fitted,
so the planner should find that it fits). Other frameworks' rows (torchtitan, ProLong) are
printed apart: a different stack, compared only.

Memory modes: each case runs two real training steps (megalong.plan.measure), takes the
measured peak as the baseline and prints predicted / measured. On CPU the measurement counts
live tensor storages; on a GPU it is torch.cuda.max_memory_allocated (the estimate's framework
overhead and fragmentation are left out there, since the allocator statistic excludes them).
The planner figure is layouts evaluated per second against the time of one measured step.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _cases_cpu():
    from megalong.config import ParallelConfig
    from megalong.model import ModelConfig
    from megalong.model.presets import resolve
    from megalong.plan.measure import StepSetup

    def setup(preset, seq, recompute=None, mb=1, m=1, **parallel):
        return StepSetup(model=resolve(ModelConfig(preset=preset, recompute=recompute)),
                         parallel=ParallelConfig(**parallel), seq_length=seq, micro_batch=mb, num_microbatches=m)

    one = [setup("test-tiny", s, r) for s in (256, 768) for r in (None, "selective", "full")]
    one += [setup("llama3-tiny", 512, r, mb=2, m=2) for r in (None, "full")]
    two = [
        setup("test-tiny", 512, None, tensor_parallel=2),
        setup("test-tiny", 512, "selective", tensor_parallel=2),
        setup("test-tiny", 256, None, m=8, pipeline_parallel=2),
        setup("test-tiny", 256, "full", m=4, pipeline_parallel=2, virtual_pipeline=2),
        setup("llama3-tiny", 512, None, tensor_parallel=2),
        setup("llama3-tiny", 256, None, distributed_optimizer=True),
    ]
    return [(1, one), (2, two)]


def run_cpu() -> None:
    from megalong.plan import memory
    from megalong.plan.measure import measure_training_steps

    print(f"{'case':64s} {'measured MB':>12s} {'predicted MB':>13s} {'ratio':>6s}")
    ratios = []
    step_seconds = None
    for world, setups in _cases_cpu():
        start = time.perf_counter()
        results = measure_training_steps(setups, world)
        elapsed = time.perf_counter() - start
        step_seconds = step_seconds or elapsed / len(setups) / 2
        for setup, ranks in zip(setups, results):
            shape = memory.TrainingShape(seq_length=setup.seq_length, micro_batch=setup.micro_batch,
                                         num_microbatches=setup.num_microbatches, recompute=setup.model.recompute)
            predicted = memory.estimate(setup.model, setup.parallel, shape, world_size=world,
                                        precision=memory.FP32, profile=memory.CPU_LOCAL).total
            measured = max(r.peak_bytes for r in ranks)
            ratios.append(predicted / measured)
            name = (f"{setup.model.preset} s={setup.seq_length} mb={setup.micro_batch} m={setup.num_microbatches} "
                    f"rc={setup.model.recompute or '-'} {setup.parallel.describe(world).split(' over')[0]}")
            print(f"{name:64s} {measured / 1e6:12.2f} {predicted / 1e6:13.2f} {predicted / measured:6.3f}")
    worst = max(ratios, key=lambda r: abs(r - 1))
    print(f"predicted/measured over {len(ratios)} cases: min {min(ratios):.3f}, max {max(ratios):.3f}, "
          f"worst error {abs(worst - 1):.1%}")
    run_planner(step_seconds)


def run_planner(step_seconds: float | None) -> None:
    from megalong.model.presets import preset_config
    from megalong.plan import PlanRequest, gpu_spec, plan

    request = PlanRequest(model=preset_config("llama3-8b"), seq_length=524288, global_batch=16, nodes=8,
                          gpus_per_node=8, gpu=gpu_spec("h100"), loss_chunk_tokens=8192)
    start = time.perf_counter()
    result = plan(request)
    elapsed = time.perf_counter() - start
    layouts = len(result.candidates) + len(result.rejections)
    print(f"planner: {layouts} layouts for Llama-3-8B at 512K on 64 GPUs in {elapsed:.2f} s "
          f"({layouts / elapsed:,.0f} layouts/s)"
          + (f"; {elapsed / step_seconds:.2f}x the time of one tiny CPU training step" if step_seconds else ""))


def _gpu_rank(seq_lengths):
    from megalong.config import ParallelConfig
    from megalong.model.presets import preset_config
    from megalong.plan import memory
    from megalong.plan.measure import StepSetup, measure_rank

    out = []
    for seq in seq_lengths:
        for recompute in (None, "selective", "full"):
            model = preset_config("llama3-8b", num_layers=4, max_position_embeddings=seq, recompute=recompute)
            setup = StepSetup(model=model, parallel=ParallelConfig(), seq_length=seq, device="cuda")
            measured = measure_rank(setup).peak_bytes
            shape = memory.TrainingShape(seq_length=seq, recompute=recompute)
            predicted = memory.estimate(dataclasses.replace(model, params_dtype="bf16"), setup.parallel, shape,
                                        world_size=1, precision=memory.BF16, profile=memory.GPU_TE).total
            out.append((seq, recompute, measured, predicted))
    return out


def run_gpu() -> None:
    import torch

    from megalong.model.backends import transformer_engine_version
    from megalong.runtime.launch import run_processes

    if not torch.cuda.is_available():
        print("no GPU visible; run without --gpu for the CPU check")
        return
    if transformer_engine_version() is None:
        print("Transformer Engine is not installed: the GPU profile models TE kernels, nothing to compare")
        return
    rows = run_processes(_gpu_rank, 1, args=((8192, 16384, 32768),))[0]
    print(f"{'Llama-3-8B shape, 4 layers, 1 GPU':40s} {'measured GB':>12s} {'predicted GB':>13s} {'ratio':>6s}")
    for seq, recompute, measured, predicted in rows:
        print(f"{f's={seq} recompute={recompute}':40s} {measured / 1e9:12.2f} {predicted / 1e9:13.2f} "
              f"{predicted / measured:6.3f}")


def _error(ratio: float) -> float:
    return abs(ratio - 1)


def _summary(label: str, ratios: list[tuple[str, float]]) -> str:
    import statistics

    if not ratios:
        return f"{label}: no rows"
    errors = sorted((_error(r), name, r) for name, r in ratios)
    worst = errors[-1]
    median = statistics.median(e for e, _, _ in errors)
    median_ratio = statistics.median(r for _, r in ratios)
    return (f"{label} ({len(ratios)} rows): median error {median:.1%} (median ratio {median_ratio:.3f}), "
            f"worst {worst[0]:.1%} ({worst[1]}, ratio {worst[2]:.3f})")


def _describe_constants(efficiency) -> str:
    return "; ".join(f"{gen}: GEMM bf16 {e.gemm_bf16:.3f}, GEMM FP8 {e.gemm_fp8:.3f}, attention {e.attention:.3f}, "
                     f"TP overlap {e.tp_overlap:.2f}" + ("" if e.calibrated else " (borrowed)")
                     for gen, e in efficiency.items())


def run_published(refit: bool) -> int:
    """Planner / published for every published run; returns 0 when the goals are met."""
    from megalong.plan.calibrate import fit, fit_bf16_ratio, predict
    from megalong.plan.efficiency import EFFICIENCY
    from megalong.plan.memory import GB
    from megalong.plan.published import load_published

    table = load_published()
    start = time.perf_counter()
    predictions = [predict(run, table) for run in table.runs]
    print(f"planner evaluated {len(predictions)} published runs in {time.perf_counter() - start:.1f} s "
          f"(layouts pinned as published, the rest searched)")
    megatron = [p for p in predictions if table.source(p.run).framework == "megatron"]
    efficiency = dict(EFFICIENCY)
    if refit:
        start = time.perf_counter()
        efficiency = fit([p for p in megatron if not p.run.held_out], start=efficiency)
        by_id = {p.run.id: p for p in predictions}
        efficiency = fit_bf16_ratio(by_id["torchtitan-t1-bf16"], by_id["torchtitan-t1-fp8"], efficiency)
        for gen in ("blackwell", "ampere"):  # no published bf16 rows: Hopper's bf16/FP8 ratio (efficiency.py)
            e = efficiency[gen]
            ratio = efficiency["hopper"].gemm_bf16 / efficiency["hopper"].gemm_fp8
            efficiency[gen] = dataclasses.replace(e, gemm_bf16=e.gemm_fp8 * ratio if gen == "blackwell"
                                                  else efficiency["hopper"].gemm_bf16)
        efficiency["ampere"] = dataclasses.replace(efficiency["hopper"], calibrated=False)
        print(f"refitted in {time.perf_counter() - start:.1f} s")
    print(f"constants: {_describe_constants(efficiency)}")
    print()
    header = (f"{'run':32s} {'GPU':5s} {'seq':>6s} {'layout as published':28s} {'published':>9s} {'planner':>9s} "
              f"{'ratio':>6s}  planner's layout / memory verdict")
    print(header)
    groups: dict[str, list[tuple[str, float]]] = {"fit": [], "held out": [], "other": []}
    memory_rows = []
    for p in predictions:
        run, framework = p.run, table.source(p.run).framework
        layout = (f"TP{run.tp} PP{run.pp}{f'x{run.vp}' if run.vp else ''} CP{run.cp} DP{run.dp}"
                  + (" FSDP" if run.fsdp else "") if run.has_layout else "(not published)")
        best = p.best(efficiency)
        seq = f"{run.seq_length // 1024}K"
        if best is None:
            print(f"{run.id:32s} {run.gpu:5s} {seq:>6s} {layout:28s} {p.measured:9,.0f} {'-':>9s} {'-':>6s}  "
                  f"nothing fits: smallest {p.smallest.memory.total / GB:.1f} GB "
                  f"({p.smallest.layout.describe()})" if p.smallest else "no valid layout")
            ratio = None
        else:
            candidate, tokens = best
            ratio = tokens / p.measured
            verdict = f"{candidate.layout.describe()}, {candidate.memory.total / GB:.1f} GB"
            print(f"{run.id:32s} {run.gpu:5s} {seq:>6s} {layout:28s} {p.measured:9,.0f} {tokens:9,.0f} {ratio:6.3f}  "
                  f"{verdict}")
        group = "other" if framework != "megatron" else ("held out" if run.held_out else "fit")
        if ratio is not None:
            groups[group].append((run.id, ratio))
        elif group != "other":
            groups[group].append((run.id, float("inf")))
        if framework == "megatron" and run.gpu_memory_gb == 80:
            memory_rows.append(p)
    print()
    print(_summary("fitted rows", groups["fit"]))
    print(_summary("held-out rows", groups["held out"]))
    print(_summary("all Megatron rows", groups["fit"] + groups["held out"]))
    print(_summary("other frameworks (torchtitan, ProLong; compared, not fitted)", groups["other"]))
    fitting = [p for p in memory_rows if p.fits]
    print(f"memory: {len(fitting)} of {len(memory_rows)} published 80 GB layouts judged to fit"
          + "".join(f"; NOT {p.run.id} (smallest {p.smallest.memory.total / GB:.1f} GB)"
                    for p in memory_rows if not p.fits))
    all_rows = [r for _, r in groups["fit"] + groups["held out"]]
    import statistics

    met = (statistics.median(_error(r) for r in all_rows) <= 0.10 and max(_error(r) for r in all_rows) <= 0.25
           and len(fitting) == len(memory_rows))
    print(f"goal (median within 10%, worst within 25%, every 80 GB layout fits): {'met' if met else 'NOT met'}")
    return 0 if met else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--fit", action="store_true", help="refit the efficiency constants first")
    mode.add_argument("--cpu-memory", action="store_true", help="memory estimate vs real CPU training steps")
    mode.add_argument("--gpu", action="store_true", help="memory estimate vs one GPU (needs TE)")
    args = parser.parse_args()
    if args.cpu_memory:
        run_cpu()
    elif args.gpu:
        run_gpu()
    else:
        sys.exit(run_published(args.fit))
