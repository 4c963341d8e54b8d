"""Benchmark checkpoint conversion against simply copying the same bytes.

Generates a random Llama-shaped Hugging Face checkpoint (bf16, sharded safetensors;
Llama-3.2-1B by default, about 2.5 GB, or Llama-3.1-8B, about 16 GB), then measures in
fresh processes, several rounds, each step after a `sync` so that one step's write-back
does not land on the next:

  copy HF shards           (baseline for hf-to-megatron; copy + fsync, like the converter)
  megalong convert hf-to-megatron
  copy Megatron checkpoint (baseline for megatron-to-hf)
  megalong convert megatron-to-hf

and prints the median wall time and the peak resident memory (RSS) of each, with ratios:
conversion time / copy time (goal < 2x) and peak RSS / largest shard (goal < 1.5x). The
fixed start-up of any converter process (Python, torch and torch's checkpoint modules) is
measured too, and the time ratio is also given without it: that is the ratio a larger
model approaches.

    python benchmarks/convert.py [--shape 1b|8b] [--repeats 3] [--workdir /tmp]
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

LLAMA31_8B = {
    **LLAMA32_1B, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "head_dim": 128,
    "rope_scaling": {**LLAMA32_1B["rope_scaling"], "factor": 8.0}, "tie_word_embeddings": False,
}
SHAPES = {"1b": (LLAMA32_1B, 1.0), "8b": (LLAMA31_8B, 5.0)}  # config, HF shard size in GB

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
# What every converter process pays before converting anything.
STARTUP_SCRIPT = "import torch, torch.distributed.checkpoint, megalong.cli.convert, megalong.convert.hf_to_megatron"


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


def measure(argv: list[str]) -> tuple[float, int, float | None]:
    """(wall seconds, peak RSS bytes, seconds the converter reports for converting) of a
    fresh child process, started after a sync so earlier writes are on disk."""
    os.sync()
    time.sleep(1.0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.stdout.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{output}")
    work = re.search(r"Wrote .* in ([0-9.]+) s", output)
    return wall, usage.ru_maxrss * 1024, float(work.group(1)) if work else None  # ru_maxrss: KB on Linux


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="model shape (default 1b)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of measurements; medians are reported")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where the temporary files go")
    parser.add_argument("--layers", type=int, help="number of layers (default: the shape's)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files (for profiling)")
    parser.add_argument("--generate-only", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()

    base, shard_gb = SHAPES[args.shape]
    config = {**base, "num_hidden_layers": args.layers or base["num_hidden_layers"]}
    if args.generate_only:
        generate_checkpoint(Path(args.generate_only), config, int(shard_gb * 1e9))
        return 0
    work = Path(tempfile.mkdtemp(prefix="megalong-convert-bench-", dir=args.workdir))
    py = sys.executable
    try:
        print(f"Generating a random {args.shape}-shaped checkpoint ({config['num_hidden_layers']} layers, bf16) "
              f"in {work} ...", flush=True)
        t0 = time.perf_counter()
        subprocess.run([py, __file__, "--generate-only", str(work / "hf"), "--shape", args.shape,
                        "--layers", str(config["num_hidden_layers"])], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        largest = max(f.stat().st_size for f in (work / "hf").glob("*.safetensors"))
        total = dir_bytes(work / "hf")
        print(f"  {total / 1e9:.2f} GB in {len(list((work / 'hf').glob('*.safetensors')))} shards, "
              f"largest shard {largest / 1e9:.2f} GB, generated in {time.perf_counter() - t0:.0f} s", flush=True)

        steps = {
            "copy HF shards (+fsync)": lambda out: [py, "-c", COPY_SCRIPT, str(work / "hf"), str(out)],
            "hf-to-megatron": lambda out: [py, "-m", "megalong", "convert", "hf-to-megatron", str(work / "hf"),
                                           str(out)],
            "copy Megatron checkpoint (+fsync)": lambda out: [py, "-c", COPY_SCRIPT, str(work / "mcore"), str(out)],
            "megatron-to-hf": lambda out: [py, "-m", "megalong", "convert", "megatron-to-hf", str(work / "mcore"),
                                           str(out), "--tokenizer", "llama3", "--max-shard-size", f"{shard_gb}GB"],
            "start-up only (python, torch, DCP)": lambda out: [py, "-c", STARTUP_SCRIPT],
        }
        results: dict[str, list[tuple[float, int, float | None]]] = {name: [] for name in steps}
        print(f"Measuring {args.repeats} rounds (fresh process each; wall time includes start-up):", flush=True)
        for round_ in range(args.repeats):
            for name, argv in steps.items():
                # The first conversion to Megatron is kept: it is the input of megatron-to-hf.
                out = work / "mcore" if name == "hf-to-megatron" and round_ == 0 else work / "out"
                results[name].append(measure(argv(out)))
                if out == work / "out":
                    shutil.rmtree(out, ignore_errors=True)
                wall, peak, inner = results[name][-1]
                detail = f"   (converting {inner:.1f} s)" if inner is not None else ""
                print(f"  round {round_ + 1}: {name:36s} {wall:6.1f} s   peak RSS {peak / 1e9:5.2f} GB{detail}",
                      flush=True)

        def summary(name: str) -> tuple[float, int]:
            walls = [wall for wall, _, _ in results[name]]
            return median(walls), max(peak for _, peak, _ in results[name])

        startup, _ = summary("start-up only (python, torch, DCP)")
        print(f"Medians of {args.repeats} rounds (start-up of a converter process: {startup:.1f} s):")
        for name in steps:
            wall, peak = summary(name)
            walls = [w for w, _, _ in results[name]]
            print(f"  {name:36s} {wall:6.1f} s  (range {min(walls):.1f}-{max(walls):.1f})   peak RSS {peak / 1e9:5.2f} GB")
        print("Ratios (goal: time < 2.0x copy, peak RSS < 1.5x largest shard):")
        for name, copy in (("hf-to-megatron", "copy HF shards (+fsync)"),
                           ("megatron-to-hf", "copy Megatron checkpoint (+fsync)")):
            (wall, peak), (copy_wall, _) = summary(name), summary(copy)
            print(f"  {name:16s} time {wall / copy_wall:5.2f}x copy ({(wall - startup) / copy_wall:4.2f}x without "
                  f"start-up)   peak RSS {peak / largest:5.2f}x largest shard ({peak / total:4.2f}x the whole model)")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
