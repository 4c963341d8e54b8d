"""Published measured training runs (megalong/plan/published_runs.yaml), as data.

Each run keeps its source (repository, file, commit, software version), its configuration as
the source prints it, and its measured figure. Sources publish tokens/s per GPU, model TFLOP/s
per GPU, or GPU-hours for a number of tokens; :meth:`PublishedRun.measured_tokens_per_s_per_gpu`
turns each into tokens/s per GPU, TFLOP/s with the FLOP formula *that source* uses:

* ``nemo-noncausal``: NeMo's Llama formula before August 2025 (nemo/utils/flops_formulas.py,
  changed by commit 6251117 "Discount FLOPs in dot-product att"), attention counted over the
  full s x s matrix, vocabulary unpadded;
* ``causal``: the same with half the attention matrix (Megatron-Bridge; Megatron-LM today).

Both are ``megalong.training.metrics.training_flops`` with the attention cost per sequence
s^2 (causal) or 2 s^2 (non-causal), so the project counts FLOPs in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from megalong.config.loader import ConfigError, load
from megalong.model.config import ModelConfig
from megalong.model.presets import resolve

TABLE_PATH = Path(__file__).with_name("published_runs.yaml")

FlopConvention = Literal["nemo-noncausal", "causal", "none"]
Framework = Literal["megatron", "torchtitan", "prolong"]


@dataclass
class Source:
    id: str
    repo: str
    file: str
    commit: str
    version: str
    system: str
    framework: Framework
    flops: FlopConvention
    note: str = ""


@dataclass
class PublishedRun:
    id: str
    source: str
    model: str
    gpu: str
    gpu_memory_gb: float
    precision: Literal["bf16", "fp8"]
    seq_length: int
    global_batch: int
    gpus: Optional[int] = None  # the source's "# of GPUs"
    tp: Optional[int] = None
    pp: Optional[int] = None
    cp: Optional[int] = None
    dp: Optional[int] = None
    vp: Optional[int] = None  # None: not interleaved (or not stated)
    mbs: Optional[int] = None  # None: not stated (the planner searches it)
    recompute: Optional[Literal["selective", "full"]] = None  # None: none or not stated
    fsdp: bool = False  # parameters, gradients and optimizer sharded over DP (ZeRO-3 style)
    document_masking: bool = False
    tokens_per_s_per_gpu: Optional[float] = None
    tflops_per_gpu: Optional[float] = None
    train_tokens: Optional[float] = None  # with gpu_hours: a whole run's cost
    gpu_hours: Optional[float] = None
    memory_gib: Optional[float] = None  # measured peak per GPU, when published
    held_out: bool = False
    note: str = ""

    @property
    def has_layout(self) -> bool:
        return None not in (self.tp, self.pp, self.cp, self.dp)

    @property
    def world_size(self) -> int:
        """GPUs the layout columns describe (TP x PP x CP x DP)."""
        return self.tp * self.pp * self.cp * self.dp


@dataclass
class PublishedTable:
    models: dict[str, ModelConfig] = field(default_factory=dict)
    sources: list[Source] = field(default_factory=list)
    runs: list[PublishedRun] = field(default_factory=list)

    def source(self, run: PublishedRun) -> Source:
        return next(s for s in self.sources if s.id == run.source)

    def model(self, run: PublishedRun) -> ModelConfig:
        return resolve(self.models[run.model])

    def flops_per_token(self, run: PublishedRun) -> float:
        """Model FLOPs per token (forward + backward) as ``run``'s source counts them."""
        from megalong.training.metrics import training_flops

        convention = self.source(run).flops
        if convention == "none":
            raise ValueError(f"{run.id}: its source publishes no FLOP counts")
        model, s = self.model(run), run.seq_length
        attention_cost = s * s * (2 if convention == "nemo-noncausal" else 1)
        return training_flops(model, s, attention_cost, model.vocab_size) / s

    def measured_tokens_per_s_per_gpu(self, run: PublishedRun) -> float:
        if run.tokens_per_s_per_gpu is not None:
            return run.tokens_per_s_per_gpu
        if run.tflops_per_gpu is not None:
            return run.tflops_per_gpu * 1e12 / self.flops_per_token(run)
        return run.train_tokens / (run.gpu_hours * 3600)

    def by_framework(self, framework: Framework) -> list[PublishedRun]:
        return [r for r in self.runs if self.source(r).framework == framework]


def _check(table: PublishedTable, path: Path) -> PublishedTable:
    """Every run names a known source and model and carries a measured figure."""
    ids = [s.id for s in table.sources]
    seen: set[str] = set()
    for run in table.runs:
        where = f"{path}: run {run.id!r}"
        if run.id in seen:
            raise ConfigError(f"{where}: the id is used twice")
        seen.add(run.id)
        if run.source not in ids:
            raise ConfigError(f"{where}: unknown source {run.source!r} (known: {', '.join(ids)})")
        if run.model not in table.models:
            raise ConfigError(f"{where}: unknown model {run.model!r} (known: {', '.join(table.models)})")
        figures = [run.tokens_per_s_per_gpu, run.tflops_per_gpu, run.gpu_hours]
        if all(f is None for f in figures):
            raise ConfigError(f"{where}: no measured figure (tokens_per_s_per_gpu, tflops_per_gpu or gpu_hours)")
        if run.gpu_hours is not None and run.train_tokens is None:
            raise ConfigError(f"{where}: gpu_hours needs train_tokens")
        if run.tokens_per_s_per_gpu is None and run.tflops_per_gpu is not None and \
                table.source(run).flops == "none":
            raise ConfigError(f"{where}: TFLOP/s from a source whose FLOP formula is unknown")
    return table


def load_published(path: str | Path = TABLE_PATH) -> PublishedTable:
    path = Path(path)
    return _check(load(PublishedTable, path), path)
