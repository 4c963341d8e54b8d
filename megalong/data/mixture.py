"""Data mixtures: domains of indexed datasets with per-sample shares.

A mixture recipe (YAML, e.g. ``megalong/recipes/mixtures/prolong_stage1_64k.yaml``)::

    description: ProLong stage 1 (64K)
    allow_repeat: true            # a domain too small for its share is repeated (epochs
                                  # reported); false refuses with a message instead
    domains:
      - name: books_64k
        weight: 30                # share of samples (= of tokens: every sample has seq_length)
        kind: long                # long | concat | sft | packed   (see megalong.data.packing)
        paths: [books/books_text_document]   # Megatron .bin/.idx prefixes, relative ones
                                             # resolve under data.data_root

Shares are per sample, as in ProLong: every sample has exactly ``seq_length`` tokens, so
a per-sample share is a token share. The interleaving of domains is Megatron-Core's
compiled ``build_blending_indices`` (deterministic, every prefix of the stream within one
sample of the exact shares), run on the per-domain sample streams built here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from megalong.data.packing import SampleLayout, build_index, materialize
from megalong.data.sample import PackedSample

log = logging.getLogger(__name__)

MIXTURE_DIR = Path(__file__).resolve().parent.parent / "recipes" / "mixtures"


@dataclass
class DomainSpec:
    name: str
    weight: float
    paths: list[str]
    kind: Literal["long", "concat", "sft", "packed"] = "concat"
    # Long domains: documents shorter than this are skipped and longer ones cut into chunks
    # of exactly this many tokens; defaults to seq_length (ProLong's cut).
    chunk_length: Optional[int] = None
    # Per-domain override of the mixture's allow_repeat.
    allow_repeat: Optional[bool] = None
    # SFT domains: "whole" packs whole conversations and pads the rest of a sample (a
    # conversation longer than a sample is dropped); "fill" fills every sample, cutting the
    # conversation that crosses its end and starting the next sample with the rest, the way
    # ProLong's released SFT data was packed (datatools). See megalong.data.packing.
    sft_packing: Literal["whole", "fill"] = "whole"

    def __post_init__(self):
        if not self.name:
            raise ValueError("a domain needs a name")
        if not self.weight > 0:
            raise ValueError(f"domain {self.name!r}: weight must be positive, got {self.weight}")
        if not self.paths:
            raise ValueError(f"domain {self.name!r}: paths is empty (list the .bin/.idx prefixes)")
        if self.chunk_length is not None and self.kind != "long":
            raise ValueError(f"domain {self.name!r}: chunk_length only applies to kind: long")
        if self.sft_packing != "whole" and self.kind != "sft":
            raise ValueError(f"domain {self.name!r}: sft_packing only applies to kind: sft")


@dataclass
class MixtureSpec:
    domains: list[DomainSpec] = field(default_factory=list)
    allow_repeat: bool = True
    description: str = ""

    def __post_init__(self):
        names = [d.name for d in self.domains]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate domain name(s): {', '.join(dupes)}")

    @property
    def shares(self) -> np.ndarray:
        weights = np.array([d.weight for d in self.domains], dtype=np.float64)
        return weights / weights.sum()


def mixture_path(name_or_path: str) -> Path:
    """A bundled mixture name (``prolong_stage1_64k``) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    bundled = MIXTURE_DIR / f"{name_or_path}.yaml"
    if not bundled.exists():
        available = ", ".join(sorted(p.stem for p in MIXTURE_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"mixture {name_or_path!r} is neither a YAML file nor a bundled mixture ({available})")
    return bundled


def load_mixture(name_or_path: str) -> MixtureSpec:
    from megalong.config import load

    return load(MixtureSpec, mixture_path(name_or_path))


def indexed_dataset_exists(prefix: str) -> bool:
    """Both files of a Megatron indexed dataset (``prefix``.bin and .idx) are there."""
    return Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file()


def resolve_prefix(path: str, data_root: str) -> str:
    p = Path(path).expanduser()
    if not p.is_absolute() and data_root:
        p = Path(data_root).expanduser() / p
    text = str(p)
    for suffix in (".bin", ".idx"):
        if text.endswith(suffix):
            text = text[: -len(suffix)]
    return text


class DomainSource:
    """One domain: its indexed datasets (opened with Megatron-Core's IndexedDataset), the
    packing index over their document lengths, and reading of samples."""

    def __init__(self, spec: DomainSpec, data_root: str, seq_length: int, seed: int,
                 pad_token_id: int, allow_repeat: bool):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.spec, self.seq_length, self.pad_token_id = spec, seq_length, pad_token_id
        self.allow_repeat = allow_repeat
        self.prefixes = [resolve_prefix(p, data_root) for p in spec.paths]
        self.datasets = []
        lengths = []
        for prefix in self.prefixes:
            if not indexed_dataset_exists(prefix):
                hint = (" (relative paths resolve under data.data_root, which is unset)" if not data_root
                        else f" (data.data_root is {data_root})")
                raise FileNotFoundError(
                    f"domain {spec.name!r}: indexed dataset {prefix}.bin/.idx not found{hint}"
                )
            if spec.kind == "sft":
                from megalong.data.sft import conversation_lengths, open_chat_dataset

                dataset = open_chat_dataset(prefix)
                lengths.append(conversation_lengths(dataset))
            elif spec.kind == "packed":
                from megalong.data.packed import PackedDataset

                dataset = PackedDataset(prefix)
                lengths.append(dataset.sample_lengths)
            else:
                dataset = IndexedDataset(prefix)
                lengths.append(np.asarray(dataset.sequence_lengths, dtype=np.int64))
            self.datasets.append(dataset)
        counts = np.array([x.size for x in lengths], dtype=np.int64)
        # Domain-global document id g lives in dataset i where first_document[i] <= g.
        self.first_document = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        self.index = build_index(spec.kind, self.lengths, seq_length, seed, spec.name,
                                 chunk_length=spec.chunk_length, spans=self._span_lengths,
                                 sft_packing=spec.sft_packing)
        if self.index.tokens_per_epoch == 0:
            what = {"long": f"no document of at least {spec.chunk_length or seq_length:,} tokens",
                    "concat": "no tokens",
                    "sft": f"no conversation of at most {seq_length:,} tokens",
                    "packed": "no packed sample"}[spec.kind]
            raise ValueError(f"domain {spec.name!r} ({spec.kind}) has {what} in {', '.join(self.prefixes)}")

    @property
    def name(self) -> str:
        return self.spec.name

    def _locate(self, document: int) -> tuple[object, int]:
        i = int(np.searchsorted(self.first_document, document, side="right") - 1)
        return self.datasets[i], int(document - self.first_document[i])

    def _span_lengths(self, sample: int) -> np.ndarray:
        dataset, local = self._locate(sample)
        return dataset.span_lengths(local)

    def check_available(self, sample: int) -> None:
        """Refuse (when repeats are off) a sample that would start a second epoch."""
        if self.allow_repeat:
            return
        whole = self.index.whole_samples_per_epoch
        if sample >= whole:
            raise RuntimeError(
                f"domain {self.name!r} is exhausted: one epoch holds {whole:,} samples of "
                f"{self.seq_length:,} tokens and sample {sample + 1:,} was asked for. Set "
                f"allow_repeat: true (mixture or domain) to repeat it, or add data."
            )

    def layout(self, sample: int) -> SampleLayout:
        self.check_available(sample)
        return self.index.layout(sample)

    def read(self, layout: SampleLayout) -> PackedSample:
        if self.spec.kind == "packed":
            return self._read_packed(layout)
        pieces, masks = [], []
        next_token, next_target = None, False
        for k, (doc, off, length) in enumerate(zip(layout.documents, layout.offsets, layout.lengths)):
            dataset, local = self._locate(int(doc))
            read_length = int(length) + (1 if layout.continues and k == len(layout.documents) - 1 else 0)
            if self.spec.kind == "sft":
                from megalong.data.sft import read_conversation

                tokens, mask = read_conversation(dataset, local)
                tokens, mask = tokens[off:off + read_length], mask[off:off + read_length]
                if read_length > length:  # a cut conversation goes on in the next sample
                    next_target = bool(mask[-1])
                    mask = mask[:-1]
                masks.append(mask)
            else:
                tokens = dataset.get(local, offset=int(off), length=read_length)
            if read_length > length:
                next_token = int(tokens[-1])
                tokens = tokens[:-1]
            pieces.append(tokens)
        return materialize(layout, pieces, next_token, self.pad_token_id, self.seq_length,
                           target_masks=masks if self.spec.kind == "sft" else None, next_target=next_target)

    def _read_packed(self, layout: SampleLayout) -> PackedSample:
        """A stored packed sample as it is: its spans are the layout's pieces; with a mask,
        a token is a target where the mask was non-zero (megalong.data.packed)."""
        dataset, local = self._locate(int(layout.documents[0]))
        tokens, target = dataset.read(local)
        cuts = np.cumsum(layout.lengths)[:-1]
        return materialize(layout, np.split(tokens, cuts), None, self.pad_token_id, self.seq_length,
                           target_masks=None if target is None else np.split(target, cuts))


class Blend:
    """Which domain, and which of its samples, global sample i comes from.

    Uses Megatron-Core's compiled ``build_blending_indices``: a deterministic interleaving
    that keeps every prefix of the stream within one sample of the exact shares. Its
    decisions depend only on the prefix, so the arrays are grown on demand (doubling) and
    earlier entries never change.
    """

    def __init__(self, shares: np.ndarray):
        self.shares = np.asarray(shares, dtype=np.float64)
        if self.shares.size > np.iinfo(np.int16).max:
            raise ValueError("too many domains for Megatron's int16 blending index")
        self._domain = np.zeros(0, dtype=np.int16)
        self._sample = np.zeros(0, dtype=np.int64)

    def _grow(self, size: int) -> None:
        from megatron.core.datasets import helpers_cpp

        size = max(size, 2 * self._domain.size, 1024)
        domain = np.zeros(size, dtype=np.int16)
        sample = np.zeros(size, dtype=np.int64)
        helpers_cpp.build_blending_indices(domain, sample, self.shares, int(self.shares.size), size, False)
        self._domain, self._sample = domain, sample

    def lookup(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        if first + count > self._domain.size:
            self._grow(first + count)
        return self._domain[first:first + count], self._sample[first:first + count]

    def counts(self, num_samples: int) -> np.ndarray:
        """Samples drawn from each domain among the first ``num_samples``."""
        if num_samples > self._domain.size:
            self._grow(num_samples)
        return np.bincount(self._domain[:num_samples], minlength=self.shares.size).astype(np.int64)
