"""The smoke-size quickstart, run once for the tests that read its artifacts."""

import shutil
import subprocess

import pytest


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "run"
    command = [shutil.which("megalong") or "megalong", "quickstart", "--size", "smoke", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out, result
