"""Detection data: one in-memory form for every box dataset, and the loader that feeds models.

Every reader in ``data/formats/`` (YOLO ``data.yaml``, COCO JSON, VOC XML) and the built-in
``shapes`` scenes produce a :class:`DetectionData`: class names plus, per split, a list of
:class:`DetRecord` (one image with its objects, boxes in pixel ``xyxy``). Writers take the
same object, so a converter is one reader plus one writer, and instance segmentation adds
masks/polygons to the same records.

Models see letterboxed squares: :class:`DetectionDataset` scales the longer side to
``imgsz``, pads right and bottom (so mapping back is a division by ``scale``), applies
box-aware augmentation (``parse_aug`` names plus ``occlude``) and optional mosaic, and
returns ``(uint8 (3, S, S), target)``. :func:`collate` stacks the images and keeps targets
as a list of dicts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from cnnkit.errors import DataError, ImageDecodeError

CACHE_BYTES = 2 << 30  # letterboxed images are cached in RAM up to this size
PAD_VALUE = 114  # grey letterbox padding (as YOLO), so padding is neither black nor white
OCCLUSION_BUCKETS = (("none", 0.0, 0.0), ("<30%", 0.0, 0.3), ("30-60%", 0.3, 0.6), (">60%", 0.6, 1.0))


@dataclass
class DetRecord:
    """One image and its objects.

    ``boxes`` float32 (N, 4) ``x1, y1, x2, y2`` in pixels of the original image (x2/y2
    exclusive, so width = x2 - x1); ``labels`` int64 (N,) class indices into
    :attr:`DetectionData.names`; ``occlusion`` float32 (N,) fraction hidden (NaN unknown),
    only built-in data knows it. ``image`` holds the pixels (uint8 H x W x 3) for generated
    data; files are read from ``path``. ``masks`` bool (N, H, W) and ``polygons`` (per object
    a list of (K, 2) float arrays in pixels) are for instance segmentation; either may be None.
    """

    path: str | None
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    image_id: int = 0
    occlusion: np.ndarray | None = None
    image: np.ndarray | None = None
    masks: np.ndarray | None = None
    polygons: list[list[np.ndarray]] | None = None

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, np.int64).reshape(-1)
        if self.occlusion is None:
            self.occlusion = np.full(len(self.labels), np.nan, np.float32)
        self.occlusion = np.asarray(self.occlusion, np.float32).reshape(-1)

    @property
    def name(self) -> str:
        return self.path if self.path is not None else f"image {self.image_id}"

    def _polygon_parts(self, k: int) -> list:
        """Object ``k``'s polygon parts with at least 3 points (none: box-only)."""
        parts = self.polygons[k] if self.polygons is not None and k < len(self.polygons) else []
        return [pt for pt in parts if len(pt) >= 3]

    def maskless(self) -> int:
        """How many objects have neither a mask nor a polygon (they get their box filled)."""
        if self.masks is not None:
            return 0
        return sum(1 for k in range(len(self.labels)) if not self._polygon_parts(k))

    def instance_masks(self) -> np.ndarray:
        """bool (N, H, W) visible mask of every object: ``masks`` when given, else the
        ``polygons`` rasterized (pycocotools, as COCO does); an object without a polygon gets
        its box filled."""
        if self.masks is not None:
            return np.asarray(self.masks, bool)
        from cnnkit.data.formats.polygons import polygons_to_mask

        h, w = int(self.height), int(self.width)
        out = np.zeros((len(self.labels), h, w), bool)
        for k in range(len(self.labels)):
            parts = self._polygon_parts(k)
            if parts:
                out[k] = polygons_to_mask(parts, h, w)
            else:
                x1, y1, x2, y2 = np.round(self.boxes[k]).astype(int)
                out[k, max(0, y1):y2, max(0, x1):x2] = True
        return out

    def load(self) -> torch.Tensor:
        """The image as uint8 (3, H, W)."""
        from cnnkit.data.decode import read_image

        if self.image is not None:
            return torch.from_numpy(np.ascontiguousarray(self.image.transpose(2, 0, 1)))
        return read_image(self.path, channels=3).contiguous()


@dataclass
class DetectionData:
    """Class names, records per split, and the problems found while reading.

    ``warnings`` holds one sentence per kind of problem (bad label lines, boxes outside the
    image, unknown class ids, images without labels), each saying how many and where the
    first one is; readers skip what is unsafe to use and keep going.
    """

    name: str
    names: list[str]
    splits: dict[str, list[DetRecord]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    category_ids: list[int] | None = None  # COCO category id of each class index; None: index + 1

    def split(self, name: str) -> list[DetRecord]:
        if name not in self.splits:
            raise DataError(f"dataset '{self.name}' has no '{name}' split (it has: {', '.join(self.splits)})")
        return self.splits[name]


# ---- built-in shapes scenes ----------------------------------------------------------------
SHAPES_DET_SIZES = {"train": 400, "val": 100, "test": 100}
SHAPES_DET_IMGSZ = 320
MAX_OCCLUSION_LABELLED = 0.85  # objects hidden more than this are not labelled (nothing left to see)


def shapes_detection_params(imgsz: int = SHAPES_DET_IMGSZ, max_objects: int = 6, num_classes: int = 8):
    """Scene settings of the ``shapes`` detection data: 1..max_objects objects whose
    circumscribed diameter is 8-45% of the image, overlaps allowed, half of the objects partly
    hidden by an occluder (up to 70%), lighting changes and sensor noise."""
    from cnnkit.data.shapes import SceneParams

    return SceneParams(imgsz=imgsz, min_objects=1, max_objects=max_objects, size_range=(0.08, 0.45),
                       clutter=0.5, occlusion=0.5, max_occlusion=0.7, lighting=0.5, noise=0.02)


def shapes_scene_record(params, seed: int, split: str, i: int, num_classes: int = 8, masks: bool = False) -> DetRecord:
    """Record ``i`` of a split of generated scenes (deterministic in ``seed, split, i``).

    Objects whose visible part is smaller than 3 px across or hidden more than 85% are
    dropped from the labels (they stay in the picture, like unlabelled crowd in COCO).
    """
    from cnnkit.data.shapes import _SPLITS, sample_scene

    rng = np.random.default_rng([seed, _SPLITS[split], i, 0xDE7])
    count = int(rng.integers(params.min_objects, params.max_objects + 1))
    scene = sample_scene(params, rng, classes=rng.integers(0, num_classes, count))
    wh = scene.boxes[:, 2:] - scene.boxes[:, :2]
    keep = (wh.min(1) >= 3) & (scene.occlusion <= MAX_OCCLUSION_LABELLED)
    s = params.imgsz
    return DetRecord(None, s, s, scene.boxes[keep], scene.labels[keep], image_id=i,
                     occlusion=scene.occlusion[keep], image=scene.image,
                     masks=scene.masks[keep] if masks else None)


def shapes_detection(imgsz: int | None = None, sizes: dict[str, int] | None = None, seed: int = 0,
                     num_classes: int = 8, max_objects: int = 6, masks: bool = False) -> DetectionData:
    """The built-in ``shapes`` detection dataset (train/val/test), rendered now (~10 ms per
    320 px image).

    Args:
        imgsz: image side (default 320).
        sizes: images per split (default train 400, val 100, test 100); only the splits named are made.
        seed: dataset seed; splits never share images.
        num_classes: use the first N of the 8 shape classes (circle, ring, triangle, ...).
        max_objects: at most this many objects per image.
        masks: also keep each object's visible mask (instance segmentation).
    """
    from cnnkit.data.shapes import SHAPE_CLASSES

    if not 1 <= num_classes <= len(SHAPE_CLASSES):
        raise DataError(f"shapes has 1 to {len(SHAPE_CLASSES)} classes, got {num_classes}")
    params = shapes_detection_params(imgsz or SHAPES_DET_IMGSZ, max_objects, num_classes)
    sizes = dict(SHAPES_DET_SIZES) if sizes is None else dict(sizes)
    splits = {sp: [shapes_scene_record(params, seed, sp, i, num_classes, masks) for i in range(n)]
              for sp, n in sizes.items()}
    return DetectionData("shapes", list(SHAPE_CLASSES[:num_classes]), splits)


def load_detection_data(spec: str, imgsz: int | None = None, seed: int = 0, **shapes_kwargs) -> DetectionData:
    """Resolve ``--data``: ``shapes`` or a dataset file (YOLO ``data.yaml``, COCO YAML/JSON,
    VOC folder); see :mod:`cnnkit.data.formats`."""
    if spec == "shapes":
        return shapes_detection(imgsz, seed=seed, **shapes_kwargs)
    if not spec:
        raise DataError("no data given; pass --data shapes or --data PATH (YOLO data.yaml or COCO YAML)")
    from cnnkit.data.formats import read_detection

    return read_detection(spec)


# ---- letterbox, augmentation, mosaic -------------------------------------------------------
def letterbox_params(h: int, w: int, imgsz: int) -> tuple[float, int, int]:
    """``(scale, new_h, new_w)``: the longer side becomes ``imgsz``; pad right and bottom."""
    scale = imgsz / max(h, w)
    return scale, max(1, round(h * scale)), max(1, round(w * scale))


def letterbox(image: torch.Tensor, imgsz: int, boxes: torch.Tensor | None = None):
    """Resize uint8 (3, H, W) so its longer side is ``imgsz`` and pad to a square.

    Returns ``(image, boxes, scale)``; boxes (N, 4) xyxy are scaled the same way.
    """
    h, w = image.shape[-2:]
    scale, nh, nw = letterbox_params(h, w, imgsz)
    if (nh, nw) != (h, w):
        image = F.resize(image, [nh, nw], antialias=True)
    if (nh, nw) != (imgsz, imgsz):
        image = F.pad(image, [0, 0, imgsz - nw, imgsz - nh], fill=PAD_VALUE)
    if boxes is not None:
        boxes = boxes * torch.tensor([nw / w, nh / h, nw / w, nh / h])
    return image, boxes, scale


def letterbox_masks(masks: torch.Tensor, imgsz: int) -> torch.Tensor:
    """Instance masks (N, H, W) placed as :func:`letterbox` places their image: resized
    (nearest) so the longer side is ``imgsz``, padded right and bottom with 0; uint8."""
    n, h, w = masks.shape
    _, nh, nw = letterbox_params(h, w, imgsz)
    m = masks.to(torch.uint8)
    if (nh, nw) != (h, w):
        m = F.resize(m, [nh, nw], interpolation=v2.InterpolationMode.NEAREST_EXACT) if n else m.new_zeros(0, nh, nw)
    if (nh, nw) != (imgsz, imgsz):
        m = torch.nn.functional.pad(m, (0, imgsz - nw, 0, imgsz - nh))
    return m


class RandomOcclusion(v2.Transform):
    """Paste patches over objects: each object, with probability ``p``, gets a rectangle of a
    random flat colour or noise hiding ``frac`` (a random 15-60%) of its box, entering from a
    random side. Boxes stay as they are (the object is still there), so the detector learns to
    find partly hidden objects.
    """

    def __init__(self, p: float = 0.5, frac: tuple[float, float] = (0.15, 0.6)):
        super().__init__()
        self.p, self.frac = p, frac

    def forward(self, *inputs):
        flat = inputs if len(inputs) > 1 else inputs[0]
        image, target = flat
        boxes = target["boxes"]
        if len(boxes) == 0:
            return image, target
        image = image.clone()
        gen = torch.rand(len(boxes)) < self.p
        for (x1, y1, x2, y2), hit in zip(boxes.tolist(), gen.tolist()):
            if not hit:
                continue
            f = float(torch.empty(1).uniform_(*self.frac))
            bw, bh = x2 - x1, y2 - y1
            side = int(torch.randint(4, (1,)))
            if side < 2:  # from the left or right: full height, part of the width
                pw, ph = bw * f, bh * float(torch.empty(1).uniform_(1.0, 1.3))
                px = x1 - 0.1 * bw if side == 0 else x2 - pw + 0.1 * bw
                py = y1 + (bh - ph) / 2
            else:
                pw, ph = bw * float(torch.empty(1).uniform_(1.0, 1.3)), bh * f
                px, py = x1 + (bw - pw) / 2, y1 - 0.1 * bh if side == 2 else y2 - ph + 0.1 * bh
            H, W = image.shape[-2:]
            a, b = max(0, int(py)), min(H, int(math.ceil(py + ph)))
            c, d = max(0, int(px)), min(W, int(math.ceil(px + pw)))
            if b <= a or d <= c:
                continue
            if torch.rand(1) < 0.5:
                image[:, a:b, c:d] = torch.randint(0, 256, (image.shape[0], 1, 1), dtype=image.dtype)
            else:
                image[:, a:b, c:d] = torch.randint(0, 256, (image.shape[0], b - a, d - c), dtype=image.dtype)
        return image, target


def parse_det_aug(spec: str | None, imgsz: int) -> list:
    """Detection augmentation: every :func:`~cnnkit.data.transforms.parse_aug` name (boxes move
    with geometric ones) plus ``occlude=P`` (:class:`RandomOcclusion`) and ``color=S``
    (brightness, contrast and saturation by up to S; ``jitter`` also turns the hue, which costs
    three times as much on a CPU). ``mosaic`` is a
    dataset option (``--mosaic P``), not an item transform."""
    from cnnkit.data.transforms import AUG_NAMES, _num, _prob, parse_aug, split_aug, unknown_aug

    rest, out = [], []
    for name, value in split_aug(spec):
        if name == "occlude":
            out.append(RandomOcclusion(_prob(value, 0.5, name)))
        elif name == "color":
            c = _num(value, 0.3, name)
            out.append(v2.ColorJitter(brightness=c, contrast=c, saturation=c))
        elif name == "mosaic":
            raise DataError("mosaic is not an item augmentation; use --mosaic P")
        elif name not in AUG_NAMES:
            raise unknown_aug(name, AUG_NAMES + ("occlude", "color"))
        else:
            rest.append(f"{name}={value}" if value else name)
    return parse_aug(",".join(rest), imgsz) + out


class DetectionDataset(Dataset):
    """Records -> ``(uint8 (3, S, S), target)`` letterboxed to ``imgsz``.

    ``target``: ``boxes`` float32 (N, 4) xyxy in letterboxed pixels, ``labels`` int64 (N,),
    ``occlusion`` float32 (N,), ``image_id``, ``scale`` (letterboxed / original), ``orig_size``
    ``(H, W)``, ``path``. With ``aug`` the boxes follow the transforms and boxes that end up
    smaller than 2 px are dropped; with ``mosaic > 0`` that share of items is a 2x2 mosaic of
    four random records cropped around a random centre. ``full_masks`` (evaluation) also puts
    each image's masks at its own size in ``orig_masks``. An unreadable image gives
    ``(None, reason)`` and :func:`collate` lists it in ``skipped``. Letterboxed images are
    cached in memory (``cache=None``: when they fit in 2 GB), so later epochs skip decoding;
    with loader workers each worker keeps its own cache for one epoch.
    """

    def __init__(self, records: list[DetRecord], imgsz: int, aug: list | None = None, mosaic: float = 0.0,
                 cache: bool | None = None, masks: bool = False, full_masks: bool = False):
        if masks and mosaic > 0:
            raise DataError("mosaic is not available with instance masks; use --mosaic 0")
        self.records, self.imgsz, self.mosaic, self.masks = records, imgsz, mosaic, masks
        self.full_masks = masks and full_masks
        self.aug = v2.Compose(list(aug) + [v2.SanitizeBoundingBoxes(min_size=2, labels_getter=_labels_getter)]) \
            if aug else None
        if cache is None:  # keep decoded, letterboxed images in memory when they take under 2 GB
            cache = len(records) * 3 * imgsz * imgsz <= CACHE_BYTES
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, i: int) -> torch.Tensor:
        """Decoded and letterboxed uint8 image ``i`` (from the cache after the first read)."""
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        rec = self.records[i]
        img = rec.load()
        h, w = img.shape[-2:]
        if (h, w) != (rec.height, rec.width):
            raise ImageDecodeError(rec.name, f"its size {w}x{h} differs from the {rec.width}x{rec.height} "
                                   "given in the annotations")
        img = letterbox(img, self.imgsz)[0].contiguous()
        if self.cache is not None:
            self.cache[i] = img
        return img

    def _letterboxed(self, i: int):
        rec = self.records[i]
        img = self._image(i)
        scale, nh, nw = letterbox_params(rec.height, rec.width, self.imgsz)
        h, w = rec.height, rec.width
        boxes = torch.from_numpy(rec.boxes.copy()) * torch.tensor([nw / w, nh / h, nw / w, nh / h])
        target = {"boxes": boxes, "labels": torch.from_numpy(rec.labels.copy()),
                  "occlusion": torch.from_numpy(rec.occlusion.copy()), "image_id": rec.image_id,
                  "scale": scale, "orig_size": (int(h), int(w)), "path": rec.path or rec.name}
        if self.masks:
            full = rec.instance_masks()
            target["masks"] = letterbox_masks(torch.from_numpy(full), self.imgsz)
            if self.full_masks:  # evaluation: mask AP is scored against these, in the image's own pixels
                target["orig_masks"] = full
        return img, target

    def _mosaic(self, i: int):
        s = self.imgsz
        idx = [i] + torch.randint(len(self.records), (3,)).tolist()
        canvas = torch.full((3, 2 * s, 2 * s), PAD_VALUE, dtype=torch.uint8)
        boxes, labels, occ = [], [], []
        t0 = None
        for k, j in enumerate(idx):
            img, t = self._letterboxed(j)
            t0 = t if t0 is None else t0
            ox, oy = (k % 2) * s, (k // 2) * s
            canvas[:, oy:oy + s, ox:ox + s] = img
            boxes.append(t["boxes"] + torch.tensor([ox, oy, ox, oy], dtype=torch.float32))
            labels.append(t["labels"])
            occ.append(t["occlusion"])
        cx, cy = torch.randint(s // 2, 3 * s // 2 + 1, (2,)).tolist()
        x0, y0 = cx - s // 2, cy - s // 2
        img = canvas[:, y0:y0 + s, x0:x0 + s].clone()
        b = torch.cat(boxes) - torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
        area0 = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        b = b.clamp(0, s)
        area1 = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        keep = area1 >= 0.25 * area0.clamp(min=1e-6)  # drop objects mostly cut away by the crop
        t0.update(boxes=b[keep], labels=torch.cat(labels)[keep], occlusion=torch.cat(occ)[keep], scale=1.0)
        return img, t0

    def __getitem__(self, i: int):
        try:
            if self.mosaic > 0 and float(torch.rand(1)) < self.mosaic:
                img, target = self._mosaic(i)
            else:
                img, target = self._letterboxed(i)
        except ImageDecodeError as e:
            return None, (e.path, e.reason)
        if self.aug is not None:
            s = self.imgsz
            bb = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(s, s))
            extra = {"masks": tv_tensors.Mask(target["masks"])} if self.masks else {}
            img, t = self.aug(tv_tensors.Image(img), {"boxes": bb, "labels": target["labels"],
                                                      "occlusion": target["occlusion"], **extra})
            target.update(boxes=t["boxes"].as_subclass(torch.Tensor).float(), labels=t["labels"],
                          occlusion=t["occlusion"])
            if self.masks:
                target["masks"] = t["masks"].as_subclass(torch.Tensor)
            img = img.as_subclass(torch.Tensor)
        return img, target


def _labels_getter(inputs):
    """SanitizeBoundingBoxes keeps ``labels`` and ``occlusion`` in step with the boxes."""
    target = inputs[1]
    return target["labels"], target["occlusion"]


def collate(items: list) -> dict:
    """``{"images": uint8 (B, 3, S, S), "targets": [dict], "skipped": [(path, reason)]}``."""
    good = [(x, t) for x, t in items if x is not None]
    skipped = [t for x, t in items if x is None]
    images = torch.stack([x for x, _ in good]) if good else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    return {"images": images, "targets": [t for _, t in good], "skipped": skipped}


def all_boxes_wh(records: list[DetRecord], imgsz: int | None = None) -> np.ndarray:
    """Widths and heights (M, 2) of every box, in letterboxed pixels when ``imgsz`` is given."""
    out = []
    for r in records:
        wh = r.boxes[:, 2:] - r.boxes[:, :2]
        if imgsz is not None:
            wh = wh * letterbox_params(r.height, r.width, imgsz)[0]
        out.append(wh)
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)


def dataset_yaml_dir(path: str | Path) -> Path:
    """The folder relative paths in a dataset YAML are resolved against."""
    return Path(path).resolve().parent
