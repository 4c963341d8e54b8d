"""Several models in one evaluation: one row each, side-by-side plots, and each model
evaluated once per output directory (until it changes)."""

import json

import pytest

from megalong.eval import evaluate as evaluate_module
from megalong.eval.config import EvalConfig, PerplexityConfig, RecallConfig
from megalong.eval.evaluate import evaluate
from tests.eval.datasets import random_documents, write_indexed_dataset
from tests.eval.tiny_models import LLAMA3_VOCAB, save_tiny_hf_model


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """The paths of the models the evaluation loads (the real loader, watched)."""
    loaded: list[str] = []
    real = evaluate_module.open_model

    def watched(path, *args, **kwargs):
        loaded.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "open_model", watched)
    return loaded


def _config(models: list[str], out, data: str) -> EvalConfig:
    return EvalConfig(
        models=models, tokenizer="llama3", out=str(out), device="cpu",
        recall=RecallConfig(tasks=["niah_single"], lengths=[256], depths=[0.0, 1.0], samples=1, max_new_tokens=2),
        perplexity=PerplexityConfig(data=data, seq_length=256, num_documents=2, bucket_tokens=64),
    )


def test_models_are_compared_and_each_is_evaluated_once(hf_dir, tmp_path, loads):
    data = write_indexed_dataset(str(tmp_path / "heldout"), random_documents([300, 260], LLAMA3_VOCAB, seed=5))
    other = str(save_tiny_hf_model(tmp_path / "other" / "tiny", seed=1))
    third = str(save_tiny_hf_model(tmp_path / "third", seed=2))
    first, out = str(hf_dir), tmp_path / "compare"

    results = evaluate(_config([first, other], out, data))
    assert sorted(loads) == sorted([str(hf_dir.resolve()), str((tmp_path / "other" / "tiny").resolve())])
    rows = results["models"]
    # Both directories are called "tiny": their labels take in their parent directories.
    assert [r["label"] for r in rows] == [f"{hf_dir.parent.name}/tiny", "other/tiny"]
    assert len({r["dir"] for r in rows}) == 2
    for row in rows:
        # The same prompts and documents for every model, different models' answers to them.
        assert [(s["task"], s["length"], s["depth"], s["answers"]) for s in row["recall"]["samples"]] == \
            [(s["task"], s["length"], s["depth"], s["answers"]) for s in rows[0]["recall"]["samples"]]
        assert row["perplexity"]["documents"] == rows[0]["perplexity"]["documents"]
    assert rows[0]["perplexity"]["mean_loss"] != rows[1]["perplexity"]["mean_loss"]
    assert results["plots"] == {"recall_heatmap": "recall_heatmap.png", "loss_by_position": "loss_by_position.png"}

    # Adding a model evaluates only that one; the others' rows come back unchanged.
    loads.clear()
    again = evaluate(_config([first, other, third], out, data))
    assert loads == [str((tmp_path / "third").resolve())]
    assert again["models"][:2] == rows and again["models"][2]["label"] == "third"
    written = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in written["models"]] == [r["label"] for r in again["models"]]

    # A model rewritten at the same path is evaluated again; results.json lists the models asked for.
    loads.clear()
    save_tiny_hf_model(tmp_path / "other" / "tiny", seed=3)
    changed = evaluate(_config([other, first], out, data))
    assert loads == [str((tmp_path / "other" / "tiny").resolve())]
    assert [r["label"] for r in changed["models"]] == ["other/tiny", f"{hf_dir.parent.name}/tiny"]
    assert changed["models"][0]["fingerprint"] != rows[1]["fingerprint"]
    assert changed["models"][0]["perplexity"] != rows[1]["perplexity"]


def test_other_settings_for_an_evaluated_model_are_refused(hf_dir, tmp_path, loads):
    data = write_indexed_dataset(str(tmp_path / "heldout"), random_documents([300], LLAMA3_VOCAB))
    cfg = _config([str(hf_dir)], tmp_path / "out", data)
    cfg.recall = RecallConfig(tasks=[], lengths=[], depths=[])
    evaluate(cfg)
    # Refused before any model runs, also the new one given first.
    cfg.models = [str(save_tiny_hf_model(tmp_path / "new", seed=4)), str(hf_dir)]
    cfg.perplexity.bucket_tokens = 32
    loads.clear()
    with pytest.raises(ValueError, match="different settings"):
        evaluate(cfg)
    assert loads == []
    cfg.models = [str(hf_dir)]
    # The chunk size only decides memory: changing it keeps the results.
    cfg.perplexity.bucket_tokens, cfg.perplexity.chunk_tokens = 64, 5
    loads.clear()
    evaluate(cfg)
    assert loads == []


def test_models_with_different_tokenizers_are_refused(tmp_path):
    from megalong.data.tokenizer import bundled_llama3_dir

    text = (bundled_llama3_dir() / "tokenizer.json").read_text()
    # Tokenizers are compared by file content (--tokenizer settles any doubt): b is another file.
    for name, content in (("a", text), ("b", json.dumps(json.loads(text), indent=1))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "tokenizer.json").write_text(content)
    cfg = EvalConfig(models=[str(tmp_path / "a"), str(tmp_path / "b")], out=str(tmp_path / "out"),
                     recall=RecallConfig(tasks=["niah_single"], lengths=[256], depths=[0.5], samples=1))
    with pytest.raises(ValueError, match="have different tokenizers.*pass --tokenizer"):
        evaluate(cfg)
    assert not (tmp_path / "out").exists()  # refused before anything is written
