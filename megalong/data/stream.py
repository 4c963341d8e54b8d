"""The training stream: global batch ``step`` for data-parallel rank ``r``, as a pure
function of the data configuration.

Global sample ``i`` comes from the mixture's blending (domain d, that domain's sample j);
the packing index of domain d says which document pieces make sample j. A step takes
samples ``[step * G, (step + 1) * G)``, orders them by attention cost and deals them to
the DP ranks (megalong.data.balance); each rank reads only its own samples' tokens.

Because nothing depends on what was read before, the stream's position in a checkpoint
is just the step: after a resume at step k, ``batch_for_step(k, r)`` is exactly the batch
an uninterrupted run saw (a checkpoint stores only the step). :meth:`TrainStream.fingerprint`
identifies the data so a trainer can refuse to resume onto a different mixture silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Iterator, Optional

import numpy as np

from megalong.data.balance import assign_by_attention_cost
from megalong.data.config import DataConfig
from megalong.data.mixture import Blend, DomainSource
from megalong.data.sample import PackedSample

log = logging.getLogger(__name__)


class TrainStream:
    """Deterministic, resumable stream of packed, attention-balanced global batches."""

    def __init__(self, cfg: DataConfig, global_batch_size: int, data_parallel_size: int,
                 total_steps: Optional[int] = None):
        if global_batch_size < 1 or data_parallel_size < 1 or global_batch_size % data_parallel_size:
            raise ValueError(
                f"global batch size {global_batch_size} must be a positive multiple of the "
                f"data-parallel size {data_parallel_size}"
            )
        self.cfg = cfg
        self.global_batch_size = int(global_batch_size)
        self.data_parallel_size = int(data_parallel_size)
        started = time.perf_counter()
        self.mixture = cfg.mixture_spec()
        default_repeat = self.mixture.allow_repeat if cfg.allow_repeat is None else cfg.allow_repeat
        self.domains: list[DomainSource] = []
        for spec in self.mixture.domains:
            allow = default_repeat if spec.allow_repeat is None else spec.allow_repeat
            self.domains.append(DomainSource(spec, cfg.data_root, cfg.seq_length, cfg.seed,
                                             cfg.pad_token_id, allow))
        self.blend = Blend(self.mixture.shares)
        self.steps_served = 0
        self.total_steps = total_steps
        if total_steps is not None:
            self._check_capacity(total_steps * self.global_batch_size)
        log.info("data: indexed %s documents in %d domain(s) in %.2f s",
                 f"{sum(int(d.lengths.size) for d in self.domains):,}", len(self.domains),
                 time.perf_counter() - started)

    # -- the contract -----------------------------------------------------------------------

    def batch_for_step(self, step: int, dp_rank: int) -> list[PackedSample]:
        """This rank's samples of global batch ``step``, in micro-batch order."""
        if not 0 <= dp_rank < self.data_parallel_size:
            raise ValueError(f"dp_rank {dp_rank} outside 0..{self.data_parallel_size - 1}")
        layouts = self.layouts_for_step(step)
        mine = self._positions_of_rank(layouts, dp_rank)
        self.steps_served = max(self.steps_served, step + 1)
        return [self.domains[layouts[i][0]].read(layouts[i][1]) for i in mine]

    def sample_ids_for_step(self, step: int, dp_rank: int) -> list[tuple[str, int]]:
        """(domain name, index of the sample in that domain) of each sample
        ``batch_for_step(step, dp_rank)`` returns, in the same order, without reading tokens:
        which data a step trained on (``logging.log_samples``)."""
        if not 0 <= dp_rank < self.data_parallel_size:
            raise ValueError(f"dp_rank {dp_rank} outside 0..{self.data_parallel_size - 1}")
        domains, samples = self.blend.lookup(step * self.global_batch_size, self.global_batch_size)
        mine = self._positions_of_rank(self.layouts_for_step(step), dp_rank)
        return [(self.domains[int(domains[i])].name, int(samples[i])) for i in mine]

    def _positions_of_rank(self, layouts, dp_rank: int) -> list[int]:
        """Positions in the global batch of the samples rank ``dp_rank`` trains on, in order."""
        costs = [layout.attention_cost for _, layout in layouts]
        return assign_by_attention_cost(costs, self.data_parallel_size)[dp_rank]

    def iter_batches(self, start_step: int, dp_rank: int) -> Iterator[list[PackedSample]]:
        step = start_step
        while True:
            yield self.batch_for_step(step, dp_rank)
            step += 1

    def describe(self) -> str:
        lines = [
            f"data: {len(self.domains)} domain(s), samples of {self.cfg.seq_length:,} tokens, "
            f"global batch {self.global_batch_size} over {self.data_parallel_size} data-parallel rank(s), "
            f"seed {self.cfg.seed}" + (f", mixture {self.cfg.mixture}" if self.cfg.mixture else "")
        ]
        for source, share in zip(self.domains, self.mixture.shares):
            idx = source.index
            dropped = idx.dropped
            line = (f"  {source.name:<24} {share * 100:6.2f}%  {idx.kind:<6} "
                    f"{idx.tokens_per_epoch:>16,} tokens/epoch = {idx.samples_per_epoch:,.1f} samples")
            if dropped.tokens or dropped.documents:
                line += f"; left out: {dropped.documents:,} docs / {dropped.tokens:,} tokens ({dropped.reason})"
            if not source.allow_repeat:
                line += "; no repeats"
            lines.append(line)
        return "\n".join(lines)

    def report(self, steps: Optional[int] = None) -> dict:
        """Samples, tokens and epochs drawn per domain over the first ``steps`` steps
        (default: every step served so far, or the planned total)."""
        if steps is None:
            steps = self.steps_served or (self.total_steps or 0)
        num_samples = steps * self.global_batch_size
        counts = self.blend.counts(num_samples) if num_samples else np.zeros(len(self.domains), dtype=np.int64)
        total_tokens = num_samples * self.cfg.seq_length
        domains = {}
        for source, share, count in zip(self.domains, self.mixture.shares, counts):
            tokens = int(count) * self.cfg.seq_length
            entry = {
                "kind": source.index.kind,
                "target_share": float(share),
                "samples": int(count),
                "tokens": tokens,
                "share": tokens / total_tokens if total_tokens else 0.0,
                "epochs": float(source.index.epochs_for(int(count))) if count else 0.0,
                "tokens_per_epoch": int(source.index.tokens_per_epoch),
                "left_out_tokens": int(source.index.dropped.tokens),
                "left_out_documents": int(source.index.dropped.documents),
            }
            if source.index.kind == "sft" and count:
                pads = [source.index.layout(j).pad_length for j in range(int(count))]
                entry["padding_tokens"] = int(sum(pads))
            domains[source.name] = entry
        return {"steps": steps, "samples": num_samples, "tokens": total_tokens, "domains": domains}

    # -- helpers ----------------------------------------------------------------------------

    def layouts_for_step(self, step: int):
        """(domain index, SampleLayout) of every sample of global batch ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        domains, samples = self.blend.lookup(step * self.global_batch_size, self.global_batch_size)
        return [(int(d), self.domains[int(d)].layout(int(j))) for d, j in zip(domains, samples)]

    def fingerprint(self) -> str:
        """Identifies everything that decides the stream (store it in checkpoints)."""
        ident = {
            "seq_length": self.cfg.seq_length, "seed": self.cfg.seed, "pad": self.cfg.pad_token_id,
            "global_batch_size": self.global_batch_size,
            "domains": [
                {"name": s.name, "kind": s.spec.kind, "weight": s.spec.weight, "chunk": s.spec.chunk_length,
                 "documents": int(s.lengths.size), "tokens": int(s.lengths.sum()),
                 # only when not the default, so checkpoints made before the option still resume
                 **({"sft_packing": s.spec.sft_packing} if s.spec.sft_packing != "whole" else {})}
                for s in self.domains
            ],
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def _check_capacity(self, num_samples: int) -> None:
        counts = self.blend.counts(num_samples)
        for source, count in zip(self.domains, counts):
            if source.allow_repeat or count == 0:
                continue
            whole = source.index.whole_samples_per_epoch
            if count > whole:
                raise RuntimeError(
                    f"domain {source.name!r} is too small for its share: {self.total_steps:,} steps need "
                    f"{int(count):,} samples of {self.cfg.seq_length:,} tokens but one epoch holds "
                    f"{whole:,} ({source.index.epochs_for(int(count)):.2f} epochs). Set allow_repeat: true "
                    f"(data.allow_repeat=true, or per domain) to repeat it, or add data."
                )
