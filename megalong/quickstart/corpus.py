"""A small, real corpus built from text every Python installation carries.

The quickstart needs the same kinds of data as the ProLong recipe without any download:

* code repositories: packages of Python's standard library (``json/``, ``email/`` ...), each
  one a repository, turned into one document per repository by ``megalong preprocess``;
* long documents ("books"): the chapters of the Python language reference shipped in
  ``pydoc_data.topics`` (the text ``help('if')`` shows);
* short documents ("web"): the docstrings of standard-library modules, classes and
  functions, read with ``ast`` (nothing is imported or executed);
* chat conversations (SFT): questions about language-reference topics answered with the
  opening paragraphs of that topic.

Everything is deterministic: the same Python version gives the same corpus.
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
from pathlib import Path

# Pure-Python packages of the standard library used as "code repositories".
STDLIB_REPOSITORIES = (
    "asyncio", "collections", "concurrent", "email", "html", "http", "importlib", "json",
    "logging", "multiprocessing", "sqlite3", "tomllib", "unittest", "urllib", "wsgiref",
    "xml", "xmlrpc", "zoneinfo", "dbm", "ctypes",
)


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


def chat_conversations(max_conversations: int = 64):
    """One conversation per reference topic: a question and the topic's opening paragraphs."""
    for name, text in list(reference_topics().items())[:max_conversations]:
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
        answer = "\n\n".join(paragraphs[:3])
        yield {
            "messages": [
                {"role": "system", "content": "You are a concise Python expert."},
                {"role": "user", "content": f"Explain the Python language topic '{name}'."},
                {"role": "assistant", "content": answer},
            ]
        }


def build_corpus(out_dir: str | Path, max_short_documents: int = 3000) -> dict:
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
    books = _write_jsonl_atomically(
        out / "books.jsonl",
        ({"text": text, "title": name} for name, text in reference_topics().items()),
    )
    web = _write_jsonl_atomically(out / "web.jsonl", short_documents(max_short_documents))
    chats = _write_jsonl_atomically(out / "chat.jsonl", chat_conversations())
    return {
        "code_repos": {"path": str(repos_dir), "repositories": len(repositories)},
        "books": {"path": str(out / "books.jsonl"), "documents": books},
        "web": {"path": str(out / "web.jsonl"), "documents": web},
        "chat": {"path": str(out / "chat.jsonl"), "conversations": chats},
    }
