"""``megalong eval`` end to end in a fresh process: a megalong weights directory, then an HF model added."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megalong.cli.eval import parse_length
from megalong.eval.config import EvalConfig
from megalong.eval.evaluate import evaluate
from tests.eval.datasets import random_documents, write_indexed_dataset

ROOT = Path(__file__).resolve().parents[2]


def _megalong(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "megalong", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_eval_of_megalong_weights_writes_json_and_plots_then_adds_a_model(tiny_weights, hf_dir, tmp_path):
    prefix = write_indexed_dataset(str(tmp_path / "heldout"), random_documents([300, 260], 128256, seed=5))
    out = tmp_path / "eval"
    options = [
        "recall.max_new_tokens=2", "--out", str(out), "--tokenizer", "llama3", "--device", "cpu",
        "--tasks", "niah_single,niah_multivalue", "--lengths", "256,320", "--depths", "0,0.5,1",
        "--samples", "1", "--ppl-data", prefix, "--ppl-length", "256", "--ppl-documents", "2",
        "--ppl-bucket", "64", "--ppl-chunk", "100",
    ]
    first = _megalong("eval", tiny_weights, *options)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "recall 12/12" in first.stderr and "perplexity 2/2" in first.stderr
    results = json.loads((out / "results.json").read_text())
    [row] = results["models"]
    assert row["kind"] == "megalong" and row["runner"]["kind"] == "megalong" and row["label"] == "tiny"
    assert len(row["recall"]["samples"]) == 2 * 2 * 3
    for sample in row["recall"]["samples"]:
        assert sample["num_tokens"] == sample["length"] and 0.0 <= sample["score"] <= 1.0
    assert set(row["recall"]["summary"]["by_length_and_depth"]["niah_multivalue"]["320"]) == {"0", "0.5", "1"}
    ppl = row["perplexity"]
    assert ppl["tokens"] == 2 * 255 and len(ppl["buckets"]) == 4
    # A random model over the 128,256-token vocabulary: loss near ln(128256) = 11.76.
    assert 9.0 < ppl["mean_loss"] < 15.0
    for name in ("recall_heatmap.png", "loss_by_position.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Again with a Hugging Face model added (and labels): the megalong model's work is all in
    # its progress file, so only the new model is evaluated.
    progress = out / row["dir"] / "progress.jsonl"
    progress_before = progress.read_text()
    second = _megalong("eval", tiny_weights, str(hf_dir), *options, "--labels", "megalong,hf")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "[megalong] recall: 12 prompts" in second.stderr and "12 already done" in second.stderr
    assert "[hf] recall 12/12" in second.stderr and "[hf] perplexity 2/2" in second.stderr
    assert "Loaded megalong weights" not in second.stderr
    assert progress.read_text() == progress_before
    again = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in again["models"]] == ["megalong", "hf"]
    assert again["models"][0]["recall"] == row["recall"] and again["models"][0]["perplexity"] == row["perplexity"]
    assert again["models"][1]["kind"] == "hf" and again["models"][1]["perplexity"]["tokens"] == 2 * 255


def test_eval_needs_a_tokenizer_for_megalong_weights(tiny_weights, tmp_path):
    # Checked before any model is loaded, so it runs in this process.
    cfg = EvalConfig(models=[tiny_weights], out=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="holds no tokenizer: pass --tokenizer"):
        evaluate(cfg)


def test_lengths_accept_k_suffixes():
    assert [parse_length(n) for n in ("4K", "128k", "1M", "300")] == [4096, 131072, 1048576, 300]


def test_flags_yaml_and_overrides_make_one_config(tmp_path):
    import argparse

    from megalong.cli import eval as eval_cli
    from megalong.config import load

    recipe = tmp_path / "eval.yaml"
    recipe.write_text("recall:\n  samples: 9\n  depths: [0.2]\nperplexity:\n  num_documents: 3\n")
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    args = parser.parse_args(["weights", "recall.seed=5", "runs/2024: a/iter_0000010", "perplexity.num_documents=4",
                              "--out", "o", "--config", str(recipe), "--lengths", "4K,6000", "--tasks", "json_kv",
                              "--ppl-data", "data/x", "--samples", "2", "--labels", "first, second"])
    cfg = load(EvalConfig, args.config, eval_cli.overrides_of(args))
    # Paths stay strings whatever they look like to YAML; overrides may sit among them.
    assert cfg.models == ["weights", "runs/2024: a/iter_0000010"] and cfg.labels == ["first", "second"]
    assert (cfg.out, cfg.perplexity.data) == ("o", "data/x")
    assert cfg.recall.lengths == [4096, 6000] and cfg.recall.tasks == ["json_kv"]
    assert cfg.recall.samples == 2 and cfg.recall.depths == [0.2] and cfg.recall.seed == 5  # flag > YAML
    assert cfg.perplexity.num_documents == 4  # override > YAML
    args = parser.parse_args(["weights", "--out", "o", "--tasks", "none"])
    assert load(EvalConfig, None, eval_cli._flag_overrides(args)).recall.tasks == []
