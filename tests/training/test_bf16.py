"""bf16, as every real run trains: a stage keeps the weights it starts from, stages hand on
exactly what they saved, and a resume at another layout holds exactly the saved state.

The runs and why a step at learning rate 0 shows what a run started from:
tests/training/bf16.py. Every comparison here is bitwise: moving tensors between layouts,
into and out of checkpoints and between formats rounds nothing, and a zero-lr step changes
no weight.
"""

import os
import subprocess
import sys

import pytest
import torch
import yaml

from megalong.cli.main import main
from megalong.convert.dist_io import CheckpointReader
from tests.convert.tiny_models import load_all_safetensors
from tests.training import bf16
from tests.training.helpers import ROOT, read_rows

MASTER_WEIGHTS = "optimizer.state.param."  # the fp32 master copy in the optimizer checkpoint


def _tensors(directory, prefix: str = "") -> dict:
    """Every tensor (whose key starts with ``prefix``) of a distributed checkpoint directory."""
    reader = CheckpointReader(directory)
    keys = sorted(k for k in reader.tensors if k.startswith(prefix))
    assert keys, f"no tensor {prefix}* in {directory}"
    return reader.read({k: ((0,) * len(reader.shape(k)), reader.shape(k)) for k in keys})


def _assert_bitwise_equal(got: dict, expected: dict, what: str) -> None:
    assert got.keys() == expected.keys(), what
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), f"{what}: {key}"


@pytest.fixture(scope="module")
def dp2_through_the_command(workdir, single_process_results):
    """`megalong train` of the zero-lr run at DP=2 with the distributed optimizer, started as
    a user starts it (torchrun, two processes)."""
    run = bf16.zero_lr_from_hf(workdir, "dp2")
    recipe = bf16.run_dir(workdir, "zero-lr-dp2") / "recipe.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump(run))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "megalong", "train", str(recipe)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.parametrize("layout", sorted(bf16.ZERO_LR_LAYOUTS))
def test_a_stage_from_converted_hf_weights_keeps_them_exactly(workdir, single_process_results,
                                                              eight_process_results, layout, tmp_path, request):
    """HF bf16 -> `megalong convert hf-to-megatron` -> one step at lr 0 (bf16) -> `megalong
    convert megatron-to-hf`: every tensor bitwise the original's."""
    if layout == "dp2":
        output = request.getfixturevalue("dp2_through_the_command")
        # What a user reads: where the weights come from, and the first loss next to a random
        # model's. These weights are a random model's, so the warning must be there.
        assert f"New run from initial weights {bf16.converted(workdir)}: weights directory" in output
        assert "First step from the initial weights: loss" in output and "ln(512) = 6.238" in output
        assert "of a model that has learned nothing. A stage started from trained weights" in output
    else:
        assert set(single_process_results["bf16_codes"]) == {0}
        assert {codes[1] for codes in eight_process_results} == {0}
    checkpoint = bf16.final_checkpoint(workdir, f"zero-lr-{layout}", 1)
    assert main(["convert", "megatron-to-hf", str(checkpoint), str(tmp_path / "hf"), "--no-tokenizer"]) == 0
    original, exported = load_all_safetensors(bf16.hf_start(workdir)), load_all_safetensors(tmp_path / "hf")
    _assert_bitwise_equal(exported, original, f"{layout}: exported vs original")


def test_each_stage_starts_from_exactly_what_the_previous_one_saved(workdir, two_process_results):
    """Stage 2 carrying the optimizer starts from stage 1's bf16 weights and fp32 master weights,
    and follows its own learning rate; SFT with a fresh optimizer starts from stage 2's weights,
    its master copy taken from them."""
    assert two_process_results["bf16_codes"] == [[0] * len(two_process_results["bf16_codes"][0])] * 2
    stage1 = bf16.final_checkpoint(workdir, "stage1", bf16.STAGE_STEPS)
    stage2 = bf16.final_checkpoint(workdir, "stage2", bf16.STAGE_STEPS)
    probe2, probe_sft = (bf16.final_checkpoint(workdir, name, 1) for name in ("stage2-probe", "sft-probe"))

    # Each stage follows its own schedule, whatever optimizer state it carries: the probes run at
    # lr 0, stage 2 at its own learning rate (not stage 1's 3e-3) from its first step.
    for name in ("stage2-probe", "sft-probe"):
        assert [row["lr"] for row in read_rows(bf16.run_dir(workdir, name) / "metrics.jsonl")] == [0.0], name
    stage2_lrs = [row["lr"] for row in read_rows(bf16.run_dir(workdir, "stage2") / "metrics.jsonl")]
    assert stage2_lrs[0] == bf16.STAGE2_LR["lr"] and bf16.STAGE2_LR["min_lr"] <= stage2_lrs[-1] < stage2_lrs[0]

    stage1_weights = _tensors(stage1 / "model")
    # The stages trained (a chain of unchanged weights would prove nothing).
    assert not torch.equal(stage1_weights["output_layer.weight"], _tensors(bf16.converted(workdir) / "model",
                                                                          "output_layer")["output_layer.weight"])
    _assert_bitwise_equal(_tensors(probe2 / "model"), stage1_weights, "stage 2's start: weights")
    _assert_bitwise_equal(_tensors(probe2 / "optimizer", MASTER_WEIGHTS), _tensors(stage1 / "optimizer", MASTER_WEIGHTS),
                          "stage 2's start: fp32 master weights (carried, not re-derived from bf16)")

    stage2_weights = _tensors(stage2 / "model")
    assert not torch.equal(stage2_weights["output_layer.weight"], stage1_weights["output_layer.weight"])
    _assert_bitwise_equal(_tensors(probe_sft / "model"), stage2_weights, "SFT's start: weights")
    fresh_master = {MASTER_WEIGHTS + key: value.float() for key, value in stage2_weights.items()}
    _assert_bitwise_equal(_tensors(probe_sft / "optimizer", MASTER_WEIGHTS), fresh_master,
                          "SFT's start: fp32 master weights (a fresh optimizer's, from the loaded weights)")


@pytest.mark.parametrize("source,target", bf16.RESHARD_PAIRS, ids=[f"{s}-to-{t}" for s, t in bf16.RESHARD_PAIRS])
def test_resumed_at_another_layout_holds_exactly_the_saved_state(workdir, two_process_results,
                                                                resumed_single_process_results, source, target):
    """Saved at ``source``, resumed at ``target`` and saved again before any step: the bf16
    weights, the fp32 master weights and both Adam moments are bitwise the saved ones."""
    assert set(resumed_single_process_results["bf16_codes"]) == {0}
    saved = bf16.source_checkpoint(workdir, source)
    again = bf16.final_checkpoint(workdir, f"{source}-to-{target}", bf16.STAGE_STEPS)
    for part in ("model", "optimizer"):
        _assert_bitwise_equal(_tensors(again / part), _tensors(saved / part), f"{source} -> {target}: {part}")
    state = yaml.safe_load((again / "train_state.json").read_text())
    assert state["step"] == bf16.STAGE_STEPS and state["layout"].startswith(
        {"one-process": "tp1,pp1,cp1,dp1", "tp2": "tp2,pp1,cp1,dp1", "dp2": "tp1,pp1,cp1,dp2"}[target])
