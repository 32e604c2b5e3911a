"""A few real inputs of each task's tiny trained model (files where the task reads files),
shared by the export and serving tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def task_images(name: str, request, tmp: Path) -> list:
    """A few real inputs of each task (files where the task reads files)."""
    if name == "digits_run":
        from cnnkit.data.digits import digits_arrays

        imgs = digits_arrays("test")[0][:6]
    elif name == "multilabel_run":
        from conftest import make_colour_csv

        return [p for p, _ in make_colour_csv(tmp / "ml", 6, 7, "x.csv")]
    elif name == "tiny_run":
        root = request.getfixturevalue("tiny_yolo").parent
        return sorted((root / "images" / "val").glob("*"))[:4]
    elif name == "seg_run":
        root = request.getfixturevalue("seg_data").parent
        return sorted((root / "images" / "val").glob("*.png"))[:4]
    elif name == "instance_run":
        from cnnkit.data.shapes import SceneParams, sample_scene

        rng = np.random.default_rng(3)
        imgs = [sample_scene(SceneParams(64, 1, 2), rng, classes=[0, 1]).image for _ in range(3)]
    else:
        from cnnkit.data.volumes import phantoms

        vol = phantoms({"val": 1}).split("val")[0].load_image()
        return [vol, np.pad(vol, ((4, 6), (0, 9), (3, 3)), mode="reflect")]  # larger than the window: sliding
    paths = []
    for i, im in enumerate(imgs):
        p = tmp / f"{name}_{i}.png"
        Image.fromarray(np.asarray(im)).save(p)
        paths.append(p)
    return paths
