"""What ``megalong plan`` reports about the layouts it did not propose.

Hundreds of layouts are rejected; a user needs, for each parallel family (TP, PP, CP, DP),
only its best outcome: it fits but is slower (at its fastest), it never fits (at its
smallest), or it is invalid (for its most common reason). When nothing fits, the layouts
closest to fitting are what to look at.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from megalong.plan.memory import GB
from megalong.plan.planner import PlanResult, Rejection, RejectionKind

# Best outcome first: fits but slower, then too large, then invalid.
_KIND_ORDER: dict[RejectionKind, int] = {"slower": 0, "too_large": 1, "invalid": 2}


@dataclass(frozen=True)
class FamilyOutcome:
    """The best a family of layouts reached, shown by one of its rejections."""

    family: str
    kind: RejectionKind
    example: Rejection  # slower: its fastest layout; too_large: its smallest; invalid: the most common reason

    def describe(self) -> str:
        example, layout = self.example, self.example.layout
        if self.kind == "slower":
            return (f"{self.family}: fits, but slower: {example.step_time_s:.2f} s/step at best "
                    f"(mb={layout.micro_batch}, recompute={layout.recompute or 'none'}, "
                    f"{example.memory.total / GB:.1f} GB)")
        if self.kind == "too_large":
            return (f"{self.family}: {example.reason} even with {layout.recompute or 'no'} recomputation, "
                    f"mb={layout.micro_batch} ({example.memory.describe()})")
        return f"{self.family}: {example.reason}"

    def sort_key(self) -> tuple:
        """Kind, then the faster (slower families) or the smaller (too large ones), then the text."""
        if self.kind == "slower":
            measure = self.example.step_time_s
        elif self.kind == "too_large":
            measure = self.example.memory.total
        else:
            measure = 0
        return _KIND_ORDER[self.kind], measure, self.describe()


def not_shown(result: PlanResult, top: int) -> list[Rejection]:
    """The rejections other than the ``top`` proposed layouts (all but the best are also
    rejections, as slower)."""
    shown = {c.layout for c in result.candidates[:top]}
    return [r for r in result.rejections if r.layout not in shown]


def family_outcomes(rejections: list[Rejection]) -> list[FamilyOutcome]:
    """One outcome per family, best first (see :meth:`FamilyOutcome.sort_key`)."""
    by_family: dict[str, list[Rejection]] = {}
    for rejection in rejections:
        by_family.setdefault(rejection.layout.family(), []).append(rejection)
    outcomes = []
    for family, items in by_family.items():
        slower = [r for r in items if r.kind == "slower"]
        too_large = [r for r in items if r.kind == "too_large"]
        if slower:
            outcomes.append(FamilyOutcome(family, "slower", slower[0]))  # the plan lists them fastest first
        elif too_large:
            outcomes.append(FamilyOutcome(family, "too_large", min(too_large, key=lambda r: r.memory.total)))
        else:
            reason = Counter(r.reason for r in items).most_common(1)[0][0]
            outcomes.append(FamilyOutcome(family, "invalid", next(r for r in items if r.reason == reason)))
    return sorted(outcomes, key=FamilyOutcome.sort_key)


def closest_to_fitting(result: PlanResult, count: int) -> list[Rejection]:
    """The ``count`` layouts that were too large by the least memory."""
    too_large = [r for r in result.rejections if r.kind == "too_large"]
    return sorted(too_large, key=lambda r: r.memory.total)[:count]
