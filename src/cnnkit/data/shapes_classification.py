"""``shapes`` for classification: one main shape per image, balanced labels, random access."""

from __future__ import annotations

import numpy as np
import torch

from cnnkit.data.shapes import _DEFAULT_SIZES, _SPLITS, SHAPE_CLASSES, SceneParams, sample_scene


def classification_params(imgsz: int = 64) -> SceneParams:
    """Default settings of :class:`ShapesClassification`: one large shape (circumscribed
    diameter 45-80% of the image), clutter 0.5, occlusion 0.3 hiding at most 40%, lighting 0.5."""
    return SceneParams(imgsz=imgsz, size_range=(0.45, 0.8), clutter=0.5, occlusion=0.3,
                       max_occlusion=0.4, lighting=0.5, noise=0.02)


class ShapesClassification(torch.utils.data.Dataset):
    """One main shape per image; the label is its index in :data:`SHAPE_CLASSES`.

    Random access and deterministic: item ``i`` of a split is generated from
    ``np.random.default_rng([seed, split_index, i])`` (train 0, val 1, test 2, so splits never
    share images) and DataLoader workers need no shared state. Labels are balanced: each block
    of 8 consecutive items holds every class once, in an order drawn from the block's own seed.

    Args:
        split: "train", "val" or "test".
        size: Number of items; defaults to 2000 / 400 / 400.
        seed: Dataset seed.
        params: Generator settings; defaults to :func:`classification_params`.
        cache: Keep rendered items in memory after first access.
    """

    name = "shapes"
    channels = 3
    default_imgsz = 64
    paths = None

    def __init__(self, split: str = "train", size: int | None = None, seed: int = 0,
                 params: SceneParams | None = None, cache: bool = True) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
        self.split, self.seed, self.cache = split, seed, cache
        self.size = _DEFAULT_SIZES[split] if size is None else int(size)
        self.params = params if params is not None else classification_params(self.default_imgsz)
        self.classes = list(SHAPE_CLASSES)
        self._cache: dict[int, torch.Tensor] = {}
        self._boxes: dict[int, torch.Tensor] = {}
        nc, idx = len(SHAPE_CLASSES), _SPLITS[split]
        blocks = [np.random.default_rng([seed, idx, b, 0xC1A55]).permutation(nc)
                  for b in range(-(-self.size // nc))]
        self._targets = [int(c) for c in np.concatenate(blocks or [[]])[: self.size]]

    @property
    def targets(self) -> list[int]:
        """Label of every item, computed without rendering."""
        return self._targets

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Return item ``i`` as (uint8 tensor of shape (3, H, W), label)."""
        if not -self.size <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} items")
        i = int(i) % self.size
        label = self._targets[i]
        if i in self._cache:
            return self._cache[i], label
        x = torch.from_numpy(np.ascontiguousarray(self.scene(i).image.transpose(2, 0, 1)))
        if self.cache:
            self._cache[i] = x
        return x, label

    def scene(self, i: int):
        """Item ``i`` rendered again with its ground truth (a :class:`~cnnkit.data.shapes.Scene`)."""
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], int(i) % self.size])
        return sample_scene(self.params, rng, classes=[self._targets[int(i) % self.size]])

    def object_boxes(self, i: int) -> torch.Tensor:
        """float32 (1, 4): the xyxy box of item ``i``'s shape in pixels (x2/y2 exclusive; what
        robustness' occlusion covers a share of)."""
        i = int(i) % self.size
        if i not in self._boxes:
            self._boxes[i] = torch.from_numpy(self.scene(i).boxes[:1].astype(np.float32))
        return self._boxes[i]

    def mask(self, i: int) -> np.ndarray:
        """bool (H, W): the visible pixels of item ``i``'s shape (what an explanation of its label
        should point at)."""
        return self.scene(i).masks.any(0)
