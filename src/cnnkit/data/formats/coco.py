"""COCO detection datasets: ``instances`` JSON files with ``images``, ``annotations`` and
``categories``.

Two ways to point at one:

- a single JSON file, read as the split ``val``; its images are found under ``images/`` next to
  the JSON, or at ``file_name`` relative to the JSON's folder (for a JSON inside
  ``annotations/``, also in ``../images/<stem>/`` as :func:`write_coco` lays them out, and in
  ``../val2017/`` for ``instances_val2017.json`` as COCO's download does);
- a YAML naming an image folder and a JSON file per split (paths relative to the YAML's folder),
  optionally with ``names`` to check or rename the classes::

      train: {images: images/train, annotations: annotations/train.json}
      val: {images: images/val, annotations: annotations/val.json}
      names: [cat, dog]

Category ids (any integers) become class indices 0..N-1 in sorted id order; the original ids are
kept in ``DetectionData.category_ids`` and written back by :func:`write_coco`. Boxes are COCO's
``[x, y, w, h]`` in pixels, turned into ``xyxy``. Segmentations may be polygons or RLE
(compressed or not); an RLE mask is traced into pixel-edge polygons that rasterize back to
the same pixels (:mod:`cnnkit.data.formats.polygons`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

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
from cnnkit.data.formats.polygons import mask_to_polygons, record_polygons
from cnnkit.errors import DataError, ImageDecodeError

MESSAGES = {
    "noimage": ("{n} annotation refers to an image id that is not in 'images' ({where}); it was skipped",
                "{n} annotations refer to image ids that are not in 'images' ({where}); they were skipped"),
    "category": ("{n} annotation has a category id that is not in 'categories' ({where}); it was skipped",
                 "{n} annotations have category ids that are not in 'categories' ({where}); they were skipped"),
    "crowd": ("{n} crowd annotation (iscrowd: 1) was skipped, as a crowd region is not one object ({where})",
              "{n} crowd annotations (iscrowd: 1) were skipped, as crowd regions are not single objects "
              "({where})"),
    "malformed": ("{n} annotation has no usable bbox (x, y, w, h) or polygon; it was skipped ({where})",
                  "{n} annotations have no usable bbox (x, y, w, h) or polygon; they were skipped ({where})"),
    "badrle": ("{n} RLE segmentation cannot be decoded; its mask was ignored ({where})",
               "{n} RLE segmentations cannot be decoded; their masks were ignored ({where})"),
    "rlesize": ("{n} RLE segmentation has a size other than its image's; its mask was ignored ({where})",
                "{n} RLE segmentations have a size other than their image's; their masks were ignored "
                "({where})"),
    "shortpoly": ("{n} polygon part has fewer than 3 points; it was ignored ({where})",
                  "{n} polygon parts have fewer than 3 points; they were ignored ({where})"),
    "badimage": ("{n} entry of 'images' lacks an integer id or a file_name; it was skipped ({where})",
                 "{n} entries of 'images' lack an integer id or a file_name; they were skipped ({where})"),
    "dupimage": ("{n} image repeats an id used before in 'images'; it was skipped ({where})",
                 "{n} images repeat an id used before in 'images'; they were skipped ({where})"),
    **BOX_MESSAGES,
}


def read_coco(path: str | Path) -> DetectionData:
    """Read a COCO dataset: a single ``instances`` JSON, or a YAML naming one per split.

    ``image_id`` comes from the JSON. Polygon segmentations become ``DetRecord.polygons`` (in
    pixels, clipped to the image); an RLE segmentation (compressed or not) is decoded and traced
    into polygons along pixel edges, so it rasterizes back to the same pixels; an object with no
    segmentation (or an RLE that cannot be decoded, a warning) keeps its box and gets an empty
    polygon list (``polygons`` is None for an image where no object has a mask).
    An annotation without a bbox takes the box that encloses its polygon. Images without
    annotations are images without objects.

    Bad entries never stop the reading; each kind becomes one sentence in
    ``DetectionData.warnings``: annotations whose image id or category id is unknown, crowd
    annotations (``iscrowd: 1``), annotations without a usable box, boxes reaching outside their
    image (clipped) or with no area (dropped), image files that are missing or unreadable
    (skipped), and images whose file size differs from the JSON's (the file wins, as that is
    what training reads).

    Args:
        path: a COCO ``.json`` file, or a YAML as described in :mod:`cnnkit.data.formats.coco`.

    Raises:
        DataError: a file is missing, an annotations file is not JSON or lacks ``images``,
            ``annotations`` or ``categories``, categories disagree between splits, ``names``
            has another length than ``categories``, or no image can be read.

    Examples:
        >>> data = read_coco("coco/coco.yaml")
        >>> data.names[0], data.category_ids[:3]
        ('person', [1, 2, 3])
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"COCO file '{p}' does not exist" if not p.exists() else
                        f"'{p}' is a folder; give a COCO .json file or a YAML naming images and annotations")
    names_given = None
    if p.suffix.lower() == ".json":
        entries = {"val": (p, None)}
        base, name = p.resolve().parent, p.stem
    else:
        entries, names_given = _yaml_entries(p)
        base, name = p.resolve().parent, p.resolve().parent.name
    loaded = {split: _load_json(js) for split, (js, _) in entries.items()}
    cat_ids, names = _categories(loaded)
    if names_given is not None:
        if len(names_given) != len(names):
            raise DataError(f"'{p}' lists {len(names_given)} names but the annotations have {len(names)} "
                            "categories")
        names = names_given
    index = {cid: i for i, cid in enumerate(cat_ids)}
    problems = Problems(MESSAGES)
    splits = {}
    for split, (js, images_dir) in entries.items():
        splits[split] = _read_split(loaded[split], js, images_dir, index, base, problems)
    if not any(splits.values()):
        where = " and ".join(str(d) for _, d in entries.values()) if p.suffix.lower() != ".json" \
            else ", ".join(str(d) for d in image_folders(p))
        raise DataError(f"none of the images of '{p}' could be read; they are looked for in {where}")
    return DetectionData(name, names, splits, problems.sentences(), category_ids=cat_ids)


def _yaml_entries(p: Path) -> tuple[dict[str, tuple[Path, Path]], list[str] | None]:
    cfg = load_yaml(p)
    base = p.resolve().parent
    entries = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and key not in SPLITS:
            raise DataError(f"'{p}' has a split '{key}'; COCO YAML splits are {', '.join(SPLITS)}")
        if key not in SPLITS or value is None:
            continue
        if not isinstance(value, dict) or "images" not in value or "annotations" not in value:
            raise DataError(f"'{p}': {key} must name 'images' (a folder) and 'annotations' (a JSON file), "
                            f"e.g. {key}: {{images: images/{key}, annotations: annotations/{key}.json}}")
        js, images = base / str(value["annotations"]), base / str(value["images"])
        if not js.is_file():
            raise DataError(f"'{p}' gives {key} annotations '{value['annotations']}', but '{js}' does not exist")
        if not images.is_dir():
            raise DataError(f"'{p}' gives {key} images '{value['images']}', but '{images}' is not a folder")
        entries[key] = (js, images)
    if not entries:
        raise DataError(f"'{p}' names no split; give e.g. train: {{images: DIR, annotations: FILE.json}}")
    names = check_names(cfg["names"], f"'{p}'") if cfg.get("names") is not None else None
    return entries, names


def _load_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"'{path}' is not a JSON file ({e})") from None
    if not isinstance(d, dict):
        raise DataError(f"'{path}' is not a COCO annotations file: it holds a {type(d).__name__}, not an object")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(d.get(k), list)]
    if missing:
        raise DataError(f"'{path}' is not a COCO annotations file: it has no {' or '.join(missing)} list")
    return d


def _categories(loaded: dict[str, dict]) -> tuple[list[int], list[str]]:
    """Category ids in sorted order and their names, the same in every split's file."""
    by_id: dict[int, str] = {}
    for split, d in loaded.items():
        for c in d["categories"]:
            if not isinstance(c, dict) or not isinstance(c.get("id"), int) or "name" not in c:
                raise DataError(f"a category of the {split} annotations lacks an integer id or a name: {c!r}")
            if by_id.setdefault(c["id"], str(c["name"])) != str(c["name"]):
                raise DataError(f"category id {c['id']} is '{by_id[c['id']]}' in one split and '{c['name']}' "
                                "in another; give every split the same categories")
    if not by_id:
        raise DataError("the COCO annotations have no categories")
    ids = sorted(by_id)
    return ids, [by_id[i] for i in ids]


def _read_split(d: dict, js: Path, images_dir: Path | None, index: dict[int, int], base: Path,
                problems: Problems) -> list[DetRecord]:
    where_js = shown(js, base)
    images: dict[int, dict] = {}
    for k, im in enumerate(d["images"]):
        if not isinstance(im, dict) or type(im.get("id")) is not int or not isinstance(im.get("file_name"), str):
            problems.add("badimage", f"images[{k}] in {where_js}")
        elif im["id"] in images:
            problems.add("dupimage", f"id {im['id']} in {where_js}")
        else:
            images[im["id"]] = im
    anns: dict[int, list[dict]] = defaultdict(list)
    for k, a in enumerate(d["annotations"]):
        aid = f"annotation id {a.get('id', '?')}" if isinstance(a, dict) else f"annotations[{k}]"
        if not isinstance(a, dict):
            problems.add("malformed", f"{aid} in {where_js}")
        elif type(a.get("image_id")) is not int or a["image_id"] not in images:
            problems.add("noimage", f"{a.get('image_id')} in {where_js}")
        elif a.get("iscrowd"):
            problems.add("crowd", f"{aid} in {where_js}")
        elif type(a.get("category_id")) is not int or a["category_id"] not in index:
            problems.add("category", f"{a.get('category_id')} in {where_js}")
        else:
            anns[a["image_id"]].append(a)
    records = []
    for iid, im in images.items():
        fn = im["file_name"]
        path = _image_path(fn, js, images_dir)
        try:
            w, h = image_size(path)
        except ImageDecodeError as e:
            problems.add("unreadable", f"{shown(path, base)}: {e.reason}")
            continue
        if isinstance(im.get("width"), int) and isinstance(im.get("height"), int) and (im["width"], im["height"]) \
                not in ((w, h), (0, 0)):
            problems.add("resized", f"{shown(path, base)}: {w}x{h}, not {im['width']}x{im['height']}")
        boxes, labels, polys = [], [], []
        for a in anns.get(iid, []):
            where = f"annotation id {a.get('id', '?')} in {where_js}"
            obj = _object(a, w, h, where, problems)
            if obj is not None:
                boxes.append(obj[0])
                labels.append(index[a["category_id"]])
                polys.append(obj[1])
        records.append(DetRecord(str(path), w, h, np.array(boxes, np.float32).reshape(-1, 4), labels,
                                 image_id=iid, polygons=polys if any(polys) else None))
    return records


def image_folders(js: Path) -> list[Path]:
    """Where the images of a lone COCO JSON may be: ``images/`` next to it, its own folder, and
    for a JSON inside ``annotations/`` the layouts of cnnkit (``images/<split>``) and of the COCO
    download (``instances_val2017.json`` -> ``val2017/``)."""
    d, stem = js.parent, js.stem
    folders = [d / "images", d]
    if d.name == "annotations":
        split = stem.removeprefix("instances_")
        folders += [d.parent / "images" / split, d.parent / split]
    return folders


def _image_path(file_name: str, js: Path, images_dir: Path | None) -> Path:
    if images_dir is not None:
        return images_dir / file_name
    folders = image_folders(js)
    return next((f / file_name for f in folders if (f / file_name).exists()), folders[0] / file_name)


def _object(a: dict, w: int, h: int, where: str, problems: Problems):
    """``(box, polygon parts)`` of one annotation, or None (the problem is recorded)."""
    parts = []
    seg = a.get("segmentation")
    if isinstance(seg, dict):  # RLE (compressed or not): traced into exact pixel-edge polygons
        parts = _rle_parts(seg, w, h, where, problems)
    elif isinstance(seg, list):  # polygons
        for flat in seg:
            pts = np.asarray(flat, np.float64).reshape(-1) if _numbers(flat) else np.zeros(0)
            if len(pts) < 6 or len(pts) % 2:
                problems.add("shortpoly", where)
                continue
            parts.append(fit_polygon(pts.reshape(-1, 2), w, h)[0])
    bbox = a.get("bbox")
    if _numbers(bbox) and len(bbox) == 4:
        x, y, bw, bh = (float(v) for v in bbox)
        box = (x, y, x + bw, y + bh)
    elif parts:
        box = polygon_box(parts)
    else:
        problems.add("malformed", where)
        return None
    box, state = fit_box(box, w, h)
    if state != "ok":
        problems.add(state, where)
    return (box, parts) if box is not None else None


def _rle_parts(seg: dict, w: int, h: int, where: str, problems: Problems) -> list[np.ndarray]:
    from pycocotools import mask as mask_utils

    size, counts = seg.get("size"), seg.get("counts")
    if not (_numbers(size) and len(size) == 2 and isinstance(counts, (str, list))):
        problems.add("badrle", where)
        return []
    if [int(v) for v in size] != [h, w]:
        problems.add("rlesize", where)
        return []
    try:
        if isinstance(counts, list):
            if not _numbers(counts) or sum(counts) != h * w or min(counts, default=0) < 0:
                raise ValueError("runs do not cover the image")
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = {"size": [h, w], "counts": counts.encode()}
        mask = mask_utils.decode(rle)
        # pycocotools decodes malformed strings without a word; a valid one encodes back to itself
        if isinstance(counts, str) and mask_utils.encode(np.asfortranarray(mask))["counts"] != rle["counts"]:
            raise ValueError("not a COCO RLE string")
    except Exception:  # noqa: BLE001 - pycocotools raises bare errors on malformed counts
        problems.add("badrle", where)
        return []
    return mask_to_polygons(mask.astype(bool))  # float32 (K, 2) outlines


def _numbers(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(v, (int, float)) and np.isfinite(v) for v in x)


def write_coco(data: DetectionData, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``data`` as a COCO dataset; returns the ``coco.yaml`` that :func:`read_coco` reads.

    Layout: ``images/<split>/<name>`` (copied files keep their name, with ``_1``, ... added when
    two would clash; generated pixels become ``{image_id:06d}.png``), ``annotations/<split>.json``
    and ``coco.yaml`` (``<split>: {images, annotations}`` relative to its folder, and
    ``names``). Image ids are the records' ``image_id`` (renumbered from 1 when they repeat
    within a split); categories keep ``DetectionData.category_ids`` (else 1..N). Each
    annotation has ``iscrowd: 0``, its polygons (or ``[]``) as ``segmentation`` and an ``area``
    that is the polygon's pixel area as COCO computes it (pycocotools) when it has one, else
    ``w * h``. Records with masks instead of polygons get their masks traced along pixel edges
    (:func:`~cnnkit.data.formats.polygons.mask_to_polygons`: one polygon per connected part,
    holes included), so reading the file back gives the same pixels. Empty splits are left out.

    Raises:
        DataError: ``out_dir`` is not empty (unless ``overwrite``, which replaces its
            ``images/``, ``annotations/`` and ``coco.yaml``), a split is not train/val/test,
            ``category_ids`` does not match ``names``, or an image cannot be copied.
    """
    import yaml

    splits = check_splits(data)
    cat_ids = list(data.category_ids) if data.category_ids is not None else list(range(1, len(data.names) + 1))
    if len(cat_ids) != len(data.names) or len(set(cat_ids)) != len(cat_ids):
        raise DataError(f"category_ids {cat_ids} must give one distinct id per class name ({len(data.names)})")
    out = prepare_out_dir(out_dir, ("images", "annotations", "coco.yaml"), data, overwrite)
    (out / "annotations").mkdir()
    categories = [{"id": int(c), "name": n, "supercategory": ""} for c, n in zip(cat_ids, data.names)]
    cfg: dict[str, Any] = {}
    for split, records in splits.items():
        files = export_images(records, out / "images" / split)
        ids = [r.image_id for r in records]
        if len(set(ids)) != len(ids):
            ids = list(range(1, len(records) + 1))
        images, anns = [], []
        for rec, fn, iid in zip(records, files, ids):
            images.append({"id": int(iid), "file_name": fn, "width": int(rec.width), "height": int(rec.height)})
            polygons = record_polygons(rec)
            for k, (box, cls) in enumerate(zip(rec.boxes.tolist(), rec.labels.tolist())):
                parts = polygons[k] if polygons is not None else []
                anns.append(_annotation(len(anns) + 1, int(iid), cat_ids[cls], box, parts, rec.height, rec.width))
        doc = {"info": {"description": f"{data.name} {split}, written by cnnkit"}, "licenses": [],
               "images": images, "annotations": anns, "categories": categories}
        (out / "annotations" / f"{split}.json").write_text(json.dumps(doc), encoding="utf-8")
        cfg[split] = {"images": f"images/{split}", "annotations": f"annotations/{split}.json"}
    cfg["names"] = list(data.names)
    yaml_path = out / "coco.yaml"
    header = "# COCO dataset written by cnnkit; paths are relative to this file's folder\n"
    yaml_path.write_text(header + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return yaml_path


def _annotation(ann_id: int, image_id: int, category_id: int, box: list[float], parts, h: int, w: int) -> dict:
    x1, y1, x2, y2 = box
    flat = [[round(float(v), 3) for v in np.asarray(p, np.float64).ravel()] for p in parts or []]
    flat = [f for f in flat if len(f) >= 6]
    if flat:
        from pycocotools import mask as mask_utils

        area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(flat, h, w))))
    else:
        area = (x2 - x1) * (y2 - y1)
    return {"id": ann_id, "image_id": image_id, "category_id": int(category_id),
            "bbox": [round(x1, 4), round(y1, 4), round(x2 - x1, 4), round(y2 - y1, 4)],
            "area": round(area, 4), "iscrowd": 0, "segmentation": flat}
