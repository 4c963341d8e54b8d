"""From the training stream to what one rank's model chunks eat, micro-batch by micro-batch.

Every step asks the stream for this data-parallel rank's packed samples
(``batch_for_step(step, dp_rank)``: deterministic in the step, so a resumed run sees
exactly the batches an uninterrupted run would), groups them into micro-batches, and for
context parallelism keeps this CP rank's share of the sequence (Megatron's load-balanced
layout). Document boundaries go to the attention as ``packed_seq_params`` (full,
unsharded boundaries: the attention knows the CP layout).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from megalong.data.cp_shard import shard_for_cp
from megalong.data.sample import PackedSample, collate
from megalong.model.attention.packing import packed_seq_params_for


class TrainingStream(Protocol):
    """What the trainer needs of its data: :class:`megalong.data.stream.TrainStream`, or what a
    recipe's ``data_factory`` returns (the test streams)."""

    def batch_for_step(self, step: int, dp_rank: int) -> list[PackedSample]:
        """This data-parallel rank's samples of global batch ``step``, in micro-batch order; a
        pure function of its arguments, so that a resumed run sees the batches an
        uninterrupted run saw."""

    def fingerprint(self) -> str:
        """Identifies everything that decides the batches; saved with checkpoints, and a resume
        onto a stream with another fingerprint is refused."""

    def describe(self) -> str:
        """What the stream serves, for the log."""

    def report(self):
        """What the stream has drawn (per domain, for a mixture), logged when training ends."""


class FixedSampleStream:
    """A :class:`TrainingStream` over a fixed list of packed samples, served in order and
    cycling: global batch ``step`` is samples ``step * G .. step * G + G - 1``, split evenly
    over the data-parallel ranks in rank order, so every layout sees the same global batches
    (what ``tools/gpu_check.py``'s training checks and the tests' data factories serve)."""

    def __init__(self, samples: list[PackedSample], global_batch_size: int, data_parallel_size: int,
                 description: str = "fixed packed samples"):
        if not samples:
            raise ValueError("FixedSampleStream needs at least one sample")
        if global_batch_size < 1 or global_batch_size % data_parallel_size:
            raise ValueError(f"global batch {global_batch_size} does not split over {data_parallel_size} "
                             f"data-parallel ranks")
        self.samples, self.global_batch_size = samples, global_batch_size
        self.per_rank = global_batch_size // data_parallel_size
        self.description = description

    def batch_for_step(self, step: int, dp_rank: int) -> list[PackedSample]:
        first = step * self.global_batch_size + dp_rank * self.per_rank
        return [self.samples[(first + i) % len(self.samples)] for i in range(self.per_rank)]

    def describe(self) -> str:
        return f"{len(self.samples)} {self.description}"

    def fingerprint(self) -> str:
        import hashlib

        digest = hashlib.sha256(str(self.global_batch_size).encode())
        for sample in self.samples:
            digest.update(sample.tokens.tobytes())
            digest.update(sample.loss_mask.tobytes())
        return digest.hexdigest()[:16]

    def report(self) -> dict:
        return {"samples": len(self.samples)}


@dataclass
class MicroBatch:
    tokens: torch.Tensor        # [B, S/CP]
    labels: torch.Tensor        # [B, S/CP]
    loss_mask: torch.Tensor     # [B, S/CP]
    position_ids: torch.Tensor  # [B, S/CP]
    packed_seq_params: Any      # PackedSeqParams or None (no document masking)
    attention_cost: int         # sum over samples of squared document lengths (for FLOPs)
    num_tokens: int             # input tokens of the full (unsharded) micro-batch


class MicroBatcher:
    """Turns one step's samples of this rank into :class:`MicroBatch` objects."""

    def __init__(self, micro_batch_size: int, cp_size: int, cp_rank: int, device: torch.device):
        self.micro_batch_size = micro_batch_size
        self.cp_size = cp_size
        self.cp_rank = cp_rank
        self.device = device

    def split(self, samples: list[PackedSample], expected: int) -> list[MicroBatch]:
        if len(samples) != expected * self.micro_batch_size:
            raise RuntimeError(
                f"the data stream gave {len(samples)} samples for this rank, expected "
                f"{expected} micro-batches x {self.micro_batch_size}"
            )
        size = self.micro_batch_size
        return [self._micro_batch(samples[i:i + size]) for i in range(0, len(samples), size)]

    def _micro_batch(self, samples: list[PackedSample]) -> MicroBatch:
        batch = collate(samples)
        seq_length = batch["tokens"].shape[1]
        psp = packed_seq_params_for(batch["cu_seqlens"], seq_length)
        if self.cp_size > 1:
            batch = shard_for_cp(batch, self.cp_size, self.cp_rank)
        dev = self.device
        return MicroBatch(
            tokens=batch["tokens"].to(dev, non_blocking=True),
            labels=batch["labels"].to(dev, non_blocking=True),
            loss_mask=batch["loss_mask"].to(dev, non_blocking=True),
            position_ids=batch["position_ids"].to(dev, non_blocking=True),
            packed_seq_params=psp,
            attention_cost=sum(s.attention_cost for s in samples),
            num_tokens=seq_length * len(samples),
        )


def load_factory(path: str) -> Callable:
    """Import ``"package.module:function"``; the error names the path."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"data_factory {path!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"data_factory {path!r}: cannot import {module_name}: {err}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"data_factory {path!r}: {module_name} has no {attr}") from None


def build_stream(run, data_parallel_size: int) -> TrainingStream:
    """The run's training stream: its data_factory, or megalong's TrainStream over ``data:``."""
    if run.data_factory:
        return load_factory(run.data_factory)(run, data_parallel_size)
    from megalong.data.stream import TrainStream

    # total_steps lets the stream refuse, before training, a domain too small for the planned steps.
    return TrainStream(run.data, run.schedule.global_batch_size, data_parallel_size,
                       total_steps=run.schedule.train_steps)
