"""The one-ahead producer used by both conversion directions, and its use by the writer."""

import threading

import pytest
import torch

from megalong.convert import dist_io
from megalong.convert.prefetch import Prefetcher
from megalong.convert.safetensors_io import PlannedTensor, ShardWriter, read_header, read_rows


def test_pieces_come_back_in_order_and_the_next_is_produced_meanwhile():
    next_started = threading.Event()

    def produce(i):
        def run():
            if i == 1:
                next_started.set()
            return i * 10
        return run

    with Prefetcher([produce(i) for i in range(4)], [1, 1, 1, 1]) as prefetch:
        assert prefetch.take(0) == 0
        # Piece 1 is being produced while the caller still holds piece 0.
        assert next_started.wait(timeout=10)
        assert [prefetch.take(i) for i in (1, 2, 3)] == [10, 20, 30]
    # Every piece, the first included, was produced before it was asked for.
    assert (prefetch.hits, prefetch.misses) == (4, 0)


def test_a_piece_too_large_to_overlap_is_produced_alone():
    alive, peak = [0], [0]
    lock = threading.Lock()

    def produce(nbytes):
        def run():
            with lock:
                alive[0] += nbytes
                peak[0] = max(peak[0], alive[0])
            return nbytes
        return run

    sizes = [1, 10, 1, 1, 10, 1]
    with Prefetcher([produce(n) for n in sizes], sizes, budget_bytes=10) as prefetch:
        for i in range(len(sizes)):
            nbytes = prefetch.take(i)
            with lock:  # the caller is done with the piece: it no longer counts
                alive[0] -= nbytes
    # A budget of the largest piece: each 10 is produced alone and never shares memory.
    assert peak[0] <= 10
    assert (prefetch.hits, prefetch.misses) == (2, 4)
    # The default budget is the two largest pieces together (here 20): all overlap.
    with Prefetcher([produce(n) for n in sizes], sizes) as prefetch:
        for i in range(len(sizes)):
            alive[0] -= prefetch.take(i)
    assert (prefetch.hits, prefetch.misses) == (6, 0)


def test_out_of_order_requests_are_still_right_and_errors_surface_at_their_piece():
    def failing():
        raise RuntimeError("shard 3 is truncated")

    producers = [lambda: "a", lambda: "b", failing, lambda: "d"]
    with Prefetcher(producers, [1, 1, 1, 1]) as prefetch:
        assert prefetch.take(0) == "a"
        assert prefetch.take(3) == "d"  # skipped ahead: produced on demand
        assert prefetch.take(1) == "b"
        with pytest.raises(RuntimeError, match="shard 3 is truncated"):
            prefetch.take(2)
    with pytest.raises(ValueError):
        Prefetcher([lambda: 1], [1, 2])


def test_a_real_checkpoint_write_produces_each_piece_while_the_previous_is_written(tmp_path):
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(4, 8, generator=generator) for _ in range(6)]
    produced = []

    def producer(value):
        def produce():
            produced.append(value.unsqueeze(0).clone())
            return produced[-1]
        return produce

    pieces = [dist_io.TensorPiece("stacked", (6, 4, 8), (i, 0, 0), (1, 4, 8), torch.float32, producer(v))
              for i, v in enumerate(values)]
    ahead = dist_io.write_checkpoint(tmp_path / "ckpt", pieces)
    # DCP asks for the pieces in plan order, so every one was produced ahead of its turn.
    assert ahead == len(pieces)
    # Each piece's memory was freed once written (DCP itself keeps references to them all).
    assert [t.untyped_storage().nbytes() for t in produced[:-1]] == [0] * (len(pieces) - 1)
    reader = dist_io.CheckpointReader(tmp_path / "ckpt")
    got = reader.read({"stacked": ((0, 0, 0), (6, 4, 8))})["stacked"]
    assert torch.equal(got, torch.stack(values))
    # The process-wide CRC setting is back to what it was.
    assert torch.serialization.get_crc32_options() is True


def test_read_rows_reads_a_run_of_rows_into_a_slice(tmp_path):
    table = torch.arange(6 * 5, dtype=torch.int32).reshape(6, 5)
    norm = torch.arange(7, dtype=torch.float32)
    writer = ShardWriter(tmp_path / "a.safetensors", [PlannedTensor("table", torch.int32, (6, 5)),
                                                      PlannedTensor("norm", torch.float32, (7,))])
    writer.write("table", table)
    writer.write("norm", norm)
    writer.close()
    entries = read_header(tmp_path / "a.safetensors")

    fused = torch.zeros(5, 5, dtype=torch.int32)
    read_rows(tmp_path / "a.safetensors", entries["table"], 2, fused.narrow(0, 1, 3))
    assert torch.equal(fused[1:4], table[2:5]) and not fused[0].any() and not fused[4].any()
    elements = torch.empty(3)
    read_rows(tmp_path / "a.safetensors", entries["norm"], 4, elements)
    assert torch.equal(elements, norm[4:])
    with pytest.raises(ValueError, match="outside"):
        read_rows(tmp_path / "a.safetensors", entries["table"], 4, torch.empty(3, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="cannot be read"):
        read_rows(tmp_path / "a.safetensors", entries["table"], 0, torch.empty(3, 4, dtype=torch.int32))
