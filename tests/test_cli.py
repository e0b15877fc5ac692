import subprocess
import sys

from picochat.cli import SUBCOMMANDS, main


def test_help_lists_every_subcommand(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name, _, _ in SUBCOMMANDS:
        assert name in out


def test_python_dash_m_works():
    result = subprocess.run([sys.executable, "-m", "picochat", "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "picochat" in result.stdout


def test_import_does_no_heavy_work():
    # Importing the package and building the CLI must not import torch (fast --help, no work at import time).
    code = "import sys, picochat, picochat.cli; picochat.cli.build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_printed_commands_work_in_the_shell_that_ran_us(monkeypatch, tmp_path):
    """A venv nobody activated (runs/cpu.sh makes one): commands we print name its picochat by full path, and the
    final message says how to activate it; with that venv first on $PATH, the bare names."""
    import shlex
    from pathlib import Path

    from picochat.common import typable_command
    from picochat.pipeline import printable
    from picochat.stages.run import finished_message

    venv_bin = Path(sys.executable).parent
    monkeypatch.setenv("PATH", str(tmp_path))  # a shell whose PATH holds no picochat
    command = typable_command()
    assert command == shlex.quote(str((venv_bin / "picochat").absolute()))
    assert printable([sys.executable, "-m", "picochat", "sft", "--run", "x"]) == f"{command} sft --run x"
    message = finished_message(tmp_path / "my run")
    assert f"{command} chat --run-dir '{tmp_path / 'my run'}'" in message and "bin/activate" in message
    result = subprocess.run(shlex.split(command) + ["--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("picochat ")

    monkeypatch.setenv("PATH", f"{venv_bin}:{tmp_path}")  # activated
    assert typable_command() == "picochat"
    assert printable([sys.executable, "-m", "picochat", "sft"]) == "picochat sft"
    assert "activate" not in finished_message(tmp_path)
