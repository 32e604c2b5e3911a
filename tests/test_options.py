"""val/predict options are declared once per task and reach the CLI and the Python API alike;
api/ is only the by-name front; no task imports another task's modules."""

from __future__ import annotations

import pkgutil
import re
from pathlib import Path

import pytest

from cnnkit.core.options import Opt, resolve
from cnnkit.errors import CnnkitError
from cnnkit.tasks import TASKS, config_class

SRC = Path(__file__).resolve().parents[1] / "src" / "cnnkit"


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("mode", ["val", "predict"])
def test_cli_options_are_the_declared_ones(task, mode):
    from cnnkit.cli.main import cli

    declared = getattr(config_class(task), mode.upper())
    cmd = cli.commands[task].commands[mode]
    params = [p for p in cmd.params if p.name != "help"]
    assert [p.name for p in params] == [o.name for o in declared]
    for p, o in zip(params, declared):
        assert p.required == o.required, o.name
        assert o.cli_flag in p.opts, (o.name, p.opts)
        if not o.required and o.kind is not bool:
            assert p.default == o.default, o.name
        if o.choices:
            assert tuple(p.type.choices) == o.choices


def test_resolve_fills_defaults_and_refuses_bad_values():
    opts = config_class("detect").PREDICT
    out = resolve(opts, {"weights": "w", "source": "s", "conf": 0.5}, "cnnkit detect predict")
    assert out["conf"] == 0.5 and out["iou"] == 0.5 and out["max_det"] == 100 and out["nms"] == "hard"
    for bad, msg in [({"conf": 1.5}, r"--conf must be in \[0, 1\], got 1.5"),
                     ({"iou": 0.0}, r"--iou must be in \(0, 1\], got 0.0"),
                     ({"max_det": 0}, "--max-det must be at least 1, got 0"),
                     ({"nms": "fast"}, "--nms must be one of hard, soft, got 'fast'"),
                     ({"cof": 0.2}, "cnnkit detect predict has no option 'cof' \\(did you mean 'conf'\\?\\)")]:
        with pytest.raises(CnnkitError, match=msg):
            resolve(opts, {"weights": "w", "source": "s", **bad}, "cnnkit detect predict")
    assert Opt("x", float, 0.5, lo=0, hi=1).check(1.0) is None  # closed upper bound


def test_python_api_checks_options_before_loading(tmp_path):
    import cnnkit

    missing = tmp_path / "none.safetensors"
    with pytest.raises(CnnkitError, match="--topk must be at least 1"):
        cnnkit.predict("classify", missing, tmp_path, topk=0)
    with pytest.raises(CnnkitError, match="has no option 'conf'"):
        cnnkit.val("segment", missing, "shapes", conf=0.3)
    with pytest.raises(CnnkitError, match="unknown task 'detection' \\(did you mean 'detect'\\?\\)"):
        cnnkit.val("detection", missing, "shapes")


def test_cli_range_error_is_one_sentence_exit_2(cli, tmp_path):
    r = cli("detect", "predict", "--weights", tmp_path / "none.safetensors", "--source", tmp_path, "--iou", "0")
    assert r.code == 2 and "--iou must be in (0, 1], got 0.0" in r.err and "Traceback" not in r.err


def test_api_is_only_the_by_name_front():
    import cnnkit.api

    assert [m.name for m in pkgutil.iter_modules(cnnkit.api.__path__)] == []
    assert {"train", "val", "predict", "load", "export"} <= set(cnnkit.api.__all__)


def test_no_task_imports_another_tasks_modules():
    packages = {p for p, _, _ in TASKS.values()}
    for pkg in packages:
        for f in (SRC / "tasks" / pkg).glob("*.py"):
            for other in re.findall(r"cnnkit\.tasks\.(\w+)", f.read_text()):
                assert other in (pkg, "base", "losses", "softmax"), f"{f.name} of {pkg} imports tasks.{other}"
