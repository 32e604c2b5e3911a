"""Box detection metrics: COCO mAP/mAR through pycocotools, per class, by size and by occlusion.

Every number here comes out of ``pycocotools.cocoeval.COCOeval`` (the reference used by the
COCO leaderboard, torchvision's references and torchmetrics' ``pycocotools`` backend); this
module only converts cnnkit's boxes into COCO's format, silences pycocotools' prints and
reads the precision/recall arrays it accumulates. Nothing is reimplemented, so
``DetectionEvaluator(...).compute()["map50_95"]`` is exactly ``COCOeval.stats[0]`` on the
same data (the tests check all twelve ``stats`` and torchmetrics' numbers).

Conventions (see :mod:`cnnkit.data.detection`): boxes are float ``x1, y1, x2, y2`` in pixels
with ``x2``/``y2`` exclusive, so COCO's ``bbox`` is ``[x1, y1, x2 - x1, y2 - y1]`` and a
ground-truth object's area is its box area (boxes-only data has no masks). Labels are 0-based
indices into ``names``; in COCO files they become ``category_ids[label]``, or ``label + 1``
when no ids are given (COCO ids start at 1).

Example:
    >>> import numpy as np
    >>> ev = DetectionEvaluator(["cat", "dog"])
    >>> ev.add(1, 640, 480, gt_boxes=[[10, 10, 110, 90]], gt_labels=[0],
    ...        pred_boxes=[[12, 10, 110, 92]], pred_scores=[0.9], pred_labels=[0])
    >>> m = ev.compute()
    >>> round(m["map50"], 6), m["per_class_ap"]["dog"]   # dog has no ground truth: None, not -1
    (1.0, None)
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from cnnkit.data.detection import OCCLUSION_BUCKETS
from cnnkit.errors import DataError

SIZE_NAMES = ("small", "medium", "large")  # COCO areaRng 1..3: [0, 32²], [32², 96²], [96², 1e10] px²
MAX_DETS = 100  # COCO's limit, applied by pycocotools per image *and class*


def occlusion_bucket(occlusion) -> np.ndarray:
    """Index into :data:`~cnnkit.data.detection.OCCLUSION_BUCKETS` of each occlusion value.

    The boundaries: ``"none"`` is exactly 0; ``"<30%"`` is ``0 < o < 0.3``; ``"30-60%"`` is
    ``0.3 <= o < 0.6``; ``">60%"`` is ``0.6 <= o <= 1``. In general a value goes to the first
    bucket ``(name, lo, hi)`` with ``lo <= o < hi`` (or ``o == lo`` when ``lo == hi``, and
    ``o == hi`` for the last bucket), so a bucket is half-open unless an earlier one already
    took its lower edge. Values are compared as given (float32 ``0.3`` is slightly above 0.3).
    NaN (unknown) gives -1.

    Raises:
        DataError: a value outside [0, 1].
    """
    occ = np.asarray(occlusion, np.float64).reshape(-1)
    known = ~np.isnan(occ)
    if ((occ[known] < 0) | (occ[known] > 1)).any():
        bad = occ[known][(occ[known] < 0) | (occ[known] > 1)][0]
        raise DataError(f"occlusion is the hidden fraction of an object, 0..1 (NaN if unknown); got {bad}")
    out = np.full(occ.shape, -1, np.int64)
    last = len(OCCLUSION_BUCKETS) - 1
    for i, (_, lo, hi) in enumerate(OCCLUSION_BUCKETS):
        inside = (occ == lo) if lo == hi else (occ >= lo) & ((occ < hi) | ((occ == hi) & (i == last)))
        out[inside & (out < 0)] = i
    return out


# ---- masks -----------------------------------------------------------------------------------
def encode_masks(masks, n: int, height: int, width: int) -> list[dict]:
    """``n`` instance masks -> COCO RLE dicts (pycocotools). Accepts bool/0-1 arrays or tensors
    (n, H, W) at the image's size, or a list of RLE dicts (returned as they are)."""
    from pycocotools import mask as mask_utils

    if masks is None:
        masks = np.zeros((0, int(height), int(width)), bool)
    if isinstance(masks, (list, tuple)) and (not masks or isinstance(masks[0], dict)):
        rles = [dict(m, counts=m["counts"].encode() if isinstance(m["counts"], str) else m["counts"]) for m in masks]
    else:
        if hasattr(masks, "detach"):
            masks = masks.detach().cpu().numpy()
        m = np.asarray(masks)
        if m.ndim != 3 or m.shape[1:] != (int(height), int(width)):
            raise DataError(f"masks must be (N, {int(height)}, {int(width)}) for this image, got shape {m.shape}")
        rles = mask_utils.encode(np.asfortranarray(m.astype(np.uint8).transpose(1, 2, 0))) if len(m) else []
    if len(rles) != n:
        raise DataError(f"{len(rles)} masks for {n} objects; give one mask per box")
    return list(rles)


def _rle_text(rle: dict) -> str:
    c = rle["counts"]
    return c.decode("ascii") if isinstance(c, bytes) else c


# ---- COCO JSON ------------------------------------------------------------------------------
def _array(x, dtype, cols: int | None, what: str) -> np.ndarray:
    """numpy or torch (any device) -> numpy of ``dtype``, (N, cols) or (N,)."""
    if x is None:
        x = []
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype)
    try:
        return a.reshape(-1, cols) if cols else a.reshape(-1)
    except ValueError:
        raise DataError(f"{what} must be (N, {cols}) boxes, got shape {a.shape}") from None


def _category_map(num_classes: int, category_ids: Sequence[int] | None) -> np.ndarray:
    if category_ids is None:
        return np.arange(1, num_classes + 1, dtype=np.int64)
    ids = np.asarray(category_ids, np.int64).reshape(-1)
    if len(ids) != num_classes:
        raise DataError(f"category_ids has {len(ids)} ids for {num_classes} class names; give one id per name")
    if len(np.unique(ids)) != len(ids):
        raise DataError("category_ids must be unique")
    return ids


def _xywh(boxes: np.ndarray) -> np.ndarray:
    out = boxes.astype(np.float64, copy=True)
    out[:, 2:] -= out[:, :2]
    return out


def coco_results(image_ids: Sequence[int], boxes: Sequence, scores: Sequence, labels: Sequence,
                 category_ids: Sequence[int] | None = None) -> list[dict]:
    """Detections in the COCO results format (what ``COCO.loadRes`` and the COCO server read).

    Args:
        image_ids: one id per image.
        boxes: per image an (N, 4) array (numpy or torch) of ``xyxy`` pixel boxes.
        scores: per image (N,) confidences.
        labels: per image (N,) 0-based class indices.
        category_ids: the COCO category id of each class index (for example the 80 COCO
            classes' original ids 1..90); default ``label + 1``.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]`` with plain
        Python numbers (JSON-ready).
    """
    if not len(image_ids) == len(boxes) == len(scores) == len(labels):
        raise DataError("coco_results needs one entry of boxes, scores and labels per image id")
    cat_map = None if category_ids is None else np.asarray(category_ids, np.int64).reshape(-1)
    out: list[dict] = []
    for img, b, s, lab in zip(image_ids, boxes, scores, labels):
        b = _array(b, np.float64, 4, "boxes")
        s, lab = _array(s, np.float64, None, "scores"), _array(lab, np.int64, None, "labels")
        if not len(b) == len(s) == len(lab):
            raise DataError(f"image {img}: {len(b)} boxes, {len(s)} scores and {len(lab)} labels; they must match")
        if len(lab) and lab.min() < 0:
            raise DataError(f"image {img}: negative class index {lab.min()}")
        if cat_map is not None and len(lab) and lab.max() >= len(cat_map):
            raise DataError(f"image {img}: class index {lab.max()} has no entry in category_ids ({len(cat_map)} ids)")
        cats = lab + 1 if cat_map is None else cat_map[lab]
        img = int(img)
        out.extend({"image_id": img, "category_id": c, "bbox": bb, "score": sc}
                   for c, bb, sc in zip(cats.tolist(), _xywh(b).tolist(), s.tolist()))
    return out


def coco_ground_truth(image_ids: Sequence[int], sizes: Sequence[tuple[int, int]], boxes: Sequence,
                      labels: Sequence, names: Sequence[str], category_ids: Sequence[int] | None = None,
                      occlusion: Sequence | None = None) -> dict:
    """Ground truth as a COCO instances JSON dict (``images``, ``annotations``, ``categories``).

    Args:
        image_ids: one id per image.
        sizes: per image ``(width, height)``.
        boxes, labels: per image (N, 4) ``xyxy`` pixel boxes and (N,) 0-based class indices.
        names: class names; ``categories`` lists all of them, also those without objects.
        category_ids: COCO id per class index; default ``index + 1``.
        occlusion: optional per image (N,) hidden fractions; written as each annotation's
            ``occlusion`` (NaN as null), an extra field COCO tools ignore.

    Returns:
        A dict ``COCO()`` accepts: annotation ids from 1, ``area`` = box area, ``iscrowd`` 0.
    """
    cat_ids = _category_map(len(names), category_ids)
    images, anns = [], []
    occlusion = occlusion if occlusion is not None else [None] * len(image_ids)
    if not len(image_ids) == len(sizes) == len(boxes) == len(labels) == len(occlusion):
        raise DataError("coco_ground_truth needs one size, boxes, labels (and occlusion) entry per image id")
    for img, (w, h), b, lab, occ in zip(image_ids, sizes, boxes, labels, occlusion):
        img = int(img)
        images.append({"id": img, "width": int(w), "height": int(h)})
        b, lab = _array(b, np.float64, 4, "gt_boxes"), _array(lab, np.int64, None, "gt_labels")
        if len(b) != len(lab):
            raise DataError(f"image {img}: {len(b)} boxes but {len(lab)} labels")
        if len(lab) and (lab.min() < 0 or lab.max() >= len(names)):
            raise DataError(f"image {img}: class index {lab.min() if lab.min() < 0 else lab.max()} "
                            f"is outside 0..{len(names) - 1} ({len(names)} names)")
        xywh = _xywh(b)
        area = (xywh[:, 2] * xywh[:, 3]).tolist()
        occ_list = None if occ is None else [None if np.isnan(o) else o
                                             for o in _array(occ, np.float64, None, "occlusion").tolist()]
        if occ_list is not None and len(occ_list) != len(lab):
            raise DataError(f"image {img}: {len(occ_list)} occlusion values for {len(lab)} boxes")
        for j, (bb, c, a) in enumerate(zip(xywh.tolist(), cat_ids[lab].tolist(), area)):
            ann = {"id": len(anns) + 1, "image_id": img, "category_id": c, "bbox": bb, "area": a, "iscrowd": 0}
            if occ_list is not None:
                ann["occlusion"] = occ_list[j]
            anns.append(ann)
    categories = [{"id": int(c), "name": str(n)} for c, n in zip(cat_ids, names)]
    return {"images": images, "annotations": anns, "categories": categories}


def _coco(dataset: dict):
    """A ``pycocotools.coco.COCO`` built in memory (no file), quietly."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _run_cocoeval(gt: dict, dt: list[dict], area_rng=None, area_lbl=None, max_dets=None, iou_type: str = "bbox"):
    """``COCOeval(iou_type)`` evaluate + accumulate (+ summarize for the default ranges), quietly."""
    from pycocotools.cocoeval import COCOeval

    coco_gt = _coco(gt)
    coco_dt = _coco({"images": gt["images"], "categories": gt["categories"], "annotations": dt})
    ev = COCOeval(coco_gt, coco_dt, iou_type)
    if area_rng is not None:
        ev.params.areaRng, ev.params.areaRngLbl = area_rng, area_lbl
    if max_dets is not None:
        ev.params.maxDets = max_dets
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        if area_rng is None:
            ev.summarize()
    return ev


def _mean_ap(precision: np.ndarray) -> float | None:
    """COCO's average of a precision slice over settings with ground truth (-1 = none)."""
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else None


def _none_if_missing(x: float) -> float | None:
    return None if x < 0 else float(x)


class DetectionEvaluator:
    """Accumulate images, then compute COCO box metrics with pycocotools.

    Args:
        names: class names; label ``i`` is ``names[i]``.
        category_ids: the COCO category id of each class (when the data came from a COCO file
            with its own ids); default ``i + 1``. Only matters for :meth:`ground_truth` /
            :meth:`results` files, the metrics are the same.

    :meth:`compute` returns plain floats and dicts (JSON-ready):

    - ``map50_95``, ``map50``, ``map75``, ``map_small``, ``map_medium``, ``map_large``,
      ``mar_1``, ``mar_10``, ``mar_100``, ``mar_small``, ``mar_medium``, ``mar_large``:
      ``COCOeval.stats[0..11]`` in that order.
    - ``per_class_ap`` / ``per_class_ap50``: ``{name: AP@[.5:.95] / AP@.5}``.
    - ``size_ap``: ``{"small"|"medium"|"large": {"map50_95", "map50", "num_gt"}}`` with COCO's
      area ranges (pixels², both ends inclusive, as pycocotools: small ``<= 32²``, medium
      ``32²..96²``, large ``>= 96²``; ``num_gt`` counts objects in the range).
    - ``occlusion_ap``: ``{bucket: {"map50_95", "map50", "num_gt"}}`` for the buckets of
      :data:`~cnnkit.data.detection.OCCLUSION_BUCKETS` (boundaries: :func:`occlusion_bucket`);
      only present when at least one ground-truth object has a known occlusion.
    - ``num_images``, ``num_gt``, ``num_pred``.

    A class (or size range, or bucket) without ground-truth objects has no AP: pycocotools
    marks it -1 and leaves it out of the means; here it is ``None``, never -1, so it cannot
    be mistaken for a score. Means over classes (``map*``) cover the classes with objects.

    As in pycocotools, at most 100 detections per image *and class* (the highest scores)
    are evaluated.

    Occlusion AP follows the CityPersons convention (Zhang et al., CVPR 2017, the
    "Reasonable"/"Heavy" subsets): for the bucket being scored, ground-truth objects of other
    buckets (or of unknown occlusion) are *ignored*: a detection matched to one of them counts
    neither as a true nor as a false positive, and they are not missed objects; a detection
    that matches nothing counts as a false positive in every bucket. So a detector that finds
    only unoccluded objects scores AP 1 on ``"none"`` and 0 on ``">60%"``, and one that also
    fires on empty background loses AP in every bucket. It is computed by pycocotools' own
    area-range mechanism (the same that gives AP-small): a second ``COCOeval`` whose ground
    truth carries the bucket index as its ``area`` and whose ``areaRng`` are the buckets;
    detections get ``area`` NaN, which no range comparison excludes, so pycocotools never
    ignores an unmatched detection. Matching prefers in-bucket objects over ignored ones, and
    an ignored object absorbs one detection only (a second detection on it is a false
    positive, as any duplicate is). Means are over classes with objects in the bucket.

    Example:
        >>> ev = DetectionEvaluator(["person"])
        >>> ev.add(7, 100, 100, [[0, 0, 50, 50]], [0], [[0, 0, 50, 50]], [0.8], [0], gt_occlusion=[0.0])
        >>> m = ev.compute()
        >>> round(m["occlusion_ap"]["none"]["map50"], 6), m["occlusion_ap"][">60%"]["map50"]
        (1.0, None)
    """

    def __init__(self, names: Sequence[str], category_ids: Sequence[int] | None = None):
        names = [str(n) for n in names]
        if not names:
            raise DataError("DetectionEvaluator needs at least one class name")
        if len(set(names)) != len(names):
            raise DataError(f"class names must be unique, got {names}")
        self.names = names
        self.category_ids = _category_map(len(names), category_ids)
        self.reset()

    def reset(self) -> None:
        """Forget all added images."""
        self._images: dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self._images)

    def add(self, image_id: int, width: int, height: int, gt_boxes, gt_labels, pred_boxes, pred_scores,
            pred_labels, gt_occlusion=None, gt_masks=None, pred_masks=None) -> None:
        """Add one image: its ground truth and the model's detections on it.

        Args:
            image_id: unique integer id of the image.
            width, height: image size in pixels (written to COCO files; not used by the metric).
            gt_boxes: (G, 4) ``xyxy`` pixel boxes, numpy or torch; ``gt_labels`` (G,) class indices.
            pred_boxes: (D, 4) ``xyxy``; ``pred_scores`` (D,); ``pred_labels`` (D,) class indices.
            gt_occlusion: optional (G,) hidden fraction of each object, NaN where unknown.
            gt_masks, pred_masks: optional instance masks, bool (G, H, W) and (D, H, W) at the
                image's size (or lists of COCO RLE dicts); given for every image, they add the
                ``mask_*`` metrics (pycocotools ``segm``).

        Raises:
            DataError: a repeated image id, mismatched lengths, or a class index out of range.
        """
        image_id = int(image_id)
        if image_id in self._images:
            raise DataError(f"image id {image_id} was added twice; every image needs its own id")
        k = len(self.names)
        gb = _array(gt_boxes, np.float64, 4, "gt_boxes")
        gl = _array(gt_labels, np.int64, None, "gt_labels")
        pb = _array(pred_boxes, np.float64, 4, "pred_boxes")
        ps = _array(pred_scores, np.float64, None, "pred_scores")
        pl = _array(pred_labels, np.int64, None, "pred_labels")
        occ = np.full(len(gl), np.nan) if gt_occlusion is None else _array(gt_occlusion, np.float64, None,
                                                                           "gt_occlusion")
        if not len(gb) == len(gl) == len(occ):
            raise DataError(f"image {image_id}: {len(gb)} gt boxes, {len(gl)} labels, {len(occ)} occlusion values")
        if not len(pb) == len(ps) == len(pl):
            raise DataError(f"image {image_id}: {len(pb)} predicted boxes, {len(ps)} scores, {len(pl)} labels")
        for what, lab in (("gt_labels", gl), ("pred_labels", pl)):
            if len(lab) and (lab.min() < 0 or lab.max() >= k):
                raise DataError(f"image {image_id}: {what} holds class index "
                                f"{lab.min() if lab.min() < 0 else lab.max()}, outside 0..{k - 1}")
        occlusion_bucket(occ)  # validate now, where the caller can see which image
        gm = pm = None
        if gt_masks is not None or pred_masks is not None:
            gm, pm = encode_masks(gt_masks, len(gl), height, width), encode_masks(pred_masks, len(pl), height, width)
        self._images[image_id] = (int(width), int(height), gb, gl, occ, pb, ps, pl, gm, pm)

    # ---- COCO files ---------------------------------------------------------------------
    def ground_truth(self) -> dict:
        """All added ground truth as a COCO instances dict (for ``--save-json``)."""
        ids = list(self._images)
        v = [self._images[i] for i in ids]
        return coco_ground_truth(ids, [(x[0], x[1]) for x in v], [x[2] for x in v], [x[3] for x in v],
                                 self.names, self.category_ids, [x[4] for x in v])

    def results(self) -> list[dict]:
        """All added detections in the COCO results format (for ``--save-json``)."""
        ids = list(self._images)
        v = [self._images[i] for i in ids]
        return coco_results(ids, [x[5] for x in v], [x[6] for x in v], [x[7] for x in v], self.category_ids)

    # ---- metrics ------------------------------------------------------------------------
    def compute(self) -> dict[str, Any]:
        """Evaluate everything added so far (see the class docstring for the keys)."""
        if not self._images:
            raise DataError("nothing to evaluate: add() at least one image before compute()")
        gt = self.ground_truth()
        for ann in gt["annotations"]:
            ann.pop("occlusion", None)
        dt = self.results()
        for i, d in enumerate(dt):  # what COCO.loadRes adds to box results
            d.update(id=i + 1, area=d["bbox"][2] * d["bbox"][3], iscrowd=0)

        ev = _run_cocoeval(gt, dt)
        s = [_none_if_missing(x) for x in ev.stats]
        keys = ("map50_95", "map50", "map75", "map_small", "map_medium", "map_large",
                "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large")
        out: dict[str, Any] = dict(zip(keys, s))
        prec = ev.eval["precision"]  # (T=10 IoU, R=101 recall, K classes, A areas, M maxDets)
        cat_index = {c: j for j, c in enumerate(ev.params.catIds)}
        ks = [cat_index[int(c)] for c in self.category_ids]
        out["per_class_ap"] = {n: _mean_ap(prec[:, :, k, 0, -1]) for n, k in zip(self.names, ks)}
        out["per_class_ap50"] = {n: _mean_ap(prec[0, :, k, 0, -1]) for n, k in zip(self.names, ks)}

        areas = np.array([a["area"] for a in gt["annotations"]], np.float64)
        out["size_ap"] = {}
        for a, name in enumerate(SIZE_NAMES, start=1):
            lo, hi = ev.params.areaRng[a]
            out["size_ap"][name] = {"map50_95": _mean_ap(prec[:, :, :, a, -1]),
                                    "map50": _mean_ap(prec[0, :, :, a, -1]),
                                    "num_gt": int(((areas >= lo) & (areas <= hi)).sum())}

        buckets = occlusion_bucket(np.concatenate([x[4] for x in self._images.values()]))
        if (buckets >= 0).any():
            out["occlusion_ap"] = self._occlusion_ap(gt, dt, buckets)
        if all(v[8] is not None for v in self._images.values()):
            out.update(self._mask_metrics(gt, dt))
        out["num_images"] = len(self._images)
        out["num_gt"] = len(gt["annotations"])
        out["num_pred"] = len(dt)
        return out

    def _mask_metrics(self, gt: dict, dt: list[dict]) -> dict[str, Any]:
        """COCO mask AP (``segm``): the same objects and detections with their RLE masks; areas
        are mask areas, as COCO's own files have them."""
        from pycocotools import mask as mask_utils

        gms = [m for v in self._images.values() for m in v[8]]
        pms = [m for v in self._images.values() for m in v[9]]
        seg_gt = dict(gt, annotations=[dict(a, segmentation=m, area=float(mask_utils.area(m)))
                                       for a, m in zip(gt["annotations"], gms)])
        seg_dt = [dict(d, segmentation=m, area=float(mask_utils.area(m))) for d, m in zip(dt, pms)]
        ev = _run_cocoeval(seg_gt, seg_dt, iou_type="segm")
        s = [_none_if_missing(x) for x in ev.stats]
        prec = ev.eval["precision"]
        cat_index = {c: j for j, c in enumerate(ev.params.catIds)}
        ks = [cat_index[int(c)] for c in self.category_ids]
        return {"mask_map50_95": s[0], "mask_map50": s[1], "mask_map75": s[2], "mask_map_small": s[3],
                "mask_map_medium": s[4], "mask_map_large": s[5], "mask_mar_100": s[8],
                "mask_per_class_ap": {n: _mean_ap(prec[:, :, k, 0, -1]) for n, k in zip(self.names, ks)}}

    def mask_results(self) -> list[dict]:
        """Detections with their masks in the COCO results format (``segmentation`` as RLE with
        a string ``counts``, JSON-ready)."""
        out = []
        for d, m in zip(self.results(), [m for v in self._images.values() for m in (v[9] or [])]):
            out.append({**d, "segmentation": {"size": list(m["size"]), "counts": _rle_text(m)}})
        return out

    def _occlusion_ap(self, gt: dict, dt: list[dict], buckets: np.ndarray) -> dict:
        """AP per occlusion bucket via pycocotools' area ranges (convention: class docstring)."""
        # Ground truth: area := bucket index (-1 unknown, outside every range), so each range
        # [i, i] keeps exactly bucket i and pycocotools ignores the other objects.
        occ_gt = dict(gt, annotations=[dict(a, area=float(b)) for a, b in zip(gt["annotations"], buckets)])
        # Detections: area NaN, so `area < lo or area > hi` is False for every range and an
        # unmatched detection is never ignored (it is a false positive in every bucket).
        occ_dt = [dict(d, area=float("nan")) for d in dt]
        used = [i for i in range(len(OCCLUSION_BUCKETS)) if (buckets == i).any()]  # empty ones: no AP
        ev = _run_cocoeval(occ_gt, occ_dt, area_rng=[[float(i), float(i)] for i in used],
                           area_lbl=[OCCLUSION_BUCKETS[i][0] for i in used], max_dets=[MAX_DETS])
        prec = ev.eval["precision"]  # (T, R, K, buckets used, 1)
        out = {}
        for i, (name, _, _) in enumerate(OCCLUSION_BUCKETS):
            a = used.index(i) if i in used else None
            out[name] = {"map50_95": None if a is None else _mean_ap(prec[:, :, :, a, -1]),
                         "map50": None if a is None else _mean_ap(prec[0, :, :, a, -1]),
                         "num_gt": int((buckets == i).sum())}
        return out
