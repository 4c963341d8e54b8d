"""Evaluate one or several models on the same prompts and documents, and compare them.

For each model: recall tasks over lengths x depths and perplexity by position. Then one
``results.json`` with the shared settings and a row per model, and side-by-side plots.
Layout of the output directory::

    results.json             settings shared by all models, one row per model (docs/eval.md)
    recall_heatmap.png       accuracy by length x depth: a row of panels (one per task) per model
    loss_by_position.png     mean loss by token position, one line per model
    models/<name>-<fp>/progress.jsonl
                             one model's finished prompts and documents (see progress.py)

Each model's work is kept in its own folder, named by its identity (resolved path plus a
fingerprint of its config and weight files, :mod:`megalong.eval.identity`): a killed run
resumes, a model evaluated into the directory before is not evaluated again, and a
checkpoint rewritten at the same path is. ``results.json`` lists the models of this call,
in the order given. Models are loaded one at a time, only when they have work left.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from megalong.data.tokenizer import TokenizerError, load_tokenizer
from megalong.eval import perplexity as ppl
from megalong.eval import plots, scoring, tasks
from megalong.eval.config import EvalConfig, PerplexityConfig, RecallConfig
from megalong.eval.identity import ModelIdentity, identify_models
from megalong.eval.models import open_model, resolve_model
from megalong.eval.progress import PROGRESS_FILE, ProgressLog
from megalong.eval.prompts import PromptFormatter

log = logging.getLogger(__name__)

# Version of the results.json layout (2: one row per model under "models").
RESULTS_SCHEMA_VERSION = 2
RESULTS_FILE = "results.json"
HEATMAP_FILE = "recall_heatmap.png"
LOSS_PLOT_FILE = "loss_by_position.png"
MODELS_DIR = "models"


def has_chat_template(model_dir: str | Path) -> bool:
    config = Path(model_dir) / "tokenizer_config.json"
    if not config.is_file():
        return False
    return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))


def _depth_key(depth: float) -> str:
    return f"{depth:g}"


class _LazyModel:
    """Loads the model on first use, so a model whose work is all done is never loaded."""

    def __init__(self, identity: ModelIdentity, device: str, loss_chunk_tokens: int, tokenizer, progress: ProgressLog):
        self.identity, self.device, self.loss_chunk_tokens = identity, device, loss_chunk_tokens
        self.tokenizer, self.progress, self._model = tokenizer, progress, None

    def get(self):
        if self._model is None:
            self._model = open_model(self.identity.path, self.identity.kind, self.device, self.loss_chunk_tokens)
            # Prompt ids must exist in the model's embedding table.
            if self.tokenizer.vocab_size > self._model.vocab_size:
                raise ValueError(
                    f"tokenizer has {self.tokenizer.vocab_size} tokens but the model {self.identity.path} only "
                    f"{self._model.vocab_size}: wrong --tokenizer for this model?"
                )
            self.progress.append({"type": "runner", **self._model.describe()})
        return self._model

    def close(self) -> None:
        """Free the model before the next one is loaded."""
        self._model = None
        gc.collect()


def _eta(done: int, total: int, started: float) -> str:
    """Time left for ``total - done`` units at the pace of the ``done`` finished since ``started``."""
    if done <= 0:
        return "?"
    seconds = (time.time() - started) / done * (total - done)
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def check_prompts_fit(rc: RecallConfig, tokenizer, formatter: PromptFormatter) -> None:
    """Fail before any model work when a length cannot hold a task's framing and needles."""
    for task in rc.tasks:
        for length in rc.lengths:
            tasks.generate(task, tokenizer, formatter, length, rc.depths[0], 0, rc.seed, rc.options)


def run_recall(rc: RecallConfig, tokenizer, formatter: PromptFormatter, model: _LazyModel, progress: ProgressLog) -> list[dict]:
    label = model.identity.label
    grid = [(t, n, d, i) for t in rc.tasks for n in rc.lengths for d in rc.depths for i in range(rc.samples)]
    done = {(r["task"], r["length"], r["depth"], r["index"]): r for r in progress.of_type("recall")}
    todo = [key for key in grid if key not in done]
    log.info("[%s] recall: %d prompts (%d tasks x %d lengths x %d depths x %d samples), %d already done",
             label, len(grid), len(rc.tasks), len(rc.lengths), len(rc.depths), rc.samples, len(grid) - len(todo))
    started, tokens_seen, stop_ids, warned = time.time(), 0, formatter.stop_ids(), set()
    for k, (task, length, depth, index) in enumerate(todo, 1):
        sample = tasks.generate(task, tokenizer, formatter, length, depth, index, rc.seed, rc.options)
        lm = model.get()
        if lm.max_length and sample.num_tokens > lm.max_length and length not in warned:
            warned.add(length)
            log.warning("[%s] %s prompt of %d tokens is longer than the model's max_position_embeddings=%d",
                        label, task, sample.num_tokens, lm.max_length)
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
        log.info("[%s] recall %d/%d  %s length=%d depth=%s  score=%.2f  (%.0f prompt tokens/s, ETA %s)",
                 label, len(grid) - len(todo) + k, len(grid), task, length, _depth_key(depth), record["score"],
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


def run_perplexity(pc: PerplexityConfig, dataset, documents: list[int], tokenizer, model: _LazyModel,
                   progress: ProgressLog) -> dict:
    label = model.identity.label
    buckets = ppl.PositionBuckets(pc.seq_length, pc.bucket_width)
    done = {r["document"]: r for r in progress.of_type("perplexity")}
    todo = [d for d in documents if d not in done]
    log.info("[%s] perplexity: %d documents of %d tokens from %s, %d already done",
             label, len(documents), pc.seq_length, pc.data, len(documents) - len(todo))
    started = time.time()
    for k, document in enumerate(todo, 1):
        ids = ppl.document_window(dataset, document, pc.seq_length, tokenizer.bos_id, pc.add_bos)
        lm = model.get()
        if k == 1 and lm.max_length and pc.seq_length > lm.max_length:
            log.warning("[%s] perplexity.seq_length=%d is longer than the model's max_position_embeddings=%d",
                        label, pc.seq_length, lm.max_length)
        losses = lm.token_losses(ids)
        doc = buckets.split(document, losses)
        record = {"type": "perplexity", "document": doc.document, "sums": doc.sums, "counts": doc.counts}
        progress.append(record)
        done[document] = record
        elapsed = max(time.time() - started, 1e-9)
        log.info("[%s] perplexity %d/%d  document %d  mean loss %.3f  (%.0f tokens/s, ETA %s)",
                 label, len(documents) - len(todo) + k, len(documents), document, float(losses.mean()),
                 k * pc.seq_length / elapsed, _eta(k, len(todo), started))
    for document in documents:
        r = done[document]
        buckets.add(ppl.DocumentLosses(r["document"], r["sums"], r["counts"]))
    return {"data": pc.data, "documents": documents, "add_bos": pc.add_bos, **buckets.summary()}


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _shared_tokenizer(cfg: EvalConfig, models: list[ModelIdentity]):
    """The one tokenizer every model is evaluated with (same prompts, same documents)."""
    hf = [m for m in models if m.kind == "hf"]
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    if not hf:
        raise ValueError(
            f"{models[0].path} is a megalong weights directory, which holds no tokenizer: pass --tokenizer "
            f"(the model's tokenizer.model / tokenizer.json, or 'llama3')"
        )
    tokenizer = load_tokenizer(hf[0].path)
    for other in hf[1:]:
        try:
            theirs = load_tokenizer(other.path)
        except TokenizerError:
            continue  # no tokenizer of its own: it gets the shared one
        if theirs.sha256 != tokenizer.sha256:
            raise ValueError(
                f"{other.path} and {hf[0].path} have different tokenizers, so they cannot see the same "
                f"prompts: pass --tokenizer to use one for all, or evaluate them into separate --out directories"
            )
    return tokenizer


def _tokenizer_settings(tokenizer) -> dict:
    """What makes the prompts: the tokenizer's content, not where it was read from (a model
    evaluated with --tokenizer llama3 keeps its results when the same file comes from elsewhere)."""
    return {k: v for k, v in tokenizer.identity().items() if k not in ("spec", "source")}


def _prompt_format(requested: str, model: ModelIdentity) -> str:
    if requested != "auto":
        return requested
    return "chat" if model.kind == "hf" and has_chat_template(model.path) else "base"


def open_progress(out: Path, model: ModelIdentity, prompt_format: str, shared: dict) -> ProgressLog:
    """The model's progress file (created when new; refused when it holds other settings)."""
    settings = {"model": model.settings(), "prompt_format": prompt_format, **shared}
    return ProgressLog(out / MODELS_DIR / model.folder, settings)


def evaluate_model(cfg: EvalConfig, model: ModelIdentity, prompt_format: str, tokenizer, progress: ProgressLog,
                   perplexity_data) -> dict:
    """Evaluate one model (what is not already in its progress file); its row of results.json."""
    lazy = _LazyModel(model, cfg.device, cfg.perplexity.chunk_tokens, tokenizer, progress)
    row: dict = {
        "label": model.label, "path": model.path, "kind": model.kind, "step": model.step,
        "fingerprint": model.fingerprint, "dir": f"{MODELS_DIR}/{model.folder}", "prompt_format": prompt_format,
        "runner": None, "recall": None, "perplexity": None,
    }
    try:
        if cfg.recall.enabled:
            records = run_recall(cfg.recall, tokenizer, PromptFormatter(tokenizer, prompt_format), lazy, progress)
            summary = summarize_recall(records)
            row["recall"] = {"summary": summary,
                             "samples": [{k: v for k, v in r.items() if k != "type"} for r in records]}
            log.info("[%s] recall accuracy: %s (average %.3f)", model.label,
                     ", ".join(f"{t} {s:.3f}" for t, s in summary["by_task"].items()), summary["average"])
        if perplexity_data is not None:
            dataset, documents = perplexity_data
            result = run_perplexity(cfg.perplexity, dataset, documents, tokenizer, lazy, progress)
            row["perplexity"] = result
            log.info("[%s] perplexity %.3f (mean loss %.4f) over %d tokens", model.label,
                     result["perplexity"], result["mean_loss"], result["tokens"])
    finally:
        lazy.close()
    runners = progress.of_type("runner")
    if runners:
        row["runner"] = {k: v for k, v in runners[-1].items() if k != "type"}
    return row


def _comparison_table(rows: list[dict]) -> str:
    width = max(len("model"), *(len(r["label"]) for r in rows))
    lines = [f"{'model':<{width}}  recall avg  perplexity"]
    for r in rows:
        recall = f"{r['recall']['summary']['average']:.3f}" if r["recall"] else "-"
        perplexity = f"{r['perplexity']['perplexity']:.4g}" if r["perplexity"] else "-"
        lines.append(f"{r['label']:<{width}}  {recall:>10}  {perplexity:>10}")
    return "\n".join(lines)


def evaluate(cfg: EvalConfig) -> dict:
    """Evaluate every model of ``cfg``; returns the results (also written to ``cfg.out``)."""
    cfg.validate()
    out = Path(cfg.out)
    resolved = [resolve_model(m, cfg.model_kind) for m in cfg.models]
    models = identify_models([str(path) for path, _ in resolved], [kind for _, kind in resolved], cfg.labels or None)
    tokenizer = _shared_tokenizer(cfg, models)
    formats = [_prompt_format(cfg.prompt_format, m) for m in models]
    shared = {
        "tokenizer": _tokenizer_settings(tokenizer),
        "recall": dataclasses.asdict(cfg.recall) if cfg.recall.enabled else None,
        "perplexity": cfg.perplexity.settings() if cfg.perplexity.data else None,
    }
    # Everything that can be checked without a model is checked before the first one runs.
    if cfg.recall.enabled:
        for prompt_format in sorted(set(formats)):
            check_prompts_fit(cfg.recall, tokenizer, PromptFormatter(tokenizer, prompt_format))
    perplexity_data = None
    if cfg.perplexity.data:
        dataset = ppl.open_dataset(cfg.perplexity.data)
        perplexity_data = (dataset, ppl.plan(dataset, cfg.perplexity.seq_length, cfg.perplexity.num_documents,
                                             cfg.perplexity.data))
    if (out / PROGRESS_FILE).is_file():
        log.warning("%s is the progress of an older megalong eval (one model per directory, before %s/); "
                    "it is not reused", out / PROGRESS_FILE, MODELS_DIR)
    log.info("Evaluating %d model(s) with tokenizer %s: %s", len(models), tokenizer.spec,
             "; ".join(f"{m.label} = {m.path} ({m.kind}, {f} prompts)" for m, f in zip(models, formats)))

    # Every model's progress file is opened (and its settings checked) before the first runs.
    progress = [open_progress(out, m, f, shared) for m, f in zip(models, formats)]
    rows = []
    for number, (model, prompt_format, log_file) in enumerate(zip(models, formats, progress), 1):
        log.info("Model %d/%d: %s", number, len(models), model.label)
        rows.append(evaluate_model(cfg, model, prompt_format, tokenizer, log_file, perplexity_data))

    results: dict = {"schema_version": RESULTS_SCHEMA_VERSION,
                     "settings": {**shared, "tokenizer": tokenizer.identity()}, "models": rows, "plots": {}}
    if cfg.recall.enabled:
        results["plots"]["recall_heatmap"] = plots.recall_heatmaps(
            [(r["label"], r["recall"]["summary"]["by_length_and_depth"]) for r in rows],
            cfg.recall.lengths, cfg.recall.depths, out / HEATMAP_FILE).name
    if perplexity_data is not None:
        results["plots"]["loss_by_position"] = plots.loss_by_position(
            [(r["label"], r["perplexity"]) for r in rows], out / LOSS_PLOT_FILE).name
    _write_json(out / RESULTS_FILE, results)
    log.info("Comparison:\n%s", _comparison_table(rows))
    log.info("Results written to %s", out / RESULTS_FILE)
    return results
