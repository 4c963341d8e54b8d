"""The training stream: global batch ``step`` for data-parallel rank ``r``, as a pure
function of the data configuration.

Global sample ``i`` comes from the mixture's blending (domain d, that domain's sample j);
the packing index of domain d says which document pieces make sample j. A step takes
samples ``[step * G, (step + 1) * G)``, orders them by attention cost and deals them to
the DP ranks (megalong.data.balance); each rank reads only its own samples' tokens.

Because nothing depends on what was read before, the stream's position in a checkpoint
is just the step: after a resume at step k, ``batch_for_step(k, r)`` is exactly the batch
an uninterrupted run saw. :meth:`TrainStream.fingerprint` identifies the data so a
trainer can refuse to resume onto a different mixture silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from megalong.data.balance import assign_by_attention_cost
from megalong.data.mixture import Blend, DomainSource, DomainSpec, MixtureSpec, load_mixture
from megalong.data.sample import PackedSample

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """The ``data:`` section of a training recipe."""

    # A bundled mixture name (megalong/recipes/mixtures/<name>.yaml) or a path to a mixture
    # YAML file. Leave empty to list the domains inline under ``domains``.
    mixture: str = ""
    domains: list[DomainSpec] = field(default_factory=list)
    # Relative dataset paths in the mixture resolve under this directory.
    data_root: str = ""
    seq_length: int = 65536
    seed: int = 1234
    # Overrides the mixture's allow_repeat when set: true repeats a domain too small for its
    # share (epochs are reported), false refuses with a message.
    allow_repeat: Optional[bool] = None
    # Token placed in SFT padding (loss is off there). Llama-3's <|finetune_right_pad_id|>
    # is 128004; any id inside the vocabulary works.
    pad_token_id: int = 0

    def __post_init__(self):
        if self.mixture and self.domains:
            raise ValueError("set either data.mixture or data.domains, not both")
        if self.seq_length < 2:
            raise ValueError(f"data.seq_length must be at least 2, got {self.seq_length}")

    def mixture_spec(self) -> MixtureSpec:
        if self.mixture:
            return load_mixture(self.mixture)
        if not self.domains:
            raise ValueError("data: no mixture given (set data.mixture or data.domains)")
        return MixtureSpec(domains=list(self.domains))


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
        costs = [layout.attention_cost for _, layout in layouts]
        mine = assign_by_attention_cost(costs, self.data_parallel_size)[dp_rank]
        self.steps_served = max(self.steps_served, step + 1)
        return [self.domains[layouts[i][0]].read(layouts[i][1]) for i in mine]

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

    # -- checkpointing ----------------------------------------------------------------------

    def state_dict(self, next_step: int) -> dict:
        """What a checkpoint stores: the next step to run and the data's fingerprint. The
        stream holds no other state: ``batch_for_step(next_step, r)`` after a resume is the
        batch an uninterrupted run would have seen."""
        return {"next_step": int(next_step), "consumed_samples": int(next_step) * self.global_batch_size,
                "fingerprint": self.fingerprint()}

    def resume_step(self, state: dict) -> int:
        """The step to continue from; refuses a checkpoint made with other data, seed,
        sequence length or global batch size (the same step would mean other samples)."""
        if state.get("fingerprint") != self.fingerprint():
            raise ValueError(
                "the checkpoint's data stream does not match this configuration (mixture, datasets, "
                "seq_length, seed or global batch size changed); resuming would not continue the same "
                f"stream (checkpoint {state.get('fingerprint')}, now {self.fingerprint()})"
            )
        return int(state["next_step"])

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
                 "documents": int(s.lengths.size), "tokens": int(s.lengths.sum())}
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
