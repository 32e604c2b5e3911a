"""Defaults derived from the data (issue 19): a user's folder trains at its images' size with
label-keeping augmentation, and says so in the run header and config.yaml."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from cnnkit.data.classification import load_classification_data
from cnnkit.tasks.classify.spec import folder_defaults


def _folder(root: Path, sizes: list[tuple[int, int]], mode: str = "RGB") -> Path:
    """Two classes; the images of each take ``sizes`` in turn ((height, width))."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        d = root / cls
        d.mkdir(parents=True)
        for i, (h, w) in enumerate(sizes * 3):
            px = rng.integers(0, 255, (h, w, 3 if mode == "RGB" else 1), dtype=np.uint8)
            Image.fromarray(px.squeeze(-1) if mode == "L" else px, mode).save(d / f"{i}.png")
    return root


def _chosen(root: Path, **options) -> SimpleNamespace:
    cfg = SimpleNamespace(**{"imgsz": None, "aug": None, "batch_aug": None, "model": "smallcnn", "seed": 0,
                             **options})
    cfg.derived = folder_defaults(cfg, load_classification_data(str(root)))
    return cfg


@pytest.mark.parametrize("sizes, model, want", [
    ([(8, 8)], "smallcnn", 16),  # never the 224 that upsampled 8x8 digits 28x; 16 as the built-in digits
    ([(32, 32)], "smallcnn", 32),
    ([(200, 300)], "smallcnn", 224),  # 245 px of area side: capped at the folder default
    ([(100, 150)], "smallcnn", 120),  # rounded to smallcnn's stride 8
    ([(100, 150)], "resnet18", 128),  # and to a registry network's 32
    ([(20, 20), (40, 40), (48, 64), (64, 64), (300, 400)], "smallcnn", 56),  # mixed: the median image (48x64)
])
def test_folder_input_size_comes_from_the_images(tmp_path, sizes, model, want):
    cfg = _chosen(_folder(tmp_path / "f", sizes, "L" if sizes == [(8, 8)] else "RGB"), model=model)
    assert cfg.imgsz == want, cfg.derived["imgsz"]
    assert "median image" in cfg.derived["imgsz"].reason
    # label-keeping augmentation: never a flip; small images get an affine jitter, larger ones crops
    assert "flip" not in cfg.aug and cfg.aug == ("affine" if want < 64 else "crop=0.6")


def test_given_options_and_built_in_data_are_left_alone(tmp_path):
    root = _folder(tmp_path / "f", [(8, 8)])
    cfg = _chosen(root, imgsz=48, aug="flip")
    assert (cfg.imgsz, cfg.aug, cfg.derived) == (48, "flip", {})
    cfg = SimpleNamespace(imgsz=None, aug=None, batch_aug=None, model="smallcnn", seed=0)
    assert folder_defaults(cfg, load_classification_data("digits")) == {} and cfg.imgsz is None


def test_header_and_config_name_every_derived_default(cli, tmp_path):
    """The run header lists each data-derived option with its reason; config.yaml carries the
    value with the reason as a comment and reruns the same training."""
    import yaml

    root = _folder(tmp_path / "f", [(8, 8)], "L")
    r = cli("classify", "train", "--data", root, "--epochs", "1", "--batch", "4", "--out", tmp_path / "run")
    assert r.code == 0, r.err
    assert "defaults from the data" in r.out and "--imgsz 16: median image 8x8 px" in r.out, r.out
    assert "--aug affine: small images" in r.out
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert "imgsz: 16  # derived from the data: median image 8x8 px" in text
    assert "aug: affine  # derived from the data:" in text
    assert yaml.safe_load(text)["imgsz"] == 16
    import json

    card = json.loads((tmp_path / "run" / "weights" / "best.json").read_text())
    assert card["input"]["height"] == 16
    r = cli("classify", "train", "--config", tmp_path / "run" / "config.yaml", "--out", tmp_path / "again")
    assert r.code == 0 and "defaults from the data" not in r.out, r.out + r.err  # all explicit now


@pytest.mark.parametrize("n_train, default, want", [
    (1000, 32, 32),  # 31 steps an epoch: enough
    (640, 32, 32),  # exactly 20
    (600, 32, 16),  # 18 at 32, 37 at 16
    (300, 32, 8),  # 9 at 32, 18 at 16, 37 at 8
    (50, 32, 8),  # never below 8 (batch-norm statistics)
    (300, 16, 8),  # detection's and segmentation's default 16
    (10, 4, 4),  # volumes keep their small default
])
def test_a_small_training_set_gets_a_smaller_batch(n_train, default, want):
    from cnnkit.data.defaults import fit_batch

    assert fit_batch(n_train, default) == want


def test_only_a_left_out_batch_on_user_data_is_fitted():
    from cnnkit.data.defaults import resolve_batch_lr
    from cnnkit.tasks.classify.config import ClassifyConfig
    from cnnkit.tasks.medical.config import MedicalConfig
    from cnnkit.tasks.segment.config import SegmentConfig

    cfg, derived = ClassifyConfig(), {}
    resolve_batch_lr(cfg, derived, 300, user_data=True)
    assert (cfg.batch, cfg.lr, list(derived)) == (8, 2e-3, ["batch"])  # the LR stays at the default
    assert "300 training images: batch 8 makes an epoch 37 steps (at 32 it would be 9" in derived["batch"].reason
    cfg, derived = ClassifyConfig(batch=64, lr=0.01), {}  # given options stay as given
    resolve_batch_lr(cfg, derived, 300, user_data=True)
    assert (cfg.batch, cfg.lr, derived) == (64, 0.01, {})
    cfg, derived = ClassifyConfig(), {}  # built-in data keep their tuned defaults
    resolve_batch_lr(cfg, derived, 300, user_data=False)
    assert (cfg.batch, cfg.lr, derived) == (32, 2e-3, {})
    for config, want in ((SegmentConfig, (16, 1e-3)), (MedicalConfig, (4, 1e-3))):
        cfg = config()
        resolve_batch_lr(cfg, {}, 1000, user_data=True)
        assert (cfg.batch, cfg.lr) == want


def test_header_and_config_name_a_derived_batch(cli, tmp_path):
    """A folder of 24 images: batch 8 (3 batches an epoch rather than 1), in the header
    and in config.yaml; the run header's batch is the one used."""
    import yaml

    root = _folder(tmp_path / "f", [(8, 8)] * 4, "L")
    r = cli("classify", "train", "--data", root, "--epochs", "1", "--out", tmp_path / "run")
    assert r.code == 0, r.err
    assert "--batch 8: " in r.out and "batch 8 ·" in r.out, r.out
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert "batch: 8  # derived from the data:" in text
    assert (yaml.safe_load(text)["batch"], yaml.safe_load(text)["lr"]) == (8, 0.002)


@pytest.mark.slow
def test_a_digits_folder_with_no_options_learns(cli, tmp_path):
    """scikit-learn's 8x8 digits as PNG class folders (a stratified split of its own, not the
    built-in one): `classify train --data FOLDER` with no option but a shorter run (the
    data-derived 16 px and affine jitter) ends above 0.98 test top-1; at the old 224 px default
    a run did not finish in 30 minutes. (benchmarks/digits_vs_svc.py --folder: the full run
    against the SVC.)"""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=1)
    for split, idx in (("train", idx_train), ("test", idx_test)):
        for i in idx:
            d = tmp_path / "digits" / split / str(y[i])
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray((x[i].reshape(8, 8) * 255 / 16).round().astype(np.uint8), "L").save(d / f"{i}.png")
    r = cli("classify", "train", "--data", tmp_path / "digits", "--epochs", "10", "--out", tmp_path / "run")
    assert r.code == 0, r.err
    import json

    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["test"]["top1"] > 0.98, res
