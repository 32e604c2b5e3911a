"""Every command in the README's bash and python blocks runs as written: the digits, export and
serving part here (the README's first commands), the `shapes` classifiers in test_readme_shapes.py,
the other tasks in test_readme_tasks.py (see readme_commands.py)."""

from __future__ import annotations

import re
import shlex

import pytest
from readme_commands import (
    CHECKS,
    PARTS,
    README,
    blocks,
    command_params,
    commands,
    part_of,
    python_blocks,
    python_params,
    run_command,
    run_python,
)


def test_readme_quickstart_comes_first():
    text = README.read_text(encoding="utf-8")
    quick = text.index("## Quickstart")
    first_block = blocks("bash")[0]
    assert text.index(first_block) > quick
    assert [ln.split("#")[0].strip() for ln in first_block.strip().splitlines()] == ["make run", "make test"]


def test_readme_has_commands():
    assert len(commands()) >= 6 and blocks("python")
    assert {part_of(c) for c in commands()} == set(PARTS) and part_of(commands()[0]) == "rest"
    # python blocks run in the "rest" and "tasks" files only
    assert len(python_blocks("rest")) + len(python_blocks("tasks")) == len(blocks("python"))


# one test per command (in README order, sharing one folder), so each gets its own time limit
@pytest.mark.slow
@command_params("rest")
def test_readme_command_runs_as_written(cmd, readme_dir, monkeypatch, capsys):
    run_command(cmd, readme_dir, monkeypatch, capsys)


@pytest.mark.slow
@python_params("rest")
def test_readme_python_runs_as_written(code, readme_dir, monkeypatch):
    run_python(code, readme_dir, monkeypatch)


def test_readme_error_example_is_true(cli):
    text = README.read_text(encoding="utf-8")
    m = re.search(r"\$ (cnnkit [^\n]+)\n(Error: [^\n]+)", text)
    assert m, "README shows an error example"
    r = cli(*shlex.split(m.group(1))[1:])
    assert r.code == 2 and r.err.strip() == m.group(2)


def test_every_readme_check_matches_one_command():
    for prefix in CHECKS:
        assert sum(c.startswith(prefix) for c in commands()) == 1, prefix
