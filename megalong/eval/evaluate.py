"""Run an evaluation: recall tasks over lengths x depths, perplexity by position, then
write ``results.json`` and the plots into the output directory."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from megalong.eval import perplexity as ppl
from megalong.eval import plots, scoring, tasks
from megalong.eval.config import EvalConfig
from megalong.eval.models import detect_kind, open_model
from megalong.eval.progress import ProgressLog
from megalong.eval.prompts import PromptFormatter
from megalong.data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
HEATMAP_FILE = "recall_heatmap.png"
LOSS_PLOT_FILE = "loss_by_position.png"


def has_chat_template(model_dir: str | Path) -> bool:
    config = Path(model_dir) / "tokenizer_config.json"
    if not config.is_file():
        return False
    return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))


def _depth_key(depth: float) -> str:
    return f"{depth:g}"


class _LazyModel:
    """Loads the model on first use, so a finished run that is re-run only rewrites results."""

    def __init__(self, cfg: EvalConfig, kind: str, tokenizer):
        self.cfg, self.kind, self.tokenizer, self._model = cfg, kind, tokenizer, None

    def get(self):
        if self._model is None:
            self._model = open_model(self.cfg.model, self.kind, self.cfg.device)
            # Prompt ids must exist in the model's embedding table.
            if self.tokenizer.vocab_size > self._model.vocab_size:
                raise ValueError(
                    f"tokenizer has {self.tokenizer.vocab_size} tokens but the model {self.cfg.model} only "
                    f"{self._model.vocab_size}: wrong --tokenizer for this model?"
                )
        return self._model


def _eta(done: int, total: int, started: float) -> str:
    """Time left for ``total - done`` units at the pace of the ``done`` finished since ``started``."""
    if done <= 0:
        return "?"
    seconds = (time.time() - started) / done * (total - done)
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def run_recall(cfg: EvalConfig, tokenizer, formatter: PromptFormatter, model: _LazyModel, progress: ProgressLog) -> list[dict]:
    rc = cfg.recall
    grid = [(t, n, d, i) for t in rc.tasks for n in rc.lengths for d in rc.depths for i in range(rc.samples)]
    # Fail before any model work when a length cannot hold a task's framing and needles.
    for task in rc.tasks:
        for length in rc.lengths:
            tasks.generate(task, tokenizer, formatter, length, rc.depths[0], 0, rc.seed, rc.options)
    done = {(r["task"], r["length"], r["depth"], r["index"]): r for r in progress.of_type("recall")}
    todo = [key for key in grid if key not in done]
    log.info("Recall: %d prompts (%d tasks x %d lengths x %d depths x %d samples), %d already done",
             len(grid), len(rc.tasks), len(rc.lengths), len(rc.depths), rc.samples, len(grid) - len(todo))
    started, tokens_seen, stop_ids, warned = time.time(), 0, formatter.stop_ids(), set()
    for k, (task, length, depth, index) in enumerate(todo, 1):
        sample = tasks.generate(task, tokenizer, formatter, length, depth, index, rc.seed, rc.options)
        lm = model.get()
        if lm.max_length and sample.num_tokens > lm.max_length and length not in warned:
            warned.add(length)
            log.warning("%s prompt of %d tokens is longer than the model's max_position_embeddings=%d",
                        task, sample.num_tokens, lm.max_length)
        budget = min(sample.max_new_tokens, rc.max_new_tokens or sample.max_new_tokens)
        generated = lm.greedy_generate(sample.input_ids, budget, stop_ids)
        prediction = tokenizer.decode(generated)
        record = {
            "type": "recall", "task": task, "length": length, "depth": depth, "index": index,
            "num_tokens": sample.num_tokens, "needle_positions": sample.needle_positions,
            "needle_depths": sample.needle_depths, "answers": sample.answers, "prediction": prediction,
            "score": scoring.recall_fraction(prediction, sample.answers),
            "all_recalled": scoring.recall_all(prediction, sample.answers),
        }
        progress.append(record)
        done[(task, length, depth, index)] = record
        tokens_seen += sample.num_tokens
        elapsed = max(time.time() - started, 1e-9)
        log.info("recall %d/%d  %s length=%d depth=%s  score=%.2f  (%.0f prompt tokens/s, ETA %s)",
                 len(grid) - len(todo) + k, len(grid), task, length, _depth_key(depth), record["score"],
                 tokens_seen / elapsed, _eta(k, len(todo), started))
    return [done[key] for key in grid]


def summarize_recall(records: list[dict]) -> dict:
    """Mean score per task, length and depth; per task and length; per task."""
    cells: dict = {}
    for r in records:
        cells.setdefault(r["task"], {}).setdefault(str(r["length"]), {}).setdefault(_depth_key(r["depth"]), []).append(r["score"])
    by_cell = {t: {n: {d: float(np.mean(v)) for d, v in ds.items()} for n, ds in ns.items()} for t, ns in cells.items()}
    by_length = {t: {n: float(np.mean([s for v in ds.values() for s in v])) for n, ds in ns.items()} for t, ns in cells.items()}
    by_task = {t: float(np.mean([r["score"] for r in records if r["task"] == t])) for t in cells}
    return {"by_length_and_depth": by_cell, "by_length": by_length, "by_task": by_task,
            "average": float(np.mean(list(by_task.values()))) if by_task else None}


def run_perplexity(cfg: EvalConfig, tokenizer, model: _LazyModel, progress: ProgressLog) -> dict:
    pc = cfg.perplexity
    dataset = ppl.open_dataset(pc.data)
    documents = ppl.plan(dataset, pc.seq_length, pc.num_documents, pc.data)
    buckets = ppl.PositionBuckets(pc.seq_length, pc.bucket_width)
    done = {r["document"]: r for r in progress.of_type("perplexity")}
    todo = [d for d in documents if d not in done]
    log.info("Perplexity: %d documents of %d tokens from %s, %d already done",
             len(documents), pc.seq_length, pc.data, len(documents) - len(todo))
    started = time.time()
    for k, document in enumerate(todo, 1):
        ids = ppl.document_window(dataset, document, pc.seq_length, tokenizer.bos_id, pc.add_bos)
        lm = model.get()
        if k == 1 and lm.max_length and pc.seq_length > lm.max_length:
            log.warning("perplexity.seq_length=%d is longer than the model's max_position_embeddings=%d",
                        pc.seq_length, lm.max_length)
        losses = lm.token_losses(ids)
        doc = buckets.split(document, losses)
        record = {"type": "perplexity", **dataclasses.asdict(doc)}
        progress.append(record)
        done[document] = record
        elapsed = max(time.time() - started, 1e-9)
        log.info("perplexity %d/%d  document %d  mean loss %.3f  (%.0f tokens/s, ETA %s)",
                 len(documents) - len(todo) + k, len(documents), document, float(losses.mean()),
                 k * pc.seq_length / elapsed, _eta(k, len(todo), started))
    for document in documents:
        r = done[document]
        buckets.add(ppl.DocumentLosses(r["document"], r["sums"], r["counts"]))
    return {"data": pc.data, "documents": documents, "add_bos": pc.add_bos, **buckets.summary()}


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def evaluate(cfg: EvalConfig) -> dict:
    """Run everything ``cfg`` asks for; returns the results (also written to ``cfg.out``)."""
    cfg.validate()
    out = Path(cfg.out)
    kind = detect_kind(cfg.model) if cfg.model_kind == "auto" else cfg.model_kind
    tokenizer_spec = cfg.tokenizer or (cfg.model if kind == "hf" else None)
    if tokenizer_spec is None:
        raise ValueError(
            f"{cfg.model} is a megalong weights directory, which holds no tokenizer: pass --tokenizer "
            f"(the model's tokenizer.model / tokenizer.json, or 'llama3')"
        )
    tokenizer = load_tokenizer(tokenizer_spec)
    prompt_format = cfg.prompt_format
    if prompt_format == "auto":
        prompt_format = "chat" if kind == "hf" and has_chat_template(cfg.model) else "base"
    log.info("Evaluating %s (%s) with the %s prompt format, tokenizer %s", cfg.model, kind, prompt_format, tokenizer_spec)

    settings = {
        "model": str(Path(cfg.model).resolve()), "kind": kind, "tokenizer": tokenizer.identity(),
        "prompt_format": prompt_format, "recall": dataclasses.asdict(cfg.recall),
        "perplexity": dataclasses.asdict(cfg.perplexity) if cfg.perplexity.data else None,
    }
    progress = ProgressLog(out, settings)  # creates the output directory
    model = _LazyModel(cfg, kind, tokenizer)
    results: dict = {"settings": settings, "plots": {}}
    if cfg.recall.tasks and cfg.recall.lengths and cfg.recall.depths:
        formatter = PromptFormatter(tokenizer, prompt_format)
        records = run_recall(cfg, tokenizer, formatter, model, progress)
        summary = summarize_recall(records)
        results["recall"] = {"summary": summary, "samples": [{k: v for k, v in r.items() if k != "type"} for r in records]}
        results["plots"]["recall_heatmap"] = plots.recall_heatmaps(
            summary["by_length_and_depth"], cfg.recall.lengths, cfg.recall.depths, out / HEATMAP_FILE).name
        log.info("Recall accuracy: %s (average %.3f)",
                 ", ".join(f"{t} {s:.3f}" for t, s in summary["by_task"].items()), summary["average"])
    if cfg.perplexity.data:
        result = run_perplexity(cfg, tokenizer, model, progress)
        results["perplexity"] = result
        results["plots"]["loss_by_position"] = plots.loss_by_position(result, out / LOSS_PLOT_FILE).name
        log.info("Perplexity %.3f (mean loss %.4f) over %d tokens", result["perplexity"], result["mean_loss"], result["tokens"])
    if model._model is not None:
        results["model"] = model.get().describe()
    _write_json(out / RESULTS_FILE, results)
    log.info("Results written to %s", out / RESULTS_FILE)
    return results

