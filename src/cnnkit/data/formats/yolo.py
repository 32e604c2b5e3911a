"""Ultralytics YOLO detection and segmentation datasets: a ``data.yaml`` plus label text files.

::

    data.yaml            names: [cat, dog]        (or {0: cat, 1: dog}); nc: 2 is optional
                         train: images/train      (a folder, a .txt list of images, or a list)
                         val: images/val
    images/train/a.jpg
    labels/train/a.txt   one object per line, coordinates normalized to 0..1:
                         "class cx cy w h" (a box), or
                         "class x1 y1 x2 y2 x3 y3 ..." (a polygon, Ultralytics' segment format)

The label file of ``.../images/.../a.jpg`` is ``.../labels/.../a.txt`` (the last ``images``
folder in the path becomes ``labels``, as Ultralytics does; without one, the ``.txt`` sits next
to the image). An empty label file means an image without objects.

Paths in ``data.yaml`` are relative to ``path:`` when given, and ``path:`` (or, without it,
every path) is relative to the YAML file's folder; a relative ``path:`` that does not exist
there is tried against the current folder, and a split ``../x`` that does not exist is tried
as ``x`` (as Ultralytics does for Roboflow exports). A ``.txt`` list names one image per line,
relative to the list's folder.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from cnnkit.data.decode import is_image_file
from cnnkit.data.detection import DetectionData, DetRecord
from cnnkit.data.formats import (
    BOX_MESSAGES,
    SPLITS,
    Problems,
    check_names,
    check_splits,
    export_images,
    fit_box,
    fit_polygon,
    image_size,
    load_yaml,
    polygon_box,
    prepare_out_dir,
    shown,
)
from cnnkit.data.formats.polygons import join_polygons, record_polygons
from cnnkit.errors import DataError, ImageDecodeError

MESSAGES = {
    "values": ("{n} label line has a wrong number of values (5 for class cx cy w h, or a class and 3 or "
               "more x y pairs for a polygon); it was skipped ({where})",
               "{n} label lines have a wrong number of values (5 for class cx cy w h, or a class and 3 or "
               "more x y pairs for a polygon); they were skipped ({where})"),
    "numbers": ("{n} label line has values that are not numbers; it was skipped ({where})",
                "{n} label lines have values that are not numbers; they were skipped ({where})"),
    "class": ("{n} object has a class id that is not one of 0..{last} (the classes in names); it was "
              "dropped ({where})",
              "{n} objects have class ids that are not one of 0..{last} (the classes in names); they were "
              "dropped ({where})"),
    **BOX_MESSAGES,
    "nolabel": ("{n} image has no label file; it was read as an image without objects ({where})",
                "{n} images have no label file; they were read as images without objects ({where})"),
    "nosplit": ("{n} split holds no images ({where})", "{n} splits hold no images ({where})"),
}


def read_yolo(path: str | Path) -> DetectionData:
    """Read an Ultralytics ``data.yaml`` (boxes, and polygons from segment lines).

    A polygon line gives the object's polygon (in pixels, in ``DetRecord.polygons``) and a box
    that encloses it; in an image that has polygons, objects given as boxes get an empty
    polygon list. Duplicate lines are kept as they are.

    Bad labels never stop the reading; each kind becomes one sentence in
    ``DetectionData.warnings``: lines with a wrong number of values or with non-numbers
    (skipped), class ids outside ``names`` (object dropped), boxes or polygons reaching outside
    their image (clipped), boxes with no area or entirely outside (dropped), images without a
    label file (read as images without objects), images whose header cannot be read (skipped).

    Args:
        path: the ``data.yaml`` file.

    Raises:
        DataError: the YAML is missing or broken, has no ``names`` (or ``nc`` disagrees with
            them), names no split, names a folder or list that does not exist, or no split
            holds any image.

    Examples:
        >>> data = read_yolo("coco8/data.yaml")
        >>> data.names[:2], len(data.split("train"))
        (['person', 'bicycle'], 4)
    """
    yaml_path = Path(path)
    cfg = load_yaml(yaml_path)
    if "names" not in cfg:
        raise DataError(f"'{yaml_path}' has no 'names' (the class names, e.g. names: [cat, dog])")
    names = check_names(cfg["names"], f"'{yaml_path}'")
    if cfg.get("nc") is not None and cfg["nc"] != len(names):
        raise DataError(f"'{yaml_path}' says nc: {cfg['nc']} but names lists {len(names)} classes")
    root = _root(cfg, yaml_path)
    if not any(cfg.get(s) for s in SPLITS):
        raise DataError(f"'{yaml_path}' names no split; give image folders as train: and val: (and test:)")
    messages = {k: (a.replace("{last}", str(len(names) - 1)), b.replace("{last}", str(len(names) - 1)))
                for k, (a, b) in MESSAGES.items()}
    problems = Problems(messages)
    splits = {}
    for split in SPLITS:
        if not cfg.get(split):
            continue
        images = _split_images(cfg[split], root, split, yaml_path)
        if not images:
            problems.add("nosplit", f"{split}: {cfg[split]}")
        splits[split] = _read_split(images, len(names), root, problems)
    if not any(splits.values()):
        raise DataError(f"no images found in the splits of '{yaml_path}' (looked under {root})")
    name = root.name or yaml_path.resolve().parent.name
    return DetectionData(name, names, splits, problems.sentences())


def _root(cfg: dict[str, Any], yaml_path: Path) -> Path:
    base = yaml_path.resolve().parent
    if not cfg.get("path"):
        return base
    p = Path(str(cfg["path"])).expanduser()
    if p.is_absolute():
        return p
    if not (base / p).exists() and p.exists():
        return p.resolve()
    return Path(os.path.normpath(base / p))


def _split_images(spec: Any, root: Path, split: str, yaml_path: Path) -> list[Path]:
    """Image paths of one split entry: a folder, a .txt list, or a list of those."""
    out: list[Path] = []
    for item in spec if isinstance(spec, list) else [spec]:
        rel = str(item)
        p = Path(os.path.normpath(root / Path(rel).expanduser()))
        if not p.exists() and rel.startswith("../"):
            p = Path(os.path.normpath(root / rel[3:]))
        if not p.exists():
            raise DataError(f"'{yaml_path}' gives {split}: {rel}, but '{p}' does not exist")
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if is_image_file(f) and f.is_file())
        elif p.suffix.lower() == ".txt":
            for line in p.read_text(encoding="utf-8-sig").splitlines():
                if line.strip():
                    out.append(Path(os.path.normpath(p.parent / line.strip())))
        else:
            out.append(p)
    return list(dict.fromkeys(out))


def label_path(image: Path) -> Path:
    """``.../images/.../a.jpg`` -> ``.../labels/.../a.txt`` (the last ``images`` folder)."""
    parts = image.parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            return Path(*parts[:i], "labels", *parts[i + 1:]).with_suffix(".txt")
    return image.with_suffix(".txt")


def _read_split(images: list[Path], num_classes: int, root: Path, problems: Problems) -> list[DetRecord]:
    records = []
    for img in images:
        try:
            w, h = image_size(img)
        except ImageDecodeError as e:
            problems.add("unreadable", f"{shown(img, root)}: {e.reason}")
            continue
        lab = label_path(img)
        boxes, labels, polys = [], [], []
        if not lab.is_file():
            problems.add("nolabel", shown(img, root))
        else:
            text = lab.read_text(encoding="utf-8-sig", errors="replace")
            for ln, line in enumerate(text.splitlines(), 1):
                obj = _parse_line(line, w, h, num_classes, f"{shown(lab, root)} line {ln}", problems)
                if obj is not None:
                    boxes.append(obj[0])
                    labels.append(obj[1])
                    polys.append(obj[2])
        has_polys = any(polys)
        records.append(DetRecord(str(img), w, h, np.array(boxes, np.float32).reshape(-1, 4), labels,
                                 image_id=len(records), polygons=polys if has_polys else None))
    return records


def _parse_line(line: str, w: int, h: int, num_classes: int, where: str, problems: Problems):
    """``(box, class, polygon parts)`` of one label line, or None (the problem is recorded)."""
    tokens = line.split()
    if not tokens:
        return None
    try:
        values = [float(t) for t in tokens]
    except ValueError:
        problems.add("numbers", where)
        return None
    if not all(math.isfinite(v) for v in values):
        problems.add("numbers", where)
        return None
    n = len(values)
    if n != 5 and (n < 7 or n % 2 == 0):
        problems.add("values", f"{where}, {n} values")
        return None
    cls = values[0]
    if not cls.is_integer() or not 0 <= cls < num_classes:
        problems.add("class", f"{where}, class {tokens[0]}")
        return None
    parts = []
    if n == 5:
        cx, cy, bw, bh = values[1] * w, values[2] * h, values[3] * w, values[4] * h
        box, state = fit_box((cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), w, h)
    else:
        points, outside = fit_polygon(np.array(values[1:], np.float64).reshape(-1, 2) * (w, h), w, h)
        parts = [points]
        box, state = fit_box(polygon_box(parts), w, h)
        state = "clipped" if outside and state == "ok" else state
    if state == "empty":
        problems.add("empty", where)
        return None
    if state == "clipped":
        problems.add("clipped", where)
    return box, int(cls), parts


def write_yolo(data: DetectionData, out_dir: str | Path, write_polygons: bool = True,
               overwrite: bool = False) -> Path:
    """Write ``data`` as an Ultralytics dataset; returns the ``data.yaml`` path.

    Layout: ``images/<split>/<name>`` (files are copied under their own name, with ``_1``, ...
    added when two would share a label file; generated pixels become ``{image_id:06d}.png``),
    ``labels/<split>/<stem>.txt`` (coordinates normalized, 6 decimals; an image without objects
    gets an empty file), and ``data.yaml`` with the splits relative to its own folder (no
    ``path:`` key, so Ultralytics and cnnkit both resolve them from the YAML), ``nc`` and
    ``names``. Empty splits are left out.

    With ``write_polygons``, objects that have polygons (or masks, traced exactly along pixel
    edges by :func:`~cnnkit.data.formats.polygons.mask_to_polygons`) are written as segment
    lines (an object of several parts becomes one outline whose parts are joined by zero-width
    bridges, since a line holds one polygon; reading it back gives the box that encloses the
    polygon). COCO category ids are not kept (YOLO numbers classes 0..N-1).

    Raises:
        DataError: ``out_dir`` is not empty (unless ``overwrite``, which replaces its
            ``images/``, ``labels/`` and ``data.yaml``), a split is not train/val/test, or an
            image cannot be copied.
    """
    import yaml

    splits = check_splits(data)
    out = prepare_out_dir(out_dir, ("images", "labels", "data.yaml"), data, overwrite)
    cfg: dict[str, Any] = {}
    for split, records in splits.items():
        names = export_images(records, out / "images" / split)
        label_dir = out / "labels" / split
        label_dir.mkdir(parents=True, exist_ok=True)
        for rec, name in zip(records, names):
            lines = _label_lines(rec, write_polygons)
            (label_dir / Path(name).with_suffix(".txt").name).write_text("".join(lines), encoding="utf-8")
        cfg[split] = f"images/{split}"
    cfg["nc"] = len(data.names)
    cfg["names"] = list(data.names)
    yaml_path = out / "data.yaml"
    header = "# Ultralytics YOLO dataset written by cnnkit; paths are relative to this file's folder\n"
    yaml_path.write_text(header + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return yaml_path


def _label_lines(rec: DetRecord, write_polygons: bool) -> list[str]:
    w, h = rec.width, rec.height
    lines = []
    polygons = record_polygons(rec) if write_polygons else None
    for i, (box, cls) in enumerate(zip(rec.boxes.tolist(), rec.labels.tolist())):
        parts = polygons[i] if polygons is not None else None
        parts = [np.asarray(p, np.float64).reshape(-1, 2) for p in parts or []]
        parts = [p for p in parts if len(p) >= 3]
        if parts:
            pts = join_polygons(parts) / (w, h)
            lines.append(f"{cls} " + " ".join(f"{v:.6f}" for v in pts.ravel()) + "\n")
        else:
            x1, y1, x2, y2 = box
            lines.append(f"{cls} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} "
                         f"{(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}\n")
    return lines
