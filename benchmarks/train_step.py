"""Step time of `megalong train` against a bare Megatron-Core training step.

CPU mode (default): one process, a tiny Llama-3-shaped model. The same model and data
are stepped two ways, alternating so that machine noise hits both alike:

* megalong: ``Trainer.train_step`` plus what ``Trainer.fit`` does around it every step
  (stop-signal check, metrics record);
* bare Megatron-Core: GPTModel in Megatron DDP, ``get_megatron_optimizer`` and
  ``get_forward_backward_func`` with a minimal forward step on pre-built tensors: the
  floor any trainer on Megatron-Core pays.

It prints the median step times and their ratio (goal: overhead under 5%).

GPU mode (``--gpu``, needs a GPU with Transformer Engine): a Llama-3-8B-shaped model with
fewer layers at 64K tokens in BF16; prints tokens/s, TFLOP/s per GPU and MFU. Written
against the documented APIs; it has not been run on a GPU in this project yet.

    python benchmarks/train_step.py                 # CPU
    python benchmarks/train_step.py --gpu --layers 4 --seq-length 65536

``--loss-chunk-tokens N`` gives the megalong side chunked cross entropy (``loss.chunk_tokens``);
the bare side keeps Megatron's full logits, so the ratio then includes the chunks'
recomputed output projections.
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


class SyntheticStream:
    """Random-token packed samples: documents of fixed length, deterministic per step."""

    def __init__(self, vocab: int, seq_length: int, per_rank: int, doc_length: int):
        self.vocab, self.seq_length, self.per_rank, self.doc_length = vocab, seq_length, per_rank, doc_length

    def batch_for_step(self, step: int, dp_rank: int) -> list[PackedSample]:
        rng = np.random.default_rng([step, dp_rank])
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
        "preset": "test-tiny", "transformer_impl": "local", "max_position_embeddings": args.seq_length}
    return from_dict(RunConfig, {
        "model": model,
        "data": {"seq_length": args.seq_length},
        "data_factory": "unused:unused",
        "optimizer": {"lr": 1e-4, "min_lr": 1e-5},
        "schedule": {"train_steps": 10_000, "global_batch_size": args.global_batch, "lr_warmup_steps": 10},
        "loss": {"chunk_tokens": args.loss_chunk_tokens},
        "logging": {"log_interval": 10_000, "peak_tflops": args.peak_tflops},
        "runtime": {"device": "cuda" if args.gpu else "cpu"},
    }, "benchmark")


class BareMegatronStep:
    """The floor: Megatron-Core's own pieces and nothing else."""

    def __init__(self, trainer, batches):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.utils import get_model_config

        from megalong.model.llama import build_model

        run = trainer.run
        chunks = build_model(trainer.model_config, run.parallel, on_gpu=trainer.runtime.on_gpu)
        config = get_model_config(chunks[0])
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
        self.model = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=c) for c in chunks]
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=1e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, clip_grad=1.0,
            bf16=run.model.params_dtype == "bf16", use_distributed_optimizer=True), self.model)
        config.grad_scale_func = self.optimizer.scale_loss
        config.finalize_model_grads_func = finalize_model_grads
        self.forward_backward = get_forward_backward_func()
        self.batches = batches
        self.seq_length = run.data.seq_length

    @staticmethod
    def _loss(loss_mask, output):
        losses = (output.float().reshape(-1) * loss_mask.reshape(-1)).sum()
        return losses, loss_mask.sum().to(int), {"lm loss": losses.detach()}

    def _forward(self, iterator, model):
        tokens, labels, loss_mask, positions = next(iterator)
        return model(tokens, positions, None, labels=labels), partial(self._loss, loss_mask)

    def step(self, step: int) -> None:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        batches = self.batches[step % len(self.batches)]
        self.forward_backward(forward_step_func=self._forward, data_iterator=iter(batches), model=self.model,
                              num_microbatches=len(batches), seq_length=self.seq_length, micro_batch_size=1,
                              forward_only=False)
        self.optimizer.step()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="GPU mode: Llama-3-8B shape, fewer layers, BF16, TE")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=None, help="default: 256 on CPU, 65536 on GPU")
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--doc-length", type=int, default=None, help="document length (default: whole sample)")
    parser.add_argument("--steps", type=int, default=40, help="measured steps per side")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--loss-chunk-tokens", type=int, default=0,
                        help="chunked cross entropy on the megalong side (0 = full logits)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU (H100/H200: 989)")
    args = parser.parse_args()
    args.seq_length = args.seq_length or (65536 if args.gpu else 256)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(level=logging.WARNING)

    import torch

    from megalong.runtime.distributed import init_distributed
    from megalong.training.metrics import MetricsWriter
    from megalong.training.signals import StopWatch
    from megalong.training.trainer import Trainer

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    run = build_run(args)
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
    for step in range(4):
        mbs = trainer.batcher.split(stream.batch_for_step(step, trainer.dp_rank), trainer.num_microbatches)
        prebuilt.append([(m.tokens, m.labels, m.loss_mask, m.position_ids) for m in mbs])
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

    ours, floor, last = [], [], None
    for i in range(args.warmup + args.steps):
        # Alternate which side goes first, so drifting machine load hits both alike.
        if i % 2:
            a, b = timed(megalong_step, i), timed(bare.step, i)
        else:
            b, a = timed(bare.step, i), timed(megalong_step, i)
        if i >= args.warmup:
            ours.append(a)
            floor.append(b)

    ours_s, floor_s = statistics.median(ours), statistics.median(floor)
    tokens = args.global_batch * args.seq_length
    print(f"model: {'Llama-3-8B shape, %d layers, bf16' % args.layers if args.gpu else 'test-tiny (4 layers, hidden 64), fp32 on CPU'}; "
          f"{args.global_batch} x {args.seq_length} tokens per step; {args.steps} measured steps each")
    print(f"megalong train step        {ours_s * 1000:9.2f} ms  ({tokens / ours_s:,.0f} tokens/s)")
    print(f"bare Megatron-Core step    {floor_s * 1000:9.2f} ms  ({tokens / floor_s:,.0f} tokens/s)")
    print(f"ratio megalong / bare      {ours_s / floor_s:9.3f}  (overhead {100 * (ours_s / floor_s - 1):+.1f}%, goal < +5%)")
    tflops = last.flops / ours_s / runtime.world_size / 1e12
    print(f"model TFLOP/s per device   {tflops:9.3f}")
    if metrics.peak_tflops:
        print(f"MFU                        {100 * tflops / metrics.peak_tflops:9.1f}%  (peak {metrics.peak_tflops:g} TFLOP/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
