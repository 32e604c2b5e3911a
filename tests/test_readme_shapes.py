"""The README's commands on the `shapes` classifiers run as written, in README order in one folder."""

from __future__ import annotations

import pytest
from readme_commands import command_params, run_command


@pytest.mark.slow
@command_params("shapes")
def test_readme_command_runs_as_written(cmd, readme_dir, monkeypatch, capsys):
    run_command(cmd, readme_dir, monkeypatch, capsys)
