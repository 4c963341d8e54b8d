"""A small, real corpus built from text every Python installation carries.

The quickstart needs the same kinds of data as the ProLong recipe without any download:

* code repositories: packages of Python's standard library (``json/``, ``email/`` ...), each
  one a repository, turned into one document per repository by ``megalong preprocess``;
* long documents ("books"): the chapters of the Python language reference shipped in
  ``pydoc_data.topics`` (the text ``help('if')`` shows);
* short documents ("web"): the docstrings of standard-library modules, classes and
  functions, read with ``ast`` (nothing is imported or executed);
* chat conversations (SFT): questions about language-reference topics answered with the
  opening paragraphs of that topic;
* held-out long documents: one in four of the longest reference chapters, kept out of every
  training set (books and chats alike), for perplexity by position;
* ``synthetic_kv``: documents of key-value records (" owl:417. cat:902. owl:417. ...") in the
  format of ``megalong eval``'s ``kv_lookup`` task, each key repeating its one value within a
  document, so that copying a value seen earlier is learnable at quickstart scale. ProLong
  mixes in no synthetic data: this domain is the quickstart's own, never in its recipes.

Everything is deterministic: the same Python version gives the same corpus.
"""

from __future__ import annotations

import ast
import json
import os
import random
import sysconfig
from pathlib import Path

from megalong.eval.tasks import KV_KEYS, KV_VALUES, kv_record

# Pure-Python packages of the standard library used as "code repositories".
STDLIB_REPOSITORIES = (
    "asyncio", "collections", "concurrent", "email", "html", "http", "importlib", "json",
    "logging", "multiprocessing", "sqlite3", "tomllib", "unittest", "urllib", "wsgiref",
    "xml", "xmlrpc", "zoneinfo", "dbm", "ctypes",
)


# Reference chapters of at least this many characters (about 1,100 Llama-3 tokens or more)
# are long enough for perplexity out to 1,024 tokens; one in HELDOUT_EVERY of them is held out.
HELDOUT_MIN_CHARS = 6000
HELDOUT_EVERY = 4


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _write_jsonl_atomically(path: Path, records) -> int:
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    os.replace(tmp, path)
    return count


def reference_topics() -> dict[str, str]:
    from pydoc_data import topics

    return dict(sorted(topics.topics.items()))


def heldout_topics(topics: dict[str, str]) -> list[str]:
    """Names of the held-out chapters: every HELDOUT_EVERY-th long one, in name order."""
    long_names = [name for name, text in topics.items() if len(text) >= HELDOUT_MIN_CHARS]
    return long_names[1::HELDOUT_EVERY]


def _docstrings(source: str):
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 200:
                yield doc


def short_documents(limit: int | None = None):
    """Docstrings of stdlib modules (top-level .py files), in a stable order."""
    count = 0
    for path in sorted(stdlib_dir().glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for doc in _docstrings(source):
            yield {"text": doc, "source": path.name}
            count += 1
            if limit is not None and count >= limit:
                return


def chat_conversations(topics: dict[str, str], max_conversations: int = 64):
    """One conversation per reference topic: a question and the topic's opening paragraphs."""
    for name, text in list(topics.items())[:max_conversations]:
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
        answer = "\n\n".join(paragraphs[:3])
        yield {
            "messages": [
                {"role": "system", "content": "You are a concise Python expert."},
                {"role": "user", "content": f"Explain the Python language topic '{name}'."},
                {"role": "assistant", "content": answer},
            ]
        }


def kv_document(rng: random.Random, num_records: int) -> str:
    """Records over a random subset of the keys, each key with one value for the whole
    document; keys drawn with uneven weights, so some recur soon and some long after."""
    keys = rng.sample(KV_KEYS, rng.randint(4, len(KV_KEYS)))
    values = dict(zip(keys, rng.sample(KV_VALUES, len(keys))))
    weights = [rng.random() ** 2 + 0.02 for _ in keys]
    return "".join(kv_record(key, values[key]) for key in rng.choices(keys, weights, k=num_records))


def kv_documents(count: int, num_records: int, seed: int = 0):
    rng = random.Random(f"megalong-quickstart-kv:{seed}")
    for index in range(count):
        yield {"text": kv_document(rng, num_records), "id": f"kv-{index}"}


def build_corpus(out_dir: str | Path, max_short_documents: int = 3000, kv_document_count: int = 256,
                 kv_records_per_document: int = 320) -> dict:
    """Write the corpus under ``out_dir``; returns where each part went and its size."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    repos_dir = out / "code_repos"
    repos_dir.mkdir(exist_ok=True)
    repositories = []
    for name in STDLIB_REPOSITORIES:
        source = stdlib_dir() / name
        if not source.is_dir():
            continue
        link = repos_dir / name
        if not link.exists():
            link.symlink_to(source, target_is_directory=True)
        repositories.append(str(link))
    topics = reference_topics()
    heldout = set(heldout_topics(topics))
    training_topics = {name: text for name, text in topics.items() if name not in heldout}
    books = _write_jsonl_atomically(
        out / "books.jsonl", ({"text": text, "title": name} for name, text in training_topics.items()))
    heldout_books = _write_jsonl_atomically(
        out / "heldout_books.jsonl", ({"text": topics[name], "title": name} for name in sorted(heldout)))
    web = _write_jsonl_atomically(out / "web.jsonl", short_documents(max_short_documents))
    chats = _write_jsonl_atomically(out / "chat.jsonl", chat_conversations(training_topics))
    kv = _write_jsonl_atomically(out / "synthetic_kv.jsonl", kv_documents(kv_document_count, kv_records_per_document))
    return {
        "code_repos": {"path": str(repos_dir), "repositories": len(repositories)},
        "books": {"path": str(out / "books.jsonl"), "documents": books},
        "web": {"path": str(out / "web.jsonl"), "documents": web},
        "chat": {"path": str(out / "chat.jsonl"), "conversations": chats},
        "synthetic_kv": {"path": str(out / "synthetic_kv.jsonl"), "documents": kv},
        "heldout_books": {"path": str(out / "heldout_books.jsonl"), "documents": heldout_books},
    }
