"""Document-block skipping vs full causal attention on one packed sequence (CPU by default).

A packed training sequence holds many documents; attention never crosses their
boundaries, so the work that is needed is sum(len_i^2) / 2 instead of S^2 / 2. This
script packs documents with realistic lengths (log-normal around a few hundred tokens
with a long tail, like the short-data domains of the ProLong mixture) into one sequence
and times:

* baseline: full causal attention, one ``torch.nn.functional.scaled_dot_product_attention``
  call with ``is_causal=True`` (what attention costs without document skipping);
* the same SDPA backend of megalong with one document (full causal through its tiles);
* megalong's SDPA backend with the documents (document-block skipping);
* megalong's block kernel (the ring's per-step kernel, CP = 1), causal and documents.

It prints times, their ratios to the baseline, and the FLOP ratio sum(len^2) / S^2 that
document skipping approaches as tiles get small relative to documents.

    python benchmarks/attention.py [--seq-length 16384] [--tile 256] [--backward]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megalong.model.attention.blocks import plan_blocks  # noqa: E402
from megalong.data.cp_shard import load_balanced_index  # noqa: E402
from megalong.model.attention.layout import DocumentLayout  # noqa: E402
from megalong.model.attention.local import sdpa_attention  # noqa: E402
from megalong.model.attention.ring import needed_steps, ring_attention  # noqa: E402


def realistic_boundaries(seq_length: int, seed: int, median: float) -> torch.Tensor:
    """Pack log-normal document lengths (median ``median``, long tail) into one sequence."""
    generator = torch.Generator().manual_seed(seed)
    cuts, position = [0], 0
    while position < seq_length:
        length = int(math.exp(math.log(median) + 1.2 * torch.randn((), generator=generator).item()))
        position = min(seq_length, position + max(8, length))
        cuts.append(position)
    return torch.tensor(cuts)


def timed(fn, repeats: int, backward: bool) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        if backward:
            out.sum().backward()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-length", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=4, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--tile", type=int, default=256, help="query/key tile of the skipping kernels")
    parser.add_argument("--median-doc", type=float, default=600.0, help="median document length, tokens")
    parser.add_argument("--repeats", type=int, default=2, help="best of N")
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--skip-block-kernel", action="store_true", help="time only the SDPA paths")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    seq, d = args.seq_length, args.head_dim
    cu = realistic_boundaries(seq, args.seed, args.median_doc)
    lengths = (cu[1:] - cu[:-1]).double()
    flop_ratio = float((lengths ** 2).sum() / seq ** 2)
    documents = DocumentLayout.from_sample_cu_seqlens([cu], seq)
    causal = DocumentLayout.causal(1, seq)
    pos = load_balanced_index(seq, 1, 0)
    tile_ratio = plan_blocks(pos, documents.doc_ids, pos, documents.doc_ids, args.tile).visible_pairs / \
        plan_blocks(pos, causal.doc_ids, pos, causal.doc_ids, args.tile).visible_pairs

    grad = args.backward
    q = torch.randn(seq, 1, args.heads, d, requires_grad=grad)
    k = torch.randn(seq, 1, args.kv_heads, d, requires_grad=grad)
    v = torch.randn(seq, 1, args.kv_heads, d, requires_grad=grad)
    scale = 1.0 / math.sqrt(d)
    print(f"packed sequence: {seq} tokens, {len(lengths)} documents (median {lengths.median():.0f}, "
          f"longest {lengths.max():.0f}); {args.heads} query / {args.kv_heads} KV heads of {d}; "
          f"tile {args.tile}; {'forward + backward' if grad else 'forward'}; "
          f"{torch.get_num_threads()} thread(s)")
    print(f"FLOP ratio documents / full causal = sum(len^2)/S^2 = {flop_ratio:.4f} "
          f"(ideal speed-up x{1 / flop_ratio:.1f}); visible tile pairs, documents / causal = {tile_ratio:.4f} "
          f"(x{1 / tile_ratio:.1f} at tile {args.tile})")
    ring_steps = ", ".join(
        f"CP={cp}: {len(needed_steps(documents, cp, args.tile)) - 1} of {cp - 1}" for cp in (2, 4, 8)
        if seq % (2 * cp * args.tile) == 0
    )
    print(f"ring K/V exchanges this packing needs (the others are skipped): {ring_steps}")

    def baseline():
        qb, kb, vb = (x.permute(1, 2, 0, 3) for x in (q, k, v))
        return F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=True)

    runs = [("full causal, one SDPA call (baseline)", baseline),
            ("megalong SDPA backend, one document", lambda: sdpa_attention(q, k, v, causal, scale, args.tile)),
            ("megalong SDPA backend, documents", lambda: sdpa_attention(q, k, v, documents, scale, args.tile))]
    if not args.skip_block_kernel:
        runs += [("block kernel (ring step), one document", lambda: ring_attention(q, k, v, causal, None, scale, args.tile)),
                 ("block kernel (ring step), documents", lambda: ring_attention(q, k, v, documents, None, scale, args.tile))]
    times = {}
    for name, fn in runs:
        times[name] = timed(fn, args.repeats, grad)
        base = times[runs[0][0]]
        print(f"  {name:42s} {times[name] * 1000:9.1f} ms   x{base / times[name]:5.2f} vs baseline")
    doc_vs_causal = times["megalong SDPA backend, one document"] / times["megalong SDPA backend, documents"]
    print(f"document-block skipping vs full causal, same SDPA backend: x{doc_vs_causal:.2f} faster "
          f"(time ratio {1 / doc_vs_causal:.4f}; FLOP ratio {flop_ratio:.4f}); vs the one-call baseline: "
          f"x{times[runs[0][0]] / times['megalong SDPA backend, documents']:.2f}")
    if not args.skip_block_kernel:
        kernel = times["block kernel (ring step), one document"] / times["block kernel (ring step), documents"]
        print(f"block kernel, documents vs one document: x{kernel:.2f} faster (time ratio {1 / kernel:.4f}; "
              f"tile-pair ratio {tile_ratio:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
