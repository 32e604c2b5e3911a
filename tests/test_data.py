"""Decoding, built-in digits, ImageFolder scanning and augmentation parsing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.data.classification import load_classification_data
from cnnkit.data.decode import read_image
from cnnkit.data.transforms import parse_aug
from cnnkit.errors import CnnkitError, DataError, ImageDecodeError

from conftest import make_image_folder


def _png_bytes(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_read_image_gray_and_rgb(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8))
    rgb.save(tmp_path / "a.png")
    t = read_image(tmp_path / "a.png", channels=3)
    assert t.dtype == torch.uint8 and t.shape == (3, 10, 12)
    assert torch.equal(t, torch.from_numpy(np.array(rgb)).permute(2, 0, 1))
    g = read_image(tmp_path / "a.png", channels=1)
    assert g.shape == (1, 10, 12)
    assert torch.equal(g[0], torch.from_numpy(np.array(rgb.convert("L"))))
    assert read_image(tmp_path / "a.png", channels=None).shape[0] == 3
    rgb.convert("L").save(tmp_path / "g.png")
    assert read_image(tmp_path / "g.png", channels=None).shape[0] == 1
    assert read_image(tmp_path / "g.png", channels=3).shape == (3, 10, 12)


def test_read_image_applies_exif_orientation(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :5] = 255  # bright left band on a 20-wide, 10-high image
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    t = read_image(tmp_path / "r.jpg", channels=1)
    assert t.shape == (1, 20, 10)  # displayed upright: taller than wide
    assert t[0, :5].float().mean() > 200  # the band is now at the top


def test_read_image_other_sources():
    arr = np.full((4, 5), 7, np.uint8)
    assert read_image(arr, channels=1).shape == (1, 4, 5)
    assert read_image(torch.zeros(3, 4, 5), channels=1).shape == (1, 4, 5)
    assert read_image(_png_bytes(Image.fromarray(arr)), channels=3).shape == (3, 4, 5)
    rgba = Image.new("RGBA", (3, 3), (255, 0, 0, 0))  # fully transparent red
    assert read_image(rgba, channels=3).sum() == 0  # composited on black
    sixteen = Image.fromarray(np.full((4, 4), 4000, np.uint16))
    assert read_image(sixteen, channels=1).max() == 255


def test_read_image_errors(tmp_path, monkeypatch):
    with pytest.raises(ImageDecodeError, match=r"^cannot read image '.*nope.png': the file does not exist$"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageDecodeError, match=r"not an image file Pillow can identify$"):
        read_image(tmp_path / "notes.txt")
    data = _png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match=r"^cannot read image '.*trunc.png': corrupt or truncated"):
        read_image(tmp_path / "trunc.png")
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(ImageDecodeError):
        read_image(tmp_path / "garbage.png")
    Image.new("L", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the guard stays on: 10,000 px > 2x limit
    with pytest.raises(ImageDecodeError, match="decompression-bomb guard"):
        read_image(tmp_path / "big.png")


def test_digits_split_is_fixed_stratified_and_disjoint():
    from cnnkit.data.digits import split_indices

    s = split_indices()
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (1257, 270, 270)
    all_idx = np.concatenate(list(s.values()))
    assert len(np.unique(all_idx)) == 1797
    data = load_classification_data("digits")
    counts = np.bincount(data.splits["test"].targets, minlength=10)
    assert counts.min() >= 26 and counts.max() <= 28  # stratified
    split_indices.cache_clear()
    assert np.array_equal(split_indices()["test"], s["test"])  # fixed, whatever the seed
    img, label = data.splits["train"][0]
    assert img.dtype == torch.uint8 and img.shape == (1, 8, 8) and 0 <= label < 10


def test_image_folder_layouts(tmp_path, image_folder):
    d = load_classification_data(str(image_folder))
    assert d.classes == ["checker", "circle", "hstripes", "vstripes"]
    assert d.channels == 3
    assert {k: len(v) for k, v in d.splits.items()} == {"train": 240, "val": 60, "test": 40}
    img, label = d.splits["val"][0]
    assert img.shape[0] == 3

    # without val/: a seeded stratified split of train/
    root = make_image_folder(tmp_path / "noval", {"train": 10}, splits=("train",), gray=True)
    a = load_classification_data(str(root), seed=1)
    b = load_classification_data(str(root), seed=1)
    c = load_classification_data(str(root), seed=2)
    assert a.channels == 1
    assert len(a.splits["val"]) == 8 and len(a.splits["train"]) == 32
    assert a.splits["val"].paths == b.splits["val"].paths != c.splits["val"].paths
    assert not set(a.splits["val"].paths) & set(a.splits["train"].paths)

    # flat root/<class>/ layout
    flat = tmp_path / "flat"
    for cls in ("a", "b"):
        (flat / cls).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(flat / cls / f"{i}.png")
    f = load_classification_data(str(flat))
    assert f.classes == ["a", "b"] and len(f.splits["train"]) + len(f.splits["val"]) == 10


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match=r"^data path '.*missing' does not exist$"):
        load_classification_data(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"^data folder '.*empty' is empty$"):
        load_classification_data(str(tmp_path / "empty"))
    root = tmp_path / "hole"
    (root / "train" / "cat").mkdir(parents=True)
    (root / "train" / "dog").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "train" / "cat" / "1.png")
    (root / "train" / "dog" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"^class folder '.*dog' has no images"):
        load_classification_data(str(root))
    with pytest.raises(DataError, match=r"did you mean 'digits'"):
        load_classification_data("digit")


def test_parse_aug_catalog():
    t = parse_aug("flip,rotate=15,scale=0.8:1.2,translate=0.1,jitter=0.4,erase=0.25,blur=1.0,crop=0.5", 32)
    assert len(t) == 6  # rotate/scale/translate merge into one RandomAffine
    assert parse_aug("none", 32) == []
    x = torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)
    for tf in t:
        x = tf(x)
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    with pytest.raises(CnnkitError, match=r"unknown augmentation 'flp' \(did you mean 'flip'\?\)"):
        parse_aug("flp", 32)
    with pytest.raises(CnnkitError, match=r"needs a number"):
        parse_aug("rotate=abc", 32)
