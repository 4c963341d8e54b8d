"""What one check reports, the verdict over all of them, and the JSON report file.

A check either *passed* (it ran and every comparison held), *failed* (a comparison did not
hold, it crashed, or something it was asked to require is missing) or was *skipped* (it
could not run here and nobody required it). A skip is never a pass: the verdict counts
them separately and the exit code is non-zero only for failures (``--require`` turns the
skips that matter into failures).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
STATUSES = (PASSED, FAILED, SKIPPED)


@dataclass
class CheckResult:
    name: str
    status: str
    # For a failure or a skip: why. For a pass: what the check showed, in one sentence.
    reason: str = ""
    figures: dict = field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"check {self.name}: status {self.status!r} is not one of {STATUSES}")

    @classmethod
    def judged(cls, name: str, failures: list[str], figures: dict, passed_reason: str) -> "CheckResult":
        """Failed with every broken comparison named, or passed."""
        if failures:
            return cls(name, FAILED, "; ".join(failures), figures)
        return cls(name, PASSED, passed_reason, figures)

    def to_dict(self) -> dict:
        return jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> "CheckResult":
        return cls(**data)


def jsonable(value: Any) -> Any:
    """Plain JSON values from numpy / torch scalars, tuples and paths; non-finite floats as strings
    (JSON has no NaN, and a NaN loss is exactly what a report must show)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def exit_code(results: Iterable[CheckResult]) -> int:
    return 1 if any(r.status == FAILED for r in results) else 0


def counts(results: Iterable[CheckResult]) -> dict[str, int]:
    tally = {status: 0 for status in STATUSES}
    for result in results:
        tally[result.status] += 1
    return tally


def verdict_line(results: list[CheckResult]) -> str:
    tally = counts(results)
    head = "FAILED" if tally[FAILED] else ("PASSED" if not tally[SKIPPED] else "PASSED (with skips)")
    line = f"{head}: {tally[PASSED]} passed, {tally[FAILED]} failed, {tally[SKIPPED]} skipped"
    if tally[SKIPPED] and not tally[FAILED]:
        line += " -- skipped checks were NOT run and prove nothing; see --require"
    return line


def result_line(result: CheckResult) -> str:
    return f"[{result.status.upper():7s}] {result.name}: {result.reason}"


def write_report(path: str | Path, report: dict) -> None:
    """Write the JSON report atomically (a temporary file renamed), so a reader never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(jsonable(report), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
