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


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    exe = Path(sys.executable).parent / "cnnkit"
    cmds = commands()
    assert len(cmds) >= 6
    for cmd in cmds:
        args = shlex.split(cmd)
        r = subprocess.run([str(exe), *args[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    for code in blocks("python"):
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{code}\n{r.stderr[-3000:]}"


def test_readme_error_example_is_true(cli):
    text = README.read_text(encoding="utf-8")
    m = re.search(r"\$ (cnnkit [^\n]+)\n(Error: [^\n]+)", text)
    assert m, "README shows an error example"
    r = cli(*shlex.split(m.group(1))[1:])
    assert r.code == 2 and r.err.strip() == m.group(2)
