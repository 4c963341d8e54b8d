"""Every check: its name, what it proves, what it needs, which process group runs it.

A group is one set of processes started together (one per GPU it uses); its checks run in
order in those processes, so package imports and CUDA start-up are paid once per group.
The order inside a group matters: the eval check reuses the FP8 training of ``fp8.delayed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from megalong.gpucheck.machine import GPUS_NEEDED


@dataclass(frozen=True)
class CheckOptions:
    """How big the checks are (``--quick`` shrinks the slow ones); passed to every worker."""

    out_dir: str
    quick: bool = False
    fp8_steps: int = 40
    figures_seq_length: int = 65536
    figures_layers: Optional[int] = None  # None: as many Llama-3-8B layers as fit
    figures_warmup: int = 2
    figures_steps: int = 3

    @classmethod
    def for_run(cls, out_dir: str, quick: bool, **overrides) -> "CheckOptions":
        sizes = dict(fp8_steps=24, figures_warmup=1, figures_steps=2) if quick else {}
        sizes.update({k: v for k, v in overrides.items() if v is not None})
        return cls(out_dir=out_dir, quick=quick, **sizes)


@dataclass(frozen=True)
class Check:
    name: str
    title: str  # what a pass proves, printed when it starts
    needs: tuple[str, ...]  # features (megalong.gpucheck.machine), the first missing one is reported
    group: str
    function: str  # "module:function" under megalong.gpucheck.checks, called as fn(ctx) -> CheckResult


@dataclass(frozen=True)
class Group:
    name: str
    description: str
    world_size: Callable[[int], int]  # GPUs visible -> processes to start
    needs_gpus: int  # the group cannot start with fewer
    timeout_s: int


GROUPS = {
    "single": Group("single", "one GPU (or the CPU with --allow-no-gpu)", lambda gpus: 1, 0, 480),
    "figures": Group("figures", "throughput on one GPU, in a process of its own", lambda gpus: 1,
                     GPUS_NEEDED["gpu"], 300),
    "cp": Group("cp", "two GPUs: context parallelism", lambda gpus: GPUS_NEEDED["cp"], GPUS_NEEDED["cp"], 300),
    "multi": Group("multi", "four or eight GPUs: wide context parallelism, TP x CP",
                   lambda gpus: 8 if gpus >= 8 else GPUS_NEEDED["tp-cp"], GPUS_NEEDED["tp-cp"], 360),
}

CHECKS = (
    Check("versions", "torch, CUDA, cuDNN, Transformer Engine, flash-attn, compute capability (real imports)",
          (), "single", "environment:check_versions"),
    Check("model.reference", "the reference's attention (megalong's sdpa in fp32) against the definition "
          "(the whole document mask written out) on this device", (), "single", "model_backends:check_reference"),
    Check("model.sdpa", "the whole model (fwd + bwd, micro-batch 2, packed documents) with the sdpa backend "
          "against the fp32 reference", (), "single", "model_backends:check_sdpa"),
    Check("model.flash", "the whole model with the flash backend against the fp32 reference",
          ("gpu", "flash-attn"), "single", "model_backends:check_flash"),
    Check("model.te", "the whole model with the te backend against the fp32 reference",
          ("gpu", "te"), "single", "model_backends:check_te"),
    Check("training.initial-weights", "a new stage keeps the weights it starts from through its first step (bf16, "
          "and FP8 where this GPU runs it; trainer seeded apart from the weights)", (), "single",
          "initial_weights:check_initial_weights"),
    Check("checkpoint.te-bf16", "a converted HF checkpoint and a CPU-written one load into the TE model and back "
          "with the same logits", ("gpu", "te", "transformers"), "single", "checkpoints:check_te_bf16"),
    Check("checkpoint.te-fp8", "the same into the TE model with FP8; its FP8 state survives a save and load; "
          "and back to the CPU", ("gpu", "te", "fp8", "transformers"), "single", "checkpoints:check_te_fp8"),
    Check("fp8.delayed", "FP8 delayed scaling against bf16: per-parameter gradients, and the loss after "
          "training on real text", ("gpu", "te", "fp8", "tokenizer"), "single", "fp8:check_delayed"),
    Check("fp8.tensorwise", "FP8 tensorwise (current) scaling against bf16, the same way",
          ("gpu", "te", "fp8", "tokenizer"), "single", "fp8:check_tensorwise"),
    Check("eval.fp8-trained", "the eval runner on an FP8-trained model.yaml: 13-token prompt and one decode step",
          ("gpu", "te", "fp8", "tokenizer"), "single", "inference:check_fp8_trained"),
    Check("figures.bf16", "tokens/s, TFLOP/s, MFU and peak memory: Llama-3-8B shape at 64K, bf16",
          ("gpu", "te"), "figures", "figures:check_bf16"),
    Check("figures.fp8", "the same with FP8 (delayed scaling)", ("gpu", "te", "fp8"), "figures", "figures:check_fp8"),
    Check("cp.te-ring", "TE's ring CP at CP=2 against the reference: one-token documents, odd lengths, "
          "one KV head", ("cp", "te"), "cp", "context_parallel:check_ring"),
    Check("cp.te-a2a", "TE's all-to-all CP at CP=2 (one KV head per rank), or megalong's refusal of it",
          ("cp", "te"), "cp", "context_parallel:check_a2a"),
    Check("cp.megalong", "megalong's own ring and all-to-all CP at CP=2 against the reference: one KV head, "
          "repeated by the all-to-all", ("cp",), "cp", "context_parallel:check_megalong"),
    Check("cp.model", "the whole model at CP=2 (TE ring and all-to-all) against CP=1",
          ("cp", "te"), "cp", "context_parallel:check_model"),
    Check("cp.te-wide", "TE's ring and all-to-all CP over every GPU (CP=4 or 8)",
          ("tp-cp", "te"), "multi", "context_parallel:check_wide"),
    Check("tp-cp.training", "TP=2 x CP=2 with sequence parallelism: training steps against TP=1",
          ("tp-cp", "te"), "multi", "tensor_context:check_training"),
)

CHECKS_BY_NAME = {check.name: check for check in CHECKS}


def select(only: Optional[str], skip: Optional[str]) -> list[Check]:
    """Checks named (or prefixed: ``fp8`` means fp8.*) by ``--only``, minus ``--skip``."""

    def matches(check: Check, patterns: list[str]) -> bool:
        return any(check.name == p or check.name.startswith(p + ".") for p in patterns)

    def parse(text: Optional[str], flag: str) -> list[str]:
        patterns = [p.strip() for p in (text or "").split(",") if p.strip()]
        unknown = [p for p in patterns if not any(matches(c, [p]) for c in CHECKS)]
        if unknown:
            raise ValueError(f"{flag}: no check is named {', '.join(unknown)}; "
                             f"checks: {', '.join(c.name for c in CHECKS)}")
        return patterns

    only_patterns, skip_patterns = parse(only, "--only"), parse(skip, "--skip")
    return [c for c in CHECKS if (not only_patterns or matches(c, only_patterns)) and not matches(c, skip_patterns)]
