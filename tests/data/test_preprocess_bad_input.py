"""Bad input (records, files, files of code repositories) is skipped and counted with its
location, or stops the run in strict mode; either way no partial .bin/.idx is ever left at the
output prefix, and nothing makes a reader wait forever."""

import contextlib
import gzip
import io
import json
import logging
import os
from pathlib import Path

import pytest

from megalong.cli.main import main
from megalong.data.preprocess import BadInputError
from tests.data.preprocess_helpers import expected, in_child_process, preprocess, read_dataset, write_jsonl

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


def _corrupt_row_group(path: Path, group: int) -> None:
    """Overwrite the pages of one row group (headers included) with junk; the footer stays valid."""
    import pyarrow.parquet as pq

    column = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + column.total_compressed_size] = b"\xab" * column.total_compressed_size
    path.write_bytes(bytes(data))


def test_corrupt_parquet_row_group_is_counted_or_stops_strict(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i}: " + "words " * (i % 7) for i in range(30)]
    source = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": texts}), source, row_group_size=10)
    _corrupt_row_group(source, 1)
    sidecar = preprocess([source], tmp_path / "out")
    assert read_dataset(tmp_path / "out") == expected(texts[:10] + texts[20:])
    assert sidecar["skipped"] == {"unreadable_file": 10}  # every row of the damaged group
    (example,) = sidecar["skip_examples"]
    assert example["path"] == str(source) and example["row"] == 10 and "row group 1" in example["detail"]
    with pytest.raises(BadInputError, match=rf"^{source} row 10: the file could not be read"):
        preprocess([source], tmp_path / "strict", strict=True)
    assert not Path(f"{tmp_path}/strict.bin").exists()


def test_corrupt_zst_is_counted_or_stops_strict(tmp_path):
    import zstandard

    good = write_jsonl(tmp_path / "a.jsonl", GOOD[:2])
    payload = bytearray(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": f"{i} {i * 7919 % 10007}"}) + "\n" for i in range(20000)).encode()))
    middle = len(payload) // 2
    payload[middle : middle + 64] = bytes(b ^ 0x5A for b in payload[middle : middle + 64])
    broken = tmp_path / "b.jsonl.zst"
    broken.write_bytes(bytes(payload))
    sidecar = preprocess([good, broken], tmp_path / "out")
    assert sidecar["skipped"] == {"unreadable_file": 1}
    (example,) = sidecar["skip_examples"]
    assert example["path"] == str(broken) and "stream broken" in example["detail"]
    assert read_dataset(tmp_path / "out")[:2] == expected(GOOD[:2])
    with pytest.raises(BadInputError, match=rf"^{broken}:\d+: the file could not be read or decompressed"):
        preprocess([good, broken], tmp_path / "strict", strict=True)


def _deep_jsonl(path: Path) -> Path:
    # Valid JSON nested deeper than Python's json parser recurses (the reproduction).
    path.write_text(json.dumps({"text": "a"}) + "\n" + '{"text": "b", "meta": ' + "[" * 1200 + "]" * 1200 + "}\n"
                    + json.dumps({"text": "c"}) + "\n")
    return path


def test_deeply_nested_json_is_skipped_at_its_line_with_worker_processes(tmp_path, capsys, caplog):
    source = _deep_jsonl(tmp_path / "deep.jsonl")
    flags = ["preprocess", "--input", str(source), "--tokenizer", "llama3", "--workers", "2"]
    assert main(flags + ["--output-prefix", str(tmp_path / "out" / "deep")]) == 0
    assert read_dataset(tmp_path / "out" / "deep") == expected(["a", "c"])
    sidecar = json.loads((tmp_path / "out" / "deep.json").read_text())
    assert sidecar["skipped"] == {"too_deeply_nested": 1}
    assert sidecar["skip_examples"][0]["line"] == 2
    assert f"{source}:2" in capsys.readouterr().out
    with caplog.at_level(logging.ERROR):
        assert main(flags + ["--output-prefix", str(tmp_path / "strict"), "--strict"]) == 1
    assert f"{source}:2: the JSON nests deeper than the parser can follow" in caplog.text


def test_utf8_byte_order_mark_starts_a_file_without_harm(tmp_path):
    bom = b"\xef\xbb\xbf"
    lines = "".join(json.dumps({"text": t}) + "\n" for t in GOOD).encode()
    (tmp_path / "plain.jsonl").write_bytes(bom + lines)
    with gzip.open(tmp_path / "packed.jsonl.gz", "wb") as handle:
        handle.write(bom + lines)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "one.txt").write_bytes(bom + GOOD[0].encode())
    for shard_size_mb in (64.0, 0.00002):  # the whole file, or a range per line
        sidecar = preprocess([tmp_path / "plain.jsonl", tmp_path / "packed.jsonl.gz"], tmp_path / f"j{shard_size_mb}",
                             strict=True, shard_size_mb=shard_size_mb)
        assert sidecar["skipped_total"] == 0
        assert read_dataset(tmp_path / f"j{shard_size_mb}") == expected(GOOD + GOOD)
    preprocess([tmp_path / "texts"], tmp_path / "t", input_format="text", strict=True)
    assert read_dataset(tmp_path / "t") == expected(GOOD[:1])


def test_strict_does_not_stop_at_the_length_filters(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", ["a", "a much longer document of many words " * 3])
    sidecar = preprocess([source], tmp_path / "out", strict=True, min_tokens=8)
    assert sidecar["skipped"] == {"too_short": 1} and sidecar["documents"] == 1


def test_named_pipes_in_input_directories_are_counted_not_waited_for(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_jsonl(inputs / "a.jsonl", GOOD[:1])
    for name in ("b.jsonl", "c.jsonl.gz", "d.parquet"):
        os.mkfifo(inputs / name)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text(GOOD[1])
    os.mkfifo(tmp_path / "texts" / "b.txt")
    # In a child process: a reader blocked on a pipe must fail the test, not hang the suite.
    sidecar = in_child_process(preprocess, [inputs], tmp_path / "out")
    texts = in_child_process(preprocess, [tmp_path / "texts"], tmp_path / "t", input_format="text")
    with pytest.raises(BadInputError, match=rf"^{inputs / 'b.jsonl'}: the file could not be read .*named pipe"):
        in_child_process(preprocess, [inputs], tmp_path / "strict", strict=True)
    assert read_dataset(tmp_path / "out") == expected(GOOD[:1])
    assert sidecar["skipped"] == {"unreadable_file": 3}
    pipes = ("b.jsonl", "c.jsonl.gz", "d.parquet")
    assert {e["path"] for e in sidecar["skip_examples"]} == {str(inputs / name) for name in pipes}
    assert all("named pipe" in e["detail"] for e in sidecar["skip_examples"])
    assert read_dataset(tmp_path / "t") == expected(GOOD[1:2])
    assert texts["skip_examples"] == [{"reason": "unreadable_file", "path": str(tmp_path / "texts" / "b.txt"),
                                       "detail": "not a regular file but a named pipe"}]


def _repositories(root: Path) -> Path:
    """repos/code: a file symlink loop, a directory link back to itself, a named pipe, two
    files that fill the cap and a later small one; repos/empty: nothing usable."""
    code = root / "repos" / "code"
    (code / "pkg").mkdir(parents=True)
    (code / "a_main.py").write_text("print('main')\n")                     # 32 bytes with its header
    os.mkfifo(code / "b_fifo.py")                                           # not_regular_file
    (code / "c_loop_one.py").symlink_to(code / "c_loop_two.py")             # a loop of file links
    (code / "c_loop_two.py").symlink_to(code / "c_loop_one.py")
    (code / "pkg" / "again").symlink_to(code)                               # a directory loop
    (code / "pkg" / "d_util.py").write_text("def util():\n    return 1\n")  # 48 bytes with its header
    (code / "pkg" / "e_tiny.py").write_text("x\n")                          # fits, but comes after the cap
    empty = root / "repos" / "empty"
    empty.mkdir()
    (empty / "blank.py").write_text("   \n")
    return root / "repos"


def test_code_repository_skip_reasons_are_counted_with_their_paths(tmp_path):
    repos = _repositories(tmp_path)
    code = repos / "code"
    sidecar = in_child_process(preprocess, [repos], tmp_path / "out", input_format="code-repos", repo_max_bytes=60)
    assert read_dataset(tmp_path / "out") == expected(["--- a_main.py ---\nprint('main')\n"])
    assert sidecar["repo_files_skipped"] == {"empty": 1, "not_regular_file": 1, "repo_cap": 2, "symlink": 3}
    examples = {(e["reason"], e["path"]) for e in sidecar["repo_file_examples"]}
    assert examples == {("not_regular_file", str(code / "b_fifo.py")), ("symlink", str(code / "c_loop_one.py")),
                        ("symlink", str(code / "c_loop_two.py")), ("symlink", str(code / "pkg" / "again")),
                        ("repo_cap", str(code / "pkg" / "d_util.py")), ("repo_cap", str(code / "pkg" / "e_tiny.py")),
                        ("empty", str(repos / "empty" / "blank.py"))}
    assert sidecar["skipped"] == {"empty_text": 1}
    assert sidecar["skip_examples"][0]["path"] == str(repos / "empty")

    # --strict: the repository policy (links, pipes, the cap) is not bad input; an empty repository is.
    in_child_process(preprocess, [repos / "code"], tmp_path / "strict", input_format="code-repos", repo_max_bytes=60,
                     strict=True)
    with pytest.raises(BadInputError, match=rf"^{repos / 'empty'}: the text is empty"):
        preprocess([repos], tmp_path / "strict_empty", input_format="code-repos", strict=True)


def _main_with_output(argv: list[str]) -> tuple[int, str]:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        return main(argv), out.getvalue()


def test_cli_summary_names_a_file_per_repository_reason(tmp_path):
    repos = _repositories(tmp_path)
    code, out = in_child_process(_main_with_output, [
        "preprocess", "--input", str(repos), "--input-format", "code-repos", "--output-prefix", str(tmp_path / "out"),
        "--tokenizer", "llama3", "--workers", "1", "--repo-max-bytes", "60"])
    assert code == 0
    pipe = repos / "code" / "b_fifo.py"
    assert f"not_regular_file: not a regular file (named pipe, socket, device) e.g. {pipe}" in out
    assert f"repo_cap: past the repository cap (repo_max_bytes) e.g. {repos / 'code' / 'pkg' / 'd_util.py'}" in out
