"""Anchor tools: fit anchor shapes to a dataset, measure them, and hand them to torchvision.

Anchor-based detectors (Faster R-CNN's RPN, RetinaNet, YOLOv2-v5) start every prediction from
an anchor box, so anchors that fit the dataset's box shapes make learning easier. This module:

- fits ``k`` anchor shapes to the boxes' widths and heights (:func:`kmeans_anchors`, k-means
  with the distance ``1 - IoU`` of boxes sharing a centre, as in YOLOv2);
- measures how well anchors cover boxes (:func:`shape_iou`, :func:`best_possible_recall`,
  :func:`mean_best_iou`);
- converts torchvision's ``sizes x aspect_ratios`` into explicit ``(w, h)`` pairs
  (:func:`anchor_pairs`) and back into a drop-in torchvision anchor generator built from any
  pairs (:class:`PairAnchorGenerator`), split over pyramid levels (:func:`split_levels`);
- stores anchors as a small YAML file (:func:`write_anchors`, :func:`read_anchors`,
  :func:`scale_anchors`).

All shapes are ``(w, h)`` in pixels of the (letterboxed) model input, float64 numpy arrays.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> wh = np.concatenate([rng.normal(m, 1.0, (200, 2)) for m in ([20, 40], [60, 30], [120, 120])])
    >>> anchors = kmeans_anchors(wh, 3)
    >>> np.round(anchors).astype(int).tolist()
    [[20, 40], [60, 30], [120, 120]]
    >>> best_possible_recall(wh, anchors) == 1.0
    True
    >>> gen = PairAnchorGenerator(split_levels(anchors, 3))   # one shape per FPN level
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import box_iou

from cnnkit.errors import DataError


def _wh(wh, what: str = "wh") -> np.ndarray:
    """Validate (M, 2) positive finite widths/heights (numpy or torch) -> float64."""
    if hasattr(wh, "detach"):
        wh = wh.detach().cpu().numpy()
    a = np.asarray(wh, np.float64)
    if a.ndim != 2 or a.shape[1] != 2:
        raise DataError(f"{what} must be (N, 2) widths and heights, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise DataError(f"{what} holds NaN or infinite sizes")
    bad = int((a <= 0).any(1).sum())
    if bad:
        raise DataError(f"{what} holds {bad} boxes with zero or negative width/height; "
                        "drop them first (wh[(wh > 0).all(1)])")
    return a


def _centred(wh: np.ndarray) -> torch.Tensor:
    """(M, 2) shapes -> (M, 4) float64 xyxy boxes centred on the origin."""
    t = torch.from_numpy(wh)
    return torch.cat([-t / 2, t / 2], 1)


# ---- shape overlap ------------------------------------------------------------------------
def shape_iou(wh, anchors_wh) -> np.ndarray:
    """IoU of every box shape with every anchor shape, both centred on the same point.

    This is the overlap an anchor could reach if it sat exactly on the object's centre; it
    depends only on widths and heights (``min(w)·min(h) / union``). Computed with
    ``torchvision.ops.box_iou`` on centred boxes, in float64.

    Shape:
        wh (M, 2), anchors_wh (K, 2) -> (M, K)
    """
    wh, anchors = _wh(wh), _wh(anchors_wh, "anchors_wh")
    return box_iou(_centred(wh), _centred(anchors)).numpy()


def best_possible_recall(wh, anchors_wh, thr: float = 0.5) -> float:
    """Fraction of boxes whose best-fitting anchor shape reaches shape-IoU ``thr``.

    An upper bound of what an anchor-matching detector can assign: real anchors sit on a
    grid (every ``stride`` pixels), so the IoU with an object is at most its shape IoU and
    usually lower, and matchers use their own thresholds (torchvision's RPN takes anchors
    with IoU >= 0.7 as positives, RetinaNet >= 0.5, both also keep each object's best
    anchor). A low figure (say below 0.98 at 0.5) means some object shapes have no
    anchor near them: fit anchors to the data (:func:`kmeans_anchors`) or add shapes.
    """
    return float((shape_iou(wh, anchors_wh).max(1) >= thr).mean()) if len(_wh(wh)) else float("nan")


def mean_best_iou(wh, anchors_wh) -> float:
    """Mean over boxes of the shape IoU with their best anchor (what k-means maximises)."""
    return float(shape_iou(wh, anchors_wh).max(1).mean()) if len(_wh(wh)) else float("nan")


# ---- k-means ------------------------------------------------------------------------------
def kmeans_anchors(wh, k: int, iters: int = 300, seed: int = 0) -> np.ndarray:
    """Fit ``k`` anchor shapes to box widths/heights with k-means under ``d = 1 - IoU``.

    The distance is one minus the IoU of two boxes sharing a centre (:func:`shape_iou`), so a
    big and a small box of the same aspect are far apart, but errors on large boxes do not
    outweigh those on small ones as they would in Euclidean (w, h) space (Redmon & Farhadi,
    YOLO9000). Initialisation is k-means++ under the same distance (seeded, so the result is
    deterministic); each update moves a centre to the element-wise **median** of its boxes:
    the IoU-optimal centre has no closed form, and the median, unlike the mean, is not pulled
    towards the long tail of large boxes that real datasets have. An empty cluster is re-seeded
    with the worst-covered box. Stops when no assignment changes or after ``iters`` rounds.

    Hand-written (30 lines of numpy): scikit-learn's and SciPy's k-means only offer Euclidean
    distance.

    Args:
        wh: (M, 2) box widths and heights in pixels (for example
            :func:`cnnkit.data.detection.all_boxes_wh` at the model's ``imgsz``).
        k: number of anchors.
        iters: maximum rounds of assignment and update.
        seed: seed of the k-means++ initialisation.

    Returns:
        (k, 2) float64 anchor shapes sorted by area, smallest first.

    Raises:
        DataError: bad sizes, or fewer distinct box shapes than ``k``.
    """
    wh = _wh(wh)
    if k < 1:
        raise DataError(f"k must be at least 1, got {k}")
    distinct = len(np.unique(wh, axis=0))
    if distinct < k:
        raise DataError(f"only {distinct} distinct box shapes for k={k} anchors; ask for at most "
                        f"{distinct} anchors or use more data")
    rng = np.random.default_rng(seed)
    centres = wh[[rng.integers(len(wh))]]
    while len(centres) < k:  # k-means++: pick far boxes with probability ~ distance²
        d2 = (1.0 - shape_iou(wh, centres).max(1)) ** 2
        centres = np.concatenate([centres, wh[[rng.choice(len(wh), p=d2 / d2.sum())]]])
    assign = None
    for _ in range(iters):
        iou = shape_iou(wh, centres)  # (M, k)
        new = iou.argmax(1)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = wh[assign == j]
            if len(members):
                centres[j] = np.median(members, 0)
            else:
                centres[j] = wh[iou.max(1).argmin()]
    return centres[np.argsort(centres.prod(1), kind="stable")]


# ---- torchvision anchor sets --------------------------------------------------------------
def anchor_pairs(sizes, aspect_ratios) -> list[np.ndarray]:
    """Per feature level, the (w, h) anchors torchvision's ``AnchorGenerator`` makes.

    Every size x ratio combination (ratio = h / w), ratio-major as torchvision orders them,
    with torchvision's rounding (its centred corners are rounded half-to-even, so a width is
    an even integer): the numbers come from torchvision's own ``generate_anchors``.

    Example:
        >>> [a.tolist() for a in anchor_pairs(((32,), (64,)), ((0.5, 1.0),) * 2)]
        [[[46.0, 22.0], [32.0, 32.0]], [[90.0, 46.0], [64.0, 64.0]]]
    """
    cell = AnchorGenerator(sizes, aspect_ratios).cell_anchors
    return [(c[:, 2:] - c[:, :2]).double().numpy() for c in cell]


class PairAnchorGenerator(AnchorGenerator):
    """torchvision ``AnchorGenerator`` built from explicit (w, h) anchors per feature level.

    A drop-in replacement wherever torchvision takes an ``AnchorGenerator`` (Faster R-CNN's
    ``rpn_anchor_generator``, RetinaNet's ``anchor_generator``): the anchors are placed on
    the feature grids by torchvision's own code; only the per-location shapes are yours,
    for example k-means anchors split over levels (:func:`split_levels`). Shapes are used as
    given (no rounding), so ``PairAnchorGenerator(anchor_pairs(sizes, ratios))`` makes exactly
    the anchors of ``AnchorGenerator(sizes, ratios)``.

    torchvision's heads share one convolution across levels, so Faster R-CNN and RetinaNet
    need the same number of anchors on every level; build the matching head with
    ``num_anchors_per_location()[0]``.

    Args:
        levels: per feature level (finest first) a (K, 2) array or list of ``(w, h)`` pairs in
            input pixels.

    Example:
        >>> from torchvision.models.detection.rpn import RPNHead
        >>> gen = PairAnchorGenerator([[(16, 24), (30, 18)], [(48, 64), (80, 50)], [(120, 160), (200, 140)]])
        >>> gen.num_anchors_per_location()
        [2, 2, 2]
        >>> head = RPNHead(256, gen.num_anchors_per_location()[0])
    """

    def __init__(self, levels: Sequence):
        nn.Module.__init__(self)  # AnchorGenerator.__init__ would build size x ratio grids
        if len(levels) == 0:
            raise DataError("PairAnchorGenerator needs at least one level of (w, h) anchors")
        self.levels = [_wh(lv, f"anchors of level {i}") for i, lv in enumerate(levels)]
        for i, lv in enumerate(self.levels):
            if len(lv) == 0:
                raise DataError(f"level {i} has no anchors; every feature level needs at least one")
        # informative only (torchvision's meaning): size = sqrt(w h), aspect ratio = h / w
        self.sizes = tuple(tuple(np.sqrt(lv.prod(1)).tolist()) for lv in self.levels)
        self.aspect_ratios = tuple(tuple((lv[:, 1] / lv[:, 0]).tolist()) for lv in self.levels)
        self.cell_anchors = [torch.cat([-torch.from_numpy(lv) / 2, torch.from_numpy(lv) / 2], 1).float()
                             for lv in self.levels]

    def num_anchors_per_location(self) -> list[int]:
        return [len(lv) for lv in self.levels]

    def extra_repr(self) -> str:
        return "anchors per level: " + ", ".join(str(len(lv)) for lv in self.levels)


def split_levels(anchors_wh, num_levels: int) -> list[np.ndarray]:
    """Share anchors out over ``num_levels`` feature levels, smallest to the finest level.

    Sorted by area and split as evenly as possible (``np.array_split``: when ``K`` is not a
    multiple of ``num_levels`` the finer levels get one more). torchvision's Faster R-CNN
    and RetinaNet need equal counts, so pick ``K`` a multiple of the level count for them.

    Shape:
        anchors_wh (K, 2) -> ``num_levels`` arrays (K_l, 2)
    """
    a = _wh(anchors_wh, "anchors_wh")
    if not 1 <= num_levels <= len(a):
        raise DataError(f"cannot split {len(a)} anchors over {num_levels} levels; "
                        f"use 1 to {len(a)} levels or more anchors")
    a = a[np.argsort(a.prod(1), kind="stable")]
    return [x.copy() for x in np.array_split(a, num_levels)]


# ---- files --------------------------------------------------------------------------------
def _plain(obj: Any) -> Any:
    """numpy scalars/arrays -> Python numbers/lists, so YAML stays plain."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def write_anchors(path: str | Path, levels: Sequence, imgsz: int, meta: dict | None = None) -> None:
    """Write anchors as YAML: ``imgsz``, ``levels: [[[w, h], ...], ...]`` (pixels at that
    input size, finest level first) and optional ``meta`` (for example best possible recall
    and mean IoU on the data they were fitted to). The write is atomic.

    Example file::

        imgsz: 320
        levels:
        - [[12.0, 16.0], [20.0, 11.0]]
        - [[41.0, 52.0], [70.0, 44.0]]
        meta: {bpr: 0.998, mean_best_iou: 0.74}
    """
    import yaml

    from cnnkit.utils.io import write_text

    if int(imgsz) <= 0:
        raise DataError(f"imgsz must be a positive number of pixels, got {imgsz}")
    doc: dict[str, Any] = {"imgsz": int(imgsz),
                           "levels": [_wh(lv, f"anchors of level {i}").tolist() for i, lv in enumerate(levels)]}
    if meta:
        doc["meta"] = _plain(meta)
    write_text(path, yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))


def read_anchors(path: str | Path) -> tuple[list[np.ndarray], int]:
    """Read a file from :func:`write_anchors`: ``(levels, imgsz)``, levels as (K, 2) float64.

    For another input size, :func:`scale_anchors` ``(levels, imgsz, new_imgsz)``.

    Raises:
        DataError: missing file, bad YAML, or missing/invalid ``imgsz`` or ``levels``.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise DataError(f"anchor file '{p}' does not exist")
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"anchor file '{p}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict) or "imgsz" not in doc or "levels" not in doc:
        raise DataError(f"anchor file '{p}' needs 'imgsz' and 'levels' keys (write it with write_anchors)")
    imgsz = doc["imgsz"]
    if isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz <= 0:
        raise DataError(f"anchor file '{p}': imgsz must be a positive integer, got {imgsz!r}")
    lv = doc["levels"]
    if not isinstance(lv, list) or not lv:
        raise DataError(f"anchor file '{p}': levels must be a non-empty list of [[w, h], ...] lists")
    levels = []
    for i, level in enumerate(lv):
        try:
            a = np.asarray(level, np.float64)
        except (TypeError, ValueError):
            a = None
        if a is None or a.ndim != 2 or a.shape[1] != 2 or len(a) == 0:
            raise DataError(f"anchor file '{p}': level {i} must be a non-empty list of [w, h] pairs")
        try:
            levels.append(_wh(a, f"level {i}"))
        except DataError as e:
            raise DataError(f"anchor file '{p}': {e}") from None
    return levels, imgsz


def scale_anchors(levels: Sequence, from_imgsz: int, to_imgsz: int) -> list[np.ndarray]:
    """Anchors fitted at one input size, for another: letterboxing scales every box by
    ``to_imgsz / from_imgsz``, so the anchors scale the same way."""
    if from_imgsz <= 0 or to_imgsz <= 0:
        raise DataError(f"image sizes must be positive, got {from_imgsz} and {to_imgsz}")
    f = to_imgsz / from_imgsz
    return [np.asarray(lv, np.float64) * f for lv in levels]


__all__ = ["kmeans_anchors", "shape_iou", "best_possible_recall", "mean_best_iou", "anchor_pairs",
           "PairAnchorGenerator", "split_levels", "write_anchors", "read_anchors", "scale_anchors"]
