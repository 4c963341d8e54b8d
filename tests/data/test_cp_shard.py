import pytest
import torch

from megalong.data.cp_shard import load_balanced_index, shard_for_cp
from megalong.model.attention.thd_relayout import thd_index
from tests.data.cp_helpers import pad_documents_for_thd, shard_thd_for_cp, unshard_from_cp


def _batch(seq_length=16):
    tokens = torch.arange(2 * seq_length).view(2, seq_length)
    return {
        "tokens": tokens, "labels": tokens + 1, "loss_mask": torch.ones(2, seq_length),
        "position_ids": tokens % 5,
        "cu_seqlens": [torch.tensor([0, 5, 16]), torch.tensor([0, 3, 4, 16])],
    }


def test_load_balanced_layout_is_megatrons():
    # 2 x CP = 4 chunks of 4: rank 0 keeps chunks 0 and 3, rank 1 keeps chunks 1 and 2.
    assert load_balanced_index(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert load_balanced_index(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_shard_then_unshard_round_trips(cp_size):
    batch = _batch()
    shards = [shard_for_cp(batch, cp_size, r) for r in range(cp_size)]
    for shard in shards:
        assert shard["tokens"].shape == (2, 16 // cp_size)
        assert shard["cu_seqlens"] is batch["cu_seqlens"]  # boundaries stay whole
    full = unshard_from_cp(shards, cp_size)
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert torch.equal(full[key], batch[key]), key


def test_sharding_rejects_indivisible_lengths():
    with pytest.raises(ValueError, match="not divisible by 2 x context_parallel = 8"):
        shard_for_cp(_batch(12), 4, 0)
    with pytest.raises(ValueError, match="cp_rank 2"):
        load_balanced_index(16, 2, 2)


def test_thd_padding_pads_every_document_to_a_multiple_of_2cp():
    padded = pad_documents_for_thd(_batch(), cp_size=2, pad_token_id=99)
    # Documents 5, 11 | 3, 1, 12 -> padded to 8, 12 | 4, 4, 12.
    assert padded["cu_seqlens"].tolist() == [0, 5, 16, 19, 20, 32]
    assert padded["cu_seqlens_padded"].tolist() == [0, 8, 20, 24, 28, 40]
    assert padded["tokens"].shape == (1, 40)
    assert padded["tokens"][0, :8].tolist() == [0, 1, 2, 3, 4, 99, 99, 99]
    assert padded["loss_mask"][0, :8].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert padded["loss_mask"].sum() == 32  # every real token kept, no padding counted
    assert padded["position_ids"][0, 5:8].tolist() == [5, 6, 7]


def test_thd_shards_take_pieces_r_and_2cp_minus_1_minus_r_of_each_document():
    padded = pad_documents_for_thd(_batch(), cp_size=2)
    assert thd_index(torch.tensor([0, 8, 20]), 2, 0).tolist() == [0, 1, 6, 7, 8, 9, 10, 17, 18, 19]
    shards = [shard_thd_for_cp(padded, 2, r) for r in range(2)]
    assert sum(s["tokens"].shape[1] for s in shards) == 40
    merged = torch.cat([s["tokens"] for s in shards], dim=1)
    assert sorted(merged[0].tolist()) == sorted(padded["tokens"][0].tolist())
