"""Memory and time of ``megalong eval``'s per-token losses at long lengths: chunked logits
against the full-logits baseline, on both runners.

For each runner (megalong weights, Hugging Face export), each length and each path:

* chunked: the runner's ``token_losses`` (``perplexity.chunk_tokens`` positions' logits at
  a time; what ``megalong eval`` does);
* full logits (baseline): the model's logits for every position at once, then the cross
  entropy (what the megalong runner did before: [positions, 128,256] fp32 logits plus
  their log-softmax).

Every case runs in a fresh Python process (``--repeat`` times; the best time and the
highest peak are shown): its peak RSS (``ru_maxrss``), its RSS once the model is loaded,
and the wall time of the losses alone. The model is a tiny random Llama-3
(2 layers, hidden 64, the real 128,256-token vocabulary), so the logits dominate. A
baseline that cannot fit in this machine's memory is not run; its need is estimated from
the size of its logits (2 x positions x vocabulary x 4 bytes) and printed instead.

    python benchmarks/eval_perplexity.py [--lengths 8K,32K,64K] [--runners megalong,hf] [--chunk 1024] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VOCAB = 128256
GB = 1e9


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def save_models(directory: str) -> None:
    """The two tiny models, in a process of their own (Megatron's writer needs one)."""
    from tests.eval.tiny_models import TINY_SHAPE, save_random_model

    save_random_model(f"{directory}/megalong")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=TINY_SHAPE["hidden_size"],
                         intermediate_size=TINY_SHAPE["ffn_hidden_size"], num_hidden_layers=TINY_SHAPE["num_layers"],
                         num_attention_heads=TINY_SHAPE["num_attention_heads"],
                         num_key_value_heads=TINY_SHAPE["num_query_groups"], max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(f"{directory}/hf")


def run_case(runner_kind: str, path: str, length: int, directory: str, chunk: int) -> dict:
    """One measurement (in a fresh process): load, then the losses of one random document."""
    import numpy as np
    import torch

    from megalong.eval.models import open_model

    runner = open_model(f"{directory}/{runner_kind}", runner_kind, "cpu", loss_chunk_tokens=chunk)
    ids = [int(t) for t in np.random.default_rng(0).integers(0, VOCAB, size=length)]
    loaded = _rss_peak_bytes()
    start = time.perf_counter()
    if path == "chunked":
        losses = torch.from_numpy(runner.token_losses(ids))
    else:
        with torch.inference_mode():
            if runner_kind == "hf":
                logits = runner.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1]
            else:
                tokens, positions = runner._inputs(ids[:-1])
                logits = runner.model(tokens, positions, attention_mask=None)[0, :, :VOCAB]
            losses = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(ids[1:]), reduction="none")
    seconds = time.perf_counter() - start
    return {"peak": _rss_peak_bytes(), "loaded": loaded, "seconds": seconds, "mean_loss": float(losses.mean())}


def _child(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"case {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _parse_length(text: str) -> int:
    text = text.strip().upper()
    return int(text[:-1]) * 1024 if text.endswith("K") else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="8K,32K,64K")
    parser.add_argument("--runners", default="megalong,hf")
    parser.add_argument("--chunk", type=int, default=1024, help="positions per logits chunk (perplexity.chunk_tokens)")
    parser.add_argument("--repeat", type=int, default=1, help="fresh processes per case (best time, highest peak)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # runner,path,length,directory: one measurement
    parser.add_argument("--save-models", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save_models:
        save_models(args.save_models)
        print("{}")
        return
    if args.case:
        runner_kind, path, length, directory = args.case.split(",", 3)
        print(json.dumps(run_case(runner_kind, path, int(length), directory, args.chunk)))
        return

    lengths = [_parse_length(n) for n in args.lengths.split(",")]
    runners = args.runners.split(",")
    print(f"torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}; logits chunk: {args.chunk} positions; "
          f"vocabulary {VOCAB}; {args.repeat} run(s) per case")
    print(f"{'runner':9s} {'length':>7s} {'path':12s} {'peak RSS':>9s} {'over load':>10s} {'time':>8s} "
          f"{'mean loss':>9s}   chunked / full logits")
    with tempfile.TemporaryDirectory() as tmp:
        _child(["--save-models", tmp])
        for runner_kind in runners:
            for length in lengths:
                paths = ["chunked"]
                # Logits and their log-softmax, fp32, plus ~1 GB for the process and the model.
                need, available = 2 * length * VOCAB * 4 + GB, _available_bytes()
                if need > 0.85 * available:
                    print(f"{runner_kind:9s} {length:>7d} {'full logits':12s} not run: needs ~{need / GB:.0f} GB, "
                          f"{available / GB:.0f} GB available")
                else:
                    paths.insert(0, "full")
                # Repeats alternate the paths, so a busy spell of the machine does not land on one path only.
                runs: dict = {path: [] for path in paths}
                for _ in range(args.repeat):
                    for path in paths:
                        runs[path].append(_child(["--case", f"{runner_kind},{path},{length},{tmp}",
                                                  "--chunk", str(args.chunk)]))
                best = {path: {"peak": max(x["peak"] for x in rs), "loaded": max(x["loaded"] for x in rs),
                               "seconds": min(x["seconds"] for x in rs), "mean_loss": rs[0]["mean_loss"]}
                        for path, rs in runs.items()}
                for path, r in best.items():
                    line = (f"{runner_kind:9s} {length:>7d} {'full logits' if path == 'full' else path:12s} "
                            f"{r['peak'] / GB:8.2f}G {max(0, r['peak'] - r['loaded']) / GB:9.2f}G "
                            f"{r['seconds']:7.1f}s {r['mean_loss']:9.4f}")
                    if path == "chunked" and "full" in best:
                        full = best["full"]
                        line += (f"   peak RSS x{r['peak'] / full['peak']:.3f}, time x{r['seconds'] / full['seconds']:.2f}, "
                                 f"mean loss diff {abs(r['mean_loss'] - full['mean_loss']):.1e}")
                    print(line, flush=True)

if __name__ == "__main__":
    main()
