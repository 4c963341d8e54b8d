"""Input that cannot be read because of file permissions is counted with its path, or stops
``--strict``; it never vanishes silently.

Root reads everything (the kernel's CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH), so each run
happens in a child process that gives both up first (preprocess_helpers.drop_read_override):
root then meets file modes like anyone else. A probe checks that a mode-000 file really is
unreadable to such a child, so these tests cannot pass by reading everything.
"""

from pathlib import Path

import pytest

from megalong.data.preprocess import BadInputError
from tests.data.preprocess_helpers import expected, in_child_process, llama3, preprocess, read_dataset, write_jsonl


@pytest.fixture
def locked():
    """``lock(path)``: chmod 0 (restored afterwards, so the tmp dir can be removed)."""
    paths = []

    def lock(path: Path) -> Path:
        paths.append(path)
        path.chmod(0)
        return path

    yield lock
    for path in paths:
        path.chmod(0o755)


@pytest.fixture
def limited(tmp_path, locked):
    """``limited(function, ...)``: run it in a child process for which file modes apply."""
    llama3()  # loaded once here, not in every child
    probe = tmp_path / "probe"
    probe.write_text("x")
    locked(probe)
    try:
        in_child_process(probe.read_text, read_override=False)
    except PermissionError:
        return lambda function, *args, **kwargs: in_child_process(function, *args, read_override=False, **kwargs)
    pytest.skip("a mode-000 file stays readable here (cannot give up the read override)")


def test_unreadable_subdirectory_of_an_input_directory(tmp_path, limited, locked):
    corpus = tmp_path / "corpus"
    (corpus / "private").mkdir(parents=True)
    write_jsonl(corpus / "a.jsonl", ["visible one", "visible two"])
    write_jsonl(corpus / "private" / "b.jsonl", ["hidden"])
    private = locked(corpus / "private")

    sidecar = limited(preprocess, [corpus], tmp_path / "out", workers=2)
    assert read_dataset(tmp_path / "out") == expected(["visible one", "visible two"])
    assert sidecar["skipped"] == {"unreadable_directory": 1}
    assert sidecar["skip_examples"] == [{"reason": "unreadable_directory", "path": str(private),
                                         "detail": "Permission denied"}]
    with pytest.raises(BadInputError, match=rf"^{private}: the directory could not be listed: the files in it are "
                                            r"missing \(Permission denied\)"):
        limited(preprocess, [corpus], tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict.bin").exists()


def test_unreadable_file_and_directory_inside_code_repositories(tmp_path, limited, locked):
    repos = tmp_path / "repos"
    (repos / "a").mkdir(parents=True)
    (repos / "a" / "main.py").write_text("print('a')\n")
    (repos / "a" / "secret.py").write_text("password = 1\n")
    (repos / "b" / "private").mkdir(parents=True)
    (repos / "b" / "lib.py").write_text("def b():\n    pass\n")
    (repos / "b" / "private" / "keys.py").write_text("KEY = 2\n")
    secret = locked(repos / "a" / "secret.py")
    private = locked(repos / "b" / "private")

    sidecar = limited(preprocess, [repos], tmp_path / "out", input_format="code-repos")
    assert read_dataset(tmp_path / "out") == expected(["--- main.py ---\nprint('a')\n",
                                                       "--- lib.py ---\ndef b():\n    pass\n"])
    assert sidecar["repo_files_skipped"] == {"unreadable": 1, "unreadable_directory": 1}
    assert sidecar["repo_file_examples"] == [
        {"reason": "unreadable", "path": str(secret), "detail": "Permission denied"},
        {"reason": "unreadable_directory", "path": str(private), "detail": "Permission denied"}]

    # --strict stops at the first one (repository a comes first), naming the file.
    with pytest.raises(BadInputError, match=rf"^{secret}: the file could not be read \(Permission denied\)"):
        limited(preprocess, [repos], tmp_path / "strict", input_format="code-repos", strict=True)
    assert not (tmp_path / "strict.bin").exists()
