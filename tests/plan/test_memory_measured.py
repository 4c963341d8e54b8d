"""The memory estimator against real training steps on CPU (the acceptance test).

Each case builds the model with ``megalong.model.llama.build_model`` in real gloo
processes, runs two full steps (forward, backward, optimizer) through Megatron-Core's
schedules, DDP and optimizer, and counts the bytes of every live tensor storage
(``megalong.plan.measure``). The estimate is the same ``megalong.plan.memory.estimate``
used for GPUs, with the CPU's precision (fp32) and kernel profile (no fused kernels, no
Transformer Engine).
"""

import pytest

from megalong.config import ParallelConfig
from megalong.model import ModelConfig
from megalong.model.presets import resolve
from megalong.plan import memory
from megalong.plan.measure import StepSetup, measure_training_steps

TOLERANCE = 0.15


def _setup(seq_length, preset="test-tiny", micro_batch=1, num_microbatches=1, recompute=None, **parallel):
    model = resolve(ModelConfig(preset=preset, recompute=recompute))
    return StepSetup(model=model, parallel=ParallelConfig(**parallel), seq_length=seq_length,
                     micro_batch=micro_batch, num_microbatches=num_microbatches)


def _predicted(setup: StepSetup, world_size: int) -> float:
    shape = memory.TrainingShape(
        seq_length=setup.seq_length, micro_batch=setup.micro_batch, num_microbatches=setup.num_microbatches,
        recompute=setup.model.recompute, recompute_num_layers=setup.model.recompute_num_layers,
    )
    return memory.estimate(setup.model, setup.parallel, shape, world_size=world_size,
                           precision=memory.FP32, profile=memory.CPU_LOCAL).total


def _check(setups, world_size):
    measured = measure_training_steps(setups, world_size)
    report = []
    for setup, ranks in zip(setups, measured):
        peak = max(rank.peak_bytes for rank in ranks)
        predicted = _predicted(setup, world_size)
        report.append((setup.parallel.describe(world_size), setup.seq_length, setup.model.recompute,
                       predicted / peak))
    for description, seq, recompute, ratio in report:
        assert abs(ratio - 1) <= TOLERANCE, (
            f"{description}, seq {seq}, recompute {recompute}: predicted/measured = {ratio:.3f}; all: {report}")
    return report


def test_single_process_layouts_match_measured_peak():
    # Attention-dominated (s^2) and logits-dominated (128K vocabulary) cases, with and
    # without recomputation, several sequence lengths and micro-batch shapes.
    _check([
        _setup(256),
        _setup(512, recompute="selective"),
        _setup(512, recompute="full"),
        _setup(128, micro_batch=4, num_microbatches=2),
        _setup(256, preset="llama3-tiny"),
    ], world_size=1)


def test_two_process_layouts_match_measured_peak():
    # TP=2, PP=2 (1F1B, 4 micro-batches), interleaved PP=2 x 2, DP=2 with the distributed
    # optimizer (optimizer state sharded over DP).
    _check([
        _setup(384, tensor_parallel=2),
        _setup(256, num_microbatches=4, pipeline_parallel=2),
        _setup(256, num_microbatches=4, pipeline_parallel=2, virtual_pipeline=2),
        _setup(256, preset="llama3-tiny", recompute="full", distributed_optimizer=True),
    ], world_size=2)
