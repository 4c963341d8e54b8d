"""The samples of the committed MDS fixtures (tests/data/fixtures/mds/), in ProLong's schemas.

tests/data/fixtures/mds/make_fixtures.py writes them with mosaicml-streaming's own MDSWriter
and reads them back with streaming's LocalDataset; the tests compare megalong's reading and
conversion against these same values. Pure numpy, so the tests need no ``streaming``.

Schemas (what datatools' ``infer_columns`` gives for its packer's output, datatools
process.py:84-100 and scripts/pack.py:124-131, and what ProLong's README lists for the raw
sets):

* packed (prolong-data-64K/512K): input_ids ndarray:uint32, indices ndarray:uint32 ((start, end)
  per span), length int, domain str;
* packed SFT (prolong-ultrachat-64K): the same plus mask ndarray:uint32;
* raw (data_before_packing): domain str, input_ids ndarray:uint32 (no BOS/EOS), length int32.
"""

from __future__ import annotations

import numpy as np

PACK_LENGTH = 64
BOS, EOS = 128000, 128001
VOCAB = 128256

PACKED_COLUMNS = {"input_ids": "ndarray:uint32", "indices": "ndarray:uint32", "length": "int", "domain": "str"}
PACKED_MASK_COLUMNS = {**PACKED_COLUMNS, "mask": "ndarray:uint32"}
RAW_COLUMNS = {"domain": "str", "input_ids": "ndarray:uint32", "length": "int32"}


def _documents(rng, count: int, with_mask: bool):
    """Documents (BOS ... EOS) and, for SFT, their masks: 0 on the prompt, 1 on the reply, and
    the BOS/EOS ids where a packer that runs the mask through its special-token step puts
    them (a mask value that is neither 0 nor 1 must still count as "predict")."""
    # Lengths chosen to leave 1-token spans at the start and at the end of some samples.
    lengths = [5, 58, 2, 30, 33, 1 + 64, 7, 40, 16, 63, 1, 20, 90, 3, 3, 12, 50, 9, 64, 64, 14, 31]
    docs, masks = [], []
    for i in range(count):
        n = lengths[i % len(lengths)] + int(rng.integers(0, 3))
        body = rng.integers(0, 128000, size=max(n - 2, 0), dtype=np.uint32)
        doc = np.concatenate([[BOS], body, [EOS]]).astype(np.uint32)[:max(n, 1)]
        docs.append(doc)
        if with_mask:
            reply = int(rng.integers(0, doc.size))
            mask = np.zeros(doc.size, np.uint32)
            mask[reply:] = 1
            mask[0] = BOS
            mask[-1] = EOS if doc.size > 1 else mask[-1]
            masks.append(mask)
    return docs, masks


def _pack(docs, masks, domain: str) -> list[dict]:
    """Fill every sample of PACK_LENGTH tokens: documents end to end, the one that crosses the
    end goes on as the first span of the next sample (what datatools' SingleBuffer does)."""
    samples, buffer, mask_buffer, spans = [], [], [], []
    position = 0
    queue = [(d, m) for d, m in zip(docs, masks or [None] * len(docs))]
    while queue:
        doc, mask = queue.pop(0)
        take = min(doc.size, PACK_LENGTH - position)
        buffer.append(doc[:take])
        if mask is not None:
            mask_buffer.append(mask[:take])
        spans.append((position, position + take))
        position += take
        if take < doc.size:
            queue.insert(0, (doc[take:], None if mask is None else mask[take:]))
        if position == PACK_LENGTH:
            sample = {"input_ids": np.concatenate(buffer).astype(np.uint32),
                      "indices": np.asarray(spans, dtype=np.uint32), "length": PACK_LENGTH, "domain": domain}
            if masks:
                sample["mask"] = np.concatenate(mask_buffer).astype(np.uint32)
            samples.append(sample)
            buffer, mask_buffer, spans, position = [], [], [], 0
    return samples  # the last, unfilled sample is dropped, as a packer that only emits full ones


def packed_samples() -> list[dict]:
    rng = np.random.default_rng(1)
    docs, _ = _documents(rng, 60, with_mask=False)
    return _pack(docs, None, "book-65536")


def packed_sft_samples() -> list[dict]:
    rng = np.random.default_rng(2)
    docs, masks = _documents(rng, 40, with_mask=True)
    return _pack(docs, masks, "ultrachat")


def raw_samples() -> list[dict]:
    rng = np.random.default_rng(3)
    samples = []
    for i in range(30):
        ids = rng.integers(0, 128000, size=int(rng.integers(1, 120)), dtype=np.uint32)
        samples.append({"domain": "fineweb-edu", "input_ids": ids, "length": np.int32(ids.size)})
    return samples


def bad_packed_sft_samples() -> list[dict]:
    """Good samples around one of each fault megalong must skip (index -> reason in BAD)."""
    good = packed_sft_samples()
    out = [dict(s) for s in good[:7]]
    out[1]["indices"] = np.array([[0, 30], [30, PACK_LENGTH + 5]], np.uint32)  # past the end
    out[2]["indices"] = np.array([[0, 30], [31, PACK_LENGTH]], np.uint32)  # a gap
    out[3]["mask"] = out[3]["mask"][:-1].copy()  # one short
    ids = out[4]["input_ids"].copy()
    ids[10] = VOCAB + 5
    out[4]["input_ids"] = ids
    out[5]["length"] = PACK_LENGTH + 1
    return out


BAD = {1: "bad_spans", 2: "bad_spans", 3: "mask_length", 4: "bad_tokens", 5: "length_mismatch"}

# name -> (columns, samples function, MDSWriter keyword arguments)
FIXTURES = {
    "packed": (PACKED_COLUMNS, packed_samples, {"size_limit": 1 << 11}),
    "packed_sft": (PACKED_MASK_COLUMNS, packed_sft_samples, {"size_limit": 1 << 11, "compression": "zstd"}),
    "raw": (RAW_COLUMNS, raw_samples, {"size_limit": 1 << 10}),
    "bad_packed_sft": (PACKED_MASK_COLUMNS, bad_packed_sft_samples, {"size_limit": 1 << 12}),
}
