"""A progress line for long runs: shards, documents, tokens, rates and ETA.

On a terminal the line is redrawn in place; in a log file (SLURM) a full line is written
every ``log_every`` seconds, so logs stay readable.
"""

from __future__ import annotations

import sys
import time


def _human(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class ProgressLine:
    def __init__(self, total_shards: int, total_bytes: int, stream=None, log_every: float | None = None):
        self.stream = stream or sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log_every = log_every if log_every is not None else (0.5 if self.interactive else 30.0)
        self.total_shards, self.total_bytes = total_shards, max(1, total_bytes)
        self.shards = self.documents = self.tokens = self.bytes = 0
        self.start = self.last = time.monotonic()

    def update(self, input_bytes: int = 0, documents: int = 0, tokens: int = 0, shards: int = 0) -> None:
        self.bytes += input_bytes
        self.documents += documents
        self.tokens += tokens
        self.shards += shards
        now = time.monotonic()
        if now - self.last >= self.log_every:
            self.last = now
            self._emit(final=False)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        fraction = min(1.0, self.bytes / self.total_bytes)
        eta = (elapsed / fraction - elapsed) if fraction > 0 else float("nan")
        eta_text = _duration(eta) if eta == eta else "?"
        return (f"shards {self.shards}/{self.total_shards} | {fraction * 100:5.1f}% of input | "
                f"{_human(self.documents)} docs ({_human(self.documents / elapsed)}/s) | "
                f"{_human(self.tokens)} tokens ({_human(self.tokens / elapsed)}/s) | "
                f"elapsed {_duration(elapsed)} | ETA {eta_text}")

    def _emit(self, final: bool) -> None:
        if self.interactive:
            self.stream.write("\r" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        self._emit(final=True)
