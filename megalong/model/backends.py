"""Which GPU kernels this machine can run, and which configurations they refuse.

Transformer Engine (TE) and flash-attn are optional. ``importlib.util.find_spec`` only says
a package is on the path; a wheel built for another CUDA or torch fails at import, so
:func:`transformer_engine_problem` and :func:`flash_attn_problem` really import them (once) and
say why they cannot be used; ``tools/gpu_check.py`` reports the same answers.

The ``*_problem`` functions are pure decisions (versions, shapes and hardware in, a
sentence naming the setting and what to use instead out, or None), so they are tested on
the CPU for every TE version range; :func:`check_for_machine` applies them to a run before
any process group, model or weights exist.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

from megalong.compat import parse_version
from megalong.config.loader import ConfigError
from megalong.config.parallel import ParallelConfig
from megalong.model.config import FP8Config, ModelConfig, all_to_all_heads_problem

log = logging.getLogger(__name__)

# Megatron-Core's transformer_engine extension and megalong's TE paths are read against these
# releases (setup.py's gpu extra).
TESTED_TE = ((2, 9), (2, 11))


def import_problem(*modules: str) -> Optional[str]:
    """None when every one of ``modules`` imports; else the error, in words."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as err:  # a broken build raises OSError, RuntimeError, ... not only ImportError
            return f"{type(err).__name__}: {err}".strip()
    return None


@functools.lru_cache(maxsize=1)
def transformer_engine_problem() -> Optional[str]:
    """Why ``transformer_engine.pytorch`` (the part megalong uses) cannot be used here, or None."""
    problem = import_problem("transformer_engine", "transformer_engine.pytorch")
    if problem and not problem.startswith("ModuleNotFoundError"):
        log.warning("Transformer Engine is installed but does not import (%s); not using it", problem)
    return problem


@functools.lru_cache(maxsize=1)
def flash_attn_problem() -> Optional[str]:
    """Why flash-attn's varlen kernel (what megalong calls) cannot be used here, or None."""
    problem = import_problem("flash_attn")
    if problem is None:
        try:
            from flash_attn import flash_attn_varlen_func  # noqa: F401
        except Exception as err:
            problem = f"{type(err).__name__}: {err}".strip()
    if problem and not problem.startswith("ModuleNotFoundError"):
        log.warning("flash-attn is installed but does not import (%s); not using it", problem)
    return problem


def transformer_engine_version() -> Optional[tuple[int, int]]:
    """(major, minor) of an importable ``transformer_engine.pytorch``; None when it does not import."""
    if transformer_engine_problem() is not None:
        return None
    import transformer_engine

    return parse_version(getattr(transformer_engine, "__version__", "0.0"))[:2]


def flash_attn_usable() -> bool:
    return flash_attn_problem() is None


def resolve_backend(requested: str, on_gpu: bool, params_dtype: str = "bf16") -> str:
    """The kernel for whole-sequence attention: "te", "flash" or "sdpa".

    ``auto``: on a GPU with bf16 parameters, Transformer Engine when it imports, else
    flash-attn when it imports; otherwise PyTorch SDPA (the only one that takes fp32). An
    explicit choice that cannot run here is an error saying why.
    """
    if requested == "auto":
        if not on_gpu:
            return "sdpa"
        if params_dtype != "bf16":
            log.info("attention_backend=auto with %s parameters: PyTorch SDPA (flash-attn and Transformer "
                     "Engine attention run only in 16-bit)", params_dtype)
            return "sdpa"
        if transformer_engine_version() is not None:
            return "te"
        if flash_attn_usable():
            return "flash"
        return "sdpa"
    if requested in ("te", "flash"):
        if not on_gpu:
            raise ValueError(f"model.attention_backend={requested} needs a GPU; use sdpa (or auto) on CPU")
        problem = attention_backend_problem(requested, params_dtype)
        if problem:
            raise ValueError(problem)
        usable = transformer_engine_version() is not None if requested == "te" else flash_attn_usable()
        if not usable:
            package = {"te": "transformer_engine.pytorch", "flash": "flash_attn"}[requested]
            raise ValueError(f"model.attention_backend={requested} but {package} does not import here "
                             "(pip install 'megalong[gpu]', built for this CUDA and torch)")
        return requested
    if requested == "sdpa":
        return "sdpa"
    raise ValueError(f"unknown model.attention_backend {requested!r}; choose auto, sdpa, flash or te")


def attention_backend_problem(requested: str, params_dtype: str) -> Optional[str]:
    """flash-attn and TE's fused attention compute in fp16/bf16 only (TE's unfused backend,
    the one that would take fp32, refuses packed THD input)."""
    if requested in ("te", "flash") and params_dtype == "fp32":
        return (f"model.attention_backend={requested} needs model.params_dtype=bf16: flash-attn and "
                "Transformer Engine's fused attention run only in 16-bit; use attention_backend=sdpa "
                "(or auto) for fp32")
    return None


def te_context_parallel_problem(te_version: tuple[int, int], cp_comm: str, query_heads_per_tp: int,
                                kv_heads_per_tp: int, cp: int) -> Optional[str]:
    """TE's all-to-all context parallelism on megalong's packed (THD) documents.

    TE 2.9 asserts that a2a sees neither THD input nor a padding mask (megalong's documents
    are both); 2.10 and later take THD but need the query and key heads of each TP rank
    divisible by the CP size (Llama-3-8B at TP=8 has one KV head per rank). TE's ring
    ("p2p") has neither limit. megalong's own all-to-all (attention_backend sdpa or flash)
    repeats KV heads, but needs the query heads to divide (``all_to_all_heads_problem``):
    it is suggested only where it can run.
    """
    if cp == 1 or cp_comm != "a2a":
        return None
    instead = "use model.cp_comm=ring (Transformer Engine's p2p ring)"
    if all_to_all_heads_problem(query_heads_per_tp, cp) is None:
        instead += ", or attention_backend=flash with cp_comm=a2a (megalong's all-to-all, which repeats KV heads)"
    if te_version < (2, 10):
        return (f"Transformer Engine {te_version[0]}.{te_version[1]} cannot run model.cp_comm=a2a on packed "
                f"documents (its all-to-all refuses THD input and padding masks before 2.10): {instead}")
    if query_heads_per_tp % cp or kv_heads_per_tp % cp:
        return (f"Transformer Engine's all-to-all needs the attention heads of each tensor-parallel rank "
                f"divisible by context_parallel={cp}, but each rank has {query_heads_per_tp} query and "
                f"{kv_heads_per_tp} KV heads: {instead}")
    return None


def fp8_problem(fp8: FP8Config, compute_capability: tuple[int, int]) -> Optional[str]:
    if fp8.recipe == "mxfp8" and compute_capability < (10, 0):
        return (f"model.fp8.recipe=mxfp8 needs compute capability 10.0 or newer (Blackwell); this GPU has "
                f"{compute_capability[0]}.{compute_capability[1]}: use recipe delayed or tensorwise")
    if compute_capability < (8, 9):
        return (f"model.fp8 needs an FP8-capable GPU (compute capability 8.9 or newer: Ada, Hopper, "
                f"Blackwell); this one has {compute_capability[0]}.{compute_capability[1]}")
    return None


def fp8_ignored_fields(fp8: FP8Config) -> list[str]:
    """Fields of ``fp8`` set away from their defaults that its recipe does not read: margin and
    the amax history belong to delayed scaling only."""
    if fp8.recipe == "delayed":
        return []
    default = FP8Config()
    return [f"model.fp8.{name}={getattr(fp8, name)!r}" for name in ("margin", "amax_history_len", "amax_compute_algo")
            if getattr(fp8, name) != getattr(default, name)]


def check_for_machine(model: ModelConfig, parallel: ParallelConfig, on_gpu: bool) -> None:
    """Refuse, before anything is built, what the chosen kernels cannot run on this machine."""
    problem = attention_backend_problem(model.attention_backend, model.params_dtype)
    if problem:
        raise ConfigError(problem)
    if model.fp8 is not None:
        ignored = fp8_ignored_fields(model.fp8)
        if ignored:
            log.warning("model.fp8.recipe=%s ignores %s (they apply to delayed scaling only)",
                        model.fp8.recipe, ", ".join(ignored))
    if not on_gpu:
        return
    import torch

    if model.fp8 is not None:
        problem = fp8_problem(model.fp8, torch.cuda.get_device_capability())
        if problem:
            raise ConfigError(problem)
    if resolve_backend(model.attention_backend, on_gpu, model.params_dtype) == "te":
        tp = parallel.tensor_parallel
        problem = te_context_parallel_problem(
            transformer_engine_version(), model.cp_comm, model.num_attention_heads // tp,
            model.num_query_groups // tp, parallel.context_parallel)
        if problem:
            raise ConfigError(problem)
