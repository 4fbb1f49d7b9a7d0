import subprocess
import sys

import pytest
from typer.testing import CliRunner

from qualiface.cli import app

SUBCOMMANDS = ["demo", "train", "eval", "embed", "export", "align", "search", "data"]


def test_top_level_help_lists_every_subcommand():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in SUBCOMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_explains_itself(name):
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert len(result.output.strip().splitlines()) >= 3


def test_module_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "qualiface", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0
    assert "qualiface" in out.stdout.lower()
