"""Host memory and time per process of saving and loading a training checkpoint, in each of the
distributed optimizer's formats, against the size of each process's own optimizer shard.

A Llama-shaped model in bf16 (fp32 master weights and two Adam moments: 12 bytes per parameter,
sharded over the data-parallel ranks by Megatron-Core's distributed optimizer) trains one step
with megalong's Trainer at DP = N on the CPU (gloo); then every process saves a complete
checkpoint (megalong.training.checkpoint.save_checkpoint) and loads it back
(load_checkpoint) in each format, and reports the peak of its resident memory above what it
held before (Linux VmHWM, reset before each phase through /proc/self/clear_refs) and the
seconds the phase took. Formats (megalong.training.checkpoint.OPTIMIZER_FORMATS):

* ``dp_reshardable``: each rank writes and reads its own shard;
* ``fully_reshardable``: megalong's, Megatron-Core's memory-efficient mode (each TP x PP
  shard's state gathered on its first data-parallel rank);
* ``fully_reshardable, every rank gathers``: Megatron-Core's default mode of the same format
  (every rank gathers the whole TP x PP shard's state), which megalong used for every save
  before: the baseline the ratios are taken against.

Ratios are printed against each process's own shard (what "near its own shard" means) and
against the baseline's time. On a GPU the state lives in device memory and every format also
stages the tensors it writes through host memory (up to the process's own shard at once with
``dp_reshardable``); the CPU run shows what the format itself gathers, which is what grows with
the data-parallel size. The model weights (2 bytes per parameter, saved by the first
data-parallel rank) are in every checkpoint alike.

    python benchmarks/checkpoint_memory.py [--processes 2,4] [--hidden 768] [--layers 4] [--repeats 1] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BASELINE = "fully_reshardable, every rank gathers"
VARIANTS = {  # label -> (megalong format, Megatron-Core metadata overrides)
    "dp_reshardable": ("dp_reshardable", {}),
    "fully_reshardable": ("fully_reshardable", {}),
    BASELINE: ("fully_reshardable", {"distrib_optim_fully_reshardable_mem_efficient": False}),
}


def _memory_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measured(phase):
    """(seconds, peak resident bytes above the resident bytes before) of ``phase()``."""
    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
        refs.write("5")  # resets VmHWM to the current resident size
    before = _memory_kib("VmRSS")
    started = time.perf_counter()
    phase()
    seconds = time.perf_counter() - started
    peak = _memory_kib("VmHWM")
    dist.barrier()
    return seconds, (peak - before) * 1024


def _own_shard_bytes(optimizer) -> int:
    """Bytes of this rank's fp32 master weights and Adam moments."""
    total = 0
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in inner.optimizer.param_groups:
            for param in group["params"]:
                state = inner.optimizer.state[param]
                total += param.numel() * param.element_size()
                total += sum(state[k].numel() * state[k].element_size() for k in ("exp_avg", "exp_avg_sq"))
    return total


def worker(args: dict) -> dict:
    import logging
    import warnings

    from megalong.config import from_dict
    from megalong.runtime import init_distributed
    from megalong.training import checkpoint as ckpt
    from megalong.training.batches import FixedSampleStream
    from megalong.training.config import RunConfig
    from megalong.training.trainer import Trainer
    from megalong.gpucheck import cases  # packed samples of chosen document lengths

    run = from_dict(RunConfig, {
        "name": "checkpoint-memory",
        "model": {"num_layers": args["layers"], "hidden_size": args["hidden"], "ffn_hidden_size": args["hidden"] * 8 // 3,
                  "num_attention_heads": args["hidden"] // 64, "num_query_groups": args["hidden"] // 256,
                  "vocab_size": args["vocab"], "max_position_embeddings": 256, "rope_theta": 500000.0,
                  "tie_word_embeddings": False, "norm_epsilon": 1e-5, "make_vocab_size_divisible_by": 128,
                  "transformer_impl": "local", "params_dtype": "bf16"},
        "parallel": {"distributed_optimizer": True},
        "data": {"seq_length": 256},
        "optimizer": {"lr": 1e-4, "min_lr": 1e-5},
        "schedule": {"train_steps": 2, "global_batch_size": args["processes"], "micro_batch_size": 1,
                     "lr_warmup_steps": 0, "lr_decay_style": "constant"},
        "logging": {"log_interval": 1000},
        "runtime": {"device": "cpu"},
    }, "benchmark")
    warnings.filterwarnings("ignore")  # bf16 norms on the CPU warn at every call; nothing here to act on
    logging.getLogger().setLevel(logging.ERROR)
    runtime = init_distributed(run.parallel, device="cpu")
    samples = cases.synthetic_samples([[256]] * args["processes"], args["vocab"], seed=0)
    trainer = Trainer(run, runtime, stream=FixedSampleStream(samples, args["processes"], runtime.data_parallel_size))
    trainer.setup()
    trainer.train_step(0)
    parameters = sum(p.numel() for chunk in trainer.model for p in chunk.parameters())
    found = {"rank": runtime.rank, "own_shard_bytes": _own_shard_bytes(trainer.optimizer), "parameters": parameters}
    formats = dict(ckpt.OPTIMIZER_FORMATS)
    try:
        for _ in range(args["repeats"]):
            for label, (fmt, overrides) in VARIANTS.items():
                # The baseline is Megatron-Core's other mode of a format megalong names: set for its phase only.
                ckpt.OPTIMIZER_FORMATS[fmt] = {**formats[fmt], **overrides}
                save_dir = os.path.join(args["dir"], label.replace(" ", "_").replace(",", ""))
                saved = []
                measured = {
                    "save": _measured(lambda: saved.append(ckpt.save_checkpoint(
                        save_dir, trainer.state, trainer.model, trainer.optimizer, trainer.model_config, run,
                        optimizer_format=fmt))),
                    "load": _measured(lambda: ckpt.load_checkpoint(saved[0], trainer.model, trainer.optimizer)),
                }
                ckpt.OPTIMIZER_FORMATS.update(formats)
                for phase, (seconds, peak) in measured.items():
                    earlier = found.get(f"{label}/{phase}", (seconds, peak))
                    # The fastest repeat (others share the machine), the largest peak.
                    found[f"{label}/{phase}"] = (min(seconds, earlier[0]), max(peak, earlier[1]))
    finally:
        ckpt.OPTIMIZER_FORMATS.update(formats)
    return found


def report(processes: int, results: list[dict]) -> None:
    own = max(r["own_shard_bytes"] for r in results)
    print(f"\nDP = {processes} processes, {results[0]['parameters'] / 1e6:.1f}M parameters: each process's own "
          f"optimizer shard {own / 2**20:,.0f} MiB (12 bytes per parameter / {processes})")
    print(f"{'format':40s} {'phase':5s} {'peak MiB above before: rank 0 / others (max)':>46s} "
          f"{'x own shard':>13s} {'seconds':>8s} {'x baseline':>10s}")
    for label in VARIANTS:
        for phase in ("save", "load"):
            seconds = max(r[f"{label}/{phase}"][0] for r in results)
            base = max(r[f"{BASELINE}/{phase}"][0] for r in results)
            first = results[0][f"{label}/{phase}"][1]
            others = max((r[f"{label}/{phase}"][1] for r in results[1:]), default=first)
            print(f"{label:40s} {phase:5s} {first / 2**20:>21,.0f} / {others / 2**20:<22,.0f} "
                  f"{first / own:>5.2f} / {others / own:<5.2f} {seconds:>8.2f} {seconds / base:>10.2f}")


def main() -> None:
    from megalong.runtime.launch import run_processes

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="2,4", help="data-parallel sizes, comma-separated (default 2,4)")
    parser.add_argument("--hidden", type=int, default=768, help="hidden size (default 768; heads of 64)")
    parser.add_argument("--layers", type=int, default=4, help="layers (default 4)")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary (default 8192)")
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: the temp dir)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="save and load each format this often; the fastest time, the largest peak (default 1)")
    args = parser.parse_args()
    for processes in (int(n) for n in args.processes.split(",")):
        directory = tempfile.mkdtemp(prefix="megalong-ckpt-memory-", dir=args.dir)
        try:
            results = run_processes(worker, processes, ({**vars(args), "processes": processes, "dir": directory},),
                                    env={"OMP_NUM_THREADS": "1"})
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        report(processes, sorted(results, key=lambda r: r["rank"]))


if __name__ == "__main__":
    main()
