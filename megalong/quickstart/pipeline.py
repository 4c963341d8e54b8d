"""The quickstart pipeline: every megalong tool, end to end, on one small machine.

Each step is the command a user would type (printed before it runs), so the quickstart is
also a worked example: corpus -> ``megalong preprocess`` -> ``megalong sft-data`` ->
``megalong train`` stage 1 (short context) -> stage 2 (longer context, larger RoPE theta,
initialized from stage 1) -> SFT -> ``megalong convert megatron-to-hf`` -> ``megalong eval``
of the stage-1 and stage-2 checkpoints and the export side by side: recall by length and
loss by position on held-out long documents out to stage 2's length, so what stage 2 did
past stage 1's length is measured. Training runs under torchrun with context parallelism
across the processes. Each finished step's command and wall time go to ``steps.json``,
which the report reads.

A step whose outputs exist is skipped, and training resumes from its last checkpoint, so a
killed quickstart started again with the same command continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megalong.checkpoint.layout import iteration_dir
from megalong.config.loader import dump_yaml, from_dict
from megalong.quickstart.corpus import build_corpus

log = logging.getLogger(__name__)


@dataclass
class QuickstartSize:
    """How big each part of the quickstart is; ``smoke`` is the one the test suite runs."""

    stage1_seq_length: int
    stage1_steps: int
    stage1_batch_size: int
    # Stage 2 and SFT: longer sequences, fewer of them per step.
    stage2_seq_length: int
    stage2_steps: int
    sft_steps: int
    stage2_batch_size: int
    # Docstrings kept as short "web" documents.
    max_short_documents: int
    # Recall prompt lengths (within stage 1's length and beyond it) and samples per cell.
    eval_lengths: str
    eval_samples: int
    # Held-out documents for loss by position, each cut to stage 2's length.
    ppl_documents: int

    def __post_init__(self):
        if self.stage1_seq_length % 4 or self.stage2_seq_length % self.ppl_bucket:
            raise ValueError("stage 1's length must be a multiple of 4 and stage 2's of a quarter of stage 1's")

    @property
    def ppl_bucket(self) -> int:
        """Position bucket width: a quarter of stage 1's length, so that buckets split exactly
        at stage 1's length and the report's bands (within it, beyond it) are exact."""
        return self.stage1_seq_length // 4


SIZES: dict[str, QuickstartSize] = {
    "smoke": QuickstartSize(
        stage1_seq_length=128, stage1_steps=12, stage1_batch_size=4,
        stage2_seq_length=256, stage2_steps=4, sft_steps=3, stage2_batch_size=4,
        max_short_documents=400, eval_lengths="128,256", eval_samples=1, ppl_documents=2,
    ),
    "small": QuickstartSize(
        stage1_seq_length=256, stage1_steps=60, stage1_batch_size=8,
        stage2_seq_length=1024, stage2_steps=15, sft_steps=10, stage2_batch_size=4,
        max_short_documents=3000, eval_lengths="256,512,1024", eval_samples=2, ppl_documents=4,
    ),
}


@dataclass
class QuickstartConfig:
    out_dir: str = "runs/quickstart"
    size: str = "small"
    # Training processes; context parallelism spans all of them.
    nproc: int = 2
    # Preprocessing worker processes (default: one per CPU).
    workers: Optional[int] = None
    # RoPE theta of stage 1 (Llama-3's own) and stage 2 (ProLong's 64K value): a longer
    # context gets a larger theta, as in the paper.
    stage1_rope_theta: float = 5.0e5
    stage2_rope_theta: float = 8.0e6
    model_preset: str = "llama3-tiny"
    tokenizer: str = "llama3"
    # The precision every stage trains in: bf16 as every real run (the optimizer keeps fp32
    # master weights), or fp32.
    params_dtype: str = "bf16"


# ProLong's shape: long code repositories and books cut to single-document chunks, short
# documents concatenated (weights 30/30/40); plus the quickstart's own synthetic key-value
# records (see corpus.py; not part of ProLong's mixture), so that a model this small learns
# to retrieve and kv_lookup can show it.
PRETRAINING_DOMAINS = [
    {"name": "code_repos", "weight": 30, "kind": "long", "paths": ["code/code_text_document"]},
    {"name": "books", "weight": 30, "kind": "long", "paths": ["books/books_text_document"]},
    {"name": "web", "weight": 40, "kind": "concat", "paths": ["web/web_text_document"]},
    {"name": "synthetic_kv", "weight": 25, "kind": "long", "paths": ["synthetic_kv/synthetic_kv_text_document"]},
]
# Held-out long documents (corpus.heldout_topics): evaluated, never trained on.
HELDOUT_PREFIX = "heldout/heldout_books_text_document"
# Where each finished step's command and wall time are kept (the report reads them).
STEPS_FILE = "steps.json"
# The models `megalong eval` compares, as labelled in results.json and the report.
EVAL_LABELS = ("stage1", "stage2", "sft-export")


class StepFailed(RuntimeError):
    pass


def _megalong(*args: str) -> list[str]:
    return [sys.executable, "-m", "megalong", *args]


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "megalong", *args]


class Quickstart:
    def __init__(self, config: QuickstartConfig):
        if config.size not in SIZES:
            raise ValueError(f"unknown quickstart size {config.size!r}; choose one of {sorted(SIZES)}")
        self.config = config
        self.size = SIZES[config.size]
        self.out = Path(config.out_dir).resolve()
        self.data = self.out / "data"
        self.skipped: list[str] = []

    # ---- paths -----------------------------------------------------------------------------
    def run_dir(self, stage: str) -> Path:
        return self.out / "runs" / stage

    def final_checkpoint(self, stage: str, steps: int) -> Path:
        return iteration_dir(self.run_dir(stage), steps)

    @property
    def export_dir(self) -> Path:
        return self.out / "hf_export"

    @property
    def eval_dir(self) -> Path:
        return self.out / "eval"

    @property
    def heldout_prefix(self) -> Path:
        return self.data / HELDOUT_PREFIX

    def finished_steps(self) -> dict[str, dict]:
        """Each finished step's title, command (run in the output directory) and wall time,
        by step name, from this run or an earlier one."""
        path = self.out / STEPS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    # ---- running steps -----------------------------------------------------------------------
    def _run(self, name: str, title: str, command: list[str], done_when: Path) -> None:
        if done_when.exists():
            log.info("%s: already done (%s exists), skipping", title, done_when)
            self.skipped.append(name)
            return
        log.info("%s\n  $ %s", title, shlex.join(command))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        start = time.monotonic()
        result = subprocess.run(command, cwd=self.out, env=env)
        seconds = time.monotonic() - start
        if result.returncode != 0:
            raise StepFailed(f"{title} failed (exit code {result.returncode}); command: {shlex.join(command)}")
        if not done_when.exists():
            raise StepFailed(f"{title} finished but did not produce {done_when}")
        log.info("%s: done in %.0f s", title, seconds)
        steps = self.finished_steps()
        steps[name] = {"title": title, "command": shlex.join(command), "seconds": round(seconds, 1)}
        tmp = self.out / f"{STEPS_FILE}.tmp"
        tmp.write_text(json.dumps(steps, indent=1))
        os.replace(tmp, self.out / STEPS_FILE)

    def _write_recipe(self, name: str, recipe: dict) -> Path:
        """Write ``recipe`` as `megalong train` will read it, after checking it as training will
        (keys, layout, datasets, initial weights): a problem is one line here, not an error in
        every training process."""
        from megalong.training.config import RunConfig

        run = from_dict(RunConfig, recipe, f"quickstart recipe {name}")
        run.validate(self.config.nproc)
        path = self.out / "recipes" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(dump_yaml(run))
        os.replace(tmp, path)
        return path

    # ---- recipes -------------------------------------------------------------------------------
    def _recipe(self, stage: str, seq_length: int, steps: int, batch_size: int, theta: float, domains: list[dict],
                lr: float, init: Optional[Path] = None, load_optimizer: Optional[bool] = None) -> dict:
        s, c = self.size, self.config
        recipe = {
            "name": f"quickstart-{stage}",
            "seed": 1234,
            "model": {"preset": c.model_preset, "rope_theta": theta, "params_dtype": c.params_dtype,
                      # Every stage's model covers the longest context the quickstart reaches.
                      "max_position_embeddings": s.stage2_seq_length},
            "parallel": {"tensor_parallel": 1, "pipeline_parallel": 1, "context_parallel": c.nproc},
            "data": {"data_root": str(self.data), "seq_length": seq_length, "seed": 1234, "domains": domains},
            "optimizer": {"lr": lr, "min_lr": lr / 10, "weight_decay": 0.1, "clip_grad": 1.0},
            "schedule": {"train_steps": steps, "global_batch_size": batch_size, "micro_batch_size": 1,
                         "lr_warmup_fraction": 0.1, "lr_decay_style": "cosine"},
            "checkpoint": {"save_dir": str(self.run_dir(stage)), "save_interval": max(steps // 2, 1),
                           "keep_last": 1},
            "logging": {"log_interval": max(steps // 10, 1)},
            "runtime": {"device": "cpu"},
        }
        if init is not None:
            recipe["init"] = {"weights": str(init), "load_optimizer": load_optimizer}
        return recipe

    # ---- the pipeline ------------------------------------------------------------------------
    def run(self) -> dict:
        c, s = self.config, self.size
        self.out.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()

        log.info("[1/8] building a small corpus from this Python installation under %s", self.out / "corpus")
        corpus = build_corpus(self.out / "corpus", max_short_documents=s.max_short_documents)
        for part, info in corpus.items():
            log.info("  %-13s %s", part, ", ".join(f"{k}={v}" for k, v in info.items()))

        workers = ["--workers", str(c.workers)] if c.workers else []
        for name, inputs, fmt, prefix in (
            ("code", [corpus["code_repos"]["path"]], "code-repos", self.data / "code" / "code_text_document"),
            ("books", [corpus["books"]["path"]], "jsonl", self.data / "books" / "books_text_document"),
            ("web", [corpus["web"]["path"]], "jsonl", self.data / "web" / "web_text_document"),
            ("synthetic_kv", [corpus["synthetic_kv"]["path"]], "jsonl",
             self.data / "synthetic_kv" / "synthetic_kv_text_document"),
            ("held-out books", [corpus["heldout_books"]["path"]], "jsonl", self.heldout_prefix),
        ):
            self._run(f"preprocess {name}", f"[2/8] preprocessing {name} with the Llama-3 tokenizer",
                      _megalong("preprocess", "--input", *inputs, "--input-format", fmt,
                                "--tokenizer", c.tokenizer, "--output-prefix", str(prefix), *workers),
                      done_when=Path(f"{prefix}.json"))
        chat_prefix = self.data / "chat" / "chat_chat"
        self._run("sft-data", "[3/8] rendering chat conversations for SFT",
                  _megalong("sft-data", corpus["chat"]["path"], "--tokenizer", c.tokenizer,
                            "--output", str(chat_prefix)),
                  done_when=Path(f"{chat_prefix}.json"))

        stage1 = self._write_recipe("stage1", self._recipe(
            "stage1", s.stage1_seq_length, s.stage1_steps, s.stage1_batch_size, c.stage1_rope_theta,
            PRETRAINING_DOMAINS, lr=2e-3))
        self._run("stage1", f"[4/8] training stage 1: {s.stage1_seq_length} tokens, RoPE theta {c.stage1_rope_theta:g}, "
                  f"context parallel over {c.nproc} processes",
                  _torchrun(c.nproc, "train", str(stage1)),
                  done_when=self.final_checkpoint("stage1", s.stage1_steps))

        stage2 = self._write_recipe("stage2", self._recipe(
            "stage2", s.stage2_seq_length, s.stage2_steps, s.stage2_batch_size, c.stage2_rope_theta,
            PRETRAINING_DOMAINS, lr=1e-3,
            init=self.final_checkpoint("stage1", s.stage1_steps), load_optimizer=True))
        self._run("stage2", f"[5/8] training stage 2: {s.stage2_seq_length} tokens, RoPE theta {c.stage2_rope_theta:g}, "
                  "from stage 1's weights and optimizer state",
                  _torchrun(c.nproc, "train", str(stage2)),
                  done_when=self.final_checkpoint("stage2", s.stage2_steps))

        sft = self._write_recipe("sft", self._recipe(
            "sft", s.stage2_seq_length, s.sft_steps, s.stage2_batch_size, c.stage2_rope_theta,
            [{"name": "chat", "weight": 100, "kind": "sft", "paths": ["chat/chat_chat"]}], lr=5e-4,
            init=self.final_checkpoint("stage2", s.stage2_steps), load_optimizer=False))
        self._run("sft", "[6/8] supervised fine-tuning on chat conversations (loss on assistant replies only)",
                  _torchrun(c.nproc, "train", str(sft)),
                  done_when=self.final_checkpoint("sft", s.sft_steps))

        self._run("export", "[7/8] exporting the fine-tuned model to Hugging Face format",
                  _megalong("convert", "megatron-to-hf", str(self.final_checkpoint("sft", s.sft_steps)),
                            str(self.export_dir), "--tokenizer", c.tokenizer),
                  done_when=self.export_dir / "config.json")

        # All three models get the same base-format prompts (the export would get the chat
        # format by default), so that their recall compares the stages and nothing else.
        self._run("eval", f"[8/8] evaluating stage 1, stage 2 and the export: recall by length, and loss by "
                          f"position on held-out documents out to {s.stage2_seq_length} tokens",
                  _megalong("eval", str(self.final_checkpoint("stage1", s.stage1_steps)),
                            str(self.final_checkpoint("stage2", s.stage2_steps)), str(self.export_dir),
                            "--labels", ",".join(EVAL_LABELS), "--tokenizer", c.tokenizer, "--prompt-format", "base",
                            "--out", str(self.eval_dir), "--tasks", "niah_single,kv_lookup",
                            "--lengths", s.eval_lengths, "--depths", "0,0.5,1", "--samples", str(s.eval_samples),
                            "--ppl-data", str(self.heldout_prefix), "--ppl-length", str(s.stage2_seq_length),
                            "--ppl-documents", str(s.ppl_documents), "--ppl-bucket", str(s.ppl_bucket),
                            "--device", "cpu"),
                  done_when=self.eval_dir / "results.json")

        from megalong.quickstart.report import write_report

        report = write_report(self, elapsed_s=time.monotonic() - started)
        return report
