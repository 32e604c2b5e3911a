"""Built-in ``digits``: scikit-learn's bundled 1,797 real handwritten digits (8x8, 10 classes).

The train/val/test split is fixed (stratified, seeded with a constant), so every run and
every peer in ``benchmarks/`` sees the same test images whatever ``--seed`` is.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset

SPLIT_SEED = 2024
FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
    return images, d.target.astype(np.int64)


@lru_cache(maxsize=1)
def split_indices() -> dict[str, np.ndarray]:
    """Indices of the fixed stratified split: 70% train, 15% val, 15% test."""
    from sklearn.model_selection import train_test_split

    _, y = _load()
    idx = np.arange(len(y))
    train, rest = train_test_split(idx, test_size=FRACTIONS["val"] + FRACTIONS["test"],
                                   stratify=y, random_state=SPLIT_SEED)
    val, test = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=SPLIT_SEED)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 8, 8), labels int64 (N,))`` of one split, for classic peers."""
    images, y = _load()
    idx = split_indices()[split]
    return images[idx], y[idx]


class DigitsDataset(Dataset):
    """One split of ``digits`` as ``(uint8 tensor (1, 8, 8), label)`` items."""

    name = "digits"
    channels = 1
    default_imgsz = 16
    classes = [str(i) for i in range(10)]

    def __init__(self, split: str = "train"):
        images, labels = digits_arrays(split)
        self.images = torch.from_numpy(images).unsqueeze(1)  # (N, 1, 8, 8)
        self.targets = labels.tolist()
        self.paths = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], self.targets[i]
