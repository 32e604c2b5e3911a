"""Tests for the procedural shapes generator (cnnkit.data.shapes)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from cnnkit.data.shapes import SHAPE_CLASSES, SceneParams, ShapeSpec, render_scene, sample_scene
from cnnkit.data.shapes_classification import ShapesClassification
from cnnkit.data.shapes_video import sample_sequence

CLEAN = dict(clutter=0.0, lighting=0.0, noise=0.0, occlusion=0.0)


def _item_bytes(seed=0, split="train", i=0) -> bytes:
    x, _ = ShapesClassification(split, size=16, seed=seed, cache=False)[i]
    return x.numpy().tobytes()


def test_determinism():
    a = _item_bytes(0, "train", 3)
    assert a == _item_bytes(0, "train", 3)
    assert a != _item_bytes(0, "train", 4)
    assert a != _item_bytes(1, "train", 3)
    assert a != _item_bytes(0, "val", 3)
    assert _item_bytes(0, "val", 3) != _item_bytes(0, "test", 3)
    p = SceneParams(imgsz=96, min_objects=2, max_objects=4, occlusion=0.5)
    s1, s2 = (sample_scene(p, np.random.default_rng(7)) for _ in range(2))
    assert s1.image.tobytes() == s2.image.tobytes()
    assert np.array_equal(s1.masks, s2.masks)


def test_classification_items_and_targets():
    ds = ShapesClassification("train", size=60, seed=3)
    assert len(ds) == 60 and ds.classes == list(SHAPE_CLASSES) and ds.paths is None
    assert ds.channels == 3 and ds.default_imgsz == 64 and ds.name == "shapes"
    for i in range(50):
        x, y = ds[i]
        assert isinstance(x, torch.Tensor) and x.dtype == torch.uint8
        assert tuple(x.shape) == (3, 64, 64)
        assert isinstance(y, int) and 0 <= y < 8
        assert ds.targets[i] == y
    assert torch.equal(ds[-1][0], ds[59][0])
    with pytest.raises(IndexError):
        ds[60]
    with pytest.raises(ValueError):
        ShapesClassification("nope")


def test_targets_balanced_and_size_independent():
    full = ShapesClassification("train", seed=5)
    assert len(full) == 2000
    assert len(ShapesClassification("val")) == len(ShapesClassification("test")) == 400
    assert set(Counter(full.targets).values()) == {250}
    for n in (7, 103, 333):
        counts = Counter(ShapesClassification("train", size=n, seed=5).targets)
        assert max(counts.values()) - min(counts.get(c, 0) for c in range(8)) <= 1
    assert ShapesClassification("train", size=100, seed=5).targets == full.targets[:100]
    assert ShapesClassification("val", size=100, seed=5).targets != full.targets[:100]


def test_scene_ground_truth_consistency():
    p = SceneParams(imgsz=128, min_objects=4, max_objects=4, occlusion=0.5)
    overlapped = 0
    for seed in range(8):
        sc = sample_scene(p, np.random.default_rng(seed))
        n = len(sc.objects)
        assert n == 4 and sc.image.shape == (128, 128, 3) and sc.image.dtype == np.uint8
        assert sc.masks.shape == sc.full_masks.shape == (n, 128, 128)
        assert sc.masks.dtype == sc.full_masks.dtype == bool
        assert sc.boxes.dtype == np.float32 and sc.occlusion.dtype == np.float32
        assert sc.labels.dtype == np.int64
        assert sc.masks.sum(0).max() <= 1  # visible masks are disjoint
        assert not (sc.masks & ~sc.full_masks).any()
        for k in range(n):
            ys, xs = np.nonzero(sc.masks[k])
            want = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, 0, 0]
            assert sc.boxes[k].tolist() == want
            frac = 1 - sc.masks[k].sum() / sc.full_masks[k].sum()
            assert abs(sc.occlusion[k] - frac) < 1e-6
        overlapped += int((sc.occlusion > 0.01).sum())
        sem = sc.semantic_mask()
        assert sem.dtype == np.uint8
        expect = np.zeros((128, 128), np.uint8)
        for m, lab in zip(sc.masks, sc.labels):
            expect[m] = lab + 1
        assert np.array_equal(sem, expect)
        assert ((sem > 0) == sc.masks.any(0)).all()
        tags = sc.tags()
        assert tags.dtype == np.float32 and tags.shape == (8,)
        visible = {int(lab) for lab, m in zip(sc.labels, sc.masks) if m.any()}
        assert set(np.nonzero(tags)[0].tolist()) == visible
    assert overlapped > 0  # the disjointness checks above were not vacuous


_A = 1 / math.hypot(1, 0.35)  # cross arm half-length for size 1 (arm width 0.35 x span)
UNIT_AREA = {  # area of each class for size (circumscribed radius) 1
    "circle": math.pi,
    "ring": math.pi * (1 - 0.55**2),
    "triangle": 3 * math.sqrt(3) / 4,
    "square": 2.0,
    "pentagon": 2.5 * math.sin(math.radians(72)),
    "hexagon": 3 * math.sqrt(3) / 2,
    "star": 10 * 0.5 * 0.45 * math.sin(math.radians(36)),
    "cross": 2 * (2 * _A) * (0.7 * _A) - (0.7 * _A) ** 2,
}


@pytest.mark.parametrize("cls", range(8))
def test_shape_geometry(cls):
    name = SHAPE_CLASSES[cls]
    p = SceneParams(imgsz=80, rotation=False, **CLEAN)
    rng = np.random.default_rng(cls)
    for _ in range(5):
        size, (cx, cy) = rng.uniform(16, 24), rng.uniform(30, 50, 2)
        obj = ShapeSpec(cls, cx, cy, size, 0.0, (250, 10, 10))
        sc = render_scene([obj], p, np.random.default_rng(0))
        m = sc.full_masks[0]
        assert np.array_equal(m, sc.masks[0]) and sc.occlusion[0] == 0
        ys, xs = np.nonzero(m)
        assert abs(xs.mean() + 0.5 - cx) < 0.5 and abs(ys.mean() + 0.5 - cy) < 0.5
        assert np.hypot(xs + 0.5 - cx, ys + 0.5 - cy).max() <= size + 0.5
        assert abs(m.sum() / (UNIT_AREA[name] * size**2) - 1) < 0.04
        # pixels well inside the mask carry exactly the object's colour (no lighting/noise)
        inner = m.copy()  # 3x3 erosion
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                inner &= np.roll(m, (dy, dx), (0, 1))
        assert inner.any() and (sc.image[inner] == (250, 10, 10)).all()
        width, height = xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()
        if name == "square":  # axis-aligned, side = 2 * size / sqrt(2)
            assert abs(width - 2 * size / math.sqrt(2)) <= 1.5
            assert abs(height - 2 * size / math.sqrt(2)) <= 1.5
        elif name in ("circle", "ring"):
            assert abs(width - 2 * size) <= 1.5 and abs(height - 2 * size) <= 1.5
        if name == "ring":  # inner radius 0.55 x outer
            assert not m[int(cy), int(cx)] and not m[int(cy + 0.5 * size), int(cx)]
        elif name == "triangle":  # points up: apex at cy - size, base at cy + size / 2
            assert abs(ys.min() - (cy - size)) <= 1.5 and abs(ys.max() + 1 - (cy + size / 2)) <= 1.5
            assert abs(width - size * math.sqrt(3)) <= 1.5
        elif name == "cross":  # arms reach the circumscribed circle, arm width 0.35 x span
            assert abs(width - 2 * _A * size) <= 1.5
            assert abs(m[int(cy - 0.8 * size)].sum() - 0.7 * _A * size) <= 1.5
        elif name == "star":  # point up, notch straight below the centre
            assert abs(ys.min() - (cy - size)) <= 1.5
            assert not m[int(cy + 0.6 * size), int(cx)]


def test_rotation_turns_the_shape():
    p = SceneParams(imgsz=64, **CLEAN)
    rng = np.random.default_rng(0)
    sq0 = render_scene([ShapeSpec(3, 32, 32, 20, 0.0, (255, 255, 255))], p, rng).full_masks[0]
    sq45 = render_scene([ShapeSpec(3, 32, 32, 20, 45.0, (255, 255, 255))], p, rng).full_masks[0]
    w0, w45 = np.nonzero(sq0.any(0))[0], np.nonzero(sq45.any(0))[0]
    assert abs(len(w0) - 20 * math.sqrt(2)) <= 1 and abs(len(w45) - 40) <= 1
    assert abs(int(sq0.sum()) - int(sq45.sum())) < 0.03 * sq0.sum()


def test_occlusion_is_bounded():
    fracs = []
    for p in (
        SceneParams(occlusion=1.0, max_occlusion=0.5),
        SceneParams(imgsz=128, min_objects=3, max_objects=3, occlusion=1.0, max_occlusion=0.5,
                    allow_overlap=False),
    ):
        for seed in range(50):
            sc = sample_scene(p, np.random.default_rng(seed))
            assert len(sc.occluders) > 0
            assert (sc.full_masks.sum(0) <= 1).all() or p.allow_overlap
            fracs.extend(sc.occlusion.tolist())
    fracs = np.array(fracs)
    assert (fracs <= 0.5 + 0.02).all()
    assert (fracs > 0.05).sum() > 20
    clean = [sample_scene(SceneParams(), np.random.default_rng(s)).occlusion for s in range(10)]
    assert np.all(np.concatenate(clean) == 0)


def test_non_overlapping_objects_and_gray():
    p = SceneParams(imgsz=128, min_objects=4, max_objects=4, allow_overlap=False, color=False)
    for seed in range(10):
        sc = sample_scene(p, np.random.default_rng(seed))
        assert len(sc.objects) >= 3
        assert sc.full_masks.sum(0).max() <= 1
        assert np.array_equal(sc.image[..., 0], sc.image[..., 1])
        assert np.array_equal(sc.image[..., 0], sc.image[..., 2])


def test_sequence_motion():
    p = SceneParams(imgsz=96, min_objects=3, max_objects=3, lighting=0.0, noise=0.0)
    frames = sample_sequence(p, np.random.default_rng(1), num_frames=25, speed=3.0)
    assert len(frames) == 25
    ids = [o.track_id for o in frames[0].objects]
    assert len(set(ids)) == 3
    moved = 0
    for a, b in zip(frames, frames[1:]):
        assert [o.track_id for o in b.objects] == ids
        assert b.labels.tolist() == a.labels.tolist()
        for oa, ob, fa, fb in zip(a.objects, b.objects, a.full_masks, b.full_masks):
            va, vb = np.array(oa.velocity), np.array(ob.velocity)
            assert 0 < np.hypot(*va) <= 3.0 * 1.5 + 1e-9
            assert math.isclose(np.hypot(*va), np.hypot(*vb))
            step = np.array([ob.cx - oa.cx, ob.cy - oa.cy])
            if np.allclose(va, vb):  # no bounce: the centre moves by exactly the velocity
                assert np.allclose(step, va)
                ya, xa = np.nonzero(fa)
                yb, xb = np.nonzero(fb)
                d = np.array([xb.mean() - xa.mean(), yb.mean() - ya.mean()])
                assert np.abs(d - va).max() < 1.0  # and so does the rendered mask
                moved += 1
            else:
                assert np.abs(step).max() <= np.abs(va).max() + 1e-9
            assert math.isclose(ob.angle, (oa.angle + oa.spin) % 360) and ob.spin == oa.spin
            assert ob.size <= ob.cx <= 96 - ob.size and ob.size <= ob.cy <= 96 - ob.size
            assert fb.any()
    assert moved > 30
    # the background (clutter included) is fixed: pixels no object ever touches are identical
    touched = np.zeros((96, 96), bool)
    for f in frames:
        touched |= f.full_masks.any(0)
    for _ in range(2):  # plus the anti-aliased fringe
        touched |= np.roll(touched, 1, 0) | np.roll(touched, -1, 0)
        touched |= np.roll(touched, 1, 1) | np.roll(touched, -1, 1)
    assert (~touched).sum() > 1000
    for f in frames[1:]:
        assert np.array_equal(f.image[~touched], frames[0].image[~touched])


def test_sequence_occluders_are_static():
    p = SceneParams(imgsz=64, min_objects=2, max_objects=2, occlusion=1.0)
    frames = sample_sequence(p, np.random.default_rng(3), num_frames=6)
    assert frames[0].occluders
    assert all(f.occluders == frames[0].occluders for f in frames)


def test_empty_scene():
    sc = render_scene([], SceneParams(), np.random.default_rng(0))
    assert sc.masks.shape == (0, 64, 64) and sc.boxes.shape == (0, 4)
    assert sc.semantic_mask().max() == 0 and sc.tags().sum() == 0


def test_scene_drawn_on_a_given_background():
    """``sample_scene(background=...)`` (the photographic benchmark set) draws the objects on that
    image: with lighting and noise off, every pixel outside the objects' circles is the background's."""
    params = SceneParams(imgsz=64, min_objects=2, max_objects=3, lighting=0.0, noise=0.0)
    rng = np.random.default_rng(3)
    bg = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    scene = sample_scene(params, np.random.default_rng(5), background=bg)
    yy, xx = np.mgrid[0:64, 0:64]
    outside = np.ones((64, 64), bool)
    for o in scene.objects:
        outside &= np.hypot(xx - o.cx, yy - o.cy) > o.size + 2
    assert scene.objects and 0.2 < outside.mean() < 0.95
    assert np.array_equal(scene.image[outside], bg[outside])
    assert not np.array_equal(scene.image, bg) and scene.semantic_mask()[outside].max() == 0
