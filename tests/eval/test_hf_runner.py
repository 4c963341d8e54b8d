"""The Hugging Face runner against plain transformers calls, and a full in-process evaluation."""

import json

import numpy as np
import pytest
import torch

from megalong.eval import models
from megalong.eval.config import EvalConfig, PerplexityConfig, RecallConfig
from megalong.eval.evaluate import evaluate
from tests.eval.datasets import random_documents, write_indexed_dataset

LLAMA3_VOCAB = 128256


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=LLAMA3_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_theta=500000.0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(5.0)  # far from uniform predictions
    path = tmp_path_factory.mktemp("hf") / "tiny"
    model.save_pretrained(path)
    return path


def test_chunked_losses_match_a_full_forward(hf_dir, monkeypatch):
    lm = models.open_model(hf_dir, device="cpu")
    assert lm.kind == "hf" and lm.vocab_size == LLAMA3_VOCAB
    ids = list(np.random.default_rng(0).integers(0, LLAMA3_VOCAB, size=50))
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0, :-1].float()
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").numpy()
    monkeypatch.setattr(models, "_LOSS_CHUNK", 7)  # several chunks, the last one short
    losses = lm.token_losses(ids)
    assert losses.shape == (49,)
    np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-5)


def test_cached_greedy_decoding_matches_recomputing(hf_dir):
    lm = models.open_model(hf_dir, device="cpu")
    prompt = [int(i) for i in np.random.default_rng(1).integers(0, LLAMA3_VOCAB, size=40)]
    generated = lm.greedy_generate(prompt, 6, stop_ids=[])
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(lm.model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert generated == ids[len(prompt):]
    # Generation stops before a stop id.
    k = next(k for k in range(1, 6) if generated[k] not in generated[:k])
    assert lm.greedy_generate(prompt, 6, stop_ids=[generated[k]]) == generated[:k]


def test_evaluate_writes_results_and_plots(hf_dir, tmp_path):
    prefix = write_indexed_dataset(str(tmp_path / "heldout"), random_documents([300, 200, 260], LLAMA3_VOCAB))
    cfg = EvalConfig(
        model=str(hf_dir), tokenizer="llama3", out=str(tmp_path / "out"), device="cpu",
        recall=RecallConfig(tasks=["niah_single", "json_kv"], lengths=[256, 320], depths=[0.0, 1.0],
                            samples=1, max_new_tokens=3),
        perplexity=PerplexityConfig(data=prefix, seq_length=256, num_documents=4, bucket_tokens=64),
    )
    results = evaluate(cfg)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert written["settings"]["prompt_format"] == "base"  # no chat template in the export
    samples = written["recall"]["samples"]
    assert len(samples) == 2 * 2 * 2
    assert {(s["task"], s["length"], s["depth"]) for s in samples} == {
        (t, n, d) for t in ("niah_single", "json_kv") for n in (256, 320) for d in (0.0, 1.0)}
    grid = written["recall"]["summary"]["by_length_and_depth"]
    assert set(grid) == {"niah_single", "json_kv"} and set(grid["json_kv"]) == {"256", "320"}
    assert set(grid["json_kv"]["256"]) == {"0", "1"}
    ppl = written["perplexity"]
    assert ppl["documents"] == [0, 2] and ppl["tokens"] == 2 * 255
    assert [b["tokens"] for b in ppl["buckets"]] == [2 * 63, 128, 128, 128]
    for name in ("recall_heatmap.png", "loss_by_position.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
