"""One process of a check group: find out what the machine has, then run the group's checks
in order, writing each record as soon as it exists (a crash later loses nothing before it)."""

from __future__ import annotations

import importlib
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from megalong.gpucheck.machine import Machine, detect
from megalong.gpucheck.records import FAILED, SKIPPED, CheckResult, result_line, write_report
from megalong.gpucheck.registry import CHECKS_BY_NAME, Check, CheckOptions

# Always needed by the checks that need them (a broken install), never a skip.
ALWAYS_REQUIRED = ("transformers", "tokenizer")


@dataclass
class WorkerContext:
    """What a check function gets: the options, the machine, this process's place, a cache
    shared by the checks of the group (reference runs computed once)."""

    options: CheckOptions
    machine: Machine
    required: tuple[str, ...]
    device: Any  # torch.device
    runtime: Any  # megalong.runtime.Runtime of the current layout
    rank: int
    world_size: int
    work_dir: Path
    cache: dict = field(default_factory=dict)  # see cached()
    shared: dict = field(default_factory=dict)  # plain values one check leaves for a later one

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per group; a failure is remembered and raised again to later users."""
        if key not in self.cache:
            try:
                self.cache[key] = (True, compute())
            except Exception as err:
                self.cache[key] = (False, err)
        ok, value = self.cache[key]
        if not ok:
            raise RuntimeError(f"{key} failed earlier in this group: {type(value).__name__}: {value}") from value
        return value

    def use_layout(self, parallel) -> Any:
        """Re-create Megatron-Core's process groups for ``parallel`` (same processes); the Runtime."""
        from megalong.runtime import init_distributed

        self.runtime = init_distributed(parallel, device=self.device.type)
        return self.runtime

    def say(self, text: str) -> None:
        if self.rank == 0:
            print(f"gpu_check: {text}", flush=True)


def gate(check: Check, machine: Machine, required: tuple[str, ...]) -> Optional[CheckResult]:
    """The record of a check that cannot run here: failed when what it lacks was required,
    skipped otherwise; None when it can run."""
    for need in check.needs:
        reason = machine.missing(need)
        if reason is None:
            continue
        if need in required or need in ALWAYS_REQUIRED:
            return CheckResult(check.name, FAILED, f"required, but {reason}")
        return CheckResult(check.name, SKIPPED, reason)
    return None


def _call(check: Check, ctx: WorkerContext) -> CheckResult:
    module_name, function_name = check.function.split(":")
    module = importlib.import_module(f"megalong.gpucheck.checks.{module_name}")
    try:
        result = getattr(module, function_name)(ctx)
    except Exception as err:
        lines = traceback.format_exc().strip().splitlines()
        return CheckResult(check.name, FAILED, f"raised {type(err).__name__}: {err}",
                           {"traceback": lines[-25:]})
    if result.name != check.name:
        raise RuntimeError(f"check function {check.function} returned a record named {result.name!r}")
    return result


def _agree_across_ranks(result: CheckResult, world_size: int) -> CheckResult:
    """Rank 0 writes the record: it must fail when the check failed on any rank."""
    if world_size == 1:
        return result
    import torch.distributed as dist

    outcomes = [None] * world_size
    dist.all_gather_object(outcomes, (result.status, result.reason))
    others = [f"rank {r}: {reason}" for r, (status, reason) in enumerate(outcomes) if r and status == FAILED]
    if others and result.status != FAILED:
        return CheckResult(result.name, FAILED, "; ".join(others), result.figures, result.seconds)
    if others:
        result.reason = "; ".join([result.reason, *others])
    return result


def run_group(names: list[str], options: CheckOptions, required: tuple[str, ...], device_type: str,
              records_dir: str) -> list[dict]:
    """Entry point of each process of a group (started by megalong.runtime.launch.run_processes)."""
    import warnings

    import torch

    from megalong.config.parallel import ParallelConfig
    from megalong.runtime import init_distributed

    # Megatron-Core's local RMSNorm keeps fp32 weights in a bf16 model (CPU: no fused kernel then).
    warnings.filterwarnings("ignore", message=".*Mismatch dtype between input and weight.*")

    # The references are fp32: no TF32 in their matmuls (it keeps 10 mantissa bits).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    machine = detect(device_type)
    runtime = init_distributed(ParallelConfig(), device=device_type)
    work_dir = Path(options.out_dir) / "work"
    work_dir.mkdir(parents=True, exist_ok=True)
    ctx = WorkerContext(options, machine, required, runtime.device, runtime, rank, world_size, work_dir)
    results = []
    for name in names:
        check = CHECKS_BY_NAME[name]
        started = time.monotonic()
        result = gate(check, machine, required)
        if result is None:
            ctx.say(f"[{name}] starting: {check.title}")
            result = _call(check, ctx)
        result.seconds = round(time.monotonic() - started, 2)
        result = _agree_across_ranks(result, world_size)
        if rank == 0:
            write_report(Path(records_dir) / f"{name}.json", result.to_dict())
            print(f"gpu_check: {result_line(result)} ({result.seconds:.1f} s)", flush=True)
        results.append(result.to_dict())
    return results if rank == 0 else []
