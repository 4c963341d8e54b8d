"""How fast ``megalong eval`` builds long prompts, and what a KV cache saves when decoding.

1. Building a recall prompt of N tokens (token-level assembly, the real Llama-3 tokenizer)
   against the baseline of just tokenizing the same text once with tiktoken.
2. Greedy decoding with the megalong runner (Megatron-Core static KV cache, last-position
   logits) against the baseline of recomputing the whole sequence for every new token, on
   a tiny random model (real Llama-3 vocabulary) saved with save_weights.

    python benchmarks/eval_prompts_and_decoding.py [--length 131072] [--decode-prompt 2048]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _best_of(runs: int, fn) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_prompts(length: int) -> None:
    from megalong.data.tokenizer import load_tokenizer
    from megalong.eval import tasks
    from megalong.eval.prompts import PromptFormatter

    tokenizer = load_tokenizer("llama3")
    formatter = PromptFormatter(tokenizer, "chat")
    for task in tasks.TASKS:
        sample = tasks.generate(task, tokenizer, formatter, length, 0.5, 0)
        text = tokenizer.decode(sample.input_ids)
        build = _best_of(3, lambda: tasks.generate(task, tokenizer, formatter, length, 0.5, 0))
        encode = _best_of(3, lambda: tokenizer.encode(text))
        print(f"prompt {task:16s} {sample.num_tokens:>7d} tokens: built in {build * 1e3:7.1f} ms "
              f"({sample.num_tokens / build / 1e6:5.2f} M tok/s); tokenizing its text once takes "
              f"{encode * 1e3:7.1f} ms -> ratio build/encode = {build / encode:.2f}")


def bench_decoding(prompt_length: int, new_tokens: int) -> None:
    import tempfile

    import numpy as np

    from megalong.eval.models import MegalongModel

    from tests.eval.tiny_models import save_random_model

    with tempfile.TemporaryDirectory() as tmp:
        save_random_model(f"{tmp}/tiny")
        runner = MegalongModel(f"{tmp}/tiny", "auto")
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, runner.vocab_size, size=prompt_length)]
    cached_ids = runner.greedy_generate(prompt, new_tokens, [])
    assert cached_ids == runner.greedy_generate_recompute(prompt, new_tokens, [])
    cached = _best_of(2, lambda: runner.greedy_generate(prompt, new_tokens, []))
    full = _best_of(2, lambda: runner.greedy_generate_recompute(prompt, new_tokens, []))
    print(f"megalong runner, decode {new_tokens} tokens after a {prompt_length}-token prompt: "
          f"KV cache {cached:.2f} s, recompute (baseline) {full:.2f} s -> speed-up x{full / cached:.1f} "
          f"(same tokens)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--decode-prompt", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    bench_prompts(args.length)
    bench_decoding(args.decode_prompt, args.new_tokens)


if __name__ == "__main__":
    main()
