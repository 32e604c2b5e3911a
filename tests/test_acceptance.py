"""Acceptance: the default digits training beats 98.5% top-1 on the fixed test split.

One seed is not a fair bar: the test split has 270 images (one image is 0.0037), and the same
seed with the same pins lands 6 images apart on two machines (most likely different CPU kernels)
(seed 0: 0.9963 on the machine BENCHMARKS.md was measured on, 0.9778 on an AMD EPYC with the
same pins). The bar is on the mean of three seeds (there: 0.990; on the EPYC: 0.986).
"""

from __future__ import annotations

import json

import pytest

from conftest import run_subprocess


@pytest.mark.slow
def test_default_digits_training_reaches_98_5_percent(tmp_path):
    top1 = []
    for seed in (0, 1, 2):
        out = tmp_path / f"run{seed}"
        r = run_subprocess(["classify", "train", "--data", "digits", "--seed", str(seed), "--out", str(out)])
        assert r.returncode == 0, r.stderr
        res = json.loads((out / "results.json").read_text())
        assert res["test"]["num_images"] == 270
        top1.append(res["test"]["top1"])
    assert sum(top1) / 3 >= 0.985, top1
