"""The quickstart at its smallest size: every step runs, every artifact exists, the loss falls,
the stages are compared on held-out data, and the report gives its figures."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from megalong.config import load
from megalong.data.mixture import resolve_prefix
from megalong.quickstart.pipeline import SIZES
from megalong.quickstart.report import read_losses
from megalong.training.config import RunConfig

SMOKE = SIZES["smoke"]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_every_artifact_exists(quickstart_run):
    out, result = quickstart_run
    for prefix in ("code/code_text_document", "books/books_text_document", "web/web_text_document",
                   "synthetic_kv/synthetic_kv_text_document", "heldout/heldout_books_text_document",
                   "chat/chat_chat"):
        for suffix in (".bin", ".idx", ".json"):
            assert (out / "data" / f"{prefix}{suffix}").is_file(), prefix + suffix
    for stage, steps in (("stage1", 12), ("stage2", 4), ("sft", 3)):
        run_dir = out / "runs" / stage
        assert (run_dir / "latest").read_text().strip() == f"iter_{steps:07d}"
        assert (run_dir / f"iter_{steps:07d}" / "model.yaml").is_file()
        assert len(read_losses(run_dir / "metrics.jsonl")) == steps
    for name in ("config.json", "model.safetensors.index.json", "tokenizer.json", "README.md"):
        assert (out / "hf_export" / name).is_file(), name
    for name in ("results.json", "recall_heatmap.png", "loss_by_position.png"):
        assert (out / "eval" / name).stat().st_size > 0
    assert (out / "loss_curves.png").stat().st_size > 0
    assert "Recall by context length" in (out / "report.md").read_text()
    assert "report.md" in result.stdout and not list(out.rglob("*.tmp"))


def _mixture_prefixes(recipe: Path, data_root: Path) -> set[Path]:
    run = load(RunConfig, recipe)
    return {Path(resolve_prefix(path, str(data_root))).resolve()
            for domain in run.data.mixture_spec().domains for path in domain.paths}


def test_heldout_documents_are_in_no_training_set(quickstart_run):
    out, _ = quickstart_run
    data = out / "data"
    heldout = (data / "heldout" / "heldout_books_text_document").resolve()
    recipes = sorted((out / "recipes").glob("*.yaml")) + sorted((EXAMPLES / "prolong").glob("*.yaml"))
    assert len(recipes) == 9  # the quickstart's 3 stages and examples/prolong's 6 recipes
    for recipe in recipes:
        prefixes = _mixture_prefixes(recipe, data)
        assert heldout not in prefixes, recipe
        synthetic = (data / "synthetic_kv" / "synthetic_kv_text_document").resolve() in prefixes
        # The synthetic domain is the quickstart's own: in its pre-training stages, not in ProLong's.
        assert synthetic == (recipe.name in ("stage1.yaml", "stage2.yaml")), recipe
    # Nor in the text the training sets were made from (the chats quote reference chapters too).
    titles = [json.loads(line)["title"] for line in (out / "corpus" / "heldout_books.jsonl").read_text().splitlines()]
    assert len(titles) >= SMOKE.ppl_documents
    books = (out / "corpus" / "books.jsonl").read_text()
    chats = (out / "corpus" / "chat.jsonl").read_text()
    assert not [t for t in titles if f'"title": "{t}"' in books or f"topic '{t}'" in chats]


def test_eval_compares_the_stages_past_stage1_length(quickstart_run):
    out, _ = quickstart_run
    results = json.loads((out / "eval" / "results.json").read_text())
    rows = {row["label"]: row for row in results["models"]}
    assert list(rows) == ["stage1", "stage2", "sft-export"]
    assert rows["stage1"]["path"].endswith("stage1/iter_0000012") and rows["sft-export"]["kind"] == "hf"
    lengths = {str(n) for n in (SMOKE.stage1_seq_length, SMOKE.stage2_seq_length)}
    for row in rows.values():
        buckets = row["perplexity"]["buckets"]
        assert buckets[-1]["end"] == SMOKE.stage2_seq_length
        beyond = [b for b in buckets if b["start"] >= SMOKE.stage1_seq_length]
        assert beyond and all(b["tokens"] > 0 and b["mean_loss"] > 0 for b in beyond)
        assert not [b for b in buckets if b["start"] < SMOKE.stage1_seq_length < b["end"]]
        by_length = row["recall"]["summary"]["by_length"]
        assert set(by_length) == {"niah_single", "kv_lookup"}
        assert set(by_length["kv_lookup"]) == lengths
        assert all(0.0 <= score <= 1.0 for score in by_length["kv_lookup"].values())


def test_report_compares_the_stages_and_gives_its_costs(quickstart_run):
    out, _ = quickstart_run
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    assert "| model | positions 1-127 | positions 128-255 | beyond - within |" in markdown
    assert "Stage 2 changed the mean loss by" in markdown and "beyond stage 1's length" in markdown
    assert "loss_by_position.png" in markdown
    bands = report["position_bands"]["models"]
    assert set(bands) == {"stage1", "stage2", "sft-export"}
    for label, band in bands.items():
        assert f"| {label} | {band['within']:.3f} | {band['beyond']:.3f} |" in markdown
    for label in bands:
        assert f"| {label} | kv_lookup |" in markdown
    for stage, steps in (("stage1", 12), ("stage2", 4), ("sft", 3)):
        figures = report["stages"][stage]
        assert figures["steps"] == steps and figures["wall_seconds"] > figures["step_seconds"] > 0
        assert figures["tokens"] > 0 and figures["tokens_per_s"] > 0
    assert report["stages"]["stage1"]["tokens"] == 12 * SMOKE.stage1_batch_size * SMOKE.stage1_seq_length
    assert all(artifact["bytes"] > 0 for artifact in report["artifacts"].values())
    assert report["artifacts"]["hf export"]["bytes"] > 10**6
    assert len(report["steps"]) == 11 and all(step["command"] and step["seconds"] > 0 for step in report["steps"].values())
    assert report["steps"]["stage2"]["command"].endswith("train " + str(out / "recipes" / "stage2.yaml"))


def test_stages_chain_with_the_recipe_settings(quickstart_run):
    out, _ = quickstart_run
    stage2 = json.loads((out / "runs" / "stage2" / "iter_0000004" / "train_state.json").read_text())
    assert stage2["step"] == 4
    import yaml

    recipe = yaml.safe_load((out / "recipes" / "stage2.yaml").read_text())
    assert recipe["parallel"]["context_parallel"] == 2
    assert recipe["model"]["rope_theta"] > yaml.safe_load((out / "recipes" / "stage1.yaml").read_text())["model"]["rope_theta"]
    assert recipe["init"]["weights"].endswith("stage1/iter_0000012")
    exported = json.loads((out / "hf_export" / "config.json").read_text())
    assert exported["rope_parameters"]["rope_theta"] == recipe["model"]["rope_theta"]


def test_loss_fell(quickstart_run):
    out, _ = quickstart_run
    report = json.loads((out / "report.json").read_text())
    # From ~ln(128256) = 11.76 at initialisation; 12 steps at LR 2e-3 take it well below.
    assert report["stage1_loss_first"] > 11.0
    assert report["stage1_loss_last"] < report["stage1_loss_first"] - 0.5


def test_rerun_skips_finished_steps(quickstart_run):
    out, _ = quickstart_run
    command = [shutil.which("megalong") or "megalong", "quickstart", "--size", "smoke", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("already done") == 11
    assert "11 steps were already done" in result.stdout
    # The costs measured by the first run are kept, and said to be from it.
    report = json.loads((out / "report.json").read_text())
    assert report["steps"]["stage1"]["seconds"] > 0 and report["steps"]["stage1"]["skipped_this_run"]


def test_read_losses_keeps_the_last_record_of_a_repeated_step(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": s, "loss": l}) for s, l in
                                 [(1, 5.0), (2, 4.0), (3, 3.5), (3, 3.0), (4, 2.0)]) + "\n")
    assert read_losses(metrics) == [(1, 5.0), (2, 4.0), (3, 3.0), (4, 2.0)]


def test_stage_two_goes_on_after_stage_one_and_the_export_chats(quickstart_run):
    """Stage 2 continues the domain it shares with stage 1 in the same cut (web) after what
    stage 1 drew, and says how its RoPE differs from stage 1's; the SFT export chats in
    transformers exactly as the SFT data was rendered, stops at the end of a turn, and its
    model card lists the three stages."""
    from transformers import AutoTokenizer, GenerationConfig

    from megalong.data.sft import render_conversation
    from megalong.data.tokenizer import load_tokenizer

    out, result = quickstart_run
    stage1 = json.loads((out / "runs" / "stage1" / "iter_0000012" / "train_state.json").read_text())
    stage2 = json.loads((out / "runs" / "stage2" / "iter_0000004" / "train_state.json").read_text())
    assert stage2["data_positions"]["web"]["start"] == stage1["data_positions"]["web"]["end"] > 0
    logs = result.stdout + result.stderr
    assert "RoPE differs from the initial weights': theta 500000.0, no scaling -> theta 8000000.0, no scaling" in logs
    assert "web: continues after the earlier run, at tokens" in logs

    export = out / "hf_export"
    tokenizer, ours = AutoTokenizer.from_pretrained(export), load_tokenizer("llama3")
    conversations = [json.loads(line)["messages"] for line in (out / "corpus" / "chat.jsonl").read_text().splitlines()]
    for messages in conversations[:3]:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert list(ids) == render_conversation(messages, ours)[0].tolist()
    assert GenerationConfig.from_pretrained(export).eos_token_id == [128001, 128009]
    card = (export / "README.md").read_text()
    for name in ("quickstart-stage1", "quickstart-stage2", "quickstart-sft"):
        assert f"| {name} |" in card
    assert "500,000, no scaling" in card and "8,000,000, no scaling" in card
    assert "chat data rendered in the llama3 format" in card and "## Chatting with it" in card
