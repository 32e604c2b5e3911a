"""Every command in the README's bash and python blocks runs as written."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def commands() -> list[str]:
    out = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("cnnkit "):
                out.append(line)
    return out


def test_readme_quickstart_comes_first():
    text = README.read_text(encoding="utf-8")
    quick = text.index("## Quickstart")
    first_block = blocks("bash")[0]
    assert text.index(first_block) > quick
    assert [ln.split("#")[0].strip() for ln in first_block.strip().splitlines()] == ["make run", "make test"]


@pytest.fixture(scope="module")
def readme_dir(tmp_path_factory) -> Path:
    """One folder for all README commands, which build on each other in order."""
    return tmp_path_factory.mktemp("readme")


def test_readme_has_commands():
    assert len(commands()) >= 6 and blocks("python")


# one test per command (in README order, sharing one folder), so each gets its own time limit; they run
# in-process (no interpreter start and torch import per command), the first one also as a real
# subprocess through the installed entry point
@pytest.mark.slow
@pytest.mark.parametrize("cmd", commands(), ids=[f"{i:02d}-{' '.join(c.split()[1:3])}" for i, c in
                                                 enumerate(commands())])
def test_readme_command_runs_as_written(cmd, readme_dir, monkeypatch, capsys):
    from cnnkit.cli.main import main

    if cmd == commands()[0]:
        exe = Path(sys.executable).parent / "cnnkit"
        r = subprocess.run([str(exe), *shlex.split(cmd)[1:]], cwd=readme_dir, capture_output=True, text=True,
                           check=False, timeout=900)
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        return
    monkeypatch.chdir(readme_dir)
    code = main(shlex.split(cmd)[1:])
    out = capsys.readouterr()
    assert code == 0, f"{cmd}\n{out.out[-2000:]}\n{out.err[-2000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("code", blocks("python"), ids=[f"python-{i}" for i in range(len(blocks("python")))])
def test_readme_python_runs_as_written(code, readme_dir, monkeypatch):
    monkeypatch.chdir(readme_dir)
    exec(compile(code, "<README python block>", "exec"), {"__name__": "__readme__"})


def test_readme_error_example_is_true(cli):
    text = README.read_text(encoding="utf-8")
    m = re.search(r"\$ (cnnkit [^\n]+)\n(Error: [^\n]+)", text)
    assert m, "README shows an error example"
    r = cli(*shlex.split(m.group(1))[1:])
    assert r.code == 2 and r.err.strip() == m.group(2)
