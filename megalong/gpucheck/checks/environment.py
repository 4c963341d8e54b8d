"""The versions check: what is installed, imported for real, and whether it can run megalong."""

from __future__ import annotations

from megalong.gpucheck.machine import FEATURES, version_notes, version_problems
from megalong.gpucheck.records import CheckResult


def check_versions(ctx) -> CheckResult:
    machine = ctx.machine
    failures = [f"required {FEATURES[f]} is missing: {machine.missing(f)}"
                for f in ctx.required if machine.missing(f)]
    failures += version_problems(machine)
    notes = version_notes(machine)
    figures = {**machine.to_dict(), "notes": notes}
    te = f"Transformer Engine {machine.te_version}" if machine.te_version else "no Transformer Engine"
    flash = f"flash-attn {machine.flash_version}" if machine.flash_version else "no flash-attn"
    where = (f"{machine.gpus} x {machine.gpu_name} (compute capability "
             f"{'.'.join(map(str, machine.compute_capability))})" if machine.gpus else "no GPU")
    summary = f"torch {machine.torch}, CUDA {machine.cuda}, {te}, {flash}, {where}"
    if notes:
        summary += "; note: " + "; ".join(notes)
    return CheckResult.judged("versions", failures, figures, summary)
