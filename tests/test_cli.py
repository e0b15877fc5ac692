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
