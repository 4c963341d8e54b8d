"""Per-step metrics: loss, LR, grad norm, throughput, FLOPs, MFU, memory, ETA.

Printed to the console in plain words, and written to TensorBoard, a JSON-lines file
and (optionally) Weights & Biases by the logging rank only.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megalong.model.config import ModelConfig

log = logging.getLogger(__name__)

# Dense BF16 peak of common training GPUs (TFLOP/s, without sparsity), for MFU when the
# recipe does not give logging.peak_tflops.
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0, "GB200": 2450.0}


def detect_peak_tflops(on_gpu: bool) -> Optional[float]:
    if not on_gpu:
        return None
    name = torch.cuda.get_device_name()
    for key, value in KNOWN_PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def training_flops(model: ModelConfig, num_tokens: int, attention_cost: int, padded_vocab: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward), no recompute.

    ``attention_cost`` is the sum of squared attended lengths (sum of squared document
    lengths with document masking, S^2 per sequence without); causal attention computes
    half of each square, with two matmuls (QK^T and PV) of 2 FLOPs per multiply-add.
    """
    h, layers = model.hidden_size, model.num_layers
    kv = model.num_query_groups * model.head_dim
    per_layer_params = h * h + 2 * h * kv + h * h + 3 * h * model.ffn_hidden_size
    matmul_params = layers * per_layer_params + h * padded_vocab
    forward = 2.0 * matmul_params * num_tokens
    forward += 2 * 2 * layers * h * (attention_cost / 2.0)
    return 3.0 * forward


def peak_memory_gib(on_gpu: bool) -> float:
    """Peak memory of this process: GPU allocator peak on GPUs, max resident set on CPU."""
    if on_gpu:
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


@dataclass
class StepMetrics:
    step: int
    loss: float
    loss_tokens: int
    lr: float
    grad_norm: float
    step_time: float
    tokens: int              # input tokens of the global batch
    flops: float             # model FLOPs of the step, whole job
    world_size: int
    skipped: bool = False
    # Per data-parallel rank, the (domain, sample index) pairs it trained on (logging.log_samples).
    samples: Optional[list] = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.step_time

    @property
    def tflops_per_device(self) -> float:
        return self.flops / self.step_time / self.world_size / 1e12


class MetricsWriter:
    """Writes metrics on the logging rank; a no-op elsewhere."""

    def __init__(self, enabled: bool, train_steps: int, log_interval: int = 1,
                 tensorboard_dir: Optional[str] = None, metrics_file: Optional[str] = None,
                 wandb_project: Optional[str] = None, wandb_run_name: Optional[str] = None,
                 peak_tflops: Optional[float] = None, run_config: Optional[dict] = None, on_gpu: bool = False):
        self.enabled = enabled
        self.on_gpu = on_gpu
        self.train_steps = train_steps
        self.log_interval = max(1, log_interval)
        self.peak_tflops = peak_tflops if peak_tflops is not None else detect_peak_tflops(on_gpu)
        self._tb = None
        self._wandb = None
        self._file = None
        self._recent_times: list[float] = []
        if not enabled:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=tensorboard_dir)
        if metrics_file:
            Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(metrics_file, "a", encoding="utf-8")
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("logging.wandb_project is set but wandb is not installed "
                                   "(pip install 'megalong[wandb]')") from None
            self._wandb = wandb.init(project=wandb_project, name=wandb_run_name, config=run_config,
                                     resume="allow")

    def record(self, m: StepMetrics) -> None:
        if not self.enabled:
            return
        self._recent_times = (self._recent_times + [m.step_time])[-20:]
        values = {
            "loss": m.loss, "lr": m.lr, "grad_norm": m.grad_norm, "step_time_s": m.step_time,
            "tokens_per_s": m.tokens_per_second, "tflops_per_device": m.tflops_per_device,
            "memory_gib": peak_memory_gib(self.on_gpu), "loss_tokens": m.loss_tokens,
        }
        if self.peak_tflops:
            values["mfu"] = m.tflops_per_device / self.peak_tflops
        if self._file is not None:
            row = {"step": m.step, "tokens": m.tokens, **values}
            if m.samples is not None:
                row["samples"] = m.samples
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(f"train/{key}", value, m.step)
        if self._wandb is not None:
            self._wandb.log(values, step=m.step)
        if m.step % self.log_interval == 0 or m.step == self.train_steps:
            eta = (self.train_steps - m.step) * (sum(self._recent_times) / len(self._recent_times))
            mfu = f" | MFU {values['mfu'] * 100:.1f}%" if "mfu" in values else ""
            skipped = " | update SKIPPED (non-finite gradients)" if m.skipped else ""
            log.info(
                "step %d/%d | loss %.4f | lr %.3g | grad norm %.3f | %.2f s/step | %s tokens/s | "
                "%.3g TFLOP/s per device%s | peak memory %.2f GiB | ETA %s%s",
                m.step, self.train_steps, m.loss, m.lr, m.grad_norm, m.step_time,
                f"{m.tokens_per_second:,.0f}", m.tflops_per_device, mfu, values["memory_gib"],
                _duration(eta), skipped,
            )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
