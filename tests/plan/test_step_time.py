"""The step-time model's parts respond to what they model, and only to that."""

import dataclasses

import numpy as np
import pytest

from megalong.config import ParallelConfig
from megalong.model.presets import preset_config
from megalong.plan.efficiency import EFFICIENCY
from megalong.plan.hardware import gpu_spec
from megalong.plan.memory import BF16, FP8, TrainingShape, estimate, layer_parameters
from megalong.plan.stack import MEGALONG, NEMO_PERFORMANCE
from megalong.plan.step_time import estimate_step_time, layer_gemm_weights
from megalong.plan.workload import Workload

MODEL = preset_config("llama3-8b")
H100 = gpu_spec("h100")
SHAPE = TrainingShape(seq_length=65536, num_microbatches=8, recompute="selective")
PARALLEL = ParallelConfig(tensor_parallel=4, context_parallel=2, sequence_parallel=True)


def _time(precision=BF16, stack=MEGALONG, workload=None, parallel=PARALLEL, shape=SHAPE, efficiency=None):
    return estimate_step_time(MODEL, parallel, shape, world_size=8, gpus_per_node=8, gpu=H100, precision=precision,
                              efficiency=efficiency or EFFICIENCY["hopper"], stack=stack,
                              workload=workload or Workload.full_sequences(65536, 8))


def test_fp8_speeds_up_the_layer_gemms_only_at_the_fp8_constant():
    bf16, fp8 = _time(BF16), _time(FP8)
    e = EFFICIENCY["hopper"]
    layer_gemm_flops = 3 * 2.0 * layer_gemm_weights(MODEL) * MODEL.num_layers * 8 * 65536 / 8  # per GPU
    expected = layer_gemm_flops * (1 / (989e12 * e.gemm_bf16) - 1 / (1979e12 * e.gemm_fp8))
    assert bf16.gemm_s - fp8.gemm_s == pytest.approx(expected, rel=1e-9)
    assert bf16.attention_s == fp8.attention_s  # attention stays bf16


def test_attention_time_follows_the_workloads_sum_of_squares():
    full = _time()
    halves = Workload(65536, 8, [[np.array([32768, 32768])] * 8], "two documents per sample")
    half = _time(workload=halves)
    # Two documents of s/2: (s/2)^2 x 2 = s^2 / 2 of the work.
    assert half.attention_s == pytest.approx(full.attention_s / 2, rel=1e-12)
    assert half.gemm_s == full.gemm_s
    assert half.model_flops < full.model_flops


def test_tp_overlap_hides_its_share_only_when_the_stack_overlaps():
    plain = _time(stack=MEGALONG)
    overlapped = _time(stack=MEGALONG.with_(tp_comm_overlap=True))
    assert overlapped.tp_comm_s == pytest.approx(plain.tp_comm_s * (1 - EFFICIENCY["hopper"].tp_overlap))
    assert plain.tp_comm_s > 0


def test_the_thd_relayout_costs_cp_communication():
    with_relayout = _time(stack=MEGALONG)
    without = _time(stack=MEGALONG.with_(cp_relayout=False))
    assert with_relayout.cp_comm_s > without.cp_comm_s


def test_imbalance_is_zero_for_identical_samples_and_positive_for_mixed_ones():
    assert _time().imbalance_s == pytest.approx(0.0, abs=1e-12)
    # Three long-document samples over four DP ranks: one rank gets two short ones instead.
    mixed = Workload(65536, 8, [[np.array([65536])] * 3 + [np.array([1024] * 64)] * 5], "mixed")
    dp_parallel = ParallelConfig(tensor_parallel=2, sequence_parallel=True)  # DP = 4
    assert _time(workload=mixed, parallel=dp_parallel).imbalance_s > 0


def test_stack_switches_change_memory_as_documented():
    parallel, shape = ParallelConfig(tensor_parallel=2, sequence_parallel=True), TrainingShape(8192, recompute="full")

    def memory(precision, **stack):
        switched = dataclasses.replace(MEGALONG, **stack)
        precision = precision.for_stack(switched.grad_reduce_in_fp32, switched.fp8_param_gather)
        return estimate(MODEL, parallel, shape, world_size=8, precision=precision, fsdp=switched.fsdp)

    linear_per_stage = sum(v for k, v in layer_parameters(MODEL, 2).items() if k != "norms") * MODEL.num_layers
    # FP8 copies of the linear weights: 2 bytes each, gone when the FP8 weights are the parameters.
    assert memory(FP8).weights - memory(FP8, fp8_param_gather=True).weights == 2 * linear_per_stage
    assert memory(FP8, fp8_param_gather=True).weights == memory(BF16).weights
    # grad_reduce_in_fp32: 4 bytes per gradient, 2 without.
    assert memory(BF16).gradients == 2 * memory(BF16, grad_reduce_in_fp32=False).gradients
    # FSDP: weights and gradients sharded over the 4 DP ranks (plus the gathered layers).
    assert memory(BF16, fsdp=True).weights < memory(BF16).weights / 3
    assert NEMO_PERFORMANCE.fp8_param_gather and not MEGALONG.fp8_param_gather
