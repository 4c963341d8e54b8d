"""Packing benchmark: index build for 1B tokens, packed samples/s at 64K, DP balancing.

    python benchmarks/packing.py [--tokens 1e9] [--seq-length 65536] [--samples 96]

1. Index build. Document lengths for ``--tokens`` tokens are *simulated* (no token is
   written): the ProLong stage-1 mixture's shares, long domains with lognormal lengths
   (median ~150K tokens, only documents >= seq_length kept, as ProLong cut them), short
   domains with lognormal lengths (median ~700 tokens, heavy tail). Timed: building every
   domain's packing index (what TrainStream does at start-up), the blending of all the
   samples those tokens make, and the layout of every one of those samples (a full pass).
   Baseline, same run: Megatron-Core's GPTDataset index for the same documents as one
   concatenated stream (document index shuffle + compiled build_sample_idx + shuffle
   index), the work Megatron does before its first step.
2. Packed samples/s at ``--seq-length``: real indexed datasets written to a temporary
   directory (a long and a short domain, ~``--samples`` samples each), read through
   TrainStream.batch_for_step. Baseline: the same tokens read as bare contiguous slices
   from Megatron-Core's IndexedDataset (the floor any loader pays).
3. Balancing: on realistic 64K global batches, the sum over micro-batches of the slowest
   DP rank's attention cost, balanced vs in mixture order.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

STAGE1 = [  # name, share, kind
    ("code_repos_64k", 0.30, "long"), ("books_64k", 0.30, "long"), ("fineweb_edu", 0.10, "concat"),
    ("fineweb", 0.10, "concat"), ("stackexchange", 0.04, "concat"), ("wikipedia", 0.04, "concat"),
    ("tulu_v2", 0.03, "concat"), ("arxiv", 0.03, "concat"), ("openwebmath", 0.03, "concat"),
    ("textbooks", 0.03, "concat"),
]


def simulated_lengths(kind: str, tokens: int, seq_length: int, rng) -> np.ndarray:
    """Document lengths summing to about ``tokens`` (lognormal; long kinds start at seq_length)."""
    if kind == "long":
        mean = np.exp(np.log(150_000) + 1.0**2 / 2)
        n = max(1, int(tokens / mean))
        lengths = rng.lognormal(np.log(150_000), 1.0, size=n)
        lengths = np.maximum(lengths, seq_length)  # the preprocess filter kept only >= seq_length
    else:
        mean = np.exp(np.log(700) + 1.3**2 / 2)
        n = max(1, int(tokens / mean))
        lengths = rng.lognormal(np.log(700), 1.3, size=n) + 1
    return lengths.astype(np.int64)


def bench_index_build(total_tokens: int, seq_length: int, mix=STAGE1) -> None:
    from megatron.core.datasets import helpers
    from megatron.core.datasets.gpt_dataset import _build_document_index, _build_shuffle_index

    from megalong.data.mixture import Blend
    from megalong.data.packing import build_index

    rng = np.random.default_rng(0)
    per_domain = [simulated_lengths(kind, int(total_tokens * share), seq_length, rng) for _, share, kind in mix]
    all_lengths = np.concatenate(per_domain)
    label = "stage-1 shares" if mix is STAGE1 else "short documents only"
    print(f"[index] simulated {all_lengths.size:,} documents, {int(all_lengths.sum()):,} tokens "
          f"({label}; long domains median 150K tokens, short median 700)")

    t0 = time.perf_counter()
    indices = [build_index(kind, lengths, seq_length, seed=1, name=name)
               for (name, _, kind), lengths in zip(mix, per_domain)]
    for index in indices:  # epochs are built lazily: count the first epoch's shuffle here
        index.layout(0)
    t_build = time.perf_counter() - t0
    num_samples = int(all_lengths.sum()) // seq_length
    t0 = time.perf_counter()
    blend = Blend(np.array([share for _, share, _ in mix]))
    domains, samples = blend.lookup(0, num_samples)
    t_blend = time.perf_counter() - t0
    t0 = time.perf_counter()
    pieces = 0
    for d, j in zip(domains.tolist(), samples.tolist()):
        pieces += indices[d].layout(j).documents.size
    t_layouts = time.perf_counter() - t0

    # Baseline: Megatron-Core's GPTDataset index over the same documents.
    t0 = time.perf_counter()
    sizes = all_lengths.astype(np.int32)
    state = np.random.RandomState(1)
    document_index = _build_document_index(np.arange(sizes.size, dtype=np.int32), 1, state, False)
    sample_index = helpers.build_sample_idx(sizes, document_index, seq_length, 1, int(all_lengths.sum()), True, True)
    _build_shuffle_index(sample_index.shape[0] - 1, sample_index.shape[0] - 1, state)
    t_megatron = time.perf_counter() - t0

    ours = t_build + t_blend
    print(f"[index] megalong: domain indices with epoch-0 shuffles {t_build:.3f} s + blending {num_samples:,} samples "
          f"{t_blend:.3f} s = {ours:.3f} s")
    print(f"[index] megalong: layouts of all {num_samples:,} samples ({pieces:,} document pieces): "
          f"{t_layouts:.3f} s ({num_samples / t_layouts:,.0f} layouts/s)")
    print(f"[index] baseline Megatron-Core GPTDataset index (doc shuffle + build_sample_idx + shuffle): "
          f"{t_megatron:.3f} s")
    print(f"[index] ratio megalong start-up / Megatron-Core: {ours / t_megatron:.2f}x; "
          f"including a full pass of layouts: {(ours + t_layouts) / t_megatron:.2f}x")


def bench_samples_per_second(seq_length: int, samples: int) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from megalong.data.config import DataConfig
    from megalong.data.mixture import DomainSpec
    from megalong.data.stream import TrainStream

    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory(prefix="megalong-bench-packing-") as tmp:
        specs = []
        for name, kind in (("long", "long"), ("short", "concat")):
            lengths = simulated_lengths(kind, samples * seq_length, seq_length, rng)
            builder = IndexedDatasetBuilder(f"{tmp}/{name}.bin", dtype=np.int32)
            for n in lengths:
                builder.add_document(rng.integers(0, 128_000, size=int(n), dtype=np.int32), [int(n)])
            builder.finalize(f"{tmp}/{name}.idx")
            specs.append(DomainSpec(name=name, weight=50, kind=kind, paths=[f"{tmp}/{name}"]))
        cfg = DataConfig(domains=specs, seq_length=seq_length, seed=1)
        gbs = 8
        stream = TrainStream(cfg, gbs, 1)
        steps = max(1, (samples // 2) // gbs)
        stream.batch_for_step(0, 0)  # warm the page cache and the epoch arrays
        t0 = time.perf_counter()
        n = 0
        for step in range(steps):
            n += len(stream.batch_for_step(step, 0))
        t_ours = time.perf_counter() - t0

        # Baseline: the same number of contiguous seq_length+1 token reads, no packing logic.
        ds = IndexedDataset(f"{tmp}/short")
        lengths = ds.sequence_lengths
        starts = np.concatenate([[0], np.cumsum(lengths)])
        t0 = time.perf_counter()
        for k in range(n):
            pos = (k * seq_length) % max(1, int(starts[-1]) - seq_length - 1)
            doc = int(np.searchsorted(starts, pos, side="right") - 1)
            out, need, off = [], seq_length + 1, pos - int(starts[doc])
            while need:
                take = min(need, int(lengths[doc]) - off)
                out.append(ds.get(doc, offset=off, length=take))
                need -= take
                doc, off = doc + 1, 0
            np.concatenate(out).astype(np.int64)
        t_raw = time.perf_counter() - t0
    ours = n / t_ours
    raw = n / t_raw
    print(f"[samples] {seq_length:,}-token packed samples via TrainStream.batch_for_step: {ours:,.1f} samples/s "
          f"({ours * seq_length / 1e6:,.1f}M tokens/s)")
    print(f"[samples] baseline bare IndexedDataset reads of the same sizes: {raw:,.1f} samples/s")
    print(f"[samples] ratio packed / bare reads: {ours / raw:.2f}")


def bench_balancing(seq_length: int) -> None:
    from megalong.data.balance import assign_by_attention_cost, step_time_proxy
    from megalong.data.packing import build_index

    rng = np.random.default_rng(2)
    indices = [build_index(kind, simulated_lengths(kind, 200 * seq_length, seq_length, rng), seq_length, 1, name)
               for name, _, kind in STAGE1]
    from megalong.data.mixture import Blend

    blend = Blend(np.array([share for _, share, _ in STAGE1]))
    gbs, dp = 64, 8
    ratios = []
    for step in range(20):
        domains, samples = blend.lookup(step * gbs, gbs)
        costs = np.array([indices[d].layout(j).attention_cost for d, j in zip(domains, samples)], dtype=float)
        in_order = [list(range(r * (gbs // dp), (r + 1) * (gbs // dp))) for r in range(dp)]
        interleaved = [list(range(r, gbs, dp)) for r in range(dp)]
        balanced = assign_by_attention_cost(costs, dp)
        ratios.append((step_time_proxy(costs, in_order), step_time_proxy(costs, interleaved),
                       step_time_proxy(costs, balanced)))
    r = np.array(ratios).mean(axis=0)
    print(f"[balance] global batch {gbs} x {seq_length:,} over {dp} DP ranks, stage-1 mix: attention-time proxy "
          f"(sum over micro-batches of the slowest rank) balanced / contiguous = {r[2] / r[0]:.2f}, "
          f"balanced / round-robin = {r[2] / r[1]:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=float, default=1e9, help="tokens for the index-build test")
    parser.add_argument("--seq-length", type=int, default=65536)
    parser.add_argument("--samples", type=int, default=96, help="samples per domain written for the read test")
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    bench_index_build(int(args.tokens), args.seq_length)
    # The harder case for the index: every token in short documents (~600K documents per 1B tokens).
    bench_index_build(int(args.tokens), args.seq_length, mix=[("web", 1.0, "concat")])
    bench_samples_per_second(args.seq_length, args.samples)
    bench_balancing(args.seq_length)
    return 0


if __name__ == "__main__":
    sys.exit(main())
