"""The README's first two commands are the ones CI runs, word for word."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_commands_verbatim():
    setup_and_run, tests = _bash_blocks((ROOT / "README.md").read_text())[:2]
    assert "megalong quickstart" in setup_and_run and "pip install torch==2.13.0" in setup_and_run
    assert tests == "python -m pytest tests -q"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert setup_and_run in ci_lines and tests in ci_lines
    assert ci_lines.index(setup_and_run) < ci_lines.index(tests)


def test_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#]+)\)", (ROOT / "README.md").read_text()):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
