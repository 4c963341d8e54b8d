"""Configuration of ``megalong eval`` (YAML + ``key.sub=value`` overrides, like the other tools)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Literal, Optional

from megalong.eval.tasks import TASKS, TaskOptions

# Positions whose logits exist at once when computing losses: 1,024 x 128,256 fp32 logits
# are 0.5 GB, and a chunk that size keeps the output-layer matmul efficient.
DEFAULT_LOSS_CHUNK = 1024


@dataclass
class RecallConfig:
    """Synthetic recall: every task at every length and depth, ``samples`` prompts each."""

    tasks: List[str] = field(default_factory=lambda: list(TASKS))
    # Prompt lengths in tokens of the real tokenizer (framing included).
    lengths: List[int] = field(default_factory=lambda: [4096, 8192, 16384, 32768, 65536, 131072])
    depths: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = 4
    seed: int = 0
    # Cap on generated tokens per answer; None = each task's own budget (enough for its answer).
    max_new_tokens: Optional[int] = None
    options: TaskOptions = field(default_factory=TaskOptions)

    @property
    def enabled(self) -> bool:
        return bool(self.tasks and self.lengths and self.depths)

    def validate(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"recall.tasks: unknown task(s) {unknown}; known: {list(TASKS)}")
        if any(n < 1 for n in self.lengths):
            raise ValueError(f"recall.lengths must be positive, got {self.lengths}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"recall.depths must lie in [0, 1], got {self.depths}")
        if self.samples < 1:
            raise ValueError(f"recall.samples must be at least 1, got {self.samples}")


@dataclass
class PerplexityConfig:
    """Loss by position on long documents of an indexed dataset (off unless ``data`` is set)."""

    # Prefix of a Megatron indexed dataset (<prefix>.bin / <prefix>.idx) of held-out text.
    data: Optional[str] = None
    seq_length: int = 32768
    num_documents: int = 8
    # Width of a position bucket in tokens; None = seq_length / 16.
    bucket_tokens: Optional[int] = None
    # Put a BOS in front of documents that do not start with one.
    add_bos: bool = True
    # Positions whose logits exist at once while computing losses (memory: chunk x vocabulary
    # x 4 bytes, about 0.5 GB per 1,024 positions for Llama-3); does not change the results.
    chunk_tokens: int = DEFAULT_LOSS_CHUNK

    @property
    def bucket_width(self) -> int:
        return self.bucket_tokens or max(1, self.seq_length // 16)

    def validate(self) -> None:
        if self.chunk_tokens < 1:
            raise ValueError(f"perplexity.chunk_tokens must be at least 1, got {self.chunk_tokens}")

    def settings(self) -> dict:
        """The options that decide the results (the chunk only decides memory use)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "chunk_tokens"}


@dataclass
class EvalConfig:
    # The models to evaluate and compare: megalong weights (or training checkpoint) directories
    # and/or Hugging Face model directories.
    models: List[str] = field(default_factory=list)
    # Short names for plots and tables, one per model; default: from the paths.
    labels: List[str] = field(default_factory=list)
    # Kind of every model; auto = detected per directory (mixes are fine).
    model_kind: Literal["auto", "hf", "megalong"] = "auto"
    # Tokenizer spec (see megalong.data.tokenizer), shared by all models so that they see the
    # same prompts; default: the first Hugging Face model directory's.
    tokenizer: Optional[str] = None
    # Output directory: results.json, plots, and models/<model>/progress.jsonl (each model's
    # finished work: a killed run resumes, a model evaluated before is not evaluated again).
    out: Optional[str] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # "chat" = Llama-3 chat format (instruct models); "auto" = chat when the HF export has a
    # chat template, base otherwise.
    prompt_format: Literal["auto", "base", "chat"] = "auto"
    recall: RecallConfig = field(default_factory=RecallConfig)
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)

    def validate(self) -> None:
        if not self.models:
            raise ValueError("no model given: pass one or more weights directories or Hugging Face model directories")
        if not self.out:
            raise ValueError("no output directory given (--out)")
        self.recall.validate()
        self.perplexity.validate()
        if not self.recall.enabled and not self.perplexity.data:
            raise ValueError("nothing to evaluate: no recall tasks/lengths/depths and no perplexity.data")
