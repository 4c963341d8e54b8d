"""Benchmark checkpoint conversion against simply copying the same bytes.

Generates a random Llama-3.2-1B-shaped Hugging Face checkpoint (bf16, sharded
safetensors, about 2.5 GB), then measures in fresh processes:

  copy HF shards           (baseline for hf-to-megatron; copy + fsync, like the converter)
  megalong convert hf-to-megatron
  copy Megatron checkpoint (baseline for megatron-to-hf)
  megalong convert megatron-to-hf

and prints wall time and peak resident memory (RSS) of each, with ratios: conversion
time / copy time (goal < 2x) and peak RSS / largest shard (goal < 1.5x).

    python benchmarks/convert.py [--workdir /tmp] [--shard-size-gb 1.0] [--layers 16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This parent process stays small and never imports torch: Linux counts a forked child's
# peak RSS from the parent's memory at fork time, which would blur the measurements.

LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rms_norm_eps": 1e-05, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "attention_bias": False,
    "mlp_bias": False, "initializer_range": 0.02,
}

COPY_SCRIPT = """
import os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
for dirpath, _, files in os.walk(src):
    target = os.path.join(dst, os.path.relpath(dirpath, src))
    os.makedirs(target, exist_ok=True)
    for name in files:
        out = os.path.join(target, name)
        shutil.copyfile(os.path.join(dirpath, name), out)
        with open(out, "rb+") as f:
            os.fsync(f.fileno())
"""


def generate_checkpoint(directory: Path, config: dict, shard_bytes: int) -> None:
    """Write random bf16 weights shard by shard (one tensor in memory at a time)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from megalong.convert.adapter import LlamaStateDictAdapter
    from megalong.convert.hf_config import model_config_from_hf
    from megalong.convert.megatron_to_hf import _plan_shards
    from megalong.convert.safetensors_io import PlannedTensor, ShardWriter

    directory.mkdir(parents=True)
    adapter = LlamaStateDictAdapter(model_config_from_hf(config))
    planned = [PlannedTensor(n, torch.bfloat16, s) for n, s in adapter.hf_shapes().items()]
    shards = _plan_shards(planned, shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    generator = torch.Generator().manual_seed(0)
    for file_name, shard in zip(names, shards):
        writer = ShardWriter(directory / file_name, shard)
        for t in shard:
            writer.write(t.name, (torch.randn(t.shape, generator=generator) * 0.02).to(torch.bfloat16))
        writer.close()
    weight_map = {t.name: f for f, shard in zip(names, shards) for t in shard}
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.nbytes for t in planned)}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config))


def measure(label: str, argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a fresh child process. For the converter, also
    print the time it reports for the conversion itself (after Python and torch start up)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    output = proc.stdout.read()
    proc.stdout.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{label} failed:\n{output}")
    peak = usage.ru_maxrss * 1024  # kilobytes on Linux
    work = re.search(r"Wrote .* in ([0-9.]+) s", output)
    detail = f"   (conversion itself {float(work.group(1)):.1f} s, the rest is start-up)" if work else ""
    print(f"  {label:34s} {wall:7.1f} s   peak RSS {peak / 1e9:6.2f} GB{detail}", flush=True)
    return wall, peak


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where the temporary files go")
    parser.add_argument("--shard-size-gb", type=float, default=1.0, help="HF shard size of the generated checkpoint")
    parser.add_argument("--layers", type=int, default=16, help="number of layers (16 = Llama-3.2-1B)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files (for profiling)")
    parser.add_argument("--generate-only", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()

    config = {**LLAMA32_1B, "num_hidden_layers": args.layers}
    if args.generate_only:
        generate_checkpoint(Path(args.generate_only), config, int(args.shard_size_gb * 1e9))
        return 0
    work = Path(tempfile.mkdtemp(prefix="megalong-convert-bench-", dir=args.workdir))
    try:
        print(f"Generating a random Llama-3.2-1B-shaped checkpoint ({args.layers} layers, bf16) in {work} ...",
              flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--generate-only", str(work / "hf"), "--layers", str(args.layers),
                        "--shard-size-gb", str(args.shard_size_gb)], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        largest = max(f.stat().st_size for f in (work / "hf").glob("*.safetensors"))
        total = dir_bytes(work / "hf")
        print(f"  {total / 1e9:.2f} GB in {len(list((work / 'hf').glob('*.safetensors')))} shards, "
              f"largest shard {largest / 1e9:.2f} GB, generated in {time.perf_counter() - t0:.0f} s", flush=True)

        py = sys.executable
        print("Measurements (fresh process each; wall time includes Python start-up):")
        copy_hf = measure("copy HF shards (+fsync)", [py, "-c", COPY_SCRIPT, str(work / "hf"), str(work / "hf-copy")])
        to_mcore = measure("megalong convert hf-to-megatron",
                           [py, "-m", "megalong", "convert", "hf-to-megatron", str(work / "hf"), str(work / "mcore")])
        copy_mcore = measure("copy Megatron checkpoint (+fsync)",
                             [py, "-c", COPY_SCRIPT, str(work / "mcore"), str(work / "mcore-copy")])
        to_hf = measure("megalong convert megatron-to-hf",
                        [py, "-m", "megalong", "convert", "megatron-to-hf", str(work / "mcore"), str(work / "out"),
                         "--tokenizer", "llama3", "--max-shard-size", f"{args.shard_size_gb}GB"])

        print("Ratios (goal: time < 2.0x copy, peak RSS < 1.5x largest shard):")
        for name, (wall, peak), (copy_wall, copy_peak) in (
            ("hf-to-megatron", to_mcore, copy_hf), ("megatron-to-hf", to_hf, copy_mcore),
        ):
            print(f"  {name:16s} time {wall / copy_wall:5.2f}x copy   peak RSS {peak / largest:5.2f}x largest "
                  f"shard ({peak / total:4.2f}x the whole model; copy itself {copy_peak / 1e9:.2f} GB)")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
