"""Typed prediction results with one ``to_dict()`` schema.

What ``cnnkit TASK predict --json`` writes, what the Python API returns and what the server
will answer are the same dictionaries: each result's :meth:`to_dict`. Masks are written as
COCO RLE (instance masks) or as files (semantic masks), never as raw arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class Classification:
    """One image's class: the best label, its probability and the top-k list."""

    path: str | None
    label: str
    class_id: int
    score: float
    topk: list[tuple[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "label": self.label, "score": self.score,
                "topk": [[n, s] for n, s in self.topk]}


@dataclass
class MultiLabel:
    """One image's tags: the labels at or above their threshold (highest score first) and the
    probability of every class."""

    path: str | None
    labels: list[str]
    scores: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "labels": list(self.labels), "scores": dict(self.scores)}


def mask_to_rle(mask: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """A bool (H, W) mask as COCO RLE ``{"size": [H, W], "counts": str}`` (pycocotools)."""
    from pycocotools import mask as mask_utils

    m = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


@dataclass
class Detection:
    """One object of a :class:`Detections` (a view for convenient loops)."""

    box: list[float]
    score: float
    class_id: int
    class_name: str
    mask: torch.Tensor | None = None


@dataclass
class Detections:
    """Objects in one image, in its original pixel coordinates.

    ``boxes`` float (N, 4) xyxy, ``scores`` (N,), ``labels`` (N,) 0-based class ids, and for
    instance models ``masks`` bool (N, H, W) at the original size.
    """

    path: str | None
    width: int
    height: int
    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    masks: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def detections(self) -> list[Detection]:
        """The objects one by one (box as a list of floats, score, class, mask)."""
        masks = self.masks if self.masks is not None else [None] * len(self)
        return [Detection(b, s, int(c), self.class_names[int(c)], m) for b, s, c, m in
                zip(self.boxes.tolist(), self.scores.tolist(), self.labels.tolist(), masks)]

    def to_dict(self) -> dict[str, Any]:
        dets = []
        for d in self.detections:
            row = {"box": [round(v, 2) for v in d.box], "score": round(d.score, 5), "class_id": d.class_id,
                   "class_name": d.class_name}
            if d.mask is not None:
                row["mask"] = mask_to_rle(d.mask)
            dets.append(row)
        return {"path": self.path, "width": self.width, "height": self.height, "detections": dets}


@dataclass
class SegMask:
    """The class-id mask of one image (``mask`` uint8 (H, W)) at its original size; for
    volumes ``mask`` is (D, H, W)."""

    path: str | None
    width: int
    height: int
    mask: torch.Tensor
    class_names: list[str] = field(default_factory=list)
    mask_file: str | None = None

    def fractions(self) -> dict[str, float]:
        """Share of the pixels per class present."""
        counts = torch.bincount(self.mask.flatten().long(), minlength=len(self.class_names))
        total = max(1, self.mask.numel())
        return {n: round(float(c) / total, 5) for n, c in zip(self.class_names, counts.tolist()) if c > 0}

    def to_dict(self) -> dict[str, Any]:
        out = {"path": self.path, "width": self.width, "height": self.height, "classes": self.fractions()}
        if self.mask_file:
            out["mask"] = self.mask_file
        return out


@dataclass
class VolumeLabels:
    """The class-id labels (uint8 (D, H, W)) of one volume and their voxel counts."""

    path: str | None
    labels: torch.Tensor
    class_names: list[str]
    labels_file: str | None = None
    affine: np.ndarray | None = None  # the input file's voxel-to-scanner transform, for the label volume

    def to_dict(self) -> dict[str, Any]:
        counts = np.bincount(self.labels.numpy().ravel(), minlength=len(self.class_names))
        out = {"path": self.path, "shape": list(self.labels.shape),
               "voxels": {n: int(c) for n, c in zip(self.class_names, counts) if c}}
        if self.labels_file:
            out["labels"] = self.labels_file
        return out


@dataclass
class VolumeClass:
    """One volume's class and the probability of every class."""

    path: str | None
    shape: list[int]
    label: str
    score: float
    probs: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "shape": self.shape, "label": self.label, "score": round(self.score, 6),
                "probs": {n: round(v, 6) for n, v in self.probs.items()}}
