"""Step time of `megalong train` against a bare Megatron-Core training step, and proof that both
compute the same thing.

The same model (same initial weights) and data are stepped two ways, alternating so that
machine noise hits both alike:

* megalong: ``Trainer.train_step`` plus what ``Trainer.fit`` does around it every step
  (stop-signal check, metrics record);
* bare Megatron-Core: the floor any trainer on Megatron-Core pays per step. The same
  model chunks (``build_model``, same seed), in Megatron DDP with Megatron's optimizer and
  LR scheduler built from the same settings (``wrap_with_ddp``, ``build_optimizer``,
  ``build_scheduler``), stepped by ``get_forward_backward_func`` with a minimal forward step
  on micro-batches prebuilt as device tensors (documents included), ``optimizer.step()`` and
  the scheduler's step, as Megatron-LM's own loop does.

Both sides do the same computation in the same order on identical weights and batches, so
on the CPU their losses are bitwise equal at every step, in fp32 and in bf16 (checked, exit 1
otherwise): any difference is a difference in what is computed. (Without the scheduler the
bare side once decayed the norm weights, which Megatron-Core's scheduler exempts through
their weight-decay multiplier of 0: a drift of 1e-5 over 43 steps that looked like rounding.)
On a GPU the attention backward's atomics are nondeterministic: the two sides' gradients
differ by about one bf16 ulp, and the check allows 2^-8 relative.
It prints the median step times and their ratio (goal: overhead under 5%).

CPU mode (default): a tiny Llama-3-shaped model, fp32 (``--bf16``: bf16, as real runs train).
GPU mode (``--gpu``, needs Transformer
Engine): a Llama-3-8B-shaped model with few layers in bf16; the defaults (2 layers, 16K tokens,
chunked cross entropy) keep both sides' weights, gradients and optimizer states plus one
step's activations within one 80 GB GPU, and megalong's planner is asked before anything is
built. Tokens/s, TFLOP/s and MFU at 64K on all the layers that fit are gpu_check's figures
(``python tools/gpu_check.py --out DIR --only figures``). Not run on a GPU in this project yet.

    python benchmarks/train_step.py                 # CPU
    python benchmarks/train_step.py --gpu           # one GPU
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalong.data.sample import PackedSample  # noqa: E402

# Distinct batches; both sides cycle through the same ones.
BATCHES = 4
CPU_REL_TOLERANCE = 0.0  # the same computation in the same order: bitwise (see the docstring)
GPU_REL_TOLERANCE = 2.0**-8


class SyntheticStream:
    """Random-token packed samples: documents of fixed length, deterministic per step (cycling)."""

    def __init__(self, vocab: int, seq_length: int, per_rank: int, doc_length: int):
        self.vocab, self.seq_length, self.per_rank, self.doc_length = vocab, seq_length, per_rank, doc_length

    def batch_for_step(self, step: int, dp_rank: int) -> list[PackedSample]:
        rng = np.random.default_rng([step % BATCHES, dp_rank])
        out = []
        for _ in range(self.per_rank):
            t = rng.integers(0, self.vocab, self.seq_length + 1)
            cu = np.unique(np.r_[np.arange(0, self.seq_length, self.doc_length), self.seq_length]).astype(np.int32)
            doc_end = np.zeros(self.seq_length, np.float32)
            doc_end[cu[1:] - 1] = 1
            pos = np.concatenate([np.arange(n) for n in np.diff(cu)])
            out.append(PackedSample(t[:-1], t[1:], 1 - doc_end, pos, cu))
        return out

    def describe(self) -> str:
        return f"synthetic random tokens, documents of {self.doc_length} tokens"


def build_run(args):
    from megalong.config import from_dict
    from megalong.training import RunConfig

    model = {"preset": "llama3-8b", "num_layers": args.layers, "max_position_embeddings": args.seq_length,
             "params_dtype": "bf16", "transformer_impl": "transformer_engine"} if args.gpu else {
        "preset": "test-tiny", "transformer_impl": "local", "max_position_embeddings": args.seq_length,
        "params_dtype": "bf16" if args.bf16 else "fp32"}
    return from_dict(RunConfig, {
        "model": model,
        "data": {"seq_length": args.seq_length},
        "data_factory": "unused:unused",
        # Constant learning rate (both sides step the same Megatron-Core scheduler).
        "optimizer": {"lr": 1e-4, "min_lr": 1e-4},
        "schedule": {"train_steps": 10_000, "global_batch_size": args.global_batch, "lr_warmup_steps": 0,
                     "lr_decay_style": "constant"},
        "loss": {"chunk_tokens": args.loss_chunk_tokens},
        "logging": {"log_interval": 10_000, "peak_tflops": args.peak_tflops},
        "runtime": {"device": "cuda" if args.gpu else "cpu"},
    }, "benchmark")


def check_gpu_memory(run, device_memory_bytes: float) -> None:
    """Refuse (with the planner's numbers) a GPU run whose two models will not fit one GPU."""
    from megalong.plan.hardware import GpuSpec
    from megalong.plan.memory import TrainingShape
    from megalong.plan.planner import check_fits

    shape = TrainingShape(run.data.seq_length, loss_chunk_tokens=run.loss.chunk_tokens or None,
                          num_microbatches=run.schedule.global_batch_size)
    one = check_fits(run.resolved_model(), run.parallel, shape, world_size=1,
                     gpu=GpuSpec.of_memory("this GPU", device_memory_bytes / 1e9))
    both = one.memory.total + one.memory.static  # a second copy of weights, gradients and optimizer states
    if both > one.usable_bytes:
        raise SystemExit(f"the two sides need about {both / 1e9:.0f} GB (one side: {one.memory.describe()}), this GPU "
                         f"has {device_memory_bytes / 1e9:.0f} GB: lower --layers or --seq-length")
    print(f"planner: both sides together about {both / 1e9:.0f} GB of {device_memory_bytes / 1e9:.0f} GB")


class BareMegatronStep:
    """The floor: Megatron-Core's step loop and nothing else, on the same kind of model and optimizer."""

    def __init__(self, trainer, batches):
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.utils import get_model_config

        from megalong.model.llama import build_model
        from megalong.runtime.distributed import set_seed
        from megalong.training.optimizer import build_optimizer, build_scheduler, wrap_with_ddp

        run = trainer.run
        set_seed(run.seed)  # the Trainer's initial weights
        chunks = build_model(trainer.model_config, run.parallel, on_gpu=trainer.runtime.on_gpu,
                             loss_chunk_tokens=run.loss.chunk_tokens)
        config = get_model_config(chunks[0])
        self.model = wrap_with_ddp(chunks, run)
        self.optimizer = build_optimizer(self.model, run)
        self.scheduler = build_scheduler(self.optimizer, run)
        config.grad_scale_func = self.optimizer.scale_loss
        config.finalize_model_grads_func = finalize_model_grads
        self.forward_backward = get_forward_backward_func()
        self.batches = batches
        self.seq_length = run.data.seq_length
        self.last_loss = float("nan")

    @staticmethod
    def _loss(loss_mask, output):
        mask = loss_mask.reshape(-1).float()
        losses = (output.float().reshape(-1) * mask).sum()
        return losses, mask.sum().to(int), {"lm loss": (losses.detach(), mask.sum())}

    def _forward(self, iterator, model):
        tokens, labels, loss_mask, positions, packed = next(iterator)
        return model(tokens, positions, None, labels=labels, packed_seq_params=packed), partial(self._loss, loss_mask)

    def step(self, step: int) -> None:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        batches = self.batches[step % len(self.batches)]
        reports = self.forward_backward(forward_step_func=self._forward, data_iterator=iter(batches),
                                        model=self.model, num_microbatches=len(batches),
                                        seq_length=self.seq_length, micro_batch_size=1, forward_only=False)
        update_successful, _, _ = self.optimizer.step()
        if update_successful:
            self.scheduler.step(increment=1)
        total = sum(float(r["lm loss"][0]) for r in reports)
        self.last_loss = total / sum(float(r["lm loss"][1]) for r in reports)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="GPU mode: Llama-3-8B shape, fewer layers, BF16, TE")
    parser.add_argument("--bf16", action="store_true", help="CPU mode in bf16 (GPU mode always is)")
    parser.add_argument("--layers", type=int, default=None, help="default: 4 (test-tiny) on CPU, 2 on GPU")
    parser.add_argument("--seq-length", type=int, default=None, help="default: 256 on CPU, 16384 on GPU")
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--doc-length", type=int, default=None, help="document length (default: whole sample)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per side (default 40 CPU, 10 GPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--loss-chunk-tokens", type=int, default=None,
                        help="chunked cross entropy on both sides (default: 0 on CPU, 4096 on GPU)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU (H100/H200: 989)")
    args = parser.parse_args()
    args.layers = args.layers or (2 if args.gpu else 4)
    args.seq_length = args.seq_length or (16384 if args.gpu else 256)
    args.steps = args.steps or (10 if args.gpu else 40)
    args.loss_chunk_tokens = (4096 if args.gpu else 0) if args.loss_chunk_tokens is None else args.loss_chunk_tokens
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(level=logging.WARNING)

    import torch

    from megalong.runtime.distributed import init_distributed
    from megalong.training.metrics import MetricsWriter
    from megalong.training.signals import StopWatch
    from megalong.training.trainer import Trainer

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    run = build_run(args)
    if args.gpu:
        check_gpu_memory(run, torch.cuda.get_device_properties(0).total_memory)
    runtime = init_distributed(run.parallel, device=run.runtime.device)
    vocab = 512 if not args.gpu else 128256
    stream = SyntheticStream(vocab, args.seq_length, args.global_batch // runtime.data_parallel_size,
                             args.doc_length or args.seq_length)
    trainer = Trainer(run, runtime, stream=stream).setup()
    stop = StopWatch(device=runtime.device)
    metrics = MetricsWriter(enabled=False, train_steps=run.schedule.train_steps)
    sync = torch.cuda.synchronize if runtime.on_gpu else (lambda: None)

    # The bare loop gets the same micro-batches, already as device tensors.
    prebuilt = []
    for step in range(BATCHES):
        mbs = trainer.batcher.split(stream.batch_for_step(step, trainer.dp_rank), trainer.num_microbatches)
        prebuilt.append([(m.tokens, m.labels, m.loss_mask, m.position_ids, m.packed_seq_params) for m in mbs])
    bare = BareMegatronStep(trainer, prebuilt)

    def megalong_step(i):
        nonlocal last
        last = trainer.train_step(i)
        metrics.record(last)
        stop.should_stop()

    def timed(fn, i) -> float:
        sync(); t0 = time.perf_counter()
        fn(i)
        sync()
        return time.perf_counter() - t0

    ours, floor, last, differences = [], [], None, []
    for i in range(args.warmup + args.steps):
        # Alternate which side goes first, so drifting machine load hits both alike.
        if i % 2:
            a, b = timed(megalong_step, i), timed(bare.step, i)
        else:
            b, a = timed(bare.step, i), timed(megalong_step, i)
        differences.append(abs(last.loss - bare.last_loss) / abs(bare.last_loss))
        if i >= args.warmup:
            ours.append(a)
            floor.append(b)

    ours_s, floor_s = statistics.median(ours), statistics.median(floor)
    tokens = args.global_batch * args.seq_length
    cpu_model = f"test-tiny (4 layers, hidden 64), {'bf16' if args.bf16 else 'fp32'} on CPU"
    print(f"model: {'Llama-3-8B shape, %d layers, bf16' % args.layers if args.gpu else cpu_model}; "
          f"{args.global_batch} x {args.seq_length} tokens per step; {args.steps} measured steps each"
          + (f"; cross entropy in chunks of {args.loss_chunk_tokens}" if args.loss_chunk_tokens else ""))
    print(f"megalong train step        {ours_s * 1000:9.2f} ms  ({tokens / ours_s:,.0f} tokens/s)")
    print(f"bare Megatron-Core step    {floor_s * 1000:9.2f} ms  ({tokens / floor_s:,.0f} tokens/s)")
    print(f"ratio megalong / bare      {ours_s / floor_s:9.3f}  (overhead {100 * (ours_s / floor_s - 1):+.1f}%, goal < +5%)")
    tflops = last.flops / ours_s / runtime.world_size / 1e12
    print(f"model TFLOP/s per device   {tflops:9.3f}")
    if metrics.peak_tflops:
        print(f"MFU                        {100 * tflops / metrics.peak_tflops:9.1f}%  (peak {metrics.peak_tflops:g} TFLOP/s)")
    tolerance = GPU_REL_TOLERANCE if args.gpu else CPU_REL_TOLERANCE
    worst = max(differences)
    same = worst <= tolerance
    print(f"same losses on both sides  {'yes' if same else 'NO':>9s}  (largest relative difference over "
          f"{len(differences)} steps {worst:.1e}, tolerance {tolerance:.1e}; last loss {last.loss:.4f})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
