#!/usr/bin/env python
"""Preprocessing throughput against the tokenizer alone, and peak memory vs corpus size.

Builds a JSONL corpus from the Python standard library's sources on this machine (one
document per file, repeated up to --corpus-mb), then measures:

1. baseline: the same texts, already in memory, through the same tokenizer with the same
   number of threads (``Tokenizer.encode_batch`` = tiktoken's encode_ordinary_batch), no I/O;
2. ``megalong preprocess`` end to end in a subprocess with --workers N (reading, parsing,
   tokenizing, writing shards; then the merge), and its tokenize stage alone;
3. the same run on a corpus --scale-up times larger, for peak memory (the sum of the RSS of
   the run's processes, sampled every 50 ms, and the largest single process).

Token counts exclude the BOS/EOS the preprocessor adds, so both sides count the same tokens.

    OMP_NUM_THREADS=1 python benchmarks/preprocess.py --corpus-mb 40 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def build_corpus(path: Path, target_bytes: int) -> list[str]:
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    texts, total = [], 0
    while total < target_bytes:
        for source in sources:
            try:
                text = source.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip():
                continue
            texts.append(text)
            total += len(text.encode("utf-8"))
            if total >= target_bytes:
                break
    with open(path, "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")
    return texts


def tokenizer_alone(texts: list[str], spec: str, threads: int) -> tuple[int, float]:
    from megalong.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(spec, threads=threads)
    tokenizer.encode_batch(texts[:50])  # warm up
    start = time.perf_counter()
    tokens = 0
    for first in range(0, len(texts), 2000):
        tokens += sum(len(ids) for ids in tokenizer.encode_batch(texts[first : first + 2000]))
    return tokens, time.perf_counter() - start


def tokenize_stage_in_process(corpus: Path, prefix: Path, tokenizer, workers: int) -> tuple[int, float]:
    """Plan + tokenize stage with real worker processes, timed without interpreter start-up and
    tokenizer loading (which the tokenizer-alone baseline does not pay either)."""
    import shutil

    from megalong.data.preprocess import PreprocessConfig
    from megalong.data.preprocess.pipeline import load_or_create_plan, tokenize_shards

    cfg = PreprocessConfig(inputs=[str(corpus)], output_prefix=str(prefix), tokenizer=tokenizer.spec, workers=workers)
    shutil.rmtree(cfg.work_dir, ignore_errors=True)
    start = time.perf_counter()
    plan = load_or_create_plan(cfg, tokenizer)
    totals = tokenize_shards(cfg, plan, tokenizer, progress_stream=open(os.devnull, "w"))
    seconds = time.perf_counter() - start
    shutil.rmtree(cfg.work_dir)
    return totals["tokens"] - 2 * totals["documents"], seconds


def run_measured(argv: list[str]) -> dict:
    """Run a command; wall time and peak memory of its process tree."""
    import psutil

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    start = time.perf_counter()
    process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(process.pid)
    peak_sum = peak_single = 0
    while process.poll() is None:
        try:
            rss = [p.memory_info().rss for p in [root, *root.children(recursive=True)]]
        except psutil.Error:
            rss = []
        if rss:
            peak_sum, peak_single = max(peak_sum, sum(rss)), max(peak_single, max(rss))
        time.sleep(0.05)
    wall = time.perf_counter() - start
    output = process.stdout.read()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{output}")
    return {"wall": wall, "peak_rss_sum": peak_sum, "peak_rss_single": peak_single, "output": output}


def preprocess(corpus: Path, prefix: Path, workers: int, spec: str) -> dict:
    """The tokenize stage and the merge as two measured commands (as a SLURM pipeline runs them)."""
    stages = {}
    for stage in ("tokenize", "merge"):
        stages[stage] = run_measured([sys.executable, "-m", "megalong", "preprocess", "--input", str(corpus),
                                      "--output-prefix", str(prefix), "--tokenizer", spec,
                                      "--workers", str(workers), "--stage", stage])
    sidecar = json.loads(Path(f"{prefix}.json").read_text())
    return {"tokenize": stages["tokenize"]["wall"], "merge": stages["merge"]["wall"],
            "peak_rss_sum": max(r["peak_rss_sum"] for r in stages.values()),
            "peak_rss_single": max(r["peak_rss_single"] for r in stages.values()),
            "sidecar": sidecar, "output": stages["tokenize"]["output"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-mb", type=float, default=40.0)
    parser.add_argument("--scale-up", type=int, default=3, help="size factor of the second corpus (memory check)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tokenizer", default="llama3")
    parser.add_argument("--repeat", type=int, default=2,
                        help="measure baseline and preprocessing this many times, alternating, and keep the best "
                             "of each (other load on the machine only ever slows a run down)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="megalong-bench-") as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        texts = build_corpus(corpus, int(args.corpus_mb * (1 << 20)))
        size_mb = corpus.stat().st_size / (1 << 20)
        print(f"corpus: {len(texts):,} documents of Python stdlib source, {size_mb:.1f} MB JSONL")

        from megalong.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        base_time = stage_time = float("inf")
        for attempt in range(args.repeat):
            base_tokens, seconds = tokenizer_alone(texts, args.tokenizer, args.workers)
            stage_tokens, stage_seconds = tokenize_stage_in_process(corpus, tmp / "stage", tokenizer, args.workers)
            print(f"  try {attempt + 1}: tokenizer alone {seconds:.2f} s, preprocess tokenize stage {stage_seconds:.2f} s")
            base_time, stage_time = min(base_time, seconds), min(stage_time, stage_seconds)
        if stage_tokens != base_tokens:
            print(f"WARNING: token counts differ: preprocess {stage_tokens:,} vs tokenizer alone {base_tokens:,}")
        base_rate, stage_rate = base_tokens / base_time, stage_tokens / stage_time
        print(f"tokenizer alone ({args.workers} threads, texts in memory): {base_tokens:,} tokens in "
              f"{base_time:.2f} s = {base_rate / 1e6:.2f}M tokens/s")
        print(f"preprocess tokenize stage ({args.workers} worker processes; planning, reading, parsing, "
              f"writing shards): {stage_time:.2f} s = {stage_rate / 1e6:.2f}M tokens/s")
        del texts

        small = preprocess(corpus, tmp / "out", args.workers, args.tokenizer)
        sidecar = small["sidecar"]
        tokens = sidecar["tokens"] - sidecar["documents"] * 2  # without the added BOS/EOS
        if tokens != base_tokens:
            print(f"WARNING: token counts differ: preprocess {tokens:,} vs tokenizer alone {base_tokens:,}")
        total = small["tokenize"] + small["merge"]
        total_rate = tokens / total
        print(f"megalong preprocess --workers {args.workers} as commands ({sidecar['shards']} shards): "
              f"--stage tokenize {small['tokenize']:.2f} s + --stage merge {small['merge']:.2f} s (each with "
              f"interpreter start-up and tokenizer loading) = {total_rate / 1e6:.2f}M tokens/s end to end")
        print(f"  peak RSS: {small['peak_rss_sum'] / 2**20:.0f} MiB all processes, "
              f"{small['peak_rss_single'] / 2**20:.0f} MiB largest process")

        big = tmp / "corpus_big.jsonl"
        with open(big, "wb") as out:
            for _ in range(args.scale_up):
                with open(corpus, "rb") as handle:
                    while block := handle.read(1 << 24):
                        out.write(block)
        corpus.unlink()
        for name in ("out.bin", "out.idx", "out.json"):
            (tmp / name).unlink()
        big_run = preprocess(big, tmp / "big", args.workers, args.tokenizer)
        big_tokens = big_run["sidecar"]["tokens"] - big_run["sidecar"]["documents"] * 2
        print(f"{args.scale_up}x corpus ({big.stat().st_size / 2**20:.0f} MB, {big_run['sidecar']['shards']} shards): "
              f"tokenize stage {big_tokens / big_run['tokenize'] / 1e6:.2f}M tokens/s, "
              f"peak RSS {big_run['peak_rss_sum'] / 2**20:.0f} MiB all processes, "
              f"{big_run['peak_rss_single'] / 2**20:.0f} MiB largest process")

        print("\nsummary")
        print(f"  preprocess / tokenizer alone, tokenize stage: {stage_rate / base_rate:.2f}x")
        print(f"  preprocess / tokenizer alone, end to end (2 commands): {total_rate / base_rate:.2f}x")
        print(f"  peak memory, {args.scale_up}x corpus / 1x corpus:      "
              f"{big_run['peak_rss_sum'] / max(small['peak_rss_sum'], 1):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
