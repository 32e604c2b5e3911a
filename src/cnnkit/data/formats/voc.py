"""Pascal VOC detection datasets (read only)::

    VOC2012/
        Annotations/2008_000008.xml     one XML per image: filename, size, object (name, bndbox)
        JPEGImages/2008_000008.jpg
        ImageSets/Main/train.txt        optional: image ids (file stems) per split

VOC pixel coordinates are 1-based and inclusive, so ``xmin - 1, ymin - 1, xmax, ymax`` are
cnnkit's ``xyxy`` (0-based, ``x2``/``y2`` exclusive).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from cnnkit.data.decode import is_image_file
from cnnkit.data.detection import DetectionData, DetRecord
from cnnkit.data.formats import BOX_MESSAGES, SPLITS, Problems, fit_box, image_size, shown
from cnnkit.errors import DataError, ImageDecodeError

MESSAGES = {
    "xml": ("{n} annotation file is not valid XML; its image was skipped ({where})",
            "{n} annotation files are not valid XML; their images were skipped ({where})"),
    "noxml": ("{n} image id listed in ImageSets/Main has no annotation file; it was skipped ({where})",
              "{n} image ids listed in ImageSets/Main have no annotation file; they were skipped ({where})"),
    "bndbox": ("{n} object has no name or no numeric bndbox (xmin, ymin, xmax, ymax); it was skipped "
               "({where})",
               "{n} objects have no name or no numeric bndbox (xmin, ymin, xmax, ymax); they were skipped "
               "({where})"),
    "class": ("{n} object has a class name that is not in names; it was dropped ({where})",
              "{n} objects have class names that are not in names; they were dropped ({where})"),
    **BOX_MESSAGES,
}


def read_voc(path: str | Path, names: list[str] | None = None) -> DetectionData:
    """Read a Pascal VOC folder (``Annotations/*.xml`` and ``JPEGImages/``).

    Splits come from ``ImageSets/Main/{train,val,test}.txt`` when any of them exists (only
    ``trainval.txt``: it becomes ``train``); otherwise every annotation is in ``train``. The
    image is ``JPEGImages/<filename>`` from the XML (else the image named like the XML); its size is read from
    the file, as training reads it. Objects marked ``difficult`` are kept as ordinary objects
    (VOC's own mAP ignores them; cnnkit trains and scores on them). Class names are the sorted
    unique ``<name>`` values of all files, unless ``names`` is given (then objects of other
    classes are dropped with a warning).

    Bad entries never stop the reading; each kind becomes one sentence in
    ``DetectionData.warnings``: XML files that cannot be parsed and images that are missing or
    unreadable (skipped), split entries without an XML (skipped), objects without a name or a
    numeric box (skipped), boxes reaching outside their image (clipped) or with no area
    (dropped), images whose file size differs from the XML's.

    Raises:
        DataError: the folder or its ``Annotations/`` is missing, or no image can be read.

    Examples:
        >>> data = read_voc("VOCdevkit/VOC2012")
        >>> sorted(data.splits), data.names[:3]
        (['train', 'val'], ['aeroplane', 'bicycle', 'bird'])
    """
    root = Path(path)
    ann_dir = root / "Annotations"
    if not ann_dir.is_dir():
        raise DataError(f"'{root}' is not a Pascal VOC folder: it has no Annotations/ folder"
                        if root.is_dir() else f"Pascal VOC folder '{root}' does not exist")
    problems = Problems(MESSAGES)
    split_ids = _split_ids(root)
    parsed = {}  # stem -> (xml root, xml path) of every readable file
    stems = sorted({s for ids in split_ids.values() for s in ids}) if split_ids else \
        sorted(p.stem for p in ann_dir.glob("*.xml"))
    for stem in stems:
        xml = ann_dir / f"{stem}.xml"
        if not xml.is_file():
            problems.add("noxml", stem)
            continue
        try:
            parsed[stem] = ET.parse(xml).getroot()
        except (ET.ParseError, OSError) as e:
            problems.add("xml", f"{shown(xml, root)}: {e}")
    if names is None:
        names = sorted({(o.findtext("name") or "").strip() for x in parsed.values() for o in x.iter("object")} - {""})
    if not names:
        raise DataError(f"no objects with a <name> found in '{ann_dir}'; cannot tell the class names")
    index = {n: i for i, n in enumerate(names)}
    splits = {}
    for split, ids in (split_ids or {"train": stems}).items():
        records = []
        for stem in ids:
            if stem in parsed:
                rec = _record(parsed[stem], stem, root, index, len(records), problems)
                if rec is not None:
                    records.append(rec)
        splits[split] = records
    if not any(splits.values()):
        raise DataError(f"none of the images of '{root}' could be read (looked in {root / 'JPEGImages'})")
    return DetectionData(root.resolve().name, list(names), splits, problems.sentences())


def _split_ids(root: Path) -> dict[str, list[str]]:
    main = root / "ImageSets" / "Main"
    files = {s: main / f"{s}.txt" for s in SPLITS if (main / f"{s}.txt").is_file()}
    if not files and (main / "trainval.txt").is_file():
        files = {"train": main / "trainval.txt"}
    return {s: [ln.split()[0] for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
            for s, f in files.items()}


def _record(x: ET.Element, stem: str, root: Path, index: dict[str, int], image_id: int,
            problems: Problems) -> DetRecord | None:
    filename = (x.findtext("filename") or "").strip() or f"{stem}.jpg"
    path = root / "JPEGImages" / filename
    if not path.exists():  # a <filename> without or with another extension: look for the stem
        path = next((p for p in sorted(path.parent.glob(f"{stem}.*")) if is_image_file(p)), path)
    try:
        w, h = image_size(path)
    except ImageDecodeError as e:
        problems.add("unreadable", f"{shown(path, root)}: {e.reason}")
        return None
    size = (_number(x.find("size"), "width"), _number(x.find("size"), "height"))
    if None not in size and size != (0, 0) and size != (w, h):
        problems.add("resized", f"{shown(path, root)}: {w}x{h}, not {size[0]:g}x{size[1]:g}")
    boxes, labels = [], []
    for k, obj in enumerate(x.iter("object"), 1):
        where = f"Annotations/{stem}.xml object {k}"
        name = (obj.findtext("name") or "").strip()
        coords = [_number(obj.find("bndbox"), t) for t in ("xmin", "ymin", "xmax", "ymax")]
        if not name or None in coords:
            problems.add("bndbox", where)
            continue
        if name not in index:
            problems.add("class", f"{where}, {name}")
            continue
        x1, y1, x2, y2 = coords
        box, state = fit_box((x1 - 1, y1 - 1, x2, y2), w, h)
        if state != "ok":
            problems.add(state, where)
        if box is not None:
            boxes.append(box)
            labels.append(index[name])
    return DetRecord(str(path), w, h, np.array(boxes, np.float32).reshape(-1, 4), labels, image_id=image_id)


def _number(parent: ET.Element | None, tag: str) -> float | None:
    if parent is None:
        return None
    try:
        v = float((parent.findtext(tag) or "").strip())
    except ValueError:
        return None
    return v if np.isfinite(v) else None
