"""``megalong info``: versions, devices and model presets, for bug reports and sanity checks."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", action="store_true", help="also list the model presets with their shapes")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _megatron_core() -> str:
    """The Megatron-Core Python imports, and whether megalong is tested with it."""
    from megalong import compat

    try:
        version = compat.megatron_core_version()
    except Exception as err:  # not installed, or installed but broken: say which
        return f"does not import ({type(err).__name__}: {err}); installed: {_version('megatron-core')}"
    if compat.is_tested(version):
        return f"{version} (tested with megalong)"
    return f"{version} (NOT tested with megalong, which is tested with {compat.tested_versions_text()})"


def run(args: argparse.Namespace) -> int:
    import torch

    from megalong import __version__
    from megalong.model import PRESETS

    print(f"megalong {__version__} on Python {platform.python_version()}")
    for pkg in ("torch", "megatron-core", "transformer-engine", "flash-attn", "transformers"):
        print(f"  {pkg:20s} {_megatron_core() if pkg == 'megatron-core' else _version(pkg)}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"  GPUs visible         {gpus}" + ("" if gpus else " (CPU path: gloo backend, fp32)"))
    if args.presets:
        print("model presets:")
        for name, shape in PRESETS.items():
            print(
                f"  {name:14s} layers={shape['num_layers']:<3d} hidden={shape['hidden_size']:<5d} "
                f"heads={shape['num_attention_heads']}/{shape['num_query_groups']} "
                f"vocab={shape['vocab_size']} tied={shape['tie_word_embeddings']}"
            )
    return 0
