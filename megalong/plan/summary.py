"""What ``megalong plan`` reports about the layouts it did not propose.

Hundreds of layouts are rejected; a user needs one line counting them by reason
(:func:`rejection_counts`; ``--show-rejected`` lists each). When nothing fits, the layouts
closest to fitting are what to look at.
"""

from __future__ import annotations

from collections import Counter

from megalong.plan.planner import PlanResult, Rejection


def not_shown(result: PlanResult, top: int) -> list[Rejection]:
    """The rejections other than the ``top`` proposed layouts (all but the best are also
    rejections, as slower)."""
    shown = {c.layout for c in result.candidates[:top]}
    return [r for r in result.rejections if r.layout not in shown]


def rejection_counts(rejections: list[Rejection]) -> list[tuple[str, int]]:
    """(reason without its numbers, how many layouts), most frequent first."""
    return Counter(r.rule or r.kind for r in rejections).most_common()


def closest_to_fitting(result: PlanResult, count: int) -> list[Rejection]:
    """The ``count`` layouts that were too large by the least memory."""
    too_large = [r for r in result.rejections if r.kind == "too_large"]
    return sorted(too_large, key=lambda r: r.memory.total)[:count]
