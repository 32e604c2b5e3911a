"""Shared fixtures: small generated image folders and a CLI runner that captures output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("MPLBACKEND", "Agg")
CLASSES = ("checker", "circle", "hstripes", "vstripes")


def pattern_image(cls: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A simple, learnable RGB pattern of one class in a random colour pair."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    period = rng.integers(6, 12)
    if cls == "hstripes":
        on = (yy // period) % 2 == 0
    elif cls == "vstripes":
        on = (xx // period) % 2 == 0
    elif cls == "checker":
        on = ((xx // period) + (yy // period)) % 2 == 0
    else:
        r = rng.uniform(0.25, 0.4) * min(w, h)
        cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h
        on = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
    fg = rng.integers(140, 256, 3)
    bg = rng.integers(0, 100, 3)
    img = np.where(on[..., None], fg, bg).astype(np.float32)
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def make_image_folder(root: Path, per_class: dict[str, int], seed: int = 0, splits=("train", "val"),
                      gray: bool = False) -> Path:
    """Write root/<split>/<class>/*.png|jpg with varied sizes."""
    rng = np.random.default_rng(seed)
    for split in splits:
        n = per_class[split]
        for cls in CLASSES:
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                size = (int(rng.integers(24, 72)), int(rng.integers(24, 72)))
                im = pattern_image(cls, size, rng)
                if gray:
                    im = im.convert("L")
                ext = ".jpg" if i % 3 == 0 else ".png"
                im.save(d / f"{cls}_{i}{ext}", quality=92) if ext == ".jpg" else im.save(d / f"{cls}_{i}{ext}")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """4 classes, RGB, varied sizes: 60 train + 15 val + 10 test images per class (340 in all)."""
    root = tmp_path_factory.mktemp("folder")
    return make_image_folder(root, {"train": 60, "val": 15, "test": 10}, splits=("train", "val", "test"))


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """A short digits training run shared by tests that need trained weights."""
    from cnnkit.api.classify import ClassifyConfig, train

    out = tmp_path_factory.mktemp("runs") / "digits"
    train(ClassifyConfig(data="digits", epochs=3, out=str(out)), verbose=False)
    return out


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capsys):
    """Run ``cnnkit ARGS`` in-process; returns exit code and captured output."""
    from cnnkit.cli.main import main

    def run(*args: str) -> CliResult:
        code = main([str(a) for a in args])
        cap = capsys.readouterr()
        return CliResult(code, cap.out, cap.err)

    return run


def run_subprocess(args: list[str], cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed ``cnnkit`` entry point as a user would."""
    exe = Path(sys.executable).parent / "cnnkit"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "120"})
