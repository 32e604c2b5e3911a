"""Acceptance: the default digits training beats 98.5% top-1 on the fixed test split."""

from __future__ import annotations

import json

import pytest

from conftest import run_subprocess


@pytest.mark.slow
def test_default_digits_training_reaches_98_5_percent(tmp_path):
    r = run_subprocess(["classify", "train", "--data", "digits", "--out", str(tmp_path / "run")])
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["test"]["top1"] >= 0.985, res["test"]["top1"]
    assert res["test"]["num_images"] == 270
