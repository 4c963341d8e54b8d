"""The parent process of ``tools/gpu_check.py``: starts each check group's processes, collects
their records (also when a group crashes or hangs), prints the verdicts and writes the report.

It never touches a GPU itself (it only counts them), so every GPU's memory belongs to the
checks, and a CUDA error in one group cannot poison another.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

from megalong.gpucheck.machine import FEATURES, GPUS_NEEDED, RequirementError, gpu_count_problem, parse_required
from megalong.gpucheck.records import (
    FAILED, SKIPPED, CheckResult, counts, exit_code, result_line, verdict_line, write_report,
)
from megalong.gpucheck.registry import CHECKS, GROUPS, Check, CheckOptions, select

REPORT_FILE = "gpu_check.json"
RECORDS_SUBDIR = "records"
# Exit code when nothing could be checked (no GPU without --allow-no-gpu, bad arguments).
NOT_CHECKED = 2
# What the group environment adds: tensor / context parallelism overlaps communication with
# compute only with one hardware queue (as `megalong train` sets it; read when CUDA starts).
MULTI_GPU_ENV = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tools/gpu_check.py",
        description="megalong's GPU acceptance checks: kernels, checkpoints, FP8, eval, context and tensor "
                    "parallelism against references, and throughput figures. See docs/gpu.md.")
    parser.add_argument("--out", help="directory for gpu_check.json and the checks' files (required)")
    parser.add_argument("--require", default="",
                        help=f"comma-separated features whose absence fails instead of skipping: {', '.join(FEATURES)}")
    parser.add_argument("--allow-no-gpu", action="store_true",
                        help="without a GPU, run the CPU-runnable checks (and skip the rest) instead of failing")
    parser.add_argument("--only", help="run only these checks (names or prefixes, comma-separated: fp8,cp.model)")
    parser.add_argument("--skip", help="leave out these checks (names or prefixes)")
    parser.add_argument("--quick", action="store_true", help="fewer FP8 training steps and throughput steps")
    parser.add_argument("--fp8-steps", type=int, help="optimizer steps of the FP8-vs-bf16 training (default 40)")
    parser.add_argument("--figures-layers", type=int,
                        help="Llama-3-8B layers of the throughput model (default: as many as fit at 64K)")
    parser.add_argument("--figures-seq-length", type=int, help="tokens per sample of the throughput model (65536)")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    parser.add_argument("--verbose", action="store_true", help="show megalong's INFO logs from the checks")
    return parser


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def unstartable(check: Check, gpus: int, required: tuple[str, ...]) -> CheckResult:
    """The record of a check whose group cannot start on ``gpus`` GPUs (decided by count alone)."""
    for need in check.needs:
        reason = gpu_count_problem(need, gpus) if need in GPUS_NEEDED else None
        if reason:
            status = FAILED if need in required else SKIPPED
            return CheckResult(check.name, status, f"required, but {reason}" if status == FAILED else reason)
    group = GROUPS[check.group]
    return CheckResult(check.name, SKIPPED, f"its group needs {group.needs_gpus} GPU(s), {gpus} visible")


def run_group(group_name: str, checks: list[Check], options: CheckOptions, required: tuple[str, ...],
              gpus: int, records_dir: Path, target=None, timeout_s: float | None = None) -> list[CheckResult]:
    """Start the group's processes (``target``: megalong.gpucheck.worker.run_group); every check
    comes back with a record, whatever happens to them."""
    from megalong.gpucheck import worker
    from megalong.runtime.launch import run_processes

    group = GROUPS[group_name]
    target = target or worker.run_group
    world = group.world_size(gpus) if gpus else 1
    names = [c.name for c in checks]
    print(f"gpu_check: group '{group_name}' ({group.description}; {world} process(es)): {', '.join(names)}",
          flush=True)
    # LOCAL_WORLD_SIZE: this group's processes, whatever a surrounding srun says about the node.
    env = {**(MULTI_GPU_ENV if world > 1 else {}), "LOCAL_WORLD_SIZE": str(world)}
    device_type = "cuda" if gpus else "cpu"
    stopped = None
    try:
        run_processes(target, world, args=(names, options, required, device_type, str(records_dir)),
                      env=env, timeout_s=timeout_s or group.timeout_s)
    except Exception as err:  # a crash, a hang stopped by the timeout: the records say how far it got
        stopped = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        print(f"gpu_check: group '{group_name}' stopped: {stopped}", flush=True)
    results = []
    for name in names:
        path = records_dir / f"{name}.json"
        if path.is_file():
            results.append(CheckResult.from_dict(json.loads(path.read_text(encoding="utf-8"))))
        else:
            results.append(CheckResult(name, FAILED, f"no result: the group's processes stopped before this check "
                                                     f"finished ({stopped or 'no error reported'})"))
    return results


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        for check in CHECKS:
            print(f"{check.name:20s} [{check.group}] {check.title}")
        return 0
    if not args.out:
        parser.error("--out DIR is required")
    from megalong.runtime.logs import setup_logging
    from megalong.runtime.warnings_filter import quiet_known_warnings

    quiet_known_warnings()
    setup_logging(logging.INFO if args.verbose else logging.WARNING)
    try:
        required = parse_required(args.require)
        selected = select(args.only, args.skip)
    except (RequirementError, ValueError) as err:
        print(f"gpu_check: {err}", file=sys.stderr)
        return NOT_CHECKED
    out = Path(args.out)
    records_dir = out / RECORDS_SUBDIR
    records_dir.mkdir(parents=True, exist_ok=True)
    for stale in records_dir.glob("*.json"):  # a previous run's records must not be read as this one's
        stale.unlink()
    options = CheckOptions.for_run(str(out), args.quick, fp8_steps=args.fp8_steps,
                                   figures_layers=args.figures_layers, figures_seq_length=args.figures_seq_length)
    started, clock = datetime.datetime.now().astimezone(), time.monotonic()
    gpus = visible_gpus()
    report = {"tool": "tools/gpu_check.py", "argv": list(sys.argv[1:] if argv is None else argv),
              "started": started.isoformat(timespec="seconds"), "gpus_visible": gpus,
              "required": list(required), "allow_no_gpu": args.allow_no_gpu, "options": asdict(options),
              "not_selected": [c.name for c in CHECKS if c not in selected]}

    def publish(results: list[CheckResult]) -> None:
        report.update(elapsed_s=round(time.monotonic() - clock, 1), counts=counts(results),
                      verdict="failed" if exit_code(results) else "passed",
                      checks=[r.to_dict() for r in results])
        write_report(out / REPORT_FILE, report)

    if gpus == 0 and not args.allow_no_gpu:
        reason = ("no GPU is visible (torch.cuda.is_available() is False): nothing was checked. Run on a GPU "
                  "machine, or pass --allow-no-gpu to run the CPU-runnable checks")
        print(f"gpu_check: {reason}", flush=True)
        publish([CheckResult("gpu", FAILED, reason)])
        return NOT_CHECKED
    if gpus == 0:
        print("gpu_check: no GPU visible; --allow-no-gpu: running the CPU-runnable checks, skipping the others",
              flush=True)

    results: list[CheckResult] = []
    for group_name in GROUPS:
        checks = [c for c in selected if c.group == group_name]
        if not checks:
            continue
        if gpus < GROUPS[group_name].needs_gpus:
            results += [unstartable(c, gpus, required) for c in checks]
        else:
            results += run_group(group_name, checks, options, required, gpus, records_dir)
        publish(results)
    publish(results)

    print(f"\ngpu_check: summary ({time.monotonic() - clock:.0f} s; report {out / REPORT_FILE})")
    for result in results:
        print("  " + result_line(result))
    print(f"gpu_check: {verdict_line(results)}")
    skipped = [r.name for r in results if r.status == SKIPPED]
    if skipped:
        print(f"gpu_check: skipped (not run): {', '.join(skipped)}")
    return exit_code(results)
