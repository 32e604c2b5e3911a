"""Readers and writers of the formats the ecosystem already uses (a converter is one reader
plus one writer).

Detection datasets (boxes, plus polygons for instance segmentation) are read into one
:class:`~cnnkit.data.detection.DetectionData`:

- ``yolo``: an Ultralytics ``data.yaml`` with ``images/`` and ``labels/`` folders
  (:mod:`cnnkit.data.formats.yolo`; read and write);
- ``coco``: a COCO ``instances`` JSON file, or a YAML naming one JSON and one image folder per
  split (:mod:`cnnkit.data.formats.coco`; read and write);
- ``voc``: a Pascal VOC folder with ``Annotations/*.xml`` (:mod:`cnnkit.data.formats.voc`;
  read only).

:func:`read_detection` picks the reader from the path and :func:`write_detection` writes YOLO
or COCO. Readers never stop at a bad label: they skip what is unsafe to use (clipping boxes
that stick out of their image) and report each kind of problem once in
``DetectionData.warnings``, with how many there were and where the first one is. A dataset
that cannot be used at all (no such file, no images, no class names) raises
:class:`~cnnkit.errors.DataError`.

Examples:
    >>> data = read_detection("coco/annotations/instances_val2017.json")
    >>> write_detection(data, "coco-as-yolo", "yolo")
    PosixPath('coco-as-yolo/data.yaml')
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnkit.errors import DataError

if TYPE_CHECKING:
    import numpy as np

    from cnnkit.data.detection import DetectionData, DetRecord

DETECTION_FORMATS = ("yolo", "coco", "voc")  # read by read_detection; yolo and coco can be written
DETECTION_WRITERS = ("yolo", "coco")
SPLITS = ("train", "val", "test")  # the splits every detection format names
ACCEPTED = ("a YOLO data.yaml, a COCO .json file, a COCO YAML (per split: images, annotations), "
            "or a Pascal VOC folder (with Annotations/)")


def read_detection(path: str | Path, fmt: str = "auto") -> DetectionData:
    """Read a detection dataset in any supported format.

    Args:
        path: a YOLO ``data.yaml``; a COCO ``.json`` file; a COCO YAML whose ``train``/``val``/
            ``test`` entries each name ``images`` (a folder) and ``annotations`` (a JSON file);
            or a Pascal VOC folder (one that holds ``Annotations/``).
        fmt: ``auto`` (decide from the path as above), ``yolo``, ``coco`` or ``voc``.

    Raises:
        DataError: the path does not exist, is none of the forms above, or cannot be used.
    """
    p = Path(path)
    if fmt not in ("auto", *DETECTION_FORMATS):
        raise DataError(f"unknown detection format '{fmt}'; use auto or one of {', '.join(DETECTION_FORMATS)}")
    if not p.exists():
        raise DataError(f"'{p}' does not exist; give {ACCEPTED}")
    if fmt == "auto":
        fmt = _guess_format(p)
    if fmt == "voc":
        from cnnkit.data.formats.voc import read_voc

        return read_voc(p)
    if fmt == "coco":
        from cnnkit.data.formats.coco import read_coco

        return read_coco(p)
    from cnnkit.data.formats.yolo import read_yolo

    return read_yolo(p)


def _guess_format(p: Path) -> str:
    if p.is_dir():
        if (p / "Annotations").is_dir():
            return "voc"
        raise DataError(f"'{p}' is a folder without Annotations/, so not a Pascal VOC dataset; give {ACCEPTED}")
    suffix = p.suffix.lower()
    if suffix == ".json":
        return "coco"
    if suffix in (".yaml", ".yml"):
        cfg = load_yaml(p)
        coco = any(isinstance(cfg.get(s), dict) and "annotations" in cfg[s] for s in SPLITS)
        return "coco" if coco else "yolo"
    raise DataError(f"cannot tell the format of '{p}'; give {ACCEPTED}")


def write_detection(data: DetectionData, out_dir: str | Path, fmt: str, overwrite: bool = False) -> Path:
    """Write ``data`` as a ``yolo`` or ``coco`` dataset into ``out_dir``; returns the dataset
    file to read it back with (``data.yaml`` or ``coco.yaml``). See
    :func:`~cnnkit.data.formats.yolo.write_yolo` and :func:`~cnnkit.data.formats.coco.write_coco`."""
    if fmt == "yolo":
        from cnnkit.data.formats.yolo import write_yolo

        return write_yolo(data, out_dir, overwrite=overwrite)
    if fmt == "coco":
        from cnnkit.data.formats.coco import write_coco

        return write_coco(data, out_dir, overwrite=overwrite)
    raise DataError(f"cannot write detection format '{fmt}'; use one of {', '.join(DETECTION_WRITERS)}")


# ---- shared by the detection readers and writers --------------------------------------------
CLIP_TOLERANCE = 0.05  # px a coordinate may stick out of its image before that counts as a problem
_ORIENTATION = 0x0112  # the EXIF orientation tag


class Problems:
    """Collects problems by kind; each kind becomes one warning sentence with its count and the
    place of the first one.

    ``messages`` maps a kind to its (singular, plural) sentence; ``{n}`` is the count and
    ``{where}`` the first place (written ``first: PLACE`` when there are several). Sentences
    come out in the order of ``messages``.
    """

    def __init__(self, messages: dict[str, tuple[str, str]]):
        self.messages = messages
        self._seen: dict[str, list] = {}

    def add(self, kind: str, where: str) -> None:
        entry = self._seen.setdefault(kind, [0, where])
        entry[0] += 1

    def count(self, kind: str) -> int:
        return self._seen.get(kind, [0])[0]

    def sentences(self) -> list[str]:
        out = []
        for kind, (one, many) in self.messages.items():
            if kind in self._seen:
                n, first = self._seen[kind]
                out.append((one if n == 1 else many).format(n=n, where=first if n == 1 else f"first: {first}"))
        return out


BOX_MESSAGES = {
    "clipped": ("{n} box reached outside its image; it was clipped to the image ({where})",
                "{n} boxes reached outside their image; they were clipped to the image ({where})"),
    "empty": ("{n} box had no area or lay entirely outside its image; it was dropped ({where})",
              "{n} boxes had no area or lay entirely outside their image; they were dropped ({where})"),
    "unreadable": ("{n} image cannot be read; it was skipped ({where})",
                   "{n} images cannot be read; they were skipped ({where})"),
    "resized": ("{n} image has a size in its file that differs from its annotation; the file's size was "
                "used ({where})",
                "{n} images have a size in their file that differs from their annotation; the file's size "
                "was used ({where})"),
}


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image file as :func:`~cnnkit.data.decode.read_image` returns it
    (EXIF orientations 5-8 swap the sides), read from the header only.

    A PNG whose EXIF block comes after the pixel data is taken as upright (finding that block
    would mean decoding the whole image).

    Raises:
        ImageDecodeError: the file is missing or not an image Pillow can identify.
    """
    from PIL import Image, UnidentifiedImageError

    from cnnkit.errors import ImageDecodeError

    p = Path(path)
    if not p.is_file():
        raise ImageDecodeError(str(p), "the file does not exist" if not p.exists() else "it is not a file")
    try:
        with Image.open(p) as im:
            w, h = im.size
            orientation = 1
            if im.format != "PNG" or "exif" in im.info:
                orientation = im.getexif().get(_ORIENTATION, 1)
    except UnidentifiedImageError:
        raise ImageDecodeError(str(p), "not an image file Pillow can identify") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(str(p), f"corrupt ({str(e).strip() or type(e).__name__})") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def fit_box(box: Iterable[float], w: int, h: int) -> tuple[tuple[float, ...] | None, str]:
    """Clip a pixel ``xyxy`` box to a ``w`` x ``h`` image.

    Returns ``(box, state)``: state ``ok``, ``clipped`` (it reached more than
    :data:`CLIP_TOLERANCE` px outside the image and was clipped) or ``empty`` (no area, or
    nothing of it inside the image; the box is None).
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    c = (max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h)))
    if not (x2 > x1 and y2 > y1 and c[2] > c[0] and c[3] > c[1]):
        return None, "empty"
    t = CLIP_TOLERANCE
    outside = x1 < -t or y1 < -t or x2 > w + t or y2 > h + t
    return c, "clipped" if outside else "ok"


def fit_polygon(points: np.ndarray, w: int, h: int) -> tuple[np.ndarray, bool]:
    """Points (K, 2) clipped to the image, and whether any was more than
    :data:`CLIP_TOLERANCE` px outside it."""
    import numpy as np

    t = CLIP_TOLERANCE
    outside = bool((points < -t).any() or (points[:, 0] > w + t).any() or (points[:, 1] > h + t).any())
    return np.clip(points, 0, (w, h)).astype(np.float32), outside


def polygon_box(parts: list[np.ndarray]) -> tuple[float, float, float, float]:
    """The box that encloses every part of a polygon."""
    import numpy as np

    pts = np.concatenate(parts)
    return float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())


def load_yaml(path: Path) -> dict[str, Any]:
    """A dataset YAML as a dict, with one-sentence errors for a missing or broken file."""
    import yaml

    if not path.is_file():
        raise DataError(f"dataset file '{path}' does not exist" if not path.exists()
                        else f"'{path}' is a folder; give the dataset's YAML file inside it")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"dataset file '{path}' is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise DataError(f"dataset file '{path}' must hold a mapping (keys such as train, val, names)")
    return cfg


def check_names(names: Any, source: str) -> list[str]:
    """Class names given as a list, or as a ``{index: name}`` mapping numbering 0..N-1."""
    if isinstance(names, dict):
        try:
            by_index = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise DataError(f"'names' in {source} must map class indices 0, 1, ... to names") from None
        if sorted(by_index) != list(range(len(by_index))):
            raise DataError(f"'names' in {source} must number the classes 0..{len(by_index) - 1} without gaps, "
                            f"got {sorted(by_index)}")
        names = [by_index[i] for i in range(len(by_index))]
    if not isinstance(names, list) or not names:
        raise DataError(f"'names' in {source} must be a non-empty list of class names (or {{index: name}})")
    return [str(n) for n in names]


def shown(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when it is inside it (shorter warnings), else as it is."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def prepare_out_dir(out_dir: str | Path, owned: tuple[str, ...], data: DetectionData, overwrite: bool) -> Path:
    """Make ``out_dir`` ready for a writer that creates the entries ``owned``.

    A folder that is not empty is refused unless ``overwrite``, which deletes only ``owned``
    (and refuses when the records' own images lie inside ``out_dir``).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"output '{out}' is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"output folder '{out}' is not empty; give a new or empty folder, or overwrite it "
                            f"(--overwrite; it replaces {', '.join(owned)} there)")
        top = out.resolve()
        for rec in (r for recs in data.splits.values() for r in recs):
            if rec.path is not None and Path(rec.path).resolve().is_relative_to(top):
                raise DataError(f"cannot overwrite '{out}': the dataset's own images are inside it "
                                f"(e.g. {rec.path}); write to another folder")
        for name in owned:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_splits(data: DetectionData) -> dict[str, list[DetRecord]]:
    """The non-empty splits, refusing split names the formats cannot hold."""
    bad = [s for s in data.splits if s not in SPLITS]
    if bad:
        raise DataError(f"split '{bad[0]}' cannot be written; detection datasets have the splits "
                        f"{', '.join(SPLITS)}")
    return {s: recs for s, recs in data.splits.items() if recs}


def export_images(records: list[DetRecord], folder: Path) -> list[str]:
    """Put each record's image into ``folder``; returns the file names, in record order.

    Files are copied under their own name; pixels held in memory are saved as
    ``{image_id:06d}.png``. Names whose stem is already taken (``a.jpg`` and ``a.png`` would
    share the label file ``a.txt``) get ``_1``, ``_2``, ... appended.
    """
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    names = []
    for rec in records:
        if rec.path is not None:
            src = Path(rec.path)
            stem, suffix = src.stem, src.suffix
        elif rec.image is not None:
            stem, suffix = f"{rec.image_id:06d}", ".png"
        else:
            raise DataError(f"record '{rec.name}' has neither a file nor pixels; nothing to write")
        name, k = stem, 0
        while name.lower() in taken:
            k += 1
            name = f"{stem}_{k}"
        taken.add(name.lower())
        name += suffix
        if rec.path is not None:
            try:
                shutil.copyfile(rec.path, folder / name)
            except OSError as e:
                raise DataError(f"cannot copy image '{rec.path}' ({e.strerror or e})") from None
        else:
            Image.fromarray(rec.image).save(folder / name)
        names.append(name)
    return names
