"""The README's detection, segmentation and multi-label commands run as written, in README order in one folder."""

from __future__ import annotations

import pytest
from readme_commands import command_params, python_params, run_command, run_python


@pytest.mark.slow
@command_params("tasks")
def test_readme_command_runs_as_written(cmd, readme_dir, monkeypatch, capsys):
    run_command(cmd, readme_dir, monkeypatch, capsys)


@pytest.mark.slow
@python_params("tasks")
def test_readme_python_runs_as_written(code, readme_dir, monkeypatch):
    run_python(code, readme_dir, monkeypatch)
