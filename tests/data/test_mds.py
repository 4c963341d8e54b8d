"""ProLong's released MDS data: megalong's reader against shards written by mosaicml-streaming's
MDSWriter (tests/data/fixtures/mds, made by its make_fixtures.py), the conversion into indexed
datasets, bad shards, and what the model sees from a ``kind: packed`` domain against ProLong's
own collator."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from megalong.data.mds import MdsError, iter_samples
from megalong.data.mixture import DomainSource, DomainSpec
from megalong.data.preprocess import BadInputError
from tests.data import mds_samples
from tests.data.preprocess_helpers import llama3, preprocess, read_dataset

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mds"


def _fixture(name):
    return mds_samples.FIXTURES[name][1]()


@pytest.mark.parametrize("name", ["packed", "packed_sft", "raw", "bad_packed_sft"])
def test_reader_returns_what_streaming_wrote(name):
    expected = _fixture(name)
    got = list(iter_samples(FIXTURES / name))
    assert len(got) == len(expected)
    for sample, want in zip(got, expected):
        assert set(sample) == set(want)
        for key, value in want.items():
            assert np.array_equal(np.asarray(sample[key]), np.asarray(value)), key


def test_raw_documents_take_the_bos_eos_policy(tmp_path):
    ids = [s["input_ids"].tolist() for s in _fixture("raw")]
    sidecar = preprocess([FIXTURES / "raw"], tmp_path / "raw", input_format="mds")
    assert read_dataset(tmp_path / "raw") == [[mds_samples.BOS] + d + [mds_samples.EOS] for d in ids]
    assert sidecar["mds_domains"] == {"fineweb-edu": len(ids)} and "kind" not in sidecar
    preprocess([FIXTURES / "raw"], tmp_path / "bare", input_format="mds", add_bos=False, add_eos=False,
               min_tokens=20, dedup=True)
    assert read_dataset(tmp_path / "bare") == [d for d in ids if len(d) >= 20]


@pytest.mark.parametrize("name", ["packed", "packed_sft"])
def test_packed_samples_are_stored_as_released(tmp_path, name):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    samples = _fixture(name)
    sidecar = preprocess([FIXTURES / name], tmp_path / name, input_format="mds")
    assert sidecar["kind"] == "packed" and sidecar["loss_mask"] == (name == "packed_sft")
    assert sidecar["documents"] == len(samples) and sidecar["spans"] == sum(len(s["indices"]) for s in samples)
    dataset = IndexedDataset(str(tmp_path / name), multimodal=sidecar["loss_mask"])
    # One Megatron document per packed sample; its sequences hold the tokens exactly as released.
    assert len(dataset.document_indices) == len(samples) + 1
    for g, sample in enumerate(samples):
        first, stop = dataset.document_indices[g], dataset.document_indices[g + 1]
        tokens = np.concatenate([np.asarray(dataset.get(int(i)) if name == "packed" else dataset.get(int(i))[0])
                                 for i in range(first, stop)])
        assert tokens.tolist() == sample["input_ids"].tolist()
        if name == "packed":  # one sequence per span
            spans = sample["indices"]
            assert dataset.sequence_lengths[first:stop].tolist() == (spans[:, 1] - spans[:, 0]).tolist()


def prolong_collator(item: dict, per_device_max_tokens: int, apply_instruct_masks: bool):
    """ProLong's ``training/dataset.py:DataCollator.__call__`` (lines 42-83) for one item,
    rewritten in numpy from its source: each (start, end) span longer than one token becomes a
    sequence; a span's first label is -100 ("Don't predict the first token"); with
    ``apply_instruct_masks`` and a ``mask`` field, labels where ``mask == 0`` are -100."""
    ids = np.asarray(item["input_ids"], dtype=np.int64)
    spans = item["indices"] if "indices" in item else [(0, len(ids))]
    inputs, labels, seq_lengths = [], [], []
    available = per_device_max_tokens
    for start, end in np.asarray(spans, dtype=np.int64):
        end = start + min(end - start, available)
        if end - start > 1:
            inputs.append(ids[start:end])
            label = ids[start:end].copy()
            label[0] = -100
            if apply_instruct_masks and "mask" in item:
                label[np.asarray(item["mask"][start:end]) == 0] = -100
            labels.append(label)
            seq_lengths.append(end - start)
            available -= end - start
        elif available <= 0:
            break
    return np.concatenate(inputs), np.concatenate(labels), np.asarray(seq_lengths)


def _megalong_sees(tmp_path, name):
    """Every stored sample of the fixture as megalong's kind: packed domain serves it."""
    preprocess([FIXTURES / name], tmp_path / name, input_format="mds")
    spec = DomainSpec(name=name, weight=1.0, kind="packed", paths=[str(tmp_path / name)])
    source = DomainSource(spec, "", mds_samples.PACK_LENGTH, seed=7, pad_token_id=128004, allow_repeat=True)
    served = {}
    for k in range(source.index.whole_samples_per_epoch):
        layout = source.layout(k)
        served[int(layout.documents[0])] = source.read(layout)
    return served


@pytest.mark.parametrize("name", ["packed", "packed_sft"])
def test_what_the_model_sees_equals_prolongs_collator(tmp_path, name):
    samples = _fixture(name)
    served = _megalong_sees(tmp_path, name)
    assert sorted(served) == list(range(len(samples)))  # one epoch serves every stored sample once
    single_token_spans = 0
    for g, item in enumerate(samples):
        # ProLong's scripts: --per_device_max_tokens = the packed length; SFT passes --apply_instruct_masks.
        ref_inputs, ref_labels, ref_lengths = prolong_collator(item, mds_samples.PACK_LENGTH, name == "packed_sft")
        # The model scores hidden[:-1] against labels[1:] (modeling_flash_llama.py:728-729): input i
        # is trained to predict labels[i + 1] unless that is -100.
        ref_target = np.append(ref_labels[1:], -100)
        sample = served[g]
        sample.validate()
        # ProLong's collator leaves out spans of one token (b - a > 1). megalong keeps the
        # released tokens: such a span is a document of its own that predicts nothing and is
        # predicted by nothing, so attention and loss of every other token are unchanged.
        lengths = np.diff(sample.cu_seqlens)
        keep = np.repeat(lengths > 1, lengths)
        for start in sample.cu_seqlens[:-1][lengths == 1]:
            assert sample.loss_mask[start] == 0
            if start > 0:
                assert sample.loss_mask[start - 1] == 0
            single_token_spans += 1
        tokens, loss_mask, labels = sample.tokens[keep], sample.loss_mask[keep], sample.labels[keep]
        assert tokens.tolist() == ref_inputs.tolist()
        assert lengths[lengths > 1].tolist() == ref_lengths.tolist()
        assert loss_mask.tolist() == (ref_target != -100).astype(np.float32).tolist()
        on = loss_mask == 1
        assert labels[on].tolist() == ref_target[on].tolist()
    assert single_token_spans > 0  # the fixtures hold such spans, at both ends of samples


def test_packed_domain_refuses_another_sequence_length(tmp_path):
    preprocess([FIXTURES / "packed"], tmp_path / "packed", input_format="mds")
    spec = DomainSpec(name="books", weight=1.0, kind="packed", paths=[str(tmp_path / "packed")])
    with pytest.raises(ValueError, match="data.seq_length must be the length they were packed to"):
        DomainSource(spec, "", 2 * mds_samples.PACK_LENGTH, seed=1, pad_token_id=0, allow_repeat=True)
    with pytest.raises(ValueError, match="not a packed-sample dataset"):
        preprocess([FIXTURES / "raw"], tmp_path / "raw", input_format="mds")
        DomainSource(DomainSpec(name="web", weight=1.0, kind="packed", paths=[str(tmp_path / "raw")]), "",
                     mds_samples.PACK_LENGTH, seed=1, pad_token_id=0, allow_repeat=True)


def test_bad_samples_are_counted_with_shard_and_sample(tmp_path):
    sidecar = preprocess([FIXTURES / "bad_packed_sft"], tmp_path / "bad", input_format="mds")
    found = {(e["sample"], e["reason"]) for e in sidecar["skip_examples"]}
    assert found == set(mds_samples.BAD.items())
    assert all(e["path"].endswith("shard.00000.mds") for e in sidecar["skip_examples"])
    assert sidecar["documents"] == 2  # samples 0 and 6
    with pytest.raises(BadInputError, match=r"bad_packed_sft/shard\.00000\.mds sample 1: indices"):
        preprocess([FIXTURES / "bad_packed_sft"], tmp_path / "strict", input_format="mds", strict=True)
    assert not (tmp_path / "strict.bin").exists()


def test_bad_shards_are_counted_or_stop_a_strict_run(tmp_path):
    broken = {}
    for name in ("no_index", "truncated", "corrupt_zstd"):
        broken[name] = tmp_path / name
        shutil.copytree(FIXTURES / ("packed_sft" if name == "corrupt_zstd" else "packed"), broken[name])
    (broken["no_index"] / "index.json").unlink()
    shard = broken["truncated"] / "shard.00001.mds"
    shard.write_bytes(shard.read_bytes()[:-100])
    zipped = broken["corrupt_zstd"] / "shard.00002.mds.zstd"
    data = bytearray(zipped.read_bytes())
    data[20:40] = b"\xff" * 20
    zipped.write_bytes(bytes(data))
    inputs = [FIXTURES / "packed", broken["no_index"], broken["truncated"]]
    sidecar = preprocess(inputs, tmp_path / "out", input_format="mds")
    examples = {e["path"]: e for e in sidecar["skip_examples"]}
    assert examples[str(broken["no_index"] / "index.json")]["reason"] == "unreadable_index"
    cut = examples[str(shard)]
    assert cut["reason"] == "unreadable_shard" and "cut short" in cut["detail"]
    samples_in_shard = list(iter_samples(FIXTURES / "packed"))  # all good
    assert sidecar["documents"] == 2 * len(samples_in_shard) - sidecar["skipped"]["unreadable_shard"]
    assert sidecar["skipped"] == {"unreadable_index": 1, "unreadable_shard": 1}
    with pytest.raises(BadInputError, match=r"truncated/shard\.00001\.mds sample 4: an MDS shard"):
        preprocess([broken["truncated"]], tmp_path / "strict", input_format="mds", strict=True)
    sidecar = preprocess([broken["corrupt_zstd"]], tmp_path / "zstd", input_format="mds")
    assert sidecar["skip_examples"][0]["path"] == str(zipped) and "decompress" in sidecar["skip_examples"][0]["detail"]
    with pytest.raises(MdsError, match="cannot be decompressed"):
        list(iter_samples(broken["corrupt_zstd"]))


def test_mixed_layouts_and_filters_on_packed_data_are_refused(tmp_path):
    from megalong.data.preprocess import InputError

    with pytest.raises(InputError, match="mix layouts"):
        preprocess([FIXTURES / "packed", FIXTURES / "raw"], tmp_path / "mixed", input_format="mds")
    with pytest.raises(InputError, match="kept exactly as released"):
        preprocess([FIXTURES / "packed"], tmp_path / "filtered", input_format="mds", min_tokens=10)
    assert llama3().vocab_size == mds_samples.VOCAB
