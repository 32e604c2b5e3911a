"""Procedural, seeded images of geometric shapes with exact masks, boxes, tags and tracks.

Every image comes from one scene model: :class:`ShapeSpec` objects drawn in order over a
background, then occluders, lighting and sensor noise. Classification, tagging, detection,
segmentation and tracking data all come from :func:`render_scene`, so labels match the pixels
(classification: :mod:`cnnkit.data.shapes_classification`; moving sequences:
:mod:`cnnkit.data.shapes_video`).

Conventions: pixel ``(x, y)`` covers ``[x, x+1) x [y, y+1)`` (centre ``(x + 0.5, y + 0.5)``), so
a shape at ``(32, 32)`` sits exactly in the middle of a 64 px image. ``ShapeSpec.size`` is the
radius of the shape's circumscribed circle; ``SceneParams.size_range`` gives that circle's
*diameter* as a fraction of ``imgsz`` (``size = u * imgsz / 2``). A pixel is in a mask when at
least half of it is covered (4x4 supersampling); the image uses the fractional coverage.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPE_CLASSES", "ShapeSpec", "SceneParams", "Occluder", "Lighting", "Scene",
           "render_scene", "sample_scene", "sample_background", "sample_lighting"]

SHAPE_CLASSES = ("circle", "ring", "triangle", "square", "pentagon", "hexagon", "star", "cross")
_SS = 4  # supersampling factor per axis
_SPLITS = {"train": 0, "val": 1, "test": 2}
_DEFAULT_SIZES = {"train": 2000, "val": 400, "test": 400}


def _ngon(n: int, start_deg: float, radii: Sequence[float] = (1.0,)) -> np.ndarray:
    """Vertices of a regular (or alternating-radius) polygon around the origin, y down."""
    a = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
    r = np.resize(np.asarray(radii, np.float64), n)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _miter(p: np.ndarray) -> np.ndarray:
    """Per-vertex shifts that move every edge of polygon ``p`` inward by 1 (mitred corners)."""
    e = np.diff(p, axis=0, append=p[:1])
    n = np.stack([-e[:, 1], e[:, 0]], 1) / np.hypot(e[:, 0], e[:, 1])[:, None]
    n *= np.sign(np.sum(p[:, 0] * e[:, 1] - e[:, 0] * p[:, 1]))  # make the normals point inward
    n0 = np.concatenate([n[-1:], n[:-1]])
    return (n + n0) / (1 + np.sum(n * n0, 1))[:, None]


def _cross(width: float = 0.35) -> np.ndarray:
    a = 1.0 / math.hypot(1.0, width)  # arm half-length: the arm corners touch the unit circle
    h = width * a  # half arm width, so arm width = 0.35 x the cross's span (2a)
    q = [(h, -a), (h, -h), (a, -h), (a, h), (h, h), (h, a)]
    return np.array(q + [(-x, -y) for x, y in q])


# Unit outlines per class as (vertices, fill) drawn in order; fill 0 punches a hole.
_UNIT = {
    0: [(_ngon(96, 0), 255)],
    1: [(_ngon(96, 0), 255), (_ngon(96, 0, (0.55,)), 0)],
    2: [(_ngon(3, -90), 255)],
    3: [(_ngon(4, 45), 255)],
    4: [(_ngon(5, -90), 255)],
    5: [(_ngon(6, 0), 255)],
    6: [(_ngon(10, -90, (1.0, 0.45)), 255)],
    7: [(_cross(), 255)],
}
_MITER = {cls: [_miter(v) for v, _ in parts] for cls, parts in _UNIT.items()}
# PIL fills every sub-pixel an outline touches; moving edges inward by 0.4 sub-pixel removes
# that bias (measured: mask areas within ~0.01 px per px of perimeter of the exact ones).
_ERODE = 0.4 / _SS


@dataclass
class ShapeSpec:
    """One object, in pixel units of the output image.

    ``size`` is the circumscribed radius; ``angle`` turns the shape counter-clockwise on screen
    (degrees). At angle 0 triangles, pentagons and stars point up, squares and crosses are
    axis-aligned. ``velocity`` (px/frame) and ``spin`` (deg/frame) are set by sequences.
    """

    cls: int
    cx: float
    cy: float
    size: float
    angle: float
    color: tuple[int, int, int]
    track_id: int = -1
    velocity: tuple[float, float] = (0.0, 0.0)
    spin: float = 0.0


@dataclass
class SceneParams:
    """Generator knobs. Strengths are 0..1; ``size_range`` is the circumscribed diameter as a
    fraction of ``imgsz``; ``noise`` is the Gaussian pixel noise std as a fraction of 255;
    ``occlusion`` is the per-object chance of an occluder hiding up to ``max_occlusion`` of it."""

    imgsz: int = 64
    min_objects: int = 1
    max_objects: int = 1
    size_range: tuple[float, float] = (0.25, 0.45)
    rotation: bool = True
    color: bool = True
    clutter: float = 0.5
    occlusion: float = 0.0
    max_occlusion: float = 0.5
    lighting: float = 0.5
    noise: float = 0.02
    allow_overlap: bool = True


@dataclass
class Occluder:
    """An opaque ``"rect"`` or ``"ellipse"`` patch in a background-like colour drawn over the
    objects; ``width`` lies along its own x axis before turning by ``angle`` (degrees, CCW)."""

    kind: str
    cx: float
    cy: float
    width: float
    height: float
    angle: float
    color: tuple[int, int, int]


@dataclass
class Lighting:
    """Global lighting: ``out = ((img - 128) * gain + 128 + offset) * field`` where
    ``field = 1 + gx*X + gy*Y + radial*(0.5 - ((X-rx)^2 + (Y-ry)^2) / 2)`` for X, Y in [-1, 1]."""

    gain: float = 1.0
    offset: float = 0.0
    gx: float = 0.0
    gy: float = 0.0
    radial: float = 0.0
    rx: float = 0.0
    ry: float = 0.0


@dataclass(eq=False)
class Scene:
    """A rendered image with per-object ground truth (N objects, H x W image).

    Shape: ``image`` uint8 (H, W, 3); ``masks`` bool (N, H, W) visible pixels (after later
    objects and occluders); ``full_masks`` bool (N, H, W) amodal masks clipped to the image;
    ``boxes`` float32 (N, 4) xyxy of the visible mask, x2/y2 exclusive, zeros if nothing is
    visible; ``occlusion`` float32 (N,) = 1 - visible/full area; ``labels`` int64 (N,).
    """

    image: np.ndarray
    objects: list[ShapeSpec]
    masks: np.ndarray
    full_masks: np.ndarray
    boxes: np.ndarray
    occlusion: np.ndarray
    labels: np.ndarray
    occluders: list[Occluder] = field(default_factory=list)

    def semantic_mask(self) -> np.ndarray:
        """Class map of the visible pixels.

        Returns:
            uint8 array (H, W): 0 for background, ``class id + 1`` elsewhere.
        """
        out = np.zeros(self.image.shape[:2], np.uint8)
        for m, lab in zip(self.masks, self.labels):
            out[m] = lab + 1
        return out

    def tags(self, num_classes: int = len(SHAPE_CLASSES)) -> np.ndarray:
        """Multi-hot vector of the classes with at least one visible pixel.

        Returns:
            float32 array (num_classes,).
        """
        out = np.zeros(num_classes, np.float32)
        out[self.labels[self.masks.any((1, 2))]] = 1.0
        return out


def _place(unit: np.ndarray, cx: float, cy: float, sx: float, sy: float, angle: float):
    """Scale a unit outline by (sx, sy), turn it CCW on screen and move it to (cx, cy)."""
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    x, y = unit[:, 0] * sx, unit[:, 1] * sy
    return np.stack([cx + c * x + s * y, cy - s * x + c * y], 1)


def _raster(parts, radius: float, cx: float, cy: float, imgsz: int):
    """Supersampled coverage of outlines within ``radius`` of (cx, cy), clipped to the image.

    Returns ((y0, y1, x0, x1), uint8 coverage 0..255 of that box), or (None, None) if empty."""
    x0, y0 = max(0, math.floor(cx - radius) - 1), max(0, math.floor(cy - radius) - 1)
    x1, y1 = min(imgsz, math.ceil(cx + radius) + 1), min(imgsz, math.ceil(cy + radius) + 1)
    if x1 <= x0 or y1 <= y0 or not radius > 0:
        return None, None
    im = Image.new("L", ((x1 - x0) * _SS, (y1 - y0) * _SS), 0)
    draw = ImageDraw.Draw(im)
    for verts, fill in parts:
        draw.polygon(((verts - (x0, y0)) * _SS).ravel().tolist(), fill=fill)
    return (y0, y1, x0, x1), np.asarray(im.reduce(_SS))


def _occluder_raster(oc: Occluder, imgsz: int):
    unit = _ngon(48, 0) if oc.kind == "ellipse" else _ngon(4, 45) * math.sqrt(2)
    verts = _place(unit, oc.cx, oc.cy, oc.width / 2, oc.height / 2, oc.angle)
    verts += _ERODE * _miter(verts)
    return _raster([(verts, 255)], math.hypot(oc.width, oc.height) / 2, oc.cx, oc.cy, imgsz)


def _rgb(a: np.ndarray) -> np.ndarray:
    """Repeat a single gray channel (last axis) to three; colour input passes through."""
    return np.repeat(a, 3 // a.shape[-1], axis=-1).astype(np.float32)


def _rand_color(rng: np.random.Generator, color: bool, lo: int = 0, hi: int = 256) -> np.ndarray:
    return _rgb(rng.integers(lo, hi, 3 if color else 1))


def _local_mean(img: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Mean colour of an (H, W, 3) image region, estimated on every 4th pixel."""
    y0, x0 = max(0, min(y0, img.shape[0] - 1)), max(0, min(x0, img.shape[1] - 1))
    return img[y0:max(y1, y0 + 1):4, x0:max(x1, x0 + 1):4].reshape(-1, 3).mean(0)


def _composite(img: np.ndarray, box: tuple, cov: np.ndarray, color) -> None:
    """Blend a flat colour into a planar (3, H, W) float image with coverage ``cov``."""
    region = img[:, box[0]:box[1], box[2]:box[3]]
    region += cov * np.float32(1 / 255) * (np.asarray(color, np.float32)[:, None, None] - region)


def sample_background(params: SceneParams, rng: np.random.Generator) -> np.ndarray:
    """Draw a background: a two-colour linear gradient with low-frequency texture, then clutter
    (thin lines and small blobs, never shapes of the classes); texture and clutter scale with
    ``params.clutter``.

    Returns:
        uint8 array (H, W, 3).
    """
    s, k, nc = params.imgsz, int(rng.integers(3, 9)), 3 if params.color else 1
    c0 = _rand_color(rng, params.color, 20, 236)
    c1 = np.clip(c0 + _rgb(rng.normal(0, 40, nc)), 0, 255)
    t = rng.uniform(0, 2 * math.pi)
    g = (np.arange(k) + 0.5) / k - 0.5  # a k x k control grid, upsampled bilinearly
    ramp = np.clip(0.5 + g[None, :] * math.cos(t) + g[:, None] * math.sin(t), 0, 1)
    small = c0 + (c1 - c0) * ramp[..., None]
    small += _rgb(rng.normal(0, 32 * params.clutter, (k, k, nc)))
    small = np.clip(small, 0, 255).astype(np.uint8)
    im = Image.fromarray(small).resize((s, s), Image.Resampling.BILINEAR)
    n = int(rng.poisson(params.clutter * 10 * s / 64))
    if n:
        w = rng.uniform(0.3, 1.0, (n, 1))  # how far each colour departs from the background
        rand = _rgb(rng.integers(0, 256, (n, nc)))
        cols = (1 - w) * small.reshape(-1, 3).mean(0) + w * rand
        xy, geo = rng.uniform(0, s, (n, 2)), rng.uniform(0, 1, (n, 3))
        kinds, widths = rng.random(n), rng.integers(1, max(2, s // 48 + 1), n)
        draw = ImageDraw.Draw(im)
        for (x, y), (g0, g1, g2), kind, col, wd in zip(xy.tolist(), geo.tolist(), kinds,
                                                      cols.astype(int).tolist(), widths):
            if kind < 0.65:  # a thin line of length 10-60% of the image
                length, a = (0.1 + 0.5 * g0) * s, g1 * 2 * math.pi
                end = (x + length * math.cos(a), y + length * math.sin(a))
                draw.line([(x, y), end], fill=tuple(col), width=int(wd))
            else:  # a small blob
                rx, ry = (0.008 + 0.027 * g1) * s, (0.008 + 0.027 * g2) * s
                draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=tuple(col))
    return np.asarray(im)


def sample_lighting(params: SceneParams, rng: np.random.Generator) -> Lighting:
    """Sample a brightness/contrast change and a linear or radial illumination gradient, all
    scaled by ``params.lighting`` (0 gives the identity)."""
    s = float(params.lighting)
    if s <= 0:
        return Lighting()
    light = Lighting(gain=1 + s * rng.uniform(-0.35, 0.25), offset=s * rng.uniform(-40, 40))
    if rng.random() < 0.5:
        a, m = rng.uniform(0, 2 * math.pi), s * rng.uniform(0.1, 0.35)
        light.gx, light.gy = m * math.cos(a), m * math.sin(a)
    else:
        light.radial = s * rng.uniform(-0.6, 0.6)
        light.rx, light.ry = rng.uniform(-0.7, 0.7), rng.uniform(-0.7, 0.7)
    return light


def _apply_lighting(img: np.ndarray, li: Lighting) -> None:
    """Apply lighting in place to a planar (3, H, W) float image."""
    if li == Lighting():
        return
    g = ((np.arange(img.shape[1]) + 0.5) * (2 / img.shape[1]) - 1).astype(np.float32)
    fld = 1 + np.float32(li.gx) * g[None, :] + np.float32(li.gy) * g[:, None]
    if li.radial:
        r2 = (g[None, :] - np.float32(li.rx)) ** 2 + (g[:, None] - np.float32(li.ry)) ** 2
        fld += np.float32(li.radial) * (0.5 - r2 / 2)
    fld = np.clip(fld, 0.3, 1.7)
    img *= np.float32(li.gain) * fld
    img += np.float32(128 * (1 - li.gain) + li.offset) * fld


@functools.lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """2**21 fixed N(0, 1) samples; each image adds a window at a random offset, which is
    Gaussian pixel noise at a fraction of the cost of sampling it afresh."""
    return np.random.default_rng(0x5EED).standard_normal(1 << 21, dtype=np.float32)


def _sample_occluders(objects, full, bg, params, rng) -> list:
    """For each object (with probability ``params.occlusion``) slide a rectangle or ellipse in
    from a random side until it hides a random fraction (up to ``max_occlusion``) of it; patches
    that would push any object's occluder-hidden fraction above ``max_occlusion`` are shrunk
    twice, then dropped. Returns [(Occluder, box, coverage)]."""
    out: list[tuple[Occluder, tuple, np.ndarray]] = []
    if params.occlusion <= 0 or params.max_occlusion <= 0:
        return out
    s, n = params.imgsz, len(objects)
    areas = np.count_nonzero(full.reshape(n, s * s), axis=1)
    hidden, hidden_px = np.zeros((s, s), bool), np.zeros(n, np.int64)
    for k, o in enumerate(objects):
        if rng.random() >= params.occlusion or not areas[k]:
            continue
        ys, xs = np.nonzero(full[k])
        ys, xs = ys[:: 1 + len(ys) // 2048], xs[:: 1 + len(xs) // 2048]  # enough to aim
        th = rng.uniform(0, 2 * math.pi)
        c, sn = math.cos(th), math.sin(th)
        u = (xs + 0.5 - o.cx) * c + (ys + 0.5 - o.cy) * sn  # along the approach direction
        v = (ys + 0.5 - o.cy) * c - (xs + 0.5 - o.cx) * sn
        rect = rng.random() < 0.5
        short = o.size * rng.uniform(0.7, 1.1)  # elongated, so never square- or circle-like
        long = short * rng.uniform(1.6, 2.5)
        along, across = (short, long) if rng.random() < 0.5 else (long, short)
        off = o.size * rng.uniform(-0.3, 0.3)
        target = params.max_occlusion * rng.uniform(0.2, 1.0)

        def frac(t: float) -> float:  # share of the object under the patch with near edge at t
            if rect:
                inside = (u >= t) & (u <= t + along) & (np.abs(v - off) <= across / 2)
            else:
                inside = ((u - t) / along - 0.5) ** 2 + ((v - off) / across) ** 2 <= 0.25
            return float(inside.mean())

        for _ in range(3):
            lo, hi = 1.15 * o.size - along, o.size  # always pokes out: never a "hole"
            for _ in range(12):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if frac(mid) > target else (lo, mid)
            d = hi + along / 2
            oc = Occluder("rect" if rect else "ellipse", o.cx + d * c - off * sn,
                          o.cy + d * sn + off * c, along, across, -math.degrees(th), (0, 0, 0))
            box, cov = _occluder_raster(oc, s)
            if box is None:
                break
            win = (slice(None), slice(box[0], box[1]), slice(box[2], box[3]))
            new = (cov >= 128) & ~hidden[win[1:]]  # pixels this patch newly hides
            extra = np.count_nonzero((full[win] & new).reshape(n, -1), axis=1)
            if np.all(hidden_px + extra <= params.max_occlusion * areas):
                jitter = _rgb(rng.normal(0, 12, 3 if params.color else 1))
                oc.color = tuple(int(x) for x in np.clip(_local_mean(bg, *box) + jitter, 0, 255))
                hidden[win[1:]] |= new
                hidden_px += extra
                out.append((oc, box, cov))
                break
            target *= 0.6
    return out


def render_scene(objects: list[ShapeSpec], params: SceneParams, rng: np.random.Generator, *,
                 background: np.ndarray | None = None, occluders: list[Occluder] | None = None,
                 lighting: Lighting | None = None) -> Scene:
    """Render objects (in z-order: later ones on top) and compute their ground truth.

    Draws the background (gradient, texture, clutter), the objects, the occluders, then applies
    lighting and Gaussian noise. The keyword arguments let callers (e.g. sequences) hold parts
    of the scene fixed.

    Args:
        objects: Shapes to draw, bottom to top.
        params: Generator settings.
        rng: Source of all randomness; equal generator states give identical scenes.
        background: uint8 (H, W, 3) image from :func:`sample_background`; sampled when None.
        occluders: Occluders to draw; sampled from ``params.occlusion`` when None, none if [].
        lighting: Lighting to apply; sampled from ``params.lighting`` when None.

    Returns:
        The :class:`Scene`; its ``occluders`` lists the occluders that were drawn.
    """
    s, n = params.imgsz, len(objects)
    bg = sample_background(params, rng) if background is None else background
    img = bg.transpose(2, 0, 1).astype(np.float32, order="C")  # planar: fast broadcasting
    full = np.zeros((n, s, s), bool)
    for k, o in enumerate(objects):
        shrink = _ERODE / max(o.size, 1e-6)
        parts = [(_place(v + shrink * m, o.cx, o.cy, o.size, o.size, o.angle), f)
                 for (v, f), m in zip(_UNIT[o.cls], _MITER[o.cls])]
        box, cov = _raster(parts, o.size, o.cx, o.cy, s)
        if box is not None:
            _composite(img, box, cov, o.color)
            full[k, box[0]:box[1], box[2]:box[3]] = cov >= 128
    if occluders is None:
        drawn = _sample_occluders(objects, full, bg, params, rng)
    else:
        drawn = [(oc, *_occluder_raster(oc, s)) for oc in occluders]
        drawn = [d for d in drawn if d[1] is not None]
    covered = np.zeros((s, s), bool)
    for oc, box, cov in drawn:
        _composite(img, box, cov, oc.color)
        covered[box[0]:box[1], box[2]:box[3]] |= cov >= 128
    masks = np.zeros_like(full)
    for k in range(n - 1, -1, -1):
        np.logical_and(full[k], ~covered, out=masks[k])
        covered |= full[k]
    _apply_lighting(img, sample_lighting(params, rng) if lighting is None else lighting)
    if params.noise > 0:
        bank, std = _noise_bank(), np.float32(params.noise * 255)
        shape = (3 if params.color else 1, s, s)  # gray images get gray noise
        size = math.prod(shape)
        if size <= len(bank) // 2:
            start = int(rng.integers(0, len(bank) - size))
            img += std * bank[start:start + size].reshape(shape)
        else:
            img += std * rng.standard_normal(shape, dtype=np.float32)
    np.clip(img, 0, 255, out=img)
    image = np.ascontiguousarray(np.rint(img, out=img).astype(np.uint8).transpose(1, 2, 0))
    rows, cols = masks.any(2), masks.any(1)
    boxes = np.stack([cols.argmax(1), rows.argmax(1),
                      s - cols[:, ::-1].argmax(1), s - rows[:, ::-1].argmax(1)], 1)
    boxes = (boxes * rows.any(1)[:, None]).astype(np.float32).reshape(n, 4)
    vis = np.count_nonzero(masks.reshape(n, s * s), axis=1)
    area = np.count_nonzero(full.reshape(n, s * s), axis=1)
    occ = np.where(area > 0, 1 - vis / np.maximum(area, 1), 1.0).astype(np.float32)
    labels = np.array([o.cls for o in objects], np.int64)
    return Scene(image, list(objects), masks, full, boxes, occ, labels, [d[0] for d in drawn])


def _sample_objects(params, rng, bg, classes=None) -> list[ShapeSpec]:
    s = params.imgsz
    if classes is None:
        count = int(rng.integers(params.min_objects, params.max_objects + 1))
        classes = rng.integers(0, len(SHAPE_CLASSES), count)
    objects: list[ShapeSpec] = []
    for k, cls in enumerate(classes):
        r = rng.uniform(*params.size_range) * s / 2
        for attempt in range(60):
            m = min(r, s / 2)  # keep the circumscribed circle inside the image
            cx, cy = rng.uniform(m, s - m, 2)
            if params.allow_overlap or all(math.hypot(cx - o.cx, cy - o.cy) >= r + o.size
                                           for o in objects):
                break
            if attempt % 10 == 9:
                r *= 0.85
        else:
            continue  # could not place it without overlap: drop it
        local = _local_mean(bg, int(cy - r), int(cy + r) + 1, int(cx - r), int(cx + r) + 1)
        best, best_d = local, -1.0
        for _ in range(10):  # pick a colour that stands out from the local background
            col = _rand_color(rng, params.color)
            d = float(np.linalg.norm(col - local))
            best, best_d = (col, d) if d > best_d else (best, best_d)
            if d >= 100:
                break
        angle = float(rng.uniform(0, 360)) if params.rotation else 0.0
        color = (int(best[0]), int(best[1]), int(best[2]))
        objects.append(ShapeSpec(int(cls), float(cx), float(cy), float(r), angle, color, k))
    return objects


def sample_scene(params: SceneParams, rng: np.random.Generator,
                 classes: Sequence[int] | None = None, background: np.ndarray | None = None) -> Scene:
    """Sample a random scene: background, objects, then :func:`render_scene`.

    Objects get a random class, a circumscribed diameter from ``params.size_range``, a centre
    keeping that circle inside the image, a random angle (if ``params.rotation``) and a colour
    contrasting with the local background. With ``allow_overlap=False`` circumscribed circles
    are kept apart; an object that cannot be placed in 60 tries (shrinking as it goes) is dropped.

    Args:
        params: Generator settings.
        rng: Source of all randomness.
        classes: One object per entry with these classes, instead of
            ``min_objects..max_objects`` random ones.
        background: uint8 (imgsz, imgsz, 3) image to draw on (a photograph, say) instead of
            a sampled gradient with clutter.

    Returns:
        The rendered :class:`Scene`.
    """
    bg = sample_background(params, rng) if background is None else background
    return render_scene(_sample_objects(params, rng, bg, classes), params, rng, background=bg)
