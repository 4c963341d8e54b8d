"""Chunked cross entropy (loss.chunk_tokens): Megatron's losses and gradients, one chunk's memory.

Chunked against Megatron's full logits on the same model and inputs, in fp32: at TP=1 and
TP=2, with and without sequence parallelism, tied and untied output weights, a padded
vocabulary, a loss mask and chunk sizes that do not divide the tokens; the peak memory of
the loss path measured with torch's profiler; and a TP=2 training run with the option set.
"""

from pathlib import Path

import pytest

from megalong.runtime.launch import run_processes
from tests.training import loss_chunks
from tests.training.helpers import read_losses, short_run

from tests.numerics import reordering_rtol

# Per-token losses come out bit-identical (each row's computation is the same); gradients
# sum the chunks' contributions in another order: the output weight's gradient is a sum over
# the micro-batch's BATCH x SEQ = 192 tokens, compared relative to the largest gradient.
GRAD_TOLERANCE = reordering_rtol(loss_chunks.BATCH * loss_chunks.SEQ)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def single():
    (result,) = run_processes(loss_chunks.single_job, 1)
    return result


@pytest.fixture(scope="module")
def tp2(workdir, two_process_results):
    # The recipes' shape: chunks under sequence parallelism (against the TP=2 run without it).
    run = short_run(workdir, "chunked-tp2", parallel={"tensor_parallel": 2, "sequence_parallel": True},
                    loss={"chunk_tokens": 24})
    return run_processes(loss_chunks.tp2_job, 2, (run,))


def _check(result, tokens_per_rank):
    sp, tied, _ = result["case"]
    assert result["installed"] and result["loss_shape"] and result["same_grads"]
    assert result["tied_output"] is tied
    per_rank = result["chunk_rows"] // (2 if sp else 1)
    chunks = -(-tokens_per_rank // per_rank)
    assert chunks > 2
    # Each chunk projected once in forward and once more (recomputed) in backward.
    assert result["projections"] == (2 * chunks, chunks)
    assert result["output_weight_accumulations"] == 1
    assert result["loss_diff"] == 0.0 and result["no_grad_loss_diff"] == 0.0
    assert result["logits_diff"] == 0.0  # a call without labels still returns the logits
    assert result["grad_diff"] < GRAD_TOLERANCE, result
    return tokens_per_rank % per_rank != 0  # the last chunk is shorter



def test_chunked_loss_equals_full_logits_at_tp1(single):
    compared, _, _ = single
    tokens = loss_chunks.SEQ * loss_chunks.BATCH
    short_last_chunk = []
    for result in compared:
        short_last_chunk.append(_check(result, tokens))
        # Padded vocabulary: Megatron's path with the exclusion is torch's CE over the real vocab.
        # Each per-token loss is log(sum of 512 exps) - logit: a reordered sum of positive terms
        # moves the log by at most 512 u (absolute); the gradients as above, over 512 entries.
        assert result["reference_diff"]["loss"] < reordering_rtol(512)
        assert result["reference_diff"]["grads"] < reordering_rtol(512)
    assert all(short_last_chunk)


def test_chunked_loss_equals_full_logits_at_tp2_with_sequence_parallel(tp2):
    for rank_results, _ in tp2:
        short_last_chunk = [_check(r, loss_chunks.SEQ * loss_chunks.BATCH // (2 if r["case"][0] else 1))
                            for r in rank_results]
        assert short_last_chunk == [True, False, True]  # chunk sizes 22, 7 (6 rows: divides), 22


def test_peak_memory_of_the_loss_path_is_one_chunk(single):
    _, (full, chunked), _ = single
    logits = 2048 * 32000 * 4  # [S, B, V] fp32 (vocabulary 31,990 padded to 32,000)
    # One logits-sized tensor: the softmax is computed in place in the logits and the
    # gradient in place in the softmax; the padded-vocabulary fill adds no gradient copy.
    assert logits <= full < 1.1 * logits
    # 256 of 2048 tokens: the chunk's logits plus the output layer's weight gradient.
    assert chunked < 0.25 * full, (full, chunked)


def test_bf16_model_losses_are_computed_and_summed_in_fp32(single):
    """A bf16 model's logits are bf16, its losses fp32: the cross entropy (Megatron-Core's, full
    or chunked) and the loss sum accumulate in fp32, as Megatron-Core does.

    Against the float64 cross entropy of the same bf16 logits, a per-token loss log(sum of 512
    exps) - logit computed in fp32 is off by at most about 512 u32 (absolute; see the fp32
    test above) and the sum of the BATCH x SEQ = 192 masked losses by 192 u32 of itself. One
    rounding to bf16 alone moves a loss near ln(500) = 6.2 by up to 6.2 x 2^-9 = 0.012, a
    thousand times more: the same checks applied to the losses rounded to bf16 must fail.
    """
    _, _, found = single
    assert found["logits_dtype"] == "torch.bfloat16"
    loss_bound, sum_bound = reordering_rtol(512), reordering_rtol(loss_chunks.BATCH * loss_chunks.SEQ)
    for name in ("full", "chunked"):
        assert found[name]["dtype"] == "torch.float32", found[name]
        assert found[name]["loss"] < loss_bound and found[name]["sum"] < sum_bound, (name, found[name])
    assert found["rounded to bf16"]["loss"] > loss_bound and found["rounded to bf16"]["sum"] > sum_bound


def test_training_run_with_chunked_loss_matches_unchunked(workdir, tp2):
    (_, (code0, installed0)), (_, (code1, installed1)) = tp2
    assert (code0, code1) == (0, 0) and installed0 == installed1 == [24]
    chunked = read_losses(workdir / "chunked-tp2" / "metrics.jsonl")
    full = read_losses(workdir / "reshard" / "metrics.jsonl")  # the same run at TP=2, unchunked, no SP
    assert sorted(chunked) == [1, 2, 3, 4]
    for step in chunked:
        assert chunked[step] == pytest.approx(full[step], rel=1e-5), step


def test_recipe_option_and_planner_read_the_same_key():
    from megalong.config import ConfigError, load
    from megalong.plan.recipe import read_recipe
    from megalong.training import RunConfig

    assert load(RunConfig, None).loss.chunk_tokens == 0  # Megatron's full logits by default
    for name in ("stage1_64k", "stage2_512k", "sft"):
        path = EXAMPLES / "prolong" / f"{name}.yaml"
        assert load(RunConfig, path).loss.chunk_tokens == 8192
        assert read_recipe(path).loss_chunk_tokens == 8192
    bad = load(RunConfig, EXAMPLES / "tiny_cpu.yaml", ["loss.chunk_tokens=-1"])
    with pytest.raises(ConfigError, match="loss.chunk_tokens"):
        bad.validate(world_size=2)
