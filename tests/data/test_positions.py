"""Stages that go on from each other's data: a later stage draws none of what an earlier stage
drew from a domain they share, and a resumed stage is still exact (megalong.data.positions)."""

import numpy as np
import pytest

from megalong.data.config import DataConfig
from megalong.data.mixture import DomainSpec
from megalong.data.packing import ConversationPackIndex
from megalong.data.stream import TrainStream
from tests.data.builders import unique_documents, write_indexed

CHUNK = 64  # stage 1's sequence length, and the chunk of stage 2's "books" domain
STAGE2_SEQ = 4 * CHUNK


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Books (long documents) and web text (short ones); every token id occurs once, so the
    tokens two streams drew overlap exactly where they drew the same piece of a document."""
    root = tmp_path_factory.mktemp("stages")
    rng = np.random.default_rng(3)
    books = unique_documents(rng.integers(CHUNK, 9 * CHUNK, size=40))
    web = unique_documents(rng.lognormal(3.0, 1.0, size=600).astype(np.int64) + 1, first_token=10**7)
    write_indexed(root / "books", books)
    write_indexed(root / "web", web)
    write_indexed(root / "other_books", unique_documents(rng.integers(CHUNK, 9 * CHUNK, size=40), first_token=10**8))
    return root


def _stage(root, seq_length, books_chunk=None, books_paths=("books",)) -> DataConfig:
    return DataConfig(
        domains=[DomainSpec(name="books", weight=60, kind="long", paths=list(books_paths), chunk_length=books_chunk),
                 DomainSpec(name="web", weight=40, kind="concat", paths=["web"])],
        data_root=str(root), seq_length=seq_length, seed=42,
    )


def _drawn(stream: TrainStream, steps: range) -> dict[str, set]:
    """Per domain, every input token the stream's samples of ``steps`` hold."""
    drawn = {source.name: set() for source in stream.domains}
    for step in steps:
        for d, layout in stream.layouts_for_step(step):
            drawn[stream.domains[d].name].update(stream.domains[d].read(layout).tokens.tolist())
    return drawn


def test_stage_two_goes_on_after_what_stage_one_drew(data_root):
    stage1 = TrainStream(_stage(data_root, CHUNK), global_batch_size=8, data_parallel_size=1)
    first = _drawn(stage1, range(6))
    record = stage1.positions(6)
    # Stage 2: longer samples, books as four 64K-style chunks per sample, the same seed and names.
    replaying = TrainStream(_stage(data_root, STAGE2_SEQ, books_chunk=CHUNK), 4, 1)
    assert all(first[name] & tokens for name, tokens in _drawn(replaying, range(3)).items())
    stage2 = TrainStream(_stage(data_root, STAGE2_SEQ, books_chunk=CHUNK), 4, 1)
    lines = stage2.continue_after(record)
    assert [line.split(":")[0] for line in lines] == ["books", "web"]
    assert all("continues after the earlier run" in line for line in lines)
    second = _drawn(stage2, range(3))
    for name in ("books", "web"):
        assert second[name] and not first[name] & second[name], name
    # Where stage 2 began is where stage 1 stood: chunks for books, tokens for web.
    began = stage2.positions(0)
    assert {name: began[name]["start"] for name in began} == {name: record[name]["end"] for name in record}
    assert record["books"]["unit"] == "chunks" and record["web"]["unit"] == "tokens"
    assert "begins at chunk" in stage2.describe()


def test_a_continued_stage_resumes_exactly(data_root):
    stage1 = TrainStream(_stage(data_root, CHUNK), 8, 1)
    stage2 = TrainStream(_stage(data_root, STAGE2_SEQ, books_chunk=CHUNK), 4, 2)
    stage2.continue_after(stage1.positions(5))
    saved = stage2.positions(3)
    batches = {step: stage2.batch_for_step(step, 1) for step in range(3, 6)}
    resumed = TrainStream(_stage(data_root, STAGE2_SEQ, books_chunk=CHUNK), 4, 2)
    resumed.restore_positions(saved)
    for step, batch in batches.items():
        for a, b in zip(resumed.batch_for_step(step, 1), batch):
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
    # The record of the resumed run is that of the uninterrupted one.
    assert resumed.positions(6) == stage2.positions(6)
    with pytest.raises(RuntimeError, match="after batches were served"):
        resumed.continue_after(saved)


def test_a_shared_name_over_other_data_starts_fresh_and_says_so(data_root):
    stage1 = TrainStream(_stage(data_root, CHUNK), 8, 1)
    record = stage1.positions(4)
    other = TrainStream(_stage(data_root, CHUNK, books_paths=("other_books",)), 8, 1)
    lines = dict(line.split(": ", 1) for line in other.continue_after(record))
    assert "NOT after the earlier run's draws" in lines["books"] and "tokens" in lines["books"]
    assert lines["web"].startswith("continues")
    assert other.positions(0)["books"]["start"] == 0
    # A domain the earlier run did not have starts at the beginning of its shuffle.
    fresh = TrainStream(_stage(data_root, CHUNK), 8, 1)
    lines = dict(line.split(": ", 1) for line in fresh.continue_after({"web": record["web"]}))
    assert lines["books"].startswith("new in this stage")


def test_repeats_off_counts_what_the_earlier_stage_drew(data_root):
    stage1 = TrainStream(_stage(data_root, CHUNK), 8, 1)
    books = stage1.domains[0].index
    # Stage 1 drew all but 3 samples' worth of book chunks; stage 2 (repeats off) has 3 left.
    used = books.num_chunks - 3
    record = stage1.positions(0)
    record["books"]["end"] = used
    cfg = _stage(data_root, CHUNK)
    cfg.allow_repeat = False
    stage2 = TrainStream(cfg, 8, 1)
    stage2.continue_after(record)
    assert stage2.domains[0].index.fresh_samples == 3
    with pytest.raises(RuntimeError, match=f"after the {used:,} chunks an earlier stage drew"):
        for step in range(10):
            stage2.batch_for_step(step, 0)


def test_sft_packing_goes_on_after_the_conversations_drawn():
    lengths = np.random.default_rng(1).integers(5, 60, size=300)
    first = ConversationPackIndex(lengths, seq_length=128, seed=9, name="chat")
    drawn = {int(d) for k in range(20) for d in first.layout(k).documents}
    later = ConversationPackIndex(lengths, seq_length=128, seed=9, name="chat", start=first.position_after(20))
    assert later.position_after(0) == first.position_after(20) == len(drawn)
    second = {int(d) for k in range(15) for d in later.layout(k).documents}
    assert second and not drawn & second
    # Past the rest of its epoch the stream packs whole epochs again.
    rest = later.fresh_samples
    assert later.position_after(rest) == first.units_per_epoch
    assert later.layout(rest).documents.size and later.epochs_for(rest) == pytest.approx(1 - len(drawn) / 300)


def _covered(index, samples) -> set:
    """Every (document, token offset) the layouts of ``samples`` hold."""
    covered = set()
    for k in samples:
        layout = index.layout(k)
        for document, offset, length in zip(layout.documents, layout.offsets, layout.lengths):
            covered.update((int(document), int(offset) + i) for i in range(int(length)))
    return covered


def test_filled_sft_and_released_packed_samples_go_on_too():
    """sft_packing: fill counts tokens (as concat), a packed domain counts stored samples."""
    from megalong.data.packing import build_index

    lengths = np.random.default_rng(2).integers(5, 60, size=200)
    fill = build_index("sft", lengths, 128, 9, "chat", sft_packing="fill")
    assert fill.unit == "tokens"
    later = build_index("sft", lengths, 128, 9, "chat", sft_packing="fill", start=fill.position_after(10))
    assert not _covered(fill, range(10)) & _covered(later, range(10))

    packed = build_index("packed", np.full(50, 64), 64, 9, "released", spans=lambda g: np.array([64]))
    assert packed.unit == "samples"
    later = build_index("packed", np.full(50, 64), 64, 9, "released", spans=lambda g: np.array([64]),
                        start=packed.position_after(20))
    first = {int(packed.layout(k).documents[0]) for k in range(20)}
    second = {int(later.layout(k).documents[0]) for k in range(later.fresh_samples)}
    assert len(first) == 20 and len(second) == 30 and not first & second
