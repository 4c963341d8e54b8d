"""Where each domain's shuffle stands, and how a new stage goes on from there.

A domain's samples come from one endless, seeded shuffle of its units (``long``: chunks,
``concat``: tokens, ``sft``: conversations; see megalong.data.packing). A checkpoint records,
per domain, where this run's stream began and where it stands (:class:`DomainPosition`, in
``train_state.json``). Two uses:

* **resume** (the same run): the stream begins where the record says it began, so the
  resumed run draws exactly the samples an uninterrupted run would have drawn;
* **a new stage** started from that checkpoint (``init.weights``): a domain it shares with
  the checkpoint's run (same name, same documents, same unit) goes on from where that run
  stopped, in that run's shuffle. Without this, stage 2 of the ProLong recipe (same seed, same
  domain names) would draw the very short documents and 64K book and code chunks stage 1 drew
  first: all of them, about 80% of stage 2's tokens. A domain new to the stage starts at the
  beginning of its own shuffle.

What stays shared by design: the recipe's long domains hold the same documents under several
cuts (``books_512k``'s documents are also ``books_64k``'s, cut at 64K in stage 1), and a
domain that runs through a whole epoch starts its next epoch, as within one run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional


@dataclass(frozen=True)
class DomainPosition:
    """One domain's place in its shuffle, as a checkpoint records it."""

    kind: str
    unit: str  # what start/end count: chunks, tokens or conversations
    units_per_epoch: int
    documents: int  # documents (or conversations) in the domain's datasets
    tokens: int  # tokens in them
    chunk_length: Optional[int]  # long domains: tokens per chunk
    seed: int  # the shuffle's seed (with the domain's name and the epoch)
    start: int  # where this run's stream began
    end: int  # where it stands after the samples the checkpoint has trained on

    @classmethod
    def from_dict(cls, data: dict) -> "DomainPosition":
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    def unlike(self, other: "DomainPosition") -> Optional[str]:
        """Why ``other``'s units are not this one's (so a position in one means nothing in the
        other), or None when they are the same."""
        for field in ("kind", "unit", "chunk_length", "documents", "tokens", "units_per_epoch"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                return f"{field} {theirs!r} there, {mine!r} here"
        return None

    def describe(self) -> str:
        epochs = self.end / self.units_per_epoch if self.units_per_epoch else 0.0
        return f"{self.unit} {self.end:,} of {self.units_per_epoch:,} per epoch ({epochs:.2f} epochs in)"


def read_positions(data: dict) -> dict[str, DomainPosition]:
    """The positions of a ``train_state.json`` (``{}`` for checkpoints that have none)."""
    return {name: DomainPosition.from_dict(entry) for name, entry in (data or {}).items()}
