"""Bad records are skipped and counted with file:line, or stop the run in strict mode;
either way no partial .bin/.idx is ever left at the output prefix."""

import gzip
import json
import logging
from pathlib import Path

import pytest

from megalong.cli.main import main
from megalong.data.preprocess import BadInputError
from tests.data.preprocess_helpers import expected, preprocess, read_dataset

GOOD = ["first good document", "second good document", "third good document"]


def _bad_jsonl(path: Path) -> Path:
    lines = [
        json.dumps({"text": GOOD[0]}).encode(),      # 1
        b'{"text": "unterminated',                   # 2 malformed_json
        json.dumps({"title": "no text"}).encode(),   # 3 missing_key
        b'{"text": "caf\xe9 latin-1"}',              # 4 not_utf8
        json.dumps({"text": "   "}).encode(),        # 5 empty_text
        b"",                                         # 6 blank line: not a record
        json.dumps({"text": 42}).encode(),           # 7 text_not_string
        b"[1, 2]",                                   # 8 not_an_object
        json.dumps({"text": "\ud800 lone"}).encode(),  # 9 not_utf8 (surrogate escape)
        json.dumps({"text": GOOD[1]}).encode(),      # 10
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


EXPECTED_LINES = {"malformed_json": [2], "missing_key": [3], "not_utf8": [4, 9], "empty_text": [5],
                  "text_not_string": [7], "not_an_object": [8]}


@pytest.mark.parametrize("shard_size_mb", [64.0, 0.00002])  # whole file, or a range per line or two
def test_bad_records_are_skipped_and_counted_with_file_line(tmp_path, shard_size_mb):
    source = _bad_jsonl(tmp_path / "bad.jsonl")
    sidecar = preprocess([source], tmp_path / "out", shard_size_mb=shard_size_mb)
    assert read_dataset(tmp_path / "out") == expected(GOOD[:2])
    assert sidecar["skipped"] == {k: len(v) for k, v in EXPECTED_LINES.items()}
    found = {}
    for example in sidecar["skip_examples"]:
        assert example["path"] == str(source)
        found.setdefault(example["reason"], []).append(example["line"])
    assert {k: sorted(v) for k, v in found.items()} == EXPECTED_LINES


def test_unreadable_and_corrupt_files_are_counted(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.jsonl").write_text(json.dumps({"text": GOOD[0]}) + "\n")
    (inputs / "b_gone.jsonl").symlink_to(tmp_path / "does-not-exist.jsonl")
    payload = gzip.compress("".join(json.dumps({"text": f"{i} {i * 7919 % 10007}"}) + "\n" for i in range(20000)).encode())
    (inputs / "c_truncated.jsonl.gz").write_bytes(payload[: len(payload) // 2])
    sidecar = preprocess([inputs], tmp_path / "out")
    assert sidecar["skipped"]["unreadable_file"] == 2
    paths = {e["path"] for e in sidecar["skip_examples"] if e["reason"] == "unreadable_file"}
    assert paths == {str(inputs / "b_gone.jsonl"), str(inputs / "c_truncated.jsonl.gz")}
    docs = read_dataset(tmp_path / "out")
    assert docs[0] == expected(GOOD[:1])[0] and len(docs) > 1  # lines before the damage are kept


def test_text_files_not_utf8_and_empty(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "1.txt").write_text(GOOD[0])
    (tmp_path / "d" / "2.txt").write_bytes(b"\xff\xfe binary")
    (tmp_path / "d" / "3.txt").write_text("\n\n")
    sidecar = preprocess([tmp_path / "d"], tmp_path / "out", input_format="text")
    assert sidecar["skipped"] == {"not_utf8": 1, "empty_text": 1}
    assert read_dataset(tmp_path / "out") == expected(GOOD[:1])


def test_parquet_missing_column_and_nulls(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [GOOD[0], None, "", GOOD[1]]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "b.parquet")
    sidecar = preprocess([tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / "out")
    assert sidecar["skipped"] == {"missing_key": 3, "empty_text": 1}
    assert read_dataset(tmp_path / "out") == expected(GOOD[:2])
    rows = sorted((e["path"].endswith("a.parquet"), e.get("row")) for e in sidecar["skip_examples"])
    assert rows == [(False, 0), (True, 1), (True, 2)]


@pytest.mark.parametrize("reason, line", [(k, v[0]) for k, v in EXPECTED_LINES.items() if k != "not_utf8"]
                         + [("not_utf8", 4)])
def test_strict_stops_at_the_first_bad_record_with_its_location(tmp_path, reason, line):
    source = tmp_path / "bad.jsonl"
    good = json.dumps({"text": GOOD[0]}).encode()
    bad_lines = dict(zip(EXPECTED_LINES, [b'{"text": "x', b'{"t": 1}', b'{"text": "\xe9"}', b'{"text": ""}',
                                          b'{"text": 1}', b"[]"]))
    source.write_bytes(b"\n".join([good] * (line - 1) + [bad_lines[reason], good]) + b"\n")
    with pytest.raises(BadInputError, match=rf"^{source}:{line}: ") as err:
        preprocess([source], tmp_path / "out", strict=True, shard_size_mb=0.00005)
    assert "--strict" in str(err.value)
    assert not Path(f"{tmp_path}/out.bin").exists() and not Path(f"{tmp_path}/out.idx").exists()
    assert not list(tmp_path.glob("out.work/*.tmp.*"))  # no half-written shard either


def test_cli_strict_exit_code_and_message(tmp_path, caplog):
    source = _bad_jsonl(tmp_path / "bad.jsonl")
    with caplog.at_level(logging.ERROR):
        code = main(["preprocess", "--input", str(source), "--output-prefix", str(tmp_path / "out"),
                     "--tokenizer", "llama3", "--strict", "--workers", "1"])
    assert code == 1
    assert f"{source}:2: the line is not valid JSON" in caplog.text


def test_cli_skip_report(tmp_path, capsys):
    source = _bad_jsonl(tmp_path / "bad.jsonl")
    code = main(["preprocess", "--input", str(source), "--output-prefix", str(tmp_path / "out"),
                 "--tokenizer", "llama3", "--workers", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "2 documents" in out and "malformed_json" in out and f"{source}:2" in out
