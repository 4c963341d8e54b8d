"""Measure the peak tensor memory of a real training step (the estimator's ground truth).

On a GPU the truth is ``torch.cuda.max_memory_allocated``. A CPU has no such counter, so
:class:`TensorMemoryTracker` keeps one: a ``TorchDispatchMode`` that sees every tensor an
ATen operator returns, records each distinct storage's size once, and drops it when the
storage is freed (a weak-reference callback). The live total is the CPU analogue of
"allocated" CUDA memory, and its maximum is the peak.

Why not RSS or the profiler: RSS also counts the Python heap, the allocator's cached
pages and libraries, and moves in page-sized, lazily faulted steps (a freshly
``torch.empty``'d buffer costs nothing until written), so it is too noisy for a 15%
check on a model of a few megabytes; the profiler's ``[memory]`` events only cover what
happens while it runs, so the weights and optimizer state created before would need a
separate count. Counting storages sees exactly the tensors the estimator models. What it
does not see: scratch memory inside one kernel (a GEMM workspace), gloo's own buffers,
and tensors created before the mode is entered (enter it before building the model).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemoryTracker(TorchDispatchMode):
    """Counts the bytes of every live tensor storage created while the mode is active."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, int] = {}  # id(storage) -> bytes
        self._refs: dict[int, weakref.ref] = {}
        self.allocated = 0
        self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.allocated

    def _forget(self, key: int, _ref=None) -> None:
        nbytes = self._live.pop(key, 0)
        self._refs.pop(key, None)
        self.allocated -= nbytes

    def track(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        nbytes = storage.nbytes()
        known = self._live.get(key)
        if known is None:
            self._live[key] = nbytes
            self._refs[key] = weakref.ref(storage, lambda ref, key=key: self._forget(key))
            self.allocated += nbytes
        elif known != nbytes:  # the storage was resized in place
            self._live[key] = nbytes
            self.allocated += nbytes - known
        if self.allocated > self.peak:
            self.peak = self.allocated

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat, _ = tree_flatten(out)
        for item in flat:
            if isinstance(item, torch.Tensor):
                self.track(item)
        # In-place resizes (out= variants) show up on the arguments.
        if func._schema.is_mutable:
            for item in tree_flatten((args, kwargs))[0]:
                if isinstance(item, torch.Tensor) and id(item.untyped_storage()) in self._live:
                    self.track(item)
        return out


class _CudaAllocatorStats:
    """The GPU's own counters, with the tracker's interface."""

    @property
    def allocated(self) -> int:
        return torch.cuda.memory_allocated()

    @property
    def peak(self) -> int:
        return torch.cuda.max_memory_allocated()

    def reset_peak(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


@dataclass
class MeasuredStep:
    """What one rank saw during one steady-state training step."""

    rank: int
    pipeline_rank: int
    static_bytes: int  # live before the step: weights, gradient buffers, optimizer state
    peak_bytes: int  # highest live total during forward, backward and the optimizer step


@dataclass
class StepSetup:
    """One training step to measure: the model, layout and batch shape."""

    model: "object"  # megalong.model.ModelConfig
    parallel: "object"  # megalong.config.ParallelConfig
    seq_length: int
    micro_batch: int = 1
    num_microbatches: int = 1
    seed: int = 1234
    # "cpu": fp32, storages counted by TensorMemoryTracker. "cuda": bf16 weights, the
    # CUDA caching allocator's own max_memory_allocated (written for GPU validation
    # runs; not exercised by the CPU test suite).
    device: str = "cpu"


def _forward_step(data_iterator, model):
    """A Megatron-Core forward step: token-summed loss, as ``calculate_per_token_loss`` wants."""
    batch = next(data_iterator)
    per_token_loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(output):
        loss = output.float().sum()
        count = torch.tensor(output.numel(), dtype=torch.int)
        return loss, count, {"loss": loss.detach()}

    return per_token_loss, loss_func


def measure_rank(setup: StepSetup) -> MeasuredStep:
    """Run on every rank (``megalong.runtime.launch.run_processes``): two training steps,
    measuring the second (the first creates the optimizer state lazily)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megalong.model import presets
    from megalong.model.llama import build_model
    from megalong.runtime import init_distributed, set_seed

    import contextlib
    import dataclasses

    on_gpu = setup.device == "cuda"
    runtime = init_distributed(setup.parallel, device=setup.device)
    set_seed(setup.seed)
    model_cfg = presets.resolve(setup.model)
    if on_gpu:
        model_cfg = dataclasses.replace(model_cfg, params_dtype="bf16")
        tracker = _CudaAllocatorStats()
    else:
        tracker = TensorMemoryTracker()
    with tracker if not on_gpu else contextlib.nullcontext():
        chunks = build_model(model_cfg, setup.parallel, on_gpu=on_gpu)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=setup.parallel.distributed_optimizer,
        )
        chunks = [
            DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                    disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)
        ]
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=1e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
                clip_grad=1.0, bf16=on_gpu, params_dtype=torch.bfloat16 if on_gpu else torch.float32,
                use_distributed_optimizer=setup.parallel.distributed_optimizer,
            ),
            chunks,
        )
        generator = torch.Generator().manual_seed(setup.seed + parallel_state.get_data_parallel_rank())
        vocab = model_cfg.vocab_size
        s, b = setup.seq_length, setup.micro_batch

        def batches():
            while True:
                tokens = torch.randint(0, vocab, (b, s + 1), generator=generator).to(runtime.device)
                yield {
                    "tokens": tokens[:, :-1].contiguous(),
                    "labels": tokens[:, 1:].contiguous(),
                    "position_ids": torch.arange(s, device=runtime.device).unsqueeze(0).expand(b, s).contiguous(),
                }

        forward_backward = get_forward_backward_func()
        num_chunks = len(chunks)
        static = 0
        for step in range(2):
            if step == 1:
                static = tracker.allocated
                tracker.reset_peak()
            for chunk in chunks:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            iterators = [batches() for _ in range(num_chunks)]
            forward_backward(
                forward_step_func=_forward_step,
                data_iterator=iterators if num_chunks > 1 else iterators[0],
                model=chunks if num_chunks > 1 else chunks[0],
                num_microbatches=setup.num_microbatches,
                seq_length=s,
                micro_batch_size=b,
                forward_only=False,
            )
            optimizer.step()
            del iterators
        peak = tracker.peak
    return MeasuredStep(
        rank=runtime.rank,
        pipeline_rank=parallel_state.get_pipeline_model_parallel_rank(),
        static_bytes=static,
        peak_bytes=peak,
    )


def measure_rank_many(setups: list[StepSetup]) -> list[MeasuredStep]:
    """Several setups one after the other in the same processes (saves process start-ups)."""
    import gc

    results = []
    for setup in setups:
        results.append(measure_rank(setup))
        gc.collect()
    return results


def measure_training_step(setup: StepSetup, world_size: int) -> list[MeasuredStep]:
    """Measure one steady-state step of ``setup`` in ``world_size`` real gloo processes."""
    from megalong.runtime.launch import run_processes

    return run_processes(measure_rank, world_size, args=(setup,))


def measure_training_steps(setups: list[StepSetup], world_size: int) -> list[list[MeasuredStep]]:
    """``measure_training_step`` for several setups in one set of processes: [setup][rank]."""
    from megalong.runtime.launch import run_processes

    per_rank = run_processes(measure_rank_many, world_size, args=(list(setups),))
    return [[per_rank[rank][i] for rank in range(world_size)] for i in range(len(setups))]
