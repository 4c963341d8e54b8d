"""megalong's single-device attention kernels with bf16 inputs against the float64 definition
(bounds and control: tests/model/attention/precision.py). The CP kernels in bf16 are checked
in real processes by test_context_parallel_attention."""

import pytest
import torch

from megalong.gpucheck.tolerances import attention_forward_bound
from megalong.model.attention import blocks
from megalong.model.attention.layout import DocumentLayout
from megalong.model.attention.local import sdpa_attention
from megalong.model.attention.ring import ring_attention
from tests.model.attention import precision


@pytest.fixture(scope="module")
def case():
    cu_seqlens, q, k, v, grad_out = precision.bf16_inputs()
    layout = DocumentLayout.from_sample_cu_seqlens(cu_seqlens, precision.SEQ_LENGTH)
    # The case must hold documents long enough for bf16 sums to show (precision's docstring).
    lengths = torch.diff(cu_seqlens[0])
    assert int(lengths.max()) >= 128
    return layout, (q, k, v, grad_out), precision.reference_outputs(q, k, v, grad_out, layout.doc_ids)


KERNELS = {
    "sdpa": lambda layout: lambda q, k, v: sdpa_attention(q, k, v, layout, precision.SCALE, 64),
    "block kernel (ring without CP)": lambda layout: lambda q, k, v: ring_attention(q, k, v, layout, None,
                                                                                      precision.SCALE, 64),
}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernel_in_bf16_is_within_its_rounding_of_the_definition(case, kernel):
    layout, tensors, reference = case
    found = precision.errors(precision.run_kernel(KERNELS[kernel](layout), *tensors), reference)
    assert precision.within_bounds(found) == [], found


def test_block_kernel_keeps_its_statistics_in_fp32(case, monkeypatch):
    """The block kernel's own (unfused) path, with the accumulation dtype forced to the input's
    (bf16): the same check must reject it; with fp32 (the kernel as shipped) it passes."""
    layout, tensors, reference = case

    def unfused(q, k, v):
        original = blocks.block_forward
        with monkeypatch.context() as patch:
            patch.setattr(blocks, "block_forward", lambda *a, **kw: original(*a, **{**kw, "fused": False}))
            return ring_attention(q, k, v, layout, None, precision.SCALE, 64)

    forward_only = {"out": reference["out"]}
    shipped = precision.run_kernel(unfused, *tensors)
    assert precision.errors({"out": shipped["out"]}, forward_only)["out"] <= attention_forward_bound()
    monkeypatch.setattr(blocks, "accumulation_dtype", lambda dtype: dtype)
    with torch.no_grad():
        summed_in_bf16 = unfused(*tensors[:3])
    assert precision.errors({"out": summed_in_bf16}, forward_only)["out"] > attention_forward_bound()


def test_the_check_rejects_a_kernel_that_sums_in_bf16(case):
    layout, (q, k, v, _), reference = case
    with torch.no_grad():
        out = precision.bf16_summing_attention(q, k, v, layout.doc_ids, precision.SCALE)
    error = precision.errors({"out": out}, {"out": reference["out"]})["out"]
    # Well outside, not a borderline miss (measured: 3.6 times the bound).
    assert error > 2 * attention_forward_bound(), error
