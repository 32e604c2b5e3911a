"""Anchor tools: k-means shapes, shape IoU, best possible recall, YAML files, torchvision generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from cnnkit.errors import DataError
from cnnkit.models.detection.anchors import (PairAnchorGenerator, anchor_pairs, best_possible_recall,
                                             kmeans_anchors, mean_best_iou, read_anchors, scale_anchors,
                                             shape_iou, split_levels, write_anchors)

PLANTED = np.array([[20.0, 40.0], [60.0, 30.0], [120.0, 120.0]])


def planted_wh(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([c * rng.uniform(0.93, 1.07, (n, 2)) for c in PLANTED])


def test_kmeans_recovers_planted_clusters():
    anchors = kmeans_anchors(planted_wh(), 3)
    assert anchors.shape == (3, 2)
    np.testing.assert_allclose(anchors, PLANTED, rtol=0.05)  # sorted by area like PLANTED
    assert mean_best_iou(planted_wh(), anchors) > 0.85


def test_kmeans_deterministic_and_sorted():
    wh = np.random.default_rng(1).lognormal(3.5, 0.6, (500, 2))
    a, b = kmeans_anchors(wh, 9, seed=3), kmeans_anchors(wh, 9, seed=3)
    np.testing.assert_array_equal(a, b)
    assert np.all(np.diff(a.prod(1)) >= 0)


def test_kmeans_too_few_distinct_shapes():
    wh = np.array([[10, 10], [10, 10], [20, 30], [20, 30]], float)
    with pytest.raises(DataError, match="only 2 distinct box shapes for k=3"):
        kmeans_anchors(wh, 3)
    assert kmeans_anchors(wh, 2).tolist() == [[10, 10], [20, 30]]


def test_bad_sizes():
    with pytest.raises(DataError, match="zero or negative"):
        kmeans_anchors([[10, 0], [5, 5]], 1)
    with pytest.raises(DataError, match=r"\(N, 2\)"):
        shape_iou(np.ones((3, 4)), np.ones((2, 2)))


def test_shape_iou_equals_box_iou_on_centred_boxes():
    rng = np.random.default_rng(2)
    wh, anchors = rng.uniform(1, 200, (50, 2)), rng.uniform(1, 200, (7, 2))
    centre = np.array([317.0, 41.0])  # any common centre gives the same overlap

    def boxes(s):
        return torch.from_numpy(np.concatenate([centre - s / 2, centre + s / 2], 1))

    np.testing.assert_allclose(shape_iou(wh, anchors), box_iou(boxes(wh), boxes(anchors)).numpy(), atol=1e-12)
    # by hand: 10x20 vs 20x10 overlap in a 10x10 square, union 200 + 200 - 100
    assert shape_iou([[10, 20]], [[20, 10]])[0, 0] == pytest.approx(100 / 300)


def test_best_possible_recall_fitted_beats_bad():
    wh = planted_wh()
    fitted = kmeans_anchors(wh, 3)
    bad = np.array([[4.0, 4.0], [300.0, 10.0], [10.0, 300.0]])
    assert best_possible_recall(wh, fitted) == 1.0
    assert best_possible_recall(wh, fitted) >= best_possible_recall(wh, bad)
    assert best_possible_recall(wh, bad) < 0.5
    assert mean_best_iou(wh, fitted) > mean_best_iou(wh, bad)


def test_split_levels():
    a = np.array([[100, 100], [5, 5], [30, 30], [10, 10], [60, 60]], float)
    lv = split_levels(a, 2)
    assert [x.tolist() for x in lv] == [[[5, 5], [10, 10], [30, 30]], [[60, 60], [100, 100]]]
    with pytest.raises(DataError, match="cannot split 5 anchors over 6 levels"):
        split_levels(a, 6)


def test_write_read_round_trip(tmp_path):
    levels = split_levels(kmeans_anchors(planted_wh(), 3), 3)
    p = tmp_path / "anchors.yaml"
    write_anchors(p, levels, 320, meta={"bpr": np.float64(0.99), "k": np.int64(3)})
    back, imgsz = read_anchors(p)
    assert imgsz == 320 and len(back) == 3
    for x, y in zip(levels, back):
        np.testing.assert_array_equal(x, y)
    assert "bpr: 0.99" in p.read_text()
    scaled = scale_anchors(back, 320, 640)
    np.testing.assert_allclose(scaled[2], levels[2] * 2)


@pytest.mark.parametrize("text, match", [
    ("imgsz: 320\n", "needs 'imgsz' and 'levels'"),
    ("imgsz: -1\nlevels: [[[1, 2]]]\n", "positive integer"),
    ("imgsz: 320\nlevels: [[[1, 2, 3]]]\n", "level 0 must be"),
    ("imgsz: 320\nlevels: [[[1, 0]]]\n", "zero or negative"),
    ("imgsz: [\n", "not valid YAML"),
])
def test_read_bad_file(tmp_path, text, match):
    p = tmp_path / "a.yaml"
    p.write_text(text)
    with pytest.raises(DataError, match=match):
        read_anchors(p)


def test_read_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_anchors(tmp_path / "nope.yaml")


def test_anchor_pairs_match_torchvision():
    sizes, ratios = ((32, 64), (128,), (33,)), ((0.5, 1.0, 2.0),) * 3
    pairs = anchor_pairs(sizes, ratios)
    assert [len(p) for p in pairs] == [6, 3, 3]
    # ratio-major, h / w = ratio, rounded as torchvision rounds its corners
    assert pairs[1].tolist() == [[182.0, 90.0], [128.0, 128.0], [90.0, 182.0]]
    assert pairs[2][1].tolist() == [32.0, 32.0]  # 33 -> corners round(±16.5) = ±16
    ref, ours = AnchorGenerator(sizes, ratios), PairAnchorGenerator(pairs)
    assert ours.num_anchors_per_location() == ref.num_anchors_per_location() == [6, 3, 3]
    for a, b in zip(ours.cell_anchors, ref.cell_anchors):
        assert a.dtype == b.dtype and torch.equal(a, b)
    images = ImageList(torch.zeros(2, 3, 64, 64), [(64, 64), (60, 50)])
    feats = [torch.zeros(2, 8, 16, 16), torch.zeros(2, 8, 8, 8), torch.zeros(2, 8, 4, 4)]
    for a, b in zip(ours(images, feats), ref(images, feats)):
        assert torch.equal(a, b)


def test_pair_anchor_generator_exact_anchors():
    gen = PairAnchorGenerator([[(10, 20), (30, 30)], [(64, 33)]])
    assert gen.num_anchors_per_location() == [2, 1]
    assert gen.cell_anchors[0].tolist() == [[-5, -10, 5, 10], [-15, -15, 15, 15]]
    assert gen.cell_anchors[1].tolist() == [[-32, -16.5, 32, 16.5]]  # used as given, no rounding
    images = ImageList(torch.zeros(1, 3, 32, 32), [(32, 32)])
    (anchors,) = gen(images, [torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 1, 1)])
    # level 0: stride 16, 2x2 cells, 2 anchors each (torchvision centres anchors on cell corners)
    expected = [[x - 5, y - 10, x + 5, y + 10] if k == 0 else [x - 15, y - 15, x + 15, y + 15]
                for y in (0, 16) for x in (0, 16) for k in (0, 1)] + [[-32, -16.5, 32, 16.5]]
    assert anchors.tolist() == expected
    with pytest.raises(DataError, match="level 1 has no anchors"):
        PairAnchorGenerator([[(10, 10)], np.zeros((0, 2))])


def test_pair_anchor_generator_in_faster_rcnn():
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn
    from torchvision.models.detection.rpn import RPNHead

    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=3,
                                              min_size=128, max_size=128)
    levels = split_levels(kmeans_anchors(planted_wh(), 6), 3)  # 3 FPN levels, 2 shapes each
    gen = PairAnchorGenerator(levels)
    model.rpn.anchor_generator = gen
    model.rpn.head = RPNHead(model.backbone.out_channels, gen.num_anchors_per_location()[0])
    images = torch.rand(2, 3, 128, 128)
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 40.0, 80.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[50.0, 50.0, 110.0, 90.0], [5.0, 5.0, 30.0, 20.0]]),
                "labels": torch.tensor([2, 1])}]
    model.train()
    losses = model(list(images), targets)
    assert {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.rpn.head.cls_logits.weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model(list(images))
    assert len(out) == 2 and all(o["boxes"].shape[-1] == 4 for o in out)
