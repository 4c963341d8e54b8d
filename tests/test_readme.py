"""The README's first two commands are the ones CI runs, word for word; the documentation's
links, and the documents the project names, exist."""

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


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces -> '-'."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_documentation_links_resolve_to_files_and_headings():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith("http"):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path) if path else page
            assert linked.exists(), f"{page.relative_to(ROOT)} links to missing {target}"
            if anchor:
                assert anchor in _anchors(linked), f"{page.relative_to(ROOT)}: no heading for {target}"


# The planner's table of published measurements: every row names a file of another repository
# (its `repo:` field beside its `file:`).
EXTERNAL_SOURCES = ROOT / "megalong" / "plan" / "published_runs.yaml"


def test_documents_named_in_the_project_are_in_it():
    """Recipes, mixtures and docstrings point readers at pages that exist (docs/recipe.md, ...).
    A page of another repository is written ``owner/repo:path`` and is not looked for here."""
    shipped = [*ROOT.glob("megalong/**/*.py"), *ROOT.glob("megalong/**/*.yaml"), *ROOT.glob("examples/**/*.yaml"),
               *ROOT.glob("tools/*.py"), *ROOT.glob("slurm/*"), ROOT / "README.md", *ROOT.glob("docs/*.md")]
    for source in shipped:
        if source == EXTERNAL_SOURCES:
            continue
        for match in re.finditer(r"(?:[\w.-]+/[\w.-]+:)?([\w/-]+\.md)\b", source.read_text(encoding="utf-8")):
            name = match.group(1)
            if match.group(0) != name:
                continue  # owner/repo:path, another repository's page
            if name in ("README.md", "report.md") or name.endswith("/report.md"):
                continue  # written by the converter and the quickstart into their outputs
            here = [ROOT / name, ROOT / "docs" / name, source.parent / name]
            assert any(p.exists() for p in here), f"{source.relative_to(ROOT)} names {name}, not in the project"
