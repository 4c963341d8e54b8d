"""Byte-based progress lines for long conversions (throughput and time left)."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("megalong.convert")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


class Progress:
    """Logs at most every ``interval_s`` seconds, and once at the end."""

    def __init__(self, what: str, total_bytes: int, interval_s: float = 5.0):
        self.what = what
        self.total = max(total_bytes, 1)
        self.done = 0
        self.interval_s = interval_s
        self.start = time.monotonic()
        self._last = self.start

    def advance(self, nbytes: int, label: str = "") -> None:
        self.done += nbytes
        now = time.monotonic()
        if now - self._last >= self.interval_s or self.done >= self.total:
            self._last = now
            elapsed = max(now - self.start, 1e-9)
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info(
                "%s: %3.0f%% (%s of %s) at %s/s, about %.0f s left%s",
                self.what, 100.0 * self.done / self.total, human_bytes(self.done), human_bytes(self.total),
                human_bytes(rate), eta, f" [{label}]" if label else "",
            )

    def elapsed(self) -> float:
        return time.monotonic() - self.start
