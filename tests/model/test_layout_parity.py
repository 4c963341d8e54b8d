"""Same weights, same numbers, whatever the parallel layout (real gloo processes)."""

from __future__ import annotations

import pytest
import torch

from megalong.config import ParallelConfig
from megalong.runtime.launch import run_processes
from tests.model import parity_workers as workers

from megalong.gpucheck.compare import relative_error
from megalong.gpucheck.tolerances import U_BF16, bf16_gradient_bound
from tests.numerics import UNIT_ROUNDOFF, reordering_rtol

# The longest sums behind logits, losses and gradients of test-tiny on BATCH x SEQ tokens:
# the padded vocabulary (512: the softmax, the output and embedding gradients), the 128 tokens
# of each weight gradient, and 4 layers of hidden/FFN sums (<= 128 terms each) stacked, 512 in all.
RTOL = reordering_rtol(512)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    weights = tmp_path_factory.mktemp("ref") / "weights"
    run_processes(workers.save_reference_weights, 1, (str(weights),))
    (ref,) = run_processes(workers.logits_and_losses, 1, (ParallelConfig(), str(weights)))
    return str(weights), ref


@pytest.fixture(scope="module")
def reference_step(reference, tmp_path_factory):
    weights, _ = reference
    ref_dir = str(tmp_path_factory.mktemp("step") / "ref")
    (norm,) = run_processes(workers.one_optimizer_step, 1, (ParallelConfig(), weights, ref_dir))
    return ref_dir, norm


def _assert_close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * expected.abs().max().item(), msg=what)


@pytest.mark.parametrize(
    "layout,world",
    [
        (ParallelConfig(tensor_parallel=2), 2),
        (ParallelConfig(pipeline_parallel=2), 2),
        (ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 4),
        (ParallelConfig(distributed_optimizer=True), 2),  # DP=2
    ],
    ids=["tp2", "pp2", "tp2xpp2", "dp2"],
)
def test_logits_and_loss_match_single_process(reference, layout, world):
    weights, ref = reference
    results = [r for r in run_processes(workers.logits_and_losses, world, (layout, weights)) if r]
    covered = 0
    for result in results:
        start, stop = result["rows"]
        _assert_close(result["logits"], ref["logits"][start:stop], f"logits rows {start}:{stop}")
        _assert_close(result["losses"], ref["losses"][start:stop], f"losses rows {start}:{stop}")
        covered += stop - start
    assert covered == workers.BATCH



def _adam_first_step(weight, grad, grad_norm):
    """The weights after Megatron's first AdamW step from ``weight`` with gradient ``grad``,
    computed in float64: clip by the global norm, then m_hat = g and v_hat = g^2 (bias
    correction of step 1), so the update is lr * g / (|g| + eps), after decoupled weight decay.
    Every parameter decays here: the worker steps without Megatron's LR scheduler, which is
    what applies the zero weight-decay multiplier of 1-D parameters (the norms)."""
    w, g = weight.double(), grad.double()
    g = g * min(1.0, workers.CLIP_GRAD / (grad_norm + 1e-6))
    decay = workers.LR * workers.WEIGHT_DECAY
    update = workers.LR * g / (g.abs() + workers.ADAM_EPS)
    return w * (1 - decay) - update, update


def _assert_is_adam_step(before, after, grad, grad_norm, what, stored_roundoff: float = 0.0):
    """``after`` is the fp32 AdamW step of ``before`` with ``grad``, to fp32 rounding: the decay
    is two roundings of w; the update takes about ten (lerp, square, sqrt, two divisions, the
    eps add, the scale, the clip multiply) and the final add one more of the result; 4u|w| +
    16u|update| covers them. Layout rounding is in ``grad``, so this check is exact whatever
    the layout, and catches a step that used other gradients, moments or learning rate."""
    expected, update = _adam_first_step(before, grad, grad_norm)
    bound = ((UNIT_ROUNDOFF * 4 + stored_roundoff) * expected.abs() + UNIT_ROUNDOFF * 16 * update.abs()
             + torch.finfo(torch.float32).tiny)
    error = (after.double() - expected).abs()
    worst = int((error - bound).argmax())
    assert bool((error <= bound).all()), (
        f"{what}: not the AdamW step of its gradients; element {worst}: "
        f"{after.reshape(-1)[worst].item()!r} vs expected {expected.reshape(-1)[worst].item()!r}"
    )


@pytest.mark.parametrize(
    "layout,world",
    [(ParallelConfig(tensor_parallel=2), 2), (ParallelConfig(distributed_optimizer=True), 2)],
    ids=["tp2", "dp2-distributed-optimizer"],
)
def test_one_optimizer_step_matches_single_process(reference, reference_step, tmp_path, layout, world):
    """The same step at another layout: the gradients agree to reduction-order rounding, and
    each run's weights are exactly the AdamW step of its own gradients. (Comparing the stepped
    weights directly amplifies gradient rounding by Adam's lr * eps / (|g| + eps)^2, up to
    lr / eps = 100 for a gradient near zero: that comparison depends on the CPU's kernels.)"""
    weights, _ = reference
    ref_dir, ref_norm = reference_step
    out_dir = tmp_path / "step_layout"
    norms = run_processes(workers.one_optimizer_step, world, (layout, weights, str(out_dir)))
    # The norm sums squares of the same gradients: the same relative rounding.
    assert norms[0] == pytest.approx(ref_norm, rel=RTOL)

    ((initial, ref_grads, ref_after, grads, after),) = run_processes(
        workers.load_states, 1,
        ([weights, f"{ref_dir}-gradients", ref_dir, f"{out_dir}-gradients", str(out_dir)],),
    )
    assert initial.keys() == grads.keys() == after.keys()
    for name, ref_grad in ref_grads.items():
        torch.testing.assert_close(grads[name], ref_grad, rtol=RTOL,
                                   atol=RTOL * ref_grad.abs().max().item(), msg=f"gradient of {name}")
        _assert_is_adam_step(initial[name], ref_after[name], ref_grad, ref_norm, f"{name} (one process)")
        _assert_is_adam_step(initial[name], after[name], grads[name], norms[0], f"{name} ({layout})")
    moved = sum(int(not torch.equal(after[name], initial[name])) for name in initial)
    assert moved == len(initial), "every parameter should have been updated by the step"


# bf16 parameters (every real run): an fp32 master copy steps, the bf16 model receives it rounded.
BF16_STEP_LAYOUTS = {"dp2": ParallelConfig(distributed_optimizer=True), "pp2": ParallelConfig(pipeline_parallel=2),
                     "tp2": ParallelConfig(tensor_parallel=2)}


def test_one_bf16_optimizer_step_matches_single_process(reference, tmp_path):
    """The same bf16 step at DP=2 (distributed optimizer), PP=2 and TP=2 as in one process.

    DP and PP compute every sample exactly as one process does (the same bf16 operations on
    the same values); they only sum the micro-batches' gradients in another order, in fp32
    (Megatron DDP's main_grad): the fp32 reordering bound applies. TP rounds its partial sums
    to bf16 where one process does not: both are within tolerances.bf16_gradient_bound of the
    exact gradients (norm-wise), so of each other within the sum of their bounds. Each run's
    bf16 weights are the fp32 AdamW step of its own gradients from the loaded weights, rounded
    once to bf16 (a relative 2^-8 more than the fp32 check): the master copy was taken from the
    loaded weights and the step reached the model through it.
    """
    weights, _ = reference
    one = str(tmp_path / "one")
    (one_norm,) = run_processes(workers.one_optimizer_step, 1, (ParallelConfig(), weights, one, "bf16"))
    norms = run_processes(workers.steps_in_sequence, 2, (BF16_STEP_LAYOUTS, weights, str(tmp_path), "bf16"))[0]
    names = list(BF16_STEP_LAYOUTS)
    directories = [weights, f"{one}-gradients", one]
    for name in names:
        directories += [f"{tmp_path / name}-gradients", str(tmp_path / name)]
    ((initial, one_grads, one_after, *per_layout),) = run_processes(workers.load_states, 1, (directories,))
    # The master copy and the step start from the loaded weights, i.e. the fp32 ones in bf16.
    start = {name: value.to(torch.bfloat16).float() for name, value in initial.items()}
    for name, grad in one_grads.items():
        _assert_is_adam_step(start[name], one_after[name], grad, one_norm, f"{name} (one process, bf16)", U_BF16)
    tp_bound = bf16_gradient_bound(4) + bf16_gradient_bound(4, tp=2)
    for index, layout in enumerate(names):
        grads, after = per_layout[2 * index], per_layout[2 * index + 1]
        assert grads.keys() == one_grads.keys()
        for name, ref_grad in one_grads.items():
            if layout == "tp2":
                assert relative_error(grads[name], ref_grad) <= tp_bound, f"{layout}: gradient of {name}"
            else:
                torch.testing.assert_close(grads[name], ref_grad, rtol=RTOL, atol=RTOL * ref_grad.abs().max().item(),
                                           msg=f"{layout}: gradient of {name}")
            _assert_is_adam_step(start[name], after[name], grads[name], norms[layout], f"{name} ({layout}, bf16)",
                                 U_BF16)
        if layout != "tp2":
            assert norms[layout] == pytest.approx(one_norm, rel=RTOL), layout
