import json

import pytest

from megalong.eval.progress import PROGRESS_FILE, ProgressLog


def test_resume_keeps_finished_records_and_drops_a_cut_one(tmp_path):
    settings = {"model": "m", "lengths": [1, 2]}
    log = ProgressLog(tmp_path, settings)
    log.append({"type": "recall", "index": 0})
    log.append({"type": "recall", "index": 1})
    path = tmp_path / PROGRESS_FILE
    # A kill in the middle of writing the third record.
    with open(path, "a") as f:
        f.write('{"type": "recall", "ind')
    resumed = ProgressLog(tmp_path, settings)
    assert [r["index"] for r in resumed.of_type("recall")] == [0, 1]
    resumed.append({"type": "recall", "index": 2})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r.get("index") for r in lines] == [None, 0, 1, 2]


def test_other_settings_or_damage_are_refused(tmp_path):
    ProgressLog(tmp_path, {"model": "m"}).append({"type": "recall", "index": 0})
    with pytest.raises(ValueError, match="different settings"):
        ProgressLog(tmp_path, {"model": "other"})
    path = tmp_path / PROGRESS_FILE
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "garbage", lines[1]]) + "\n")
    with pytest.raises(ValueError, match=f"{PROGRESS_FILE}:2: damaged"):
        ProgressLog(tmp_path, {"model": "m"})
