"""Instance masks <-> polygons, exactly.

COCO (``segmentation`` polygons) and Ultralytics' segment labels store an object as
polygons, while cnnkit's built-in data, Mask R-CNN and COCO RLE give masks. Going from a
mask to polygons is usually done with OpenCV's ``findContours``, whose outline runs through
pixel *centres*: rasterized again (COCO samples pixel centres, pycocotools ``frPyObjects``)
every object loses half a pixel all round, an IoU of about 0.9 for a 20 px object. The
outline here runs along pixel *edges* instead, so rasterizing it gives back the very same
pixels (IoU 1.0; tests/test_det_formats.py checks random masks with holes and several
parts). It is hand-written because no library at hand traces pixel edges (OpenCV and
scikit-image trace centres) and it is 60 lines.

Holes and touching parts need no special case: pycocotools fills a polygon by the even-odd
rule, so a mask is the even-odd fill of its boundary edges linked into closed loops in any
order; the loops of one connected part are joined into one outline by zero-width bridges
walked there and back (which cancel under even-odd), giving one COCO polygon per part and
one outline per object for YOLO (:func:`join_polygons`).
"""

from __future__ import annotations

import numpy as np

# unit steps (dx, dy) in image coordinates (y down), clockwise order: right, down, left, up
_STEPS = ((1, 0), (0, 1), (-1, 0), (0, -1))


def mask_to_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Polygons of a binary mask along pixel edges: one float (K, 2) ``x, y`` outline per
    8-connected part (holes included by bridges), vertices only where the outline turns.

    Rasterizing the list with pycocotools (``frPyObjects`` then ``merge``) gives ``mask``
    back exactly. An empty mask gives ``[]``.
    """
    from scipy import ndimage

    m = np.asarray(mask, bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    labels, n = ndimage.label(m, structure=np.ones((3, 3), bool))
    parts = []
    for k in range(1, n + 1):
        loops = _boundary_loops(labels == k)
        parts.append(join_polygons(loops, keep_turn=True) if len(loops) > 1 else loops[0])
    return parts


def _boundary_loops(m: np.ndarray) -> list[np.ndarray]:
    """The directed pixel-edge boundary of ``m`` (foreground on the right when walking, so an
    outer outline turns clockwise on screen and a hole the other way), linked into loops."""
    p = np.pad(m, 1)
    edges: dict[tuple[int, int], list[int]] = {}  # start vertex -> directions leaving it
    # a foreground pixel (y, x) with a background neighbour has that side in the boundary:
    # top side walks right from (x, y), right side down from (x+1, y), bottom left from
    # (x+1, y+1), left side up from (x, y+1)
    core = p[1:-1, 1:-1]
    sides = (
        (core & ~p[:-2, 1:-1], 0, 0, 0),  # (where, direction, dx, dy of the start vertex)
        (core & ~p[1:-1, 2:], 1, 1, 0),
        (core & ~p[2:, 1:-1], 2, 1, 1),
        (core & ~p[1:-1, :-2], 3, 0, 1),
    )
    for where, d, dx, dy in sides:
        ys, xs = np.nonzero(where)
        for x, y in zip((xs + dx).tolist(), (ys + dy).tolist()):
            edges.setdefault((x, y), []).append(d)
    loops = []
    while edges:
        # every vertex has as many edges in as out, so a walk can only end where it started
        v = start = next(iter(edges))
        d = first = None
        pts = []
        while edges.get(v):
            out = edges[v]
            # where two diagonal pixels touch, two edges leave a vertex: take the right turn
            # (any choice gives the same even-odd fill)
            j = 0 if d is None else min(range(len(out)), key=lambda i: (out[i] - d - 1) % 4)
            nd = out.pop(j)
            if not out:
                del edges[v]
            if nd != d:
                pts.append(v)
            d = nd if d is not None else (first := nd)
            v = (v[0] + _STEPS[d][0], v[1] + _STEPS[d][1])
        if v == start and d == first:  # the start vertex is mid-side, not a corner
            pts = pts[1:]
        loops.append(np.asarray(pts, np.float32))
    return [lp for lp in loops if len(lp) >= 3]


def record_polygons(rec) -> list[list[np.ndarray]] | None:
    """Per object the polygon parts a writer stores: the record's ``polygons`` when it has
    them, else its ``masks`` traced (:func:`mask_to_polygons`), else None (boxes only)."""
    if rec.polygons is not None:
        return rec.polygons
    if rec.masks is None:
        return None
    return [mask_to_polygons(m) for m in np.asarray(rec.masks, bool)]


def polygons_to_mask(parts: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """bool (height, width) pixels inside any of ``parts`` (pycocotools, as COCO rasterizes)."""
    from pycocotools import mask as mask_utils

    flat = [np.asarray(pt, np.float64).reshape(-1).tolist() for pt in parts if len(pt) >= 3]
    if not flat:
        return np.zeros((height, width), bool)
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(flat, height, width))).astype(bool)


def join_polygons(parts: list[np.ndarray], keep_turn: bool = False) -> np.ndarray:
    """One outline (K, 2) through every part of a polygon.

    Each further part hangs off the first one by a zero-width bridge between their nearest
    vertices, walked there and back. By default each part is turned the same way round as the
    first, so that the areas add up under the non-zero rule too (Ultralytics' COCO converter
    joins parts the same way; this is 20 lines of our own rather than a dependency on its AGPL
    code); ``keep_turn`` leaves them as they are, for holes filled by the even-odd rule.
    """
    base = parts[0]
    turn = np.sign(_signed_area(base)) or 1.0
    hang: dict[int, list[np.ndarray]] = {}
    for p in parts[1:]:
        if not keep_turn and np.sign(_signed_area(p)) * turn < 0:
            p = p[::-1]
        d = ((base[:, None, :] - p[None, :, :]) ** 2).sum(-1)  # (len(base), len(p))
        i, j = np.unravel_index(int(d.argmin()), d.shape)
        hang.setdefault(int(i), []).append(np.concatenate([np.roll(p, -int(j), 0), p[j:j + 1]]))
    out = []
    for i, v in enumerate(base):
        out.append(v[None])
        for loop in hang.get(i, []):
            out += [loop, v[None]]
    return np.concatenate(out)


def _signed_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
