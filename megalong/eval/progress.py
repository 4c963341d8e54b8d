"""The progress file of an evaluation: one JSON record per finished unit of work.

``<out>/progress.jsonl`` starts with a header holding a fingerprint of everything that
decides the results (model, tokenizer, prompt format, task and perplexity settings). A
rerun with the same settings skips every recorded unit, so a killed evaluation resumes
without losing or repeating work; a rerun with other settings into the same directory is
refused instead of mixing results. A record cut short by a kill (the last line only) is
dropped and counted; a damaged line anywhere else is an error naming the line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.jsonl"


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ProgressLog:
    def __init__(self, out_dir: str | Path, settings: dict):
        self.path = Path(out_dir) / PROGRESS_FILE
        self.records: list[dict] = []
        expected = fingerprint(settings)
        if self.path.exists():
            self._read(expected)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._rewrite([{"type": "header", "fingerprint": expected, "settings": settings}])

    def _read(self, expected: str) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        records, dropped = [], 0
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):
                    dropped += 1  # the record a kill interrupted
                    continue
                raise ValueError(f"{self.path}:{number}: damaged progress record; delete the file to start over") from None
        if not records or records[0].get("type") != "header":
            raise ValueError(f"{self.path}:1: not a megalong eval progress file (no header)")
        if records[0].get("fingerprint") != expected:
            raise ValueError(
                f"{self.path} holds the progress of an evaluation with different settings "
                f"(model, tokenizer, prompt format, tasks or perplexity options); use another "
                f"--out directory or delete it"
            )
        if dropped:
            log.warning("Dropped %d partly written record at the end of %s (it will be redone)", dropped, self.path)
            self._rewrite(records)
        self.records = records[1:]
        log.info("Resuming: %d finished records found in %s", len(self.records), self.path)

    def _rewrite(self, records: list[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, self.path)

    def of_type(self, kind: str) -> list[dict]:
        return [r for r in self.records if r.get("type") == kind]

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)
