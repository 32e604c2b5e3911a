"""ImageFolder trees for classification.

Accepted layouts::

    root/train/<class>/*.png   root/val/<class>/*   [root/test/<class>/*]
    root/train/<class>/*                          (val: a seeded stratified split of train)
    root/<class>/*                                (train/val: a seeded stratified split)

Images are decoded lazily by :func:`cnnkit.data.decode.read_image`; a corrupt file raises
:class:`~cnnkit.errors.ImageDecodeError` from ``__getitem__`` so the loader can skip and
count it instead of stopping the run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cnnkit.data.decode import is_image_file, read_image
from cnnkit.errors import DataError

SPLITS = ("train", "val", "test")


class FileDataset(Dataset):
    """``(path, label)`` samples decoded on access to ``(uint8 (C, H, W), label)``."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], channels: int,
                 name: str = "folder", default_imgsz: int = 224):
        self.samples = samples
        self.classes = classes
        self.channels = channels
        self.name = name
        self.default_imgsz = default_imgsz
        self.targets = [y for _, y in samples]
        self.paths = [p for p, _ in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return read_image(path, self.channels), label


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and is_image_file(p))


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_split(folder: Path, classes: list[str] | None) -> tuple[list[tuple[str, int]], list[str]]:
    dirs = _class_dirs(folder)
    if not dirs:
        if _images_in(folder):
            raise DataError(f"'{folder}' holds images but no class folders; put each class's "
                            "images in their own sub-folder (root/train/<class>/...)")
        raise DataError(f"no class folders found in '{folder}'")
    names = [d.name for d in dirs]
    if classes is None:
        classes = names
    else:
        extra = sorted(set(names) - set(classes))
        if extra:
            raise DataError(f"'{folder}' has class folder(s) {extra} that are not in the training "
                            f"classes {classes}")
    samples: list[tuple[str, int]] = []
    for d in dirs:
        files = _images_in(d)
        if not files:
            raise DataError(f"class folder '{d}' has no images (readable: .png .jpg .jpeg .bmp .gif "
                            ".tif .webp)")
        label = classes.index(d.name)
        samples += [(str(p), label) for p in files]
    return samples, classes


def _stratified_split(samples: list[tuple[str, int]], fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    keep, held = [], []
    labels = np.array([y for _, y in samples])
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_held = int(round(len(idx) * fraction)) if len(idx) > 1 else 0
        n_held = min(max(n_held, 1 if len(idx) > 1 else 0), len(idx) - 1)
        held += idx[:n_held].tolist()
        keep += idx[n_held:].tolist()
    return [samples[i] for i in sorted(keep)], [samples[i] for i in sorted(held)]


def _detect_channels(paths: list[str], limit: int = 32) -> int:
    """1 when the first images are all grayscale, else 3 (mixed folders convert to RGB)."""
    step = max(1, len(paths) // limit)
    for p in paths[::step][:limit]:
        try:
            with Image.open(p) as im:
                if im.mode not in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
                    return 3
        except Exception:  # unreadable: decided by the others; reported when loaded
            continue
    return 1


def scan_image_folder(root: str | Path, val_fraction: float = 0.2, seed: int = 0,
                      channels: int | None = None) -> dict[str, FileDataset]:
    """Read an ImageFolder tree into ``{"train": ..., "val": ..., ["test": ...]}`` datasets.

    Raises:
        DataError: the path is missing, empty, or a class folder has no images.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data path '{root}' does not exist")
    if not root.is_dir():
        raise DataError(f"data path '{root}' is a file; give a folder with class sub-folders, "
                        "or a built-in dataset name (digits, shapes)")
    if not any(root.iterdir()):
        raise DataError(f"data folder '{root}' is empty")
    has_train = (root / "train").is_dir()
    train_dir = root / "train" if has_train else root
    train, classes = _scan_split(train_dir, None)
    splits: dict[str, list[tuple[str, int]]] = {}
    if has_train and (root / "val").is_dir():
        splits["train"] = train
        splits["val"], _ = _scan_split(root / "val", classes)
    else:
        splits["train"], splits["val"] = _stratified_split(train, val_fraction, seed)
        if not splits["val"]:
            raise DataError(f"'{root}' has too few images to hold out a validation split; add a "
                            "val/ folder or more images per class")
    if has_train and (root / "test").is_dir():
        splits["test"], _ = _scan_split(root / "test", classes)
    if channels is None:
        channels = _detect_channels([p for p, _ in splits["train"]])
    return {k: FileDataset(v, classes, channels, name=str(root)) for k, v in splits.items()}
