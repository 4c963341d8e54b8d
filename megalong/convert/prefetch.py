"""Produce the next piece of a conversion while the current one is written.

A conversion step is "produce a tensor (read its sources, fuse or split them)" followed
by "write it". Reading, copying and writing release the GIL, so on two or more cores
producing piece i+1 in a background thread while piece i is written hides most of the
producing time. Overlap costs memory (two pieces alive at once), so a piece is produced
ahead only when it and the piece being written together fit in ``budget_bytes``. The
default budget, the two largest pieces together, lets any two neighbours overlap; in a
conversion the two vocabulary tables are never neighbours, so at most the largest table
and one layer's tensors are alive at once.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable, Generic, Sequence, TypeVar

T = TypeVar("T")


class Prefetcher(Generic[T]):
    """Hands out ``produce[i]()`` for i = 0, 1, 2, ... producing one piece ahead.

    ``take(i)`` must be called with increasing indices; an unexpected index (a caller
    that skips or reorders) is produced in the calling thread, so it is slower but never
    wrong. Errors raised while producing surface in ``take`` of that piece.
    """

    def __init__(self, produce: Sequence[Callable[[], T]], nbytes: Sequence[int], budget_bytes: int | None = None):
        if len(produce) != len(nbytes):
            raise ValueError("produce and nbytes must have the same length")
        self._produce = list(produce)
        self._nbytes = list(nbytes)
        self._budget = sum(sorted(self._nbytes)[-2:]) if budget_bytes is None else budget_bytes
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megalong-prefetch")
        # The first piece starts at once, so it overlaps whatever the caller still sets up.
        self._ahead: tuple[int, Future] | None = (0, self._pool.submit(self._produce[0])) if self._produce else None
        self.hits = 0  # pieces that were produced ahead
        self.misses = 0  # pieces produced on demand (over the budget, or asked for out of order)

    def take(self, index: int) -> T:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == index:
            self.hits += 1
            result = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].cancel()
                wait([ahead[1]])  # never more than one piece in flight
            self.misses += 1
            result = self._produce[index]()
        following = index + 1
        if following < len(self._produce) and self._nbytes[index] + self._nbytes[following] <= self._budget:
            self._ahead = (following, self._pool.submit(self._produce[following]))
        return result

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead[1].cancel()
            self._ahead = None
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "Prefetcher[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
