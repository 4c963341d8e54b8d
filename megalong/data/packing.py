"""Packing documents into fixed-length samples, as ProLong cut its data.

Three ways a domain's documents become samples of ``seq_length`` inputs:

* ``long``   (:class:`LongChunkIndex`): keep only documents of at least ``chunk_length``
  tokens and cut each into single-document chunks of exactly ``chunk_length`` tokens; the
  remainder shorter than a chunk is dropped. A sample is ``seq_length // chunk_length``
  shuffled chunks (one chunk when they are equal, as in ProLong's long domains).
* ``concat`` (:class:`ConcatIndex`): shuffled documents laid end to end and cut every
  ``seq_length`` tokens; the cut-off tail of one sample starts the next, so a document
  longer than a sample is split and no token is lost.
* ``sft``    (:class:`ConversationPackIndex`, ``sft_packing: whole``, the default): whole
  conversations packed in order into a sample until the next one does not fit, the rest
  padded; a conversation longer than a sample is dropped (counted). With ``sft_packing:
  fill`` (:class:`ConversationFillIndex`): conversations laid end to end like ``concat``, so
  every sample is full and the conversation crossing a sample's end goes on in the next one,
  as ProLong's released SFT data was packed (datatools' ``scripts/pack.py``, SingleBuffer).
* ``packed`` (:class:`PackedSampleIndex`): samples packed before (ProLong's released data,
  megalong.data.packed): each stored sample is one training sample, its spans the documents.

An index knows only document *lengths* (no tokens): it is built with vectorized numpy
and answers "which document pieces make sample k" for any k without touching the rest,
which is what makes resuming at any step cheap. :func:`materialize` turns such a layout
plus the tokens it names into a :class:`~megalong.data.sample.PackedSample`.

Epochs: each epoch is a fresh permutation seeded by ``(seed, name, epoch)``. For ``long``
and ``concat`` the epochs are chained into one endless stream (a sample may straddle two
epochs), so nothing is dropped at an epoch's end; ``sft`` packs each epoch on its own.

Positions: every index counts its way through that chained stream in one *unit* (``long``:
chunks, ``concat`` and ``sft_packing: fill``: tokens, ``sft``: conversations, ``packed``:
stored samples) and may begin at ``start`` units instead of 0. A unit means the same thing
at any ``seq_length`` (a 64K chunk is a 64K chunk whether one or eight make a sample), so a
later stage that begins where an earlier one stopped (:meth:`position_after`) draws none of
the units the earlier stage drew, until the stream comes round to its next epoch (see
megalong.data.positions).

Why not Megatron-Core's GPTDataset index (``helpers_cpp.build_sample_idx``): it packs one
concatenated stream only, knows nothing of ProLong's single-document long chunks or of
whole-conversation packing, and materializes the full sample index for a fixed number of
samples up front; these indices answer any sample lazily from O(documents) arrays.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from megalong.data.sample import PackedSample


@dataclass
class SampleLayout:
    """Which document pieces fill one sample, in order (documents are domain-global ids).

    ``continues`` is True when the last piece's document goes on after the sample: its last
    input then gets the document's next token as a real label (loss on), as in Megatron's
    GPT dataset. ``pad_length`` trailing inputs are padding (SFT), a document of their own.
    """

    documents: np.ndarray  # int64 [P]
    offsets: np.ndarray  # int64 [P] first token of the piece inside its document
    lengths: np.ndarray  # int64 [P]
    continues: bool = False
    pad_length: int = 0

    @property
    def segment_lengths(self) -> np.ndarray:
        """Lengths of the attention segments: the pieces, then the padding if any."""
        if self.pad_length:
            return np.concatenate([self.lengths, [self.pad_length]]).astype(np.int64)
        return self.lengths.astype(np.int64)

    @property
    def attention_cost(self) -> int:
        seg = self.segment_lengths
        return int((seg * seg).sum())


def epoch_permutation(count: int, seed: int, stream_name: str, epoch: int) -> np.ndarray:
    """The shuffle of one epoch: a pure function of (seed, name, epoch), independent of
    every other domain, so adding a domain never reshuffles the others."""
    key = [int(seed) & 0xFFFFFFFF, zlib.crc32(stream_name.encode("utf-8")), int(epoch)]
    return np.random.default_rng(key).permutation(count).astype(np.int64)


class _EpochCache:
    """Keeps the last few epochs' arrays (resume and sequential reading touch 1-2 epochs)."""

    def __init__(self, build, keep: int = 3):
        self._build = build
        self._keep = keep
        self._items: dict[int, object] = {}

    def __call__(self, epoch: int):
        item = self._items.get(epoch)
        if item is None:
            item = self._build(epoch)
            self._items[epoch] = item
            while len(self._items) > self._keep:
                self._items.pop(next(iter(self._items)))
        return item


@dataclass
class DropReport:
    """Tokens an index leaves out by construction (reported, never silent)."""

    documents: int = 0
    tokens: int = 0
    reason: str = ""
    extra: dict = field(default_factory=dict)


class LongChunkIndex:
    """ProLong's long domains: single-document chunks of exactly ``chunk_length`` tokens."""

    kind = "long"
    unit = "chunks"

    def __init__(self, lengths: np.ndarray, seq_length: int, seed: int, name: str = "long",
                 chunk_length: int | None = None, start: int = 0):
        lengths = np.asarray(lengths, dtype=np.int64)
        chunk_length = int(chunk_length or seq_length)
        if seq_length % chunk_length:
            raise ValueError(
                f"domain {name!r}: seq_length {seq_length} is not a multiple of chunk_length {chunk_length}"
            )
        self.name, self.seed, self.seq_length, self.chunk_length = name, seed, int(seq_length), chunk_length
        self.chunks_per_sample = self.seq_length // chunk_length
        per_doc = lengths // chunk_length
        docs = np.nonzero(per_doc)[0]
        counts = per_doc[docs]
        # Chunk c of the epoch-0 (unshuffled) list: its document and its chunk number inside it.
        self.chunk_document = np.repeat(docs, counts)
        first_chunk = np.cumsum(counts) - counts
        self.chunk_offset = (np.arange(self.chunk_document.size, dtype=np.int64)
                             - np.repeat(first_chunk, counts)) * chunk_length
        self.num_chunks = int(self.chunk_document.size)
        short = lengths < chunk_length
        kept_tokens = self.num_chunks * chunk_length
        self.dropped = DropReport(
            documents=int(short.sum()), tokens=int(lengths.sum()) - kept_tokens,
            reason=f"documents under {chunk_length:,} tokens and remainders after the last full chunk",
            extra={"short_documents": int(short.sum()), "short_document_tokens": int(lengths[short].sum())},
        )
        self.tokens_per_epoch = kept_tokens
        self.start = _check_start(start, name)
        self._perm = _EpochCache(lambda e: epoch_permutation(self.num_chunks, seed, name, e))

    @property
    def units_per_epoch(self) -> int:
        return self.num_chunks

    @property
    def samples_per_epoch(self) -> float:
        return self.num_chunks / self.chunks_per_sample

    @property
    def whole_samples_per_epoch(self) -> int:
        """Samples one whole epoch holds."""
        return self.num_chunks // self.chunks_per_sample

    @property
    def fresh_samples(self) -> int:
        """Samples served before a chunk repeats, counting the ``start`` chunks already drawn."""
        return max(self.num_chunks - self.start, 0) // self.chunks_per_sample

    def position_after(self, num_samples: int) -> int:
        """The chunk the stream stands at after serving ``num_samples`` samples."""
        return self.start + num_samples * self.chunks_per_sample

    def epochs_for(self, num_samples: int) -> float:
        return num_samples * self.chunks_per_sample / self.num_chunks if self.num_chunks else float("inf")

    def layout(self, sample: int) -> SampleLayout:
        if self.num_chunks == 0:
            raise ValueError(f"domain {self.name!r} has no document of at least {self.chunk_length:,} tokens")
        positions = self.position_after(sample) + np.arange(self.chunks_per_sample, dtype=np.int64)
        epochs, within = np.divmod(positions, self.num_chunks)
        chunks = np.empty_like(positions)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            chunks[sel] = self._perm(int(epoch))[within[sel]]
        return SampleLayout(
            documents=self.chunk_document[chunks], offsets=self.chunk_offset[chunks],
            lengths=np.full(chunks.size, self.chunk_length, dtype=np.int64),
        )


class ConcatIndex:
    """Short domains: shuffled documents end to end, cut every ``seq_length`` tokens."""

    kind = "concat"
    unit = "tokens"

    def __init__(self, lengths: np.ndarray, seq_length: int, seed: int, name: str = "concat", start: int = 0):
        lengths = np.asarray(lengths, dtype=np.int64)
        self.name, self.seed, self.seq_length = name, seed, int(seq_length)
        # Empty documents would be zero-length segments; they carry no token, so leave them out.
        self.documents = np.nonzero(lengths > 0)[0].astype(np.int64)
        self.lengths = lengths[self.documents]
        self.full_lengths = lengths
        self.tokens_per_epoch = int(self.lengths.sum())
        self.dropped = DropReport(documents=int(lengths.size - self.documents.size), tokens=0,
                                  reason="empty documents")
        self.start = _check_start(start, name)
        self._epoch = _EpochCache(self._build_epoch)

    @property
    def units_per_epoch(self) -> int:
        return self.tokens_per_epoch

    def _build_epoch(self, epoch: int):
        perm = epoch_permutation(self.documents.size, self.seed, self.name, epoch)
        docs = self.documents[perm]
        ends = np.cumsum(self.lengths[perm])
        return docs, ends

    @property
    def samples_per_epoch(self) -> float:
        return self.tokens_per_epoch / self.seq_length

    @property
    def whole_samples_per_epoch(self) -> int:
        """Samples one whole epoch holds (a look-ahead label token always lies inside the
        same document, hence inside the same epoch)."""
        return self.tokens_per_epoch // self.seq_length

    @property
    def fresh_samples(self) -> int:
        """Samples served before a token repeats, counting the ``start`` tokens already drawn."""
        return max(self.tokens_per_epoch - self.start, 0) // self.seq_length

    def position_after(self, num_samples: int) -> int:
        """The token the stream stands at after serving ``num_samples`` samples (the look-ahead
        label of the last one is this token, the first input of the next)."""
        return self.start + num_samples * self.seq_length

    def epochs_for(self, num_samples: int) -> float:
        # A sample reads seq_length inputs (+1 look-ahead token that the next sample reuses).
        return num_samples * self.seq_length / self.tokens_per_epoch if self.tokens_per_epoch else float("inf")

    def layout(self, sample: int) -> SampleLayout:
        if self.tokens_per_epoch == 0:
            raise ValueError(f"domain {self.name!r} has no tokens")
        start = self.position_after(sample)
        stop = start + self.seq_length
        docs, offs, lens = [], [], []
        continues = False
        while start < stop:
            epoch, within = divmod(start, self.tokens_per_epoch)
            epoch_docs, ends = self._epoch(epoch)
            want_end = min(within + (stop - start), self.tokens_per_epoch)
            first = int(np.searchsorted(ends, within, side="right"))
            last = int(np.searchsorted(ends, want_end, side="left"))  # doc holding token want_end-1
            piece_docs = epoch_docs[first:last + 1]
            doc_ends = ends[first:last + 1]
            doc_starts = doc_ends - self.full_lengths[piece_docs]
            piece_start = np.maximum(doc_starts, within)
            piece_end = np.minimum(doc_ends, want_end)
            docs.append(piece_docs)
            offs.append(piece_start - doc_starts)
            lens.append(piece_end - piece_start)
            continues = bool(piece_end[-1] < doc_ends[-1])
            start += want_end - within
        return SampleLayout(np.concatenate(docs), np.concatenate(offs), np.concatenate(lens), continues=continues)


class ConversationPackIndex:
    """SFT: whole conversations packed in order; the one that does not fit opens the next
    sample (the rest of the current one is padding); longer than a sample: dropped.

    The stream is a sequence of *passes*, each packed on its own: the rest of the epoch
    ``start`` falls in (from the conversation after ``start``), then whole epochs."""

    kind = "sft"
    unit = "conversations"

    def __init__(self, lengths: np.ndarray, seq_length: int, seed: int, name: str = "sft", start: int = 0):
        lengths = np.asarray(lengths, dtype=np.int64)
        self.name, self.seed, self.seq_length = name, seed, int(seq_length)
        fits = (lengths > 0) & (lengths <= seq_length)
        self.documents = np.nonzero(fits)[0].astype(np.int64)
        self.lengths = lengths[self.documents]
        self.full_lengths = lengths
        too_long = lengths > seq_length
        self.dropped = DropReport(
            documents=int(too_long.sum()), tokens=int(lengths[too_long].sum()),
            reason=f"conversations longer than {seq_length:,} tokens",
        )
        self.tokens_per_epoch = int(self.lengths.sum())
        self.start = _check_start(start, name)
        self._first_epoch, self._skip = divmod(self.start, self.documents.size) if self.documents.size else (0, 0)
        self._pass = _EpochCache(self._pack_pass)
        self._pass_sample_counts: list[int] = []

    @property
    def units_per_epoch(self) -> int:
        return int(self.documents.size)

    def _pack_pass(self, index: int):
        """Next-fit packing of one pass: (its conversations in order, each sample's first
        position in them, the running token count).

        The loop runs once per *sample* (a searchsorted over the running token count finds
        how many whole conversations fit), not once per conversation."""
        perm = epoch_permutation(self.documents.size, self.seed, self.name, self._first_epoch + index)
        if index == 0:
            perm = perm[self._skip:]
        ends = np.cumsum(self.lengths[perm])
        starts = [0]
        position, consumed = 0, 0
        n = perm.size
        while position < n:
            position = int(np.searchsorted(ends, consumed + self.seq_length, side="right"))
            consumed = int(ends[position - 1])
            starts.append(position)
        return self.documents[perm], np.asarray(starts, dtype=np.int64), ends

    def _samples_in_pass(self, index: int) -> int:
        while len(self._pass_sample_counts) <= index:
            e = len(self._pass_sample_counts)
            self._pass_sample_counts.append(int(self._pass(e)[1].size - 1))
        return self._pass_sample_counts[index]

    @property
    def samples_per_epoch(self) -> float:
        return float(self.whole_samples_per_epoch)

    @property
    def whole_samples_per_epoch(self) -> int:
        """Samples one whole epoch packs into."""
        if not self.documents.size:
            return 0
        return self._samples_in_pass(1) if self._skip else self._samples_in_pass(0)

    @property
    def fresh_samples(self) -> int:
        """Samples served before a conversation repeats, counting the ``start`` already drawn."""
        if not self.documents.size or self.start >= self.documents.size:
            return 0
        return self._samples_in_pass(0)

    def _locate(self, sample: int) -> tuple[int, int]:
        index = 0
        while sample >= self._samples_in_pass(index):
            sample -= self._samples_in_pass(index)
            index += 1
        return index, sample

    def position_after(self, num_samples: int) -> int:
        """The conversation the stream stands at after serving ``num_samples`` samples."""
        if not self.documents.size:
            return self.start
        index, within = self._locate(num_samples)
        drawn = int(self._pass(index)[1][within]) + sum(
            self.documents.size - (self._skip if i == 0 else 0) for i in range(index))
        return self.start + drawn

    def epochs_for(self, num_samples: int) -> float:
        if not self.documents.size:
            return float("inf")
        return (self.position_after(num_samples) - self.start) / self.documents.size

    def layout(self, sample: int) -> SampleLayout:
        if not self.documents.size:
            raise ValueError(f"domain {self.name!r} has no conversation of at most {self.seq_length:,} tokens")
        index, within = self._locate(sample)
        docs, starts, _ = self._pass(index)
        chosen = docs[starts[within]:starts[within + 1]]
        lengths = self.full_lengths[chosen]
        pad = self.seq_length - int(lengths.sum())
        return SampleLayout(chosen, np.zeros_like(chosen), lengths, pad_length=pad)


def _check_start(start: int, name: str) -> int:
    if int(start) < 0:
        raise ValueError(f"domain {name!r}: start position must be >= 0, got {start}")
    return int(start)


class ConversationFillIndex(ConcatIndex):
    """SFT with ``sft_packing: fill``: conversations shuffled and laid end to end, cut every
    ``seq_length`` tokens (ConcatIndex): no padding; the conversation that crosses a sample's
    end is cut there, its rest a document of its own at the start of the next sample (the last
    input of the sample predicts the rest's first token, when that is an assistant token)."""

    kind = "sft"
    packing = "fill"


class PackedSampleIndex:
    """Samples packed before megalong saw them (ProLong's released data): stored sample g is
    one training sample as it is, its spans (``spans(g)``: their lengths) the attention
    documents. Each epoch is a fresh shuffle of the stored samples; positions count samples."""

    kind = "packed"
    unit = "samples"

    def __init__(self, lengths: np.ndarray, seq_length: int, seed: int, name: str,
                 spans: Callable[[int], np.ndarray], start: int = 0):
        lengths = np.asarray(lengths, dtype=np.int64)
        wrong = np.flatnonzero(lengths != seq_length)
        if wrong.size:
            raise ValueError(
                f"domain {name!r}: {wrong.size:,} of {lengths.size:,} packed samples are not {seq_length:,} tokens "
                f"long (sample {wrong[0]} has {lengths[wrong[0]]:,}); packed samples are used as they are, so "
                "data.seq_length must be the length they were packed to")
        self.name, self.seed, self.seq_length = name, seed, int(seq_length)
        self.num_samples = int(lengths.size)
        self.tokens_per_epoch = int(lengths.sum())
        self.dropped = DropReport(reason="nothing: packed samples are used whole")
        self.start = _check_start(start, name)
        self._spans = spans
        self._perm = _EpochCache(lambda e: epoch_permutation(self.num_samples, seed, name, e))

    @property
    def units_per_epoch(self) -> int:
        return self.num_samples

    @property
    def samples_per_epoch(self) -> float:
        return float(self.num_samples)

    @property
    def whole_samples_per_epoch(self) -> int:
        return self.num_samples

    @property
    def fresh_samples(self) -> int:
        """Samples served before a stored sample repeats, counting the ``start`` already drawn."""
        return max(self.num_samples - self.start, 0)

    def position_after(self, num_samples: int) -> int:
        return self.start + num_samples

    def epochs_for(self, num_samples: int) -> float:
        return num_samples / self.num_samples if self.num_samples else float("inf")

    def layout(self, sample: int) -> SampleLayout:
        if not self.num_samples:
            raise ValueError(f"domain {self.name!r} has no packed sample")
        epoch, within = divmod(self.position_after(sample), self.num_samples)
        stored = int(self._perm(epoch)[within])
        lengths = np.asarray(self._spans(stored), dtype=np.int64)
        return SampleLayout(documents=np.full(lengths.size, stored, dtype=np.int64),
                            offsets=np.cumsum(lengths) - lengths, lengths=lengths)


def build_index(kind: str, lengths: np.ndarray, seq_length: int, seed: int, name: str,
                chunk_length: int | None = None, spans: Callable[[int], np.ndarray] | None = None,
                sft_packing: str = "whole", start: int = 0):
    """The index for a domain of ``kind`` ('long', 'concat', 'sft' or 'packed') over
    document lengths, beginning ``start`` units into its chained epochs; ``spans(g)`` gives
    the span lengths of packed sample g; ``sft_packing`` ('whole' or 'fill') chooses how an
    sft domain packs its conversations."""
    if kind == "sft" and sft_packing == "fill":
        return ConversationFillIndex(lengths, seq_length, seed, name, start=start)
    if kind == "packed":
        if spans is None:
            raise ValueError(f"domain {name!r}: a packed index needs the span lengths of its samples")
        return PackedSampleIndex(lengths, seq_length, seed, name, spans, start=start)
    if kind == "long":
        return LongChunkIndex(lengths, seq_length, seed, name, chunk_length=chunk_length, start=start)
    if kind == "concat":
        return ConcatIndex(lengths, seq_length, seed, name, start=start)
    if kind == "sft":
        return ConversationPackIndex(lengths, seq_length, seed, name, start=start)
    raise ValueError(f"domain {name!r}: unknown kind {kind!r} (expected long, concat, sft or packed)")


@functools.lru_cache(maxsize=4)
def _positions(seq_length: int) -> np.ndarray:
    positions = np.arange(seq_length, dtype=np.int64)
    positions.flags.writeable = False
    return positions


def materialize(layout: SampleLayout, pieces: list[np.ndarray], next_token: int | None,
                pad_token_id: int, seq_length: int,
                target_masks: list[np.ndarray] | None = None, next_target: bool = False) -> PackedSample:
    """Assemble a PackedSample from the tokens of each piece of ``layout``.

    ``pieces[i]`` holds the tokens of piece i; ``next_token`` is the token after the last
    piece when ``layout.continues``. ``target_masks[i]`` (SFT) marks which tokens of piece i
    are worth predicting (assistant turns); the loss of input j is on when token j+1 is;
    ``next_target`` says whether ``next_token`` is.
    """
    seg_lengths = layout.segment_lengths
    if int(seg_lengths.sum()) != seq_length:
        raise ValueError(f"layout covers {int(seg_lengths.sum())} tokens, expected {seq_length}")
    cu = np.zeros(seg_lengths.size + 1, dtype=np.int32)
    np.cumsum(seg_lengths, out=cu[1:])
    if len(pieces) != layout.lengths.size or any(len(p) != n for p, n in zip(pieces, layout.lengths)):
        raise ValueError("the pieces read do not match the sample layout (dataset changed on disk?)")
    # Copy each piece straight into the sample (one int32 -> int64 pass, no concatenate).
    tokens = np.empty(seq_length, dtype=np.int64)
    for piece, start, stop in zip(pieces, cu[:-1], cu[1:]):
        tokens[start:stop] = piece
    if layout.pad_length:
        tokens[seq_length - layout.pad_length:] = pad_token_id
    position_ids = _positions(seq_length) - np.repeat(cu[:-1].astype(np.int64), seg_lengths)

    final_label = int(next_token) if layout.continues else pad_token_id
    labels = np.empty(seq_length, dtype=np.int64)
    labels[:-1] = tokens[1:]
    labels[-1] = final_label

    if target_masks is None:
        loss_mask = np.ones(seq_length, dtype=np.float32)
    else:
        # Input j predicts token j+1 of the same piece: shift each piece's mask left by one.
        shifted = []
        for mask in target_masks:
            m = np.zeros(mask.size, dtype=np.float32)
            m[:-1] = mask[1:]
            shifted.append(m)
        if layout.pad_length:
            shifted.append(np.zeros(layout.pad_length, dtype=np.float32))
        loss_mask = np.concatenate(shifted)
    # The last input of a document predicts another document's first token: never a target.
    doc_last = cu[1:] - 1
    if layout.continues:
        doc_last = doc_last[:-1]
    loss_mask[doc_last] = 0.0
    if layout.continues and target_masks is not None:
        loss_mask[-1] = float(next_target)
    if layout.pad_length:
        loss_mask[seq_length - layout.pad_length:] = 0.0
    return PackedSample(tokens=tokens, labels=labels, loss_mask=loss_mask,
                        position_ids=position_ids, cu_seqlens=cu)
