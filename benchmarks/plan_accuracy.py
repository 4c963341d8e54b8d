"""How close is the memory estimator to real training steps, and how fast is the planner?

    python benchmarks/plan_accuracy.py            # CPU: tiny models, real gloo processes
    python benchmarks/plan_accuracy.py --gpu      # one GPU: Llama-3-8B shape, few layers (needs TE)

For each case it runs two real training steps (megalong.plan.measure), takes the measured
peak as the baseline and prints predicted / measured. On CPU the measurement counts live
tensor storages; on a GPU it is torch.cuda.max_memory_allocated (the estimate's framework
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
        setup("test-tiny", 512, "selective", tensor_parallel=2, sequence_parallel=True),
        setup("test-tiny", 256, None, m=8, pipeline_parallel=2),
        setup("test-tiny", 256, "full", m=4, pipeline_parallel=2, virtual_pipeline=2),
        setup("llama3-tiny", 512, None, tensor_parallel=2),
        setup("llama3-tiny", 512, None, tensor_parallel=2, sequence_parallel=True),
        setup("llama3-tiny", 256, None, distributed_optimizer=True),
    ]
    return [(1, one), (2, two)]


def run_cpu() -> None:
    from megalong.plan import memory
    from megalong.plan.measure import measure_training_steps

    print(f"{'case':76s} {'measured MB':>12s} {'predicted MB':>13s} {'ratio':>6s}")
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
            print(f"{name:76s} {measured / 1e6:12.2f} {predicted / 1e6:13.2f} {predicted / measured:6.3f}")
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="measure on the GPU instead of the CPU")
    args = parser.parse_args()
    run_gpu() if args.gpu else run_cpu()
