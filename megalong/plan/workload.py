"""The attention work of a run's samples, and the step time lost to its imbalance over ranks.

With document masking, a packed sample's attention costs the sum of its squared document
lengths, not the square of the sequence length, so the planner needs the samples the run
will see. They come from megalong's own data code, the code training uses:

* the recipe's mixture (megalong.data.mixture / packing), read as ``TrainStream`` reads it
  when the indexed datasets exist (their document lengths are in the ``.idx`` files);
* when they do not (planning before preprocessing): the same packing indices built over
  stand-in document lengths. Long domains need none: ProLong's long domains are cut into
  single-document chunks of exactly ``chunk_length`` tokens, so their samples are exact.
  Short-document (``concat``) and SFT domains get lognormal lengths (median 700 tokens,
  sigma 1.3, about 1.6K tokens on average: the stand-in benchmarks/packing.py uses); at 64K
  and beyond their attention is under 2% of a long-document sample's, so the stand-in moves
  the prediction little;
* without a recipe (``megalong plan --model``) or for runs without document masking
  (the published NeMo/Megatron-Bridge benchmarks): one full-length document per sample.

From the same samples, the two imbalances that stretch a step:

* DP: each rank's samples are dealt by ``megalong.data.balance.assign_by_attention_cost``
  (as ``TrainStream`` does) and ranks meet once per step (the gradient reduce-scatter), so
  the step lasts as long as the heaviest rank's sum of (GEMM + attention) times;
* CP: a sample's attention is split over the CP ranks by megalong's load-balanced chunking
  (``megalong.data.cp_shard.load_balanced_index``): of every document (Transformer Engine's
  THD layout, what megalong runs on GPUs, ``per_document=True``) or of the whole sequence
  (Megatron's layout, megalong's own ring). The heaviest rank sets the pace.
"""

from __future__ import annotations

import math

import numpy as np

# Stand-in lengths of short documents (see the module docstring).
SHORT_DOCUMENT_MEDIAN = 700
SHORT_DOCUMENT_SIGMA = 1.3
# Samples simulated to estimate the mixture's mean cost and its imbalance (at least one step).
SIMULATED_SAMPLES = 256
MAX_SIMULATED_STEPS = 64


def stand_in_document_lengths(tokens: int, rng: np.random.Generator) -> np.ndarray:
    """Lognormal document lengths summing to about ``tokens`` (median 700, sigma 1.3)."""
    mean = math.exp(math.log(SHORT_DOCUMENT_MEDIAN) + SHORT_DOCUMENT_SIGMA ** 2 / 2)
    count = max(1, int(tokens / mean) + 1)
    return (rng.lognormal(math.log(SHORT_DOCUMENT_MEDIAN), SHORT_DOCUMENT_SIGMA, size=count) + 1).astype(np.int64)


def _causal_work(start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """Keys attended by the queries at positions [start, stop) of a document (causal):
    sum over p of (p + 1)."""
    return (stop * (stop + 1) - start * (start + 1)) // 2


def cp_rank_work(segments: np.ndarray, cp: int, per_document: bool) -> np.ndarray:
    """Causal attention work (query-key pairs) of each CP rank for one sample.

    Which chunks a rank holds is megalong's rule (``load_balanced_index`` on 2 x CP chunks:
    rank r gets chunks r and 2CP-1-r); per document, each document is first padded to a
    multiple of 2 x CP as Transformer Engine's THD layout requires (padding does no work).
    """
    from megalong.data.cp_shard import load_balanced_index

    segments = np.asarray(segments, dtype=np.int64)
    work = np.zeros(cp, dtype=np.float64)
    if per_document:
        padded = -(-segments // (2 * cp)) * (2 * cp)
        chunk = padded // (2 * cp)
        for rank in range(cp):
            for k in load_balanced_index(2 * cp, cp, rank).tolist():
                lo = np.minimum(k * chunk, segments)
                hi = np.minimum((k + 1) * chunk, segments)
                work[rank] += float(_causal_work(lo, hi).sum())
        return work
    starts = np.concatenate([[0], np.cumsum(segments)[:-1]])
    chunk = int(segments.sum()) // (2 * cp)
    for rank in range(cp):
        for k in load_balanced_index(2 * cp, cp, rank).tolist():
            lo = np.clip(k * chunk - starts, 0, segments)
            hi = np.clip((k + 1) * chunk - starts, 0, segments)
            work[rank] += float(_causal_work(lo, hi).sum())
    return work


class Workload:
    """Segment lengths (documents as attention sees them) of the samples of a few steps."""

    def __init__(self, seq_length: int, global_batch: int, steps: list[list[np.ndarray]], source: str):
        if not steps or any(len(step) != global_batch for step in steps):
            raise ValueError(f"every simulated step needs {global_batch} samples")
        self.seq_length, self.global_batch, self.source = int(seq_length), int(global_batch), source
        self.steps = steps
        self.costs = np.array([[float((s.astype(np.float64) ** 2).sum()) for s in step] for step in steps])
        self._cp_cache: dict[tuple[int, bool], float] = {}
        self._dp_cache: dict[tuple[int, float], float] = {}

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def full_sequences(cls, seq_length: int, global_batch: int) -> "Workload":
        """One document per sample (no document masking, or one long document)."""
        sample = np.array([seq_length], dtype=np.int64)
        return cls(seq_length, global_batch, [[sample] * global_batch], "one full-length document per sample")

    @classmethod
    def from_data(cls, data, global_batch: int, samples: int = SIMULATED_SAMPLES) -> "Workload":
        """The samples of the first steps of ``data`` (a DataConfig with a mixture)."""
        steps = max(1, min(MAX_SIMULATED_STEPS, math.ceil(samples / global_batch)))
        if not data.missing_datasets():
            from megalong.data.stream import TrainStream

            stream = TrainStream(data, global_batch, 1)
            layouts = [stream.layouts_for_step(step) for step in range(steps)]
            source = f"the first {steps} step(s) of the mixture's datasets under {data.data_root or '.'}"
        else:
            layouts = _stand_in_layouts(data, global_batch, steps)
            source = (f"{steps} step(s) of the mixture's shares with stand-in lengths for short documents "
                      f"(its datasets are not there yet)")
        return cls(data.seq_length, global_batch,
                   [[layout.segment_lengths for _, layout in step] for step in layouts], source)

    # -- what the step-time model asks ------------------------------------------------------

    @property
    def mean_attention_cost(self) -> float:
        """Mean over samples of the sum of squared segment lengths."""
        return float(self.costs.mean())

    @property
    def attention_fraction_of_full(self) -> float:
        """Mean attention work relative to one full-length document per sample."""
        return self.mean_attention_cost / float(self.seq_length) ** 2

    def cp_inflation(self, cp: int, per_document: bool = True) -> float:
        """Attention time of the heaviest CP rank over the balanced ideal, summed over samples."""
        key = (cp, per_document)
        if key not in self._cp_cache:
            if cp == 1:
                self._cp_cache[key] = 1.0
            else:
                distinct: dict[tuple, int] = {}
                for step in self.steps:
                    for sample in step:
                        signature = tuple(sample.tolist())
                        distinct[signature] = distinct.get(signature, 0) + 1
                heaviest = ideal = 0.0
                for signature, count in distinct.items():
                    work = cp_rank_work(np.array(signature), cp, per_document)
                    heaviest += count * work.max()
                    ideal += count * work.mean()
                self._cp_cache[key] = heaviest / ideal if ideal else 1.0
        return self._cp_cache[key]

    def dp_inflation(self, dp: int, attention_fraction: float) -> float:
        """Step time of the heaviest DP rank over the balanced ideal.

        ``attention_fraction``: the share of attention in a sample's compute time at the mean
        cost (the rest, GEMMs, is the same for every sample). Samples are dealt as
        ``TrainStream`` deals them (by attention cost, megalong.data.balance)."""
        from megalong.data.balance import assign_by_attention_cost, rank_loads

        key = (dp, round(attention_fraction, 4))
        if key not in self._dp_cache:
            if dp == 1:
                self._dp_cache[key] = 1.0
            else:
                mean = self.mean_attention_cost or 1.0
                heaviest = ideal = 0.0
                for costs in self.costs:
                    times = (1 - attention_fraction) + attention_fraction * costs / mean
                    loads = rank_loads(times, assign_by_attention_cost(costs, dp))
                    heaviest += loads.max()
                    ideal += loads.mean()
                self._dp_cache[key] = heaviest / ideal
        return self._dp_cache[key]

    def describe(self) -> str:
        return f"{self.attention_fraction_of_full:.0%} of full-length causal attention ({self.source})"


def _stand_in_layouts(data, global_batch: int, steps: int) -> list[list[tuple[int, object]]]:
    """(domain, SampleLayout) of each sample of the first ``steps`` steps, with the mixture's
    packing indices built over stand-in lengths (see the module docstring)."""
    from megalong.data.mixture import Blend
    from megalong.data.packing import build_index

    mixture = data.mixture_spec()
    seq = data.seq_length
    blend = Blend(mixture.shares)
    counts = blend.counts(steps * global_batch)
    rng = np.random.default_rng(data.seed)
    indices = []
    for spec, count in zip(mixture.domains, counts.tolist()):
        tokens_needed = (count + 2) * seq
        if spec.kind == "long":
            chunk = spec.chunk_length or seq
            lengths = np.full(tokens_needed // chunk + 1, chunk, dtype=np.int64)
        else:
            lengths = stand_in_document_lengths(tokens_needed, rng)
            if spec.kind == "sft":
                lengths = np.minimum(lengths, seq)
        indices.append(build_index(spec.kind, lengths, seq, data.seed, spec.name, chunk_length=spec.chunk_length))
    out = []
    for step in range(steps):
        domains, samples = blend.lookup(step * global_batch, global_batch)
        out.append([(int(d), indices[int(d)].layout(int(j))) for d, j in zip(domains, samples)])
    return out
