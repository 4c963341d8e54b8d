"""Every parallelism gives the losses of one process (same initial weights, same data).

One 8-process job combines TP=2 x PP=2 with CP=2 (when context parallelism is built:
megalong.data.cp_shard and megalong.model.attention) or with DP=2 otherwise. DP=2 with
the distributed optimizer is also checked against one process in the two-process job of
test_loss (uneven batches), and PP=2 with virtual stages in test_checkpoint.
"""

import importlib.util

import pytest

from megalong.runtime.launch import run_processes
from tests.training.helpers import read_losses, reference_run, train_from_dict

# Different layouts sum in a different order: each step's gradients differ by fp32 reordering,
# <= 512 u = 3e-5 of a tensor's largest gradient (tests/numerics.py). Adam (eps 1e-8) passes
# that on as lr * eps / g^2 * dg, small unless |g| is itself at rounding level; such an element
# (a ~3e-5 share of them) may step the other way, but moves the loss by at most |g| * 2 lr,
# ~1e-10. So the losses agree to far below 1e-5 relative to first order in every step (seen:
# ~1e-7 after 12 steps, the rest is the steps compounding); a wrong reduction is off by >1e-2.
REL_TOLERANCE = 1e-5

CP_BUILT = all(importlib.util.find_spec(m) is not None for m in ("megalong.data.cp_shard", "megalong.model.attention"))
LAYOUT = {"tensor_parallel": 2, "pipeline_parallel": 2, "distributed_optimizer": True,
          **({"context_parallel": 2} if CP_BUILT else {})}


def test_tp2_pp2_and_cp2_or_dp2_match_one_process(workdir, single_process_results):
    """12 steps at TP=2 x PP=2 x CP=2 (or x DP=2 without CP) vs the one-process run."""
    run = reference_run(workdir, "eight-processes", parallel=LAYOUT)
    assert run_processes(train_from_dict, 8, (run,)) == [0] * 8
    parallel = read_losses(workdir / "eight-processes" / "metrics.jsonl")
    single = read_losses(workdir / "reference" / "metrics.jsonl")
    assert sorted(parallel) == list(range(1, 13))
    for step in parallel:
        assert parallel[step] == pytest.approx(single[step], rel=REL_TOLERANCE), step
