"""Semantic segmentation data: records, the built-in ``shapes`` masks, mask-folder datasets.

A dataset is a :class:`SegmentationData`: class names (index = pixel value, ``background``
first) and per split a list of :class:`SegRecord` (an image and its class-id mask, as files
or in memory). Pixels equal to ``ignore_index`` (255) count for nothing in losses and metrics.

User data is a YAML file naming the folders (paths relative to the YAML, or to ``path:``)::

    path: .                 # optional root
    train: images/train     # image folder; masks/train holds x.png for every images/train/x.*
    val: images/val
    test: images/test       # optional
    names: [background, road, car]   # or {0: background, 1: road, ...}
    masks: masks            # optional: where mask folders live (default: "images" -> "masks")

Masks are single-channel PNGs whose pixel value is the class id (255 = ignore). Palette
("P" mode) PNGs such as Pascal VOC's are read as their palette indices, which is what VOC
stores (its colours are only a display palette), so ``SegmentationClass/*.png`` masks are read
as they are. Every image in a split folder needs a mask: VOC's ``JPEGImages`` holds many images
without one, so copy the segmentation subset (the ids in ``ImageSets/Segmentation``) into
split folders first; split list files are not read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from cnnkit.errors import DataError, ImageDecodeError

IGNORE_INDEX = 255
SHAPES_SEG_IMGSZ = 128
SHAPES_SEG_SIZES = {"train": 600, "val": 150, "test": 150}
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")


@dataclass
class SegRecord:
    """One image and its mask: files (``path``, ``mask_path``) or arrays (``image`` uint8
    (H, W, 3), ``mask`` uint8 (H, W))."""

    path: str | None = None
    mask_path: str | None = None
    image: np.ndarray | None = None
    mask: np.ndarray | None = None
    image_id: int = 0

    @property
    def name(self) -> str:
        return self.path or f"<image {self.image_id}>"

    def load_image(self) -> torch.Tensor:
        """uint8 (3, H, W)."""
        from cnnkit.data.decode import read_image

        return read_image(self.image if self.image is not None else self.path, channels=3).contiguous()

    def load_mask(self) -> torch.Tensor:
        """uint8 (H, W) class ids."""
        if self.mask is not None:
            return torch.from_numpy(np.ascontiguousarray(self.mask, dtype=np.uint8))
        return torch.from_numpy(read_mask(self.mask_path))


@dataclass
class SegmentationData:
    """Class names (pixel value = index) and records per split."""

    name: str
    names: list[str]
    splits: dict[str, list[SegRecord]]
    warnings: list[str] | None = None

    def split(self, name: str) -> list[SegRecord]:
        if name not in self.splits:
            raise DataError(f"dataset '{self.name}' has no '{name}' split (it has {', '.join(self.splits)})")
        return self.splits[name]


def read_mask(path: str | Path) -> np.ndarray:
    """A class-id mask as uint8 (H, W). "P" (palette) images give their indices, "L"/"I"
    their values; colour (RGB) masks are refused, since a colour has no class id without a
    palette.

    Raises:
        DataError: the file is missing, empty, not an image, or has colour channels.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"mask '{p}' does not exist")
    if p.stat().st_size == 0:
        raise DataError(f"mask '{p}' is an empty file")
    try:
        with Image.open(p) as im:
            im.load()
            if im.mode in ("P", "L"):
                arr = np.asarray(im, dtype=np.uint8)
            elif im.mode in ("I", "I;16", "I;16B", "F", "1"):
                arr = np.asarray(im)
                if arr.size and (arr.min() < 0 or arr.max() > 255):
                    raise DataError(f"mask '{p}' has values outside 0..255; class ids must fit in 8 bits")
                arr = arr.astype(np.uint8)
            elif im.mode == "LA":
                arr = np.asarray(im.getchannel(0), dtype=np.uint8)
            else:
                raise DataError(f"mask '{p}' is a {im.mode} colour image; masks must be single-channel class ids "
                                "(mode L, or a palette PNG like Pascal VOC's)")
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"mask '{p}' cannot be read as an image ({e.__class__.__name__})") from None
    return np.array(arr, dtype=np.uint8, copy=True)


def write_mask(path: str | Path, mask: np.ndarray, palette: bool = True) -> None:
    """Save class ids as a PNG: a palette PNG (ids in the pixels, colours for viewing) when
    ``palette``, else grayscale."""
    from PIL import Image

    im = Image.fromarray(np.asarray(mask, np.uint8), mode="L")
    if palette:
        im = im.convert("P")
        im.putpalette(palette_bytes())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def palette_bytes() -> list[int]:
    """A 256-colour palette: Pascal VOC's bit-interleaved colours, index 255 white (ignore)."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    pal[255 * 3:] = [255, 255, 255]
    return pal


# ---- built-in shapes ------------------------------------------------------------------------
def shapes_segmentation_params(imgsz: int = SHAPES_SEG_IMGSZ, max_objects: int = 4):
    """Scene settings of the ``shapes`` segmentation data: 1..max_objects objects of 15-55% of
    the image, overlaps, a third partly hidden by occluders, lighting changes and noise."""
    from cnnkit.data.shapes import SceneParams

    return SceneParams(imgsz=imgsz, min_objects=1, max_objects=max_objects, size_range=(0.15, 0.55),
                       clutter=0.5, occlusion=0.33, max_occlusion=0.5, lighting=0.5, noise=0.02)


def shapes_segmentation(imgsz: int | None = None, sizes: dict[str, int] | None = None, seed: int = 0,
                        num_classes: int = 4, max_objects: int = 4) -> SegmentationData:
    """The built-in ``shapes`` segmentation dataset: per-pixel class masks of rendered scenes
    (``background`` plus the first ``num_classes`` shape classes), deterministic in ``seed``.

    Args:
        imgsz: image side (default 128).
        sizes: images per split (default train 600, val 150, test 150).
        num_classes: shape classes (1..8), not counting background.
        max_objects: at most this many objects per image.
    """
    from cnnkit.data.shapes import _SPLITS, SHAPE_CLASSES, sample_scene

    if not 1 <= num_classes <= len(SHAPE_CLASSES):
        raise DataError(f"shapes has 1 to {len(SHAPE_CLASSES)} classes, got {num_classes}")
    params = shapes_segmentation_params(imgsz or SHAPES_SEG_IMGSZ, max_objects)
    sizes = dict(SHAPES_SEG_SIZES) if sizes is None else dict(sizes)
    splits: dict[str, list[SegRecord]] = {}
    for sp, n in sizes.items():
        recs = []
        for i in range(n):
            rng = np.random.default_rng([seed, _SPLITS[sp], i, 0x5E6])
            count = int(rng.integers(params.min_objects, params.max_objects + 1))
            scene = sample_scene(params, rng, classes=rng.integers(0, num_classes, count))
            recs.append(SegRecord(image=scene.image, mask=scene.semantic_mask(), image_id=i))
        splits[sp] = recs
    return SegmentationData("shapes", ["background", *SHAPE_CLASSES[:num_classes]], splits)


# ---- mask folders ---------------------------------------------------------------------------
def read_mask_folders(path: str | Path) -> SegmentationData:
    """A dataset YAML naming image folders per split (masks in the parallel ``masks/`` tree).

    Raises:
        DataError: no such file, no class names, a split folder missing or empty, or an image
            without a mask.
    """
    import yaml

    from cnnkit.data.decode import is_image_file
    from cnnkit.data.detection import dataset_yaml_dir

    p = Path(path)
    if not p.is_file():
        raise DataError(f"'{p}' does not exist; give 'shapes' or a segmentation YAML "
                        "(train/val image folders, masks/ beside images/, names)")
    try:
        spec = yaml.safe_load(p.read_text(encoding="utf-8-sig")) or {}
    except yaml.YAMLError as e:
        raise DataError(f"'{p}' is not valid YAML ({e.__class__.__name__})") from None
    if not isinstance(spec, dict):
        raise DataError(f"'{p}' must be a mapping with train, val and names")
    names = spec.get("names")
    if isinstance(names, dict):
        try:
            keys = sorted(int(k) for k in names)
        except ValueError:
            raise DataError(f"the names in '{p}' must be a list or a mapping from class id to name") from None
        if keys != list(range(len(keys))):
            raise DataError(f"the class ids in '{p}' must run 0..{len(keys) - 1} without gaps")
        names = [str(names[k] if k in names else names[str(k)]) for k in keys]
    if not isinstance(names, list) or len(names) < 2:
        raise DataError(f"'{p}' must list at least two class names under 'names' (background first)")
    if len(names) > IGNORE_INDEX:
        raise DataError(f"'{p}' lists {len(names)} classes; at most {IGNORE_INDEX} fit beside the ignore value 255")
    root = dataset_yaml_dir(p) / str(spec.get("path", "."))
    splits: dict[str, list[SegRecord]] = {}
    for sp in ("train", "val", "test"):
        if sp not in spec or spec[sp] in (None, ""):
            continue
        img_dir = (root / str(spec[sp])).resolve()
        if not img_dir.is_dir():
            raise DataError(f"the {sp} image folder '{img_dir}' named in '{p}' does not exist")
        mask_dir = _mask_dir(root, img_dir, spec.get("masks"))
        files = sorted(f for f in img_dir.rglob("*") if f.is_file() and is_image_file(f) and not f.name.startswith("."))
        if not files:
            raise DataError(f"the {sp} image folder '{img_dir}' has no images")
        recs = []
        for i, f in enumerate(files):
            rel = f.relative_to(img_dir).parent / f.stem  # 'scan.001.jpg' -> 'scan.001' (not 'scan')
            m = next((p for p in (mask_dir / f"{rel}{s}" for s in MASK_SUFFIXES) if p.is_file()), None)
            if m is None:
                raise DataError(f"image '{f}' has no mask in '{mask_dir}' (expected {rel}.png)")
            recs.append(SegRecord(path=str(f), mask_path=str(m), image_id=i))
        splits[sp] = recs
    if "train" not in splits and "val" not in splits:
        raise DataError(f"'{p}' names no train or val image folder")
    return SegmentationData(str(p), [str(n) for n in names], splits, [])


def _mask_dir(root: Path, img_dir: Path, masks: Any) -> Path:
    """``masks/<split>`` beside ``images/<split>``, or ``<masks>/<split>`` when the YAML says."""
    if masks:
        return (root / str(masks) / img_dir.name).resolve()
    parts = list(img_dir.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "masks"
            return Path(*parts)
        if parts[i] == "JPEGImages":  # Pascal VOC layout
            parts[i] = "SegmentationClass"
            return Path(*parts)
    return img_dir.parent / "masks" / img_dir.name


def load_segmentation_data(spec: str, imgsz: int | None = None, seed: int = 0, **shapes_kwargs) -> SegmentationData:
    """Resolve ``--data``: ``shapes`` or a segmentation YAML."""
    if spec == "shapes":
        return shapes_segmentation(imgsz, seed=seed, **shapes_kwargs)
    return read_mask_folders(spec)


# ---- dataset ------------------------------------------------------------------------------
class SegmentationDataset(Dataset):
    """Records -> ``(uint8 (3, S, S), (int64 (S, S) mask, meta))`` at ``imgsz``, with
    augmentation applied to image and mask alike (masks nearest-neighbour).

    ``mode``: ``resize`` scales every image to ``imgsz`` x ``imgsz`` (images bilinear, masks
    nearest); ``crop`` keeps the original resolution and takes an ``imgsz`` crop (random in
    training, centred otherwise), padding smaller images (mask padding is ignored, 255).
    ``imgsz=None`` keeps the original size.

    Masks are checked against their image and the class list: a size mismatch or a class id
    beyond ``num_classes`` (other than 255) raises :class:`~cnnkit.errors.DataError`, since
    training on them would silently learn wrong labels. Unreadable images give ``(None, reason)``
    and :func:`collate_segmentation` lists them in ``skipped``.
    """

    def __init__(self, records: list[SegRecord], imgsz: int | None, num_classes: int, aug: list | None = None,
                 mode: str = "resize", train: bool = True):
        if mode not in ("resize", "crop"):
            raise ValueError(f"mode must be resize or crop, got {mode!r}")
        self.records, self.imgsz, self.num_classes = records, imgsz, num_classes
        self.mode, self.train = mode, train
        self.aug = v2.Compose(aug) if aug else None

    def __len__(self) -> int:
        return len(self.records)

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Original-size uint8 image (3, H, W) and mask (H, W), checked."""
        rec = self.records[i]
        img = rec.load_image()
        mask = rec.load_mask()
        if tuple(mask.shape) != tuple(img.shape[-2:]):
            raise DataError(f"mask '{rec.mask_path or rec.name}' is {mask.shape[1]}x{mask.shape[0]} but its image "
                            f"is {img.shape[2]}x{img.shape[1]}; every mask must match its image's size")
        bad = mask[(mask >= self.num_classes) & (mask != IGNORE_INDEX)]
        if bad.numel():
            raise DataError(f"mask '{rec.mask_path or rec.name}' has class id {int(bad.max())}, beyond the "
                            f"{self.num_classes} classes listed (ids 0..{self.num_classes - 1}, 255 = ignore)")
        return img, mask

    def _crop(self, img: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.imgsz
        h, w = img.shape[-2:]
        ph, pw = max(0, s - h), max(0, s - w)
        if ph or pw:
            img = F.pad(img, (0, pw, 0, ph), value=0)
            mask = F.pad(mask, (0, pw, 0, ph), value=IGNORE_INDEX)
            h, w = img.shape[-2:]
        if self.train:
            y0, x0 = int(torch.randint(h - s + 1, (1,))), int(torch.randint(w - s + 1, (1,)))
        else:
            y0, x0 = (h - s) // 2, (w - s) // 2
        return img[:, y0:y0 + s, x0:x0 + s], mask[y0:y0 + s, x0:x0 + s]

    def __getitem__(self, i: int):
        try:
            img, mask = self.load(i)
        except ImageDecodeError as e:
            return None, (e.path, e.reason)
        h, w = img.shape[-2:]
        s = self.imgsz
        if s and self.mode == "crop":
            img, mask = self._crop(img, mask)
        img, mask = tv_tensors.Image(img), tv_tensors.Mask(mask[None])
        if s and self.mode == "resize" and (h, w) != (s, s):
            img = v2.functional.resize(img, [s, s], antialias=True)
            mask = v2.functional.resize(mask, [s, s], interpolation=v2.InterpolationMode.NEAREST_EXACT)
        if self.aug is not None:
            img, mask = self.aug(img, mask)
        return img.as_subclass(torch.Tensor), (mask.as_subclass(torch.Tensor)[0].long(),
                                               {"orig_size": (int(h), int(w)), "index": i})


def collate_segmentation(items: list) -> dict:
    """``{"images": uint8 (B, 3, S, S), "masks": int64 (B, S, S), "meta": [...], "skipped": [...]}``."""
    good = [(x, t) for x, t in items if x is not None]
    skipped = [t for x, t in items if x is None]
    if not good:
        return {"images": torch.zeros(0, 3, 1, 1, dtype=torch.uint8), "masks": torch.zeros(0, 1, 1, dtype=torch.long),
                "meta": [], "skipped": skipped}
    return {"images": torch.stack([x for x, _ in good]), "masks": torch.stack([t[0] for _, t in good]),
            "meta": [t[1] for _, t in good], "skipped": skipped}


def write_mask_folders(data: SegmentationData, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``data`` as ``images/<split>/*.png``, ``masks/<split>/*.png`` (palette PNGs of
    class ids) and ``data.yaml``; returns the YAML's path. Files that exist on disk are
    copied under their own names; in-memory images are numbered.

    Raises:
        DataError: ``out`` holds files and ``overwrite`` is False.
    """
    import shutil

    import yaml
    from PIL import Image

    root = Path(out)
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise DataError(f"'{root}' is not empty; choose a new folder or pass --overwrite")
    for sub in ("images", "masks"):
        shutil.rmtree(root / sub, ignore_errors=True)
    for split, recs in data.splits.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        for r in recs:
            stem = Path(r.path).stem if r.path else f"{r.image_id:06d}"
            if r.path:
                shutil.copy2(r.path, root / "images" / split / Path(r.path).name)
            else:
                Image.fromarray(np.asarray(r.image, np.uint8)).save(root / "images" / split / f"{stem}.png")
            write_mask(root / "masks" / split / f"{stem}.png", r.load_mask().numpy())
    spec = {"path": ".", **{s: f"images/{s}" for s in data.splits}, "names": list(data.names)}
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path
