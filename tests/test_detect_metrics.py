"""COCO box metrics: parity with pycocotools and torchmetrics, hand-checked occlusion buckets."""

from __future__ import annotations

import contextlib
import io
import json
import math
import time

import numpy as np
import pytest
import torch

from cnnkit.errors import DataError
from cnnkit.tasks.detect.metrics import DetectionEvaluator, coco_results, occlusion_bucket

NAMES = ["a", "b", "c", "never"]  # "never" has predictions but no ground truth
STATS_KEYS = ("map50_95", "map50", "map75", "map_small", "map_medium", "map_large",
              "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large")


def _boxes(rng, n, size=200.0):
    xy = rng.uniform(0, size * 0.8, (n, 2))
    wh = rng.uniform(4, size * 0.6, (n, 2))  # small, medium and large objects
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def random_data(seed=0, num_images=40, max_gt=8, max_dets=30):
    """Per image (id, gt_boxes, gt_labels, pred_boxes, scores, pred_labels); some images have no
    ground truth, some no predictions; class 3 is never in the ground truth."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num_images):
        g = 0 if i % 7 == 3 else int(rng.integers(1, max_gt + 1))
        gb, gl = _boxes(rng, g), rng.integers(0, 3, g)
        if i % 5 == 4:
            pb, ps, pl = np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
        else:
            hit = rng.random(g) < 0.7
            jit = (gb[hit] + rng.normal(0, 3, (int(hit.sum()), 4))).astype(np.float32)
            jit[:, 2:] = np.maximum(jit[:, 2:], jit[:, :2] + 1)
            extra = int(rng.integers(0, max_dets - g + 1))
            pb = np.concatenate([jit, _boxes(rng, extra)])
            pl = np.concatenate([np.where(rng.random(int(hit.sum())) < 0.85, gl[hit], rng.integers(0, 3)),
                                 rng.integers(0, 4, extra)])
            ps = rng.random(len(pb)).astype(np.float32)
        out.append((10 * i + 1, gb, gl, pb, ps, pl))
    return out


def evaluator_for(data, names=NAMES, category_ids=None, torch_inputs=False):
    ev = DetectionEvaluator(names, category_ids)
    for img, gb, gl, pb, ps, pl in data:
        args = (gb, gl, pb, ps, pl)
        if torch_inputs:
            args = tuple(torch.from_numpy(np.asarray(a)) for a in args)
        ev.add(img, 200, 200, *args)
    return ev


def test_parity_with_pycocotools_json_files(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    data = random_data()
    # COCO files written here by hand (not by cnnkit), so the box conventions are checked too
    images, anns, dets = [], [], []
    for img, gb, gl, pb, ps, pl in data:
        images.append({"id": img, "width": 200, "height": 200})
        for b, lab in zip(gb.astype(np.float64), gl):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({"id": len(anns) + 1, "image_id": img, "category_id": int(lab) + 1,
                         "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": 0})
        for b, s, lab in zip(pb.astype(np.float64), ps.astype(np.float64), pl):
            dets.append({"image_id": img, "category_id": int(lab) + 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                         "score": s})
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(NAMES)]
    (tmp_path / "gt.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / "gt.json"))
        ev = COCOeval(gt, gt.loadRes(str(tmp_path / "dt.json")), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()

    m = evaluator_for(data).compute()
    for k, ref in zip(STATS_KEYS, ev.stats):
        assert m[k] == pytest.approx(ref, abs=1e-9), k
    assert m["num_gt"] == len(anns) and m["num_pred"] == len(dets) and m["num_images"] == len(data)
    # per class from the same precision array; the class without ground truth is None (COCO: -1)
    prec = ev.eval["precision"][:, :, :, 0, -1]
    for k, name in enumerate(NAMES[:3]):
        assert m["per_class_ap"][name] == pytest.approx(prec[:, :, k].mean(), abs=1e-9)
        assert m["per_class_ap50"][name] == pytest.approx(prec[0, :, k].mean(), abs=1e-9)
    assert m["per_class_ap"]["never"] is None and m["per_class_ap50"]["never"] is None
    # size buckets: AP equals stats[3..5]; counts use COCO's inclusive area ranges
    areas = np.array([a["area"] for a in anns])
    for name, key, (lo, hi) in zip(("small", "medium", "large"), STATS_KEYS[3:6], ev.params.areaRng[1:]):
        assert m["size_ap"][name]["map50_95"] == pytest.approx(m[key], abs=1e-12)
        assert m["size_ap"][name]["num_gt"] == int(((areas >= lo) & (areas <= hi)).sum())
    assert "occlusion_ap" not in m  # no occlusion given
    json.dumps(m)  # plain Python types only


def test_parity_with_torchmetrics():
    from torchmetrics.detection import MeanAveragePrecision

    data = random_data(seed=1)
    tm = MeanAveragePrecision(iou_type="bbox", backend="pycocotools", class_metrics=True)
    for _, gb, gl, pb, ps, pl in data:
        tm.update([{"boxes": torch.from_numpy(pb), "scores": torch.from_numpy(ps), "labels": torch.from_numpy(pl)}],
                  [{"boxes": torch.from_numpy(gb), "labels": torch.from_numpy(gl)}])
    with contextlib.redirect_stdout(io.StringIO()):
        ref = tm.compute()
    m = evaluator_for(data, torch_inputs=True).compute()
    assert m["map50_95"] == pytest.approx(float(ref["map"]), abs=1e-6)
    assert m["map50"] == pytest.approx(float(ref["map_50"]), abs=1e-6)
    assert m["map75"] == pytest.approx(float(ref["map_75"]), abs=1e-6)
    per_class = dict(zip(ref["classes"].tolist(), ref["map_per_class"].tolist()))
    for k, name in enumerate(NAMES):
        ours = m["per_class_ap"][name]
        assert (ours if ours is not None else -1.0) == pytest.approx(per_class[k], abs=1e-6), name


def test_perfect_predictions_give_one():
    data = [(i, gb, gl, gb, np.linspace(1, 0.5, len(gb)), gl) for i, gb, gl, *_ in random_data(seed=2)]
    m = evaluator_for(data).compute()
    for k in ("map50_95", "map50", "map75", "mar_100"):
        assert m[k] == pytest.approx(1.0, abs=1e-9)
    assert all(v == pytest.approx(1.0, abs=1e-9) for n, v in m["per_class_ap"].items() if n != "never")
    assert m["per_class_ap"]["never"] is None


def test_class_without_ground_truth_is_none_and_mean_skips_it():
    ev = DetectionEvaluator(["cat", "dog"])
    ev.add(1, 100, 100, [[0, 0, 40, 40]], [0], [[0, 0, 40, 40], [50, 50, 90, 90]], [0.9, 0.8], [0, 1])
    m = ev.compute()
    assert m["per_class_ap"] == {"cat": pytest.approx(1.0), "dog": None}
    assert m["map50_95"] == pytest.approx(1.0)  # the dog false positive has no class to count against


def test_occlusion_buckets_by_hand():
    # one class; A is unoccluded, B hidden 70 %
    gt_boxes, occ = [[10, 10, 50, 50], [60, 60, 100, 100]], [0.0, 0.7]
    a_det, b_det, background = [10, 10, 50, 50], [60, 60, 100, 100], [0, 100, 30, 130]

    def occ_ap(pred_boxes, scores):
        ev = DetectionEvaluator(["person"])
        ev.add(1, 200, 200, gt_boxes, [0, 0], pred_boxes, scores, [0] * len(scores), gt_occlusion=occ)
        return ev.compute()["occlusion_ap"]

    # only the unoccluded object is found: "none" is perfect, ">60%" gets nothing
    r = occ_ap([a_det], [0.9])
    assert r["none"]["map50_95"] == pytest.approx(1.0) and r[">60%"]["map50_95"] == 0.0
    assert r["<30%"] == {"map50_95": None, "map50": None, "num_gt": 0}
    assert r["none"]["num_gt"] == 1 and r[">60%"]["num_gt"] == 1
    # both found: the detection of A is ignored in ">60%" (matched to an out-of-bucket object)
    r = occ_ap([a_det, b_det], [0.9, 0.8])
    assert r["none"]["map50_95"] == pytest.approx(1.0) and r[">60%"]["map50_95"] == pytest.approx(1.0)
    # a higher-scored detection on background is a false positive in every bucket:
    # ranked FP, TP -> interpolated precision 1/2 at every recall level -> AP 0.5
    r = occ_ap([background, a_det, b_det], [0.95, 0.9, 0.8])
    assert r["none"]["map50"] == pytest.approx(0.5) and r[">60%"]["map50"] == pytest.approx(0.5)


def test_occlusion_unknown_objects_are_ignored_everywhere():
    ev = DetectionEvaluator(["x"])
    ev.add(1, 100, 100, [[0, 0, 40, 40], [50, 50, 90, 90]], [0, 0], [[50, 50, 90, 90]], [0.9], [0],
           gt_occlusion=[0.1, float("nan")])
    r = ev.compute()["occlusion_ap"]
    assert r["<30%"]["map50"] == 0.0  # the one detection hit the unknown object: ignored, not a TP
    assert sum(b["num_gt"] for b in r.values()) == 1


def test_occlusion_bucket_boundaries():
    occ = [0.0, 1e-6, 0.29, 0.3, 0.59, 0.6, 1.0, float("nan")]
    assert occlusion_bucket(occ).tolist() == [0, 1, 1, 2, 2, 3, 3, -1]
    with pytest.raises(DataError, match="0..1"):
        occlusion_bucket([1.5])


def test_category_ids_and_results_format():
    res = coco_results([5], [np.array([[1, 2, 11, 22]])], [[0.5]], [[1]], category_ids=[3, 7])
    assert res == [{"image_id": 5, "category_id": 7, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.5}]
    data = random_data(seed=3, num_images=10)
    a = evaluator_for(data).compute()
    ev = evaluator_for(data, category_ids=[1, 5, 9, 90])
    b = ev.compute()
    assert a["map50_95"] == b["map50_95"] and a["per_class_ap"] == b["per_class_ap"]
    gt = ev.ground_truth()
    assert [c["id"] for c in gt["categories"]] == [1, 5, 9, 90]
    assert {r["category_id"] for r in ev.results()} <= {1, 5, 9, 90}


def test_bad_input_errors():
    ev = DetectionEvaluator(["a"])
    with pytest.raises(DataError, match="add"):
        ev.compute()
    ev.add(1, 10, 10, [], [], [], [], [])
    with pytest.raises(DataError, match="twice"):
        ev.add(1, 10, 10, [], [], [], [], [])
    with pytest.raises(DataError, match="outside 0..0"):
        ev.add(2, 10, 10, [[0, 0, 5, 5]], [1], [], [], [])
    with pytest.raises(DataError, match="scores"):
        ev.add(3, 10, 10, [], [], [[0, 0, 5, 5]], [], [0])
    with pytest.raises(DataError, match="unique"):
        DetectionEvaluator(["a", "a"])


def test_speed_100_images_100_detections():
    rng = np.random.default_rng(0)
    ev = DetectionEvaluator([f"c{i}" for i in range(5)])
    for i in range(100):
        g = int(rng.integers(1, 15))
        gb = _boxes(rng, g, 640)
        pb = np.concatenate([gb + rng.normal(0, 4, gb.shape), _boxes(rng, 100 - g, 640)])
        ev.add(i, 640, 640, gb, rng.integers(0, 5, g), pb, rng.random(100), rng.integers(0, 5, 100),
               gt_occlusion=rng.random(g))
    t = time.perf_counter()
    m = ev.compute()
    elapsed = time.perf_counter() - t
    assert not math.isnan(m["map50_95"]) and "occlusion_ap" in m
    assert elapsed < 6.0  # ~1 s on 2 free cores; generous for a shared CI machine
