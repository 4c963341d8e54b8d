"""The Hugging Face runner against plain transformers calls, and a full in-process evaluation."""

import json

import numpy as np
import torch

from megalong.eval import models
from megalong.eval.config import EvalConfig, PerplexityConfig, RecallConfig
from megalong.eval.evaluate import evaluate
from tests.eval.chunked_losses import LargestAllocation, loss_tolerance
from tests.eval.datasets import random_documents, write_indexed_dataset
from tests.eval.tiny_models import LLAMA3_VOCAB

CHUNK = 7  # several chunks over the 49 targets, the last one short


def _ids(seed: int, size: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(0, LLAMA3_VOCAB, size=size)]


def test_chunked_losses_equal_the_full_logits_ones(hf_dir):
    lm = models.open_model(hf_dir, device="cpu", loss_chunk_tokens=CHUNK)
    assert lm.kind == "hf" and lm.vocab_size == LLAMA3_VOCAB
    ids = _ids(0, 50)
    with torch.no_grad():
        out = lm.model(torch.tensor([ids]), output_hidden_states=True)
    logits = out.logits[0, :-1].float()
    hidden, weight = out.hidden_states[-1][0, :-1], lm.model.get_output_embeddings().weight.detach()
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").numpy()
    losses = lm.token_losses(ids)
    assert losses.shape == (49,) and losses.dtype == np.float64
    tolerance = loss_tolerance(LLAMA3_VOCAB, weight.shape[1], float(logits.abs().max()),
                               float((hidden.abs() @ weight.abs().t()).max()))
    np.testing.assert_allclose(losses, expected, rtol=0, atol=tolerance)
    # Tight enough to see a loss at the wrong position.
    assert not np.allclose(losses[1:], expected[:-1], rtol=0, atol=tolerance)


def test_chunked_losses_never_hold_more_than_one_chunk_of_logits(hf_dir):
    lm = models.open_model(hf_dir, device="cpu", loss_chunk_tokens=CHUNK)
    ids = _ids(3, 50)
    with LargestAllocation() as chunked:
        lm.token_losses(ids)
    with torch.no_grad(), LargestAllocation() as full:
        lm.model(torch.tensor([ids]))
    # The largest tensor is one chunk of fp32 logits (or its log-softmax), never all of them;
    # the check does see the full model's [positions, vocabulary] logits.
    assert chunked.nbytes <= CHUNK * LLAMA3_VOCAB * 4, chunked.op
    assert full.nbytes >= len(ids) * LLAMA3_VOCAB * 4, full.op


def test_cached_greedy_decoding_matches_recomputing(hf_dir):
    lm = models.open_model(hf_dir, device="cpu")
    prompt = _ids(1, 40)
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
        models=[str(hf_dir)], tokenizer="llama3", out=str(tmp_path / "out"), device="cpu",
        recall=RecallConfig(tasks=["niah_single", "json_kv"], lengths=[256, 320], depths=[0.0, 1.0],
                            samples=1, max_new_tokens=3),
        perplexity=PerplexityConfig(data=prefix, seq_length=256, num_documents=4, bucket_tokens=64),
    )
    results = evaluate(cfg)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert written["schema_version"] == 2 and len(written["models"]) == 1
    row = written["models"][0]
    assert row["label"] == "tiny" and row["kind"] == "hf" and row["path"] == str(hf_dir.resolve())
    assert row["prompt_format"] == "base"  # no chat template in the export
    assert row["runner"]["class"] == "LlamaForCausalLM"
    samples = row["recall"]["samples"]
    assert len(samples) == 2 * 2 * 2
    assert {(s["task"], s["length"], s["depth"]) for s in samples} == {
        (t, n, d) for t in ("niah_single", "json_kv") for n in (256, 320) for d in (0.0, 1.0)}
    grid = row["recall"]["summary"]["by_length_and_depth"]
    assert set(grid) == {"niah_single", "json_kv"} and set(grid["json_kv"]) == {"256", "320"}
    assert set(grid["json_kv"]["256"]) == {"0", "1"}
    ppl = row["perplexity"]
    assert ppl["documents"] == [0, 2] and ppl["tokens"] == 2 * 255
    assert [b["tokens"] for b in ppl["buckets"]] == [2 * 63, 128, 128, 128]
    assert (tmp_path / "out" / row["dir"] / "progress.jsonl").is_file()
    for name in ("recall_heatmap.png", "loss_by_position.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
