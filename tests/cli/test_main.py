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
