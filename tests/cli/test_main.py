import os
import subprocess
import sys

from megalong.cli.main import SUBCOMMANDS, main


def test_info_lists_presets(capsys):
    assert main(["info", "--presets"]) == 0
    out = capsys.readouterr().out
    assert "megatron-core" in out and "llama3-8b" in out and "llama3.2-1b" in out


def test_no_subcommand_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "info" in capsys.readouterr().out


def test_every_registered_subcommand_has_help():
    for name in SUBCOMMANDS:
        result = subprocess.run([sys.executable, "-m", "megalong", name, "--help"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (name, result.stderr)
        assert f"megalong {name}" in result.stdout


def _environment_after_main(argv: list[str], import_torch_first: bool) -> str:
    """THP_MEM_ALLOC_ENABLE as a fresh process sees it after ``main(argv)`` set up the subcommand."""
    script = (
        "import os, sys\n"
        + ("import torch\n" if import_torch_first else "")
        + "from megalong.cli.main import main\n"
        + "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        + "print('THP=' + os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_convert_runs_with_huge_pages_only_when_torch_is_not_yet_loaded():
    assert _environment_after_main(["convert", "--help"], import_torch_first=False) == "THP=1"
    # Too late once torch is loaded (it reads the setting once): left alone.
    assert _environment_after_main(["convert", "--help"], import_torch_first=True) == "THP=unset"
    # Other subcommands do not get it.
    assert _environment_after_main(["plan", "--help"], import_torch_first=False) == "THP=unset"


def test_a_rank_other_than_0_shows_its_errors_tagged_with_its_rank(tmp_path):
    """The command reads the rank from the launcher's environment before torch.distributed starts."""
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2"}
    result = subprocess.run([sys.executable, "-m", "megalong", "train", str(tmp_path / "missing.yaml")],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("[rank 1] ") and "cannot read recipe" in result.stderr
