"""A child that multiprocessing starts for `python -m megalong` dies with its parent."""

import os
import signal
import subprocess
import sys
import time

CHILD_WAITS_FOREVER = """
import multiprocessing as mp, os, time
from megalong.runtime.orphans import PARENT_PID_VARIABLE, die_with_parent

if __name__ != "__main__":  # as megalong/__main__.py does in a child of `python -m megalong`
    die_with_parent()
else:
    os.environ[PARENT_PID_VARIABLE] = str(os.getpid())
    mp.set_start_method("spawn")
    child = mp.Process(target=time.sleep, args=(600,))
    child.start()
    print(child.pid, flush=True)
    time.sleep(600)
"""


def test_a_spawned_child_does_not_outlive_a_killed_parent(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(CHILD_WAITS_FOREVER)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child}/stat") as stat:
                if stat.read().split(")")[-1].split()[0] == "Z":
                    break  # dead, not yet reaped
        except FileNotFoundError:
            break
        time.sleep(0.2)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the child outlived its killed parent")


def test_the_cli_names_the_variable_its_children_read():
    from pathlib import Path

    import megalong
    from megalong.runtime.orphans import PARENT_PID_VARIABLE

    main = (Path(megalong.__file__).parent / "__main__.py").read_text()
    assert f'os.environ["{PARENT_PID_VARIABLE}"] = str(os.getpid())' in main
