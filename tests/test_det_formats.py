"""Detection dataset formats: YOLO, COCO and VOC readers and writers, and ``cnnkit convert``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from cnnkit.data.detection import DetectionData, DetRecord, shapes_detection
from cnnkit.data.formats import read_detection, write_detection
from cnnkit.data.formats.coco import read_coco, write_coco
from cnnkit.data.formats.voc import read_voc
from cnnkit.data.formats.yolo import join_polygons, label_path, read_yolo, write_yolo
from cnnkit.errors import DataError

NAMES = ["circle", "ring", "triangle"]


@pytest.fixture(scope="module")
def shapes() -> DetectionData:
    """6 generated 96 px scenes (4 train, 2 val), 3 classes, up to 4 objects each."""
    data = shapes_detection(96, {"train": 4, "val": 2, "test": 0}, num_classes=3, max_objects=4)
    data.splits.pop("test")
    return data


@pytest.fixture(scope="module")
def polygons() -> DetectionData:
    """Two 96 x 80 images with polygon objects: a triangle, a two-part object and a plain box."""
    rng = np.random.default_rng(0)
    tri = [np.array([[10, 10], [40, 12], [22, 50]], np.float32)]
    two = [np.array([[50, 5], [70, 5], [70, 20], [50, 20]], np.float32),
           np.array([[80, 40], [90, 40], [90, 70], [80, 70]], np.float32)]
    recs = []
    for i in range(2):
        img = rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)
        boxes = [[10, 10, 40, 50], [50, 5, 90, 70], [5, 60, 30, 75]]
        recs.append(DetRecord(None, 96, 80, boxes, [0, 2, 1], image_id=i, image=img, polygons=[tri, two, []]))
    return DetectionData("poly", list(NAMES), {"train": recs[:1], "val": recs[1:]})


def png(path: Path, w: int, h: int, exif_orientation: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.full((h, w, 3), 120, np.uint8))
    if exif_orientation is None:
        im.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        im.save(path, exif=exif)
    return path


def assert_same_boxes(a: DetectionData, b: DetectionData) -> None:
    """Same names, splits, image counts, labels, and every box at IoU >= 0.999."""
    assert b.names == a.names
    assert list(b.splits) == list(a.splits)
    for split in a.splits:
        assert len(b.splits[split]) == len(a.splits[split])
        for ra, rb in zip(a.splits[split], b.splits[split]):
            assert (rb.width, rb.height) == (ra.width, ra.height)
            assert rb.labels.tolist() == ra.labels.tolist()
            if len(ra.boxes):
                iou = box_iou(torch.from_numpy(ra.boxes), torch.from_numpy(rb.boxes)).diagonal()
                assert iou.min() >= 0.999


def shoelace(p: np.ndarray) -> float:
    x, y = p[:, 0].astype(np.float64), p[:, 1].astype(np.float64)
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


# ---- round trips ----------------------------------------------------------------------------
def test_round_trip_shapes_yolo_coco_yolo(shapes, tmp_path):
    y1 = read_yolo(write_yolo(shapes, tmp_path / "y1"))
    assert_same_boxes(shapes, y1)
    c = read_coco(write_coco(y1, tmp_path / "c"))
    assert_same_boxes(shapes, c)
    assert c.category_ids == [1, 2, 3]
    lone = read_detection(tmp_path / "c" / "annotations" / "val.json")  # finds ../images/val by itself
    assert_same_boxes(DetectionData("v", shapes.names, {"val": shapes.split("val")}), lone)
    y2 = read_detection(write_detection(c, tmp_path / "y2", "yolo"))
    assert_same_boxes(shapes, y2)
    assert y1.warnings == c.warnings == y2.warnings == []
    assert (tmp_path / "y1" / "images" / "train" / "000003.png").is_file()
    assert [r.image_id for r in y2.split("train")] == [0, 1, 2, 3]
    # the pixels travel too
    assert torch.equal(y2.split("val")[1].load(), shapes.split("val")[1].load())


def test_polygons_survive_yolo_and_coco(polygons, tmp_path):
    y = read_yolo(write_yolo(polygons, tmp_path / "y"))
    c = read_coco(write_coco(polygons, tmp_path / "c"))
    yc = read_coco(write_coco(y, tmp_path / "yc"))
    for got in (y, c, yc):
        assert_same_boxes(polygons, got)
        for ra, rb in zip(polygons.split("train") + polygons.split("val"), got.split("train") + got.split("val")):
            tri_a, tri_b = ra.polygons[0], rb.polygons[0]
            assert len(tri_b) == 1 and np.allclose(tri_b[0], tri_a[0], atol=1e-3)
            two_a, two_b = ra.polygons[1], rb.polygons[1]
            # YOLO holds one outline per object: the parts come back joined, with the same area
            assert sum(map(shoelace, two_b)) == pytest.approx(sum(map(shoelace, two_a)), abs=0.05)
            assert rb.polygons[2] == []
    assert len(c.split("train")[0].polygons[1]) == 2  # COCO keeps the parts apart
    ann = json.loads((tmp_path / "c" / "annotations" / "train.json").read_text())["annotations"]
    assert ann[0]["area"] == pytest.approx(shoelace(polygons.split("train")[0].polygons[0][0]), rel=0.1)
    assert ann[2]["area"] == 25 * 15 and ann[2]["segmentation"] == []


def test_join_polygons_keeps_area_and_bounds():
    a = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], np.float64)
    b = np.array([[20, 0], [20, 5], [30, 5], [30, 0]], np.float64)  # turned the other way round
    joined = join_polygons([a, b])
    assert shoelace(joined) == pytest.approx(100 + 50)
    assert joined.min(0).tolist() == [0, 0] and joined.max(0).tolist() == [30, 10]


def test_yolo_and_coco_of_the_same_images_give_the_same_records(shapes, tmp_path):
    y = read_yolo(write_yolo(shapes, tmp_path / "y"))
    c = read_coco(write_coco(shapes, tmp_path / "c"))
    assert (y.names, list(y.splits)) == (c.names, list(c.splits))
    for split in y.splits:
        for ry, rc in zip(y.split(split), c.split(split)):
            assert Path(ry.path).name == Path(rc.path).name
            assert (ry.width, ry.height, ry.image_id) == (rc.width, rc.height, rc.image_id)
            assert ry.labels.tolist() == rc.labels.tolist()
            np.testing.assert_allclose(ry.boxes, rc.boxes, atol=1e-3)
            assert ry.polygons is None and rc.polygons is None
            assert torch.equal(ry.load(), rc.load())


# ---- YOLO -----------------------------------------------------------------------------------
def test_yolo_bad_labels_are_skipped_with_one_warning_each(tmp_path):
    root = tmp_path / "ds"
    for name in ("a", "b", "c"):
        png(root / "images" / "train" / f"{name}.png", 100, 50)
    (root / "images" / "train" / "d.png").write_bytes(b"not an image")
    lab = root / "labels" / "train"
    lab.mkdir(parents=True)
    (lab / "a.txt").write_text("\n".join([
        "0 0.5 0.5 0.2 0.2",            # 1 fine
        "0 0.5 0.5 0.2",                # 2 four values
        "1 0.5 abc 0.2 0.2",            # 3 not a number
        "5 0.5 0.5 0.2 0.2",            # 4 class beyond names
        "-1 0.5 0.5 0.2 0.2",           # 5 negative class
        "0 0.95 0.5 0.2 0.2",           # 6 partly outside: clipped
        "0 1.5 0.5 0.2 0.2",            # 7 entirely outside: dropped
        "0 0.5 0.5 0 0.2",              # 8 zero width: dropped
        "0 0.5 0.5 0.2 0.2",            # 9 duplicate of line 1: kept
        "1 0.1 0.1 0.3 0.1 0.2 0.4",    # 10 polygon
        "1 0.1 0.1 0.3 0.1 0.2",        # 11 six values
        "0 nan 0.5 0.2 0.2",            # 12 not a number
        "",
    ]))
    (lab / "b.txt").write_text("")  # an image without objects: no warning
    (root / "data.yaml").write_text("train: images/train\nnames: [cat, dog]\n")
    data = read_yolo(root / "data.yaml")
    recs = data.split("train")
    assert [Path(r.path).name for r in recs] == ["a.png", "b.png", "c.png"]
    a = recs[0]
    assert a.labels.tolist() == [0, 0, 0, 1]
    np.testing.assert_allclose(a.boxes, [[40, 20, 60, 30], [85, 20, 100, 30], [40, 20, 60, 30], [10, 5, 30, 20]],
                               atol=1e-4)
    assert a.polygons[:3] == [[], [], []]
    np.testing.assert_allclose(a.polygons[3][0], [[10, 5], [30, 5], [20, 20]], atol=1e-4)
    assert len(recs[1].boxes) == len(recs[2].boxes) == 0 and recs[1].polygons is None
    assert data.warnings == [
        "2 label lines have a wrong number of values (5 for class cx cy w h, or a class and 3 or more x y "
        "pairs for a polygon); they were skipped (first: labels/train/a.txt line 2, 4 values)",
        "2 label lines have values that are not numbers; they were skipped (first: labels/train/a.txt line 3)",
        "2 objects have class ids that are not one of 0..1 (the classes in names); they were dropped "
        "(first: labels/train/a.txt line 4, class 5)",
        "1 box reached outside its image; it was clipped to the image (labels/train/a.txt line 6)",
        "2 boxes had no area or lay entirely outside their image; they were dropped "
        "(first: labels/train/a.txt line 7)",
        "1 image cannot be read; it was skipped (images/train/d.png: not an image file Pillow can identify)",
        "1 image has no label file; it was read as an image without objects (images/train/c.png)",
    ]


def test_yolo_yaml_forms_and_paths(tmp_path):
    root = tmp_path / "ds"
    a = png(root / "images" / "train" / "sub" / "a.png", 30, 20)
    b = png(root / "extra" / "b.jpg", 60, 40, exif_orientation=6)  # stored 60 x 40, shown 40 x 60
    (root / "labels" / "train" / "sub").mkdir(parents=True)
    (root / "labels" / "train" / "sub" / "a.txt").write_text("1 0.5 0.5 1 1\n")
    (root / "extra" / "b.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (root / "val.txt").write_text("./extra/b.jpg\n")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "data.yaml").write_text(
        "path: ../ds\ntrain: [images/train]\nval: val.txt\ntest:\nnc: 2\nnames: {0: cat, 1: dog}\n")
    data = read_detection(tmp_path / "cfg" / "data.yaml")
    assert data.names == ["cat", "dog"] and list(data.splits) == ["train", "val"] and data.warnings == []
    assert data.split("train")[0].path == str(a) and data.split("train")[0].boxes.tolist() == [[0, 0, 30, 20]]
    rb = data.split("val")[0]
    assert rb.path == str(b) and (rb.width, rb.height) == (40, 60) == tuple(rb.load().shape[:0:-1])
    assert rb.boxes.tolist() == [[10, 15, 30, 45]]
    assert label_path(Path("/d/images/x/images/y/z.jpg")) == Path("/d/images/x/labels/y/z.txt")
    assert label_path(Path("/d/pics/z.png")) == Path("/d/pics/z.txt")


@pytest.mark.parametrize("yaml_text, match", [
    (None, "does not exist"),
    ("train: images/train\n", "has no 'names'"),
    ("train: images/train\nnames: [a, b]\nnc: 3\n", "nc: 3 but names lists 2 classes"),
    ("train: images/train\nnames: {0: a, 2: b}\n", "without gaps"),
    ("names: [a]\n", "names no split"),
    ("train: images/nope\nnames: [a]\n", "does not exist"),
    ("train: images/empty\nnames: [a]\n", "no images found"),
    ("train: [images\n", "not valid YAML"),
])
def test_yolo_unusable_datasets_raise(tmp_path, yaml_text, match):
    (tmp_path / "images" / "empty").mkdir(parents=True)
    if yaml_text is not None:
        (tmp_path / "data.yaml").write_text(yaml_text)
    with pytest.raises(DataError, match=match):
        read_yolo(tmp_path / "data.yaml")


def test_writers_refuse_a_non_empty_folder_unless_overwrite(shapes, tmp_path):
    out = tmp_path / "out"
    write_yolo(shapes, out)
    with pytest.raises(DataError, match="is not empty"):
        write_yolo(shapes, out)
    (out / "images" / "train" / "stale.png").write_bytes(b"x")
    write_yolo(shapes, out, overwrite=True)
    assert not (out / "images" / "train" / "stale.png").exists()
    again = read_yolo(out / "data.yaml")
    with pytest.raises(DataError, match="own images are inside it"):
        write_yolo(again, out, overwrite=True)


def test_copied_files_keep_their_names_and_never_share_a_label_file(tmp_path):
    recs = [DetRecord(str(png(tmp_path / "src" / d / n, 20, 10)), 20, 10, [[0, 0, 10, 5]], [0])
            for d, n in (("x", "a.png"), ("y", "a.png"), ("y", "a.jpg"), ("x", "b.png"))]
    yaml_path = write_yolo(DetectionData("files", ["thing"], {"train": recs}), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "labels" / "train").iterdir()) == \
        ["a.txt", "a_1.txt", "a_2.txt", "b.txt"]
    back = read_yolo(yaml_path)
    assert [Path(r.path).name for r in back.split("train")] == ["a.png", "a_1.png", "a_2.jpg", "b.png"]
    assert back.warnings == []


# ---- COCO -----------------------------------------------------------------------------------
def test_coco_json_bad_entries_are_skipped_with_one_warning_each(tmp_path):
    png(tmp_path / "images" / "a.png", 100, 50)
    png(tmp_path / "b.png", 40, 30)  # file_name relative to the JSON's folder
    (tmp_path / "images" / "bad.png").write_bytes(b"\x89PNG broken")
    box = {"iscrowd": 0, "segmentation": []}
    doc = {
        "images": [{"id": 7, "file_name": "a.png", "width": 100, "height": 50},
                   {"id": 9, "file_name": "b.png", "width": 40, "height": 30},
                   {"id": 11, "file_name": "missing.png", "width": 10, "height": 10},
                   {"id": 12, "file_name": "bad.png", "width": 10, "height": 10}],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 5, 20, 10], **box},
            {"id": 2, "image_id": 7, "category_id": 7, "bbox": [90, 40, 20, 20], **box},    # clipped
            {"id": 3, "image_id": 17, "category_id": 3, "bbox": [0, 0, 5, 5], **box},       # no image 17
            {"id": 4, "image_id": 7, "category_id": 5, "bbox": [0, 0, 5, 5], **box},        # no category 5
            {"id": 5, "image_id": 7, "category_id": 3, "bbox": [0, 0, 50, 50], "iscrowd": 1,
             "segmentation": {"size": [50, 100], "counts": "abc"}},                          # crowd
            {"id": 6, "image_id": 7, "category_id": 3, "bbox": [10, 10, 0, 5], **box},      # no area
            {"id": 7, "image_id": 9, "category_id": 7, "bbox": [1, 2, 3, 4], "iscrowd": 0,
             "segmentation": {"size": [30, 40], "counts": "xyz"}},                           # bad RLE: box only
            {"id": 8, "image_id": 9, "category_id": 3, "iscrowd": 0,
             "segmentation": [[5, 5, 15, 5, 10, 20]]},                                       # box from polygon
            {"id": 9, "image_id": 9, "category_id": 3, "iscrowd": 0, "bbox": "oops"},       # no usable box
            {"id": 10, "image_id": 17, "category_id": 3, "bbox": [0, 0, 5, 5], **box},      # no image 17
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(doc))
    data = read_detection(tmp_path / "instances.json")
    assert data.names == ["cat", "dog"] and data.category_ids == [3, 7] and list(data.splits) == ["val"]
    a, b = data.split("val")
    assert (a.image_id, a.path, a.width, a.height) == (7, str(tmp_path / "images" / "a.png"), 100, 50)
    assert a.labels.tolist() == [0, 1] and a.boxes.tolist() == [[10, 5, 30, 15], [90, 40, 100, 50]]
    assert a.polygons is None
    assert (b.image_id, b.path) == (9, str(tmp_path / "b.png"))
    assert b.labels.tolist() == [1, 0] and b.boxes.tolist() == [[1, 2, 4, 6], [5, 5, 15, 20]]
    assert b.polygons[0] == [] and b.polygons[1][0].tolist() == [[5, 5], [15, 5], [10, 20]]
    assert data.warnings == [
        "2 annotations refer to image ids that are not in 'images' (first: 17 in instances.json); "
        "they were skipped",
        "1 annotation has a category id that is not in 'categories' (5 in instances.json); it was skipped",
        "1 crowd annotation (iscrowd: 1) was skipped, as a crowd region is not one object "
        "(annotation id 5 in instances.json)",
        "1 annotation has no usable bbox (x, y, w, h) or polygon; it was skipped (annotation id 9 in instances.json)",
        "1 RLE segmentation cannot be decoded; its mask was ignored (annotation id 7 in instances.json)",
        "1 box reached outside its image; it was clipped to the image (annotation id 2 in instances.json)",
        "1 box had no area or lay entirely outside its image; it was dropped (annotation id 6 in instances.json)",
        "2 images cannot be read; they were skipped (first: images/missing.png: the file does not exist)",
    ]


def test_coco_yaml_names_override_and_standard_layout(tmp_path):
    png(tmp_path / "val2017" / "1.png", 20, 20)
    doc = {"images": [{"id": 1, "file_name": "1.png", "width": 20, "height": 20}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "iscrowd": 0}],
           "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    lone = read_coco(tmp_path / "annotations" / "instances_val2017.json")  # COCO's own layout
    assert lone.split("val")[0].path == str(tmp_path / "val2017" / "1.png")
    (tmp_path / "c.yaml").write_text("val: {images: val2017, annotations: annotations/instances_val2017.json}\n"
                                     "names: [widget]\n")
    data = read_detection(tmp_path / "c.yaml")
    assert data.names == ["widget"] and data.split("val")[0].boxes.tolist() == [[0, 0, 4, 4]]
    (tmp_path / "c.yaml").write_text("val: {images: val2017, annotations: annotations/instances_val2017.json}\n"
                                     "names: [a, b]\n")
    with pytest.raises(DataError, match="lists 2 names but the annotations have 1 categories"):
        read_coco(tmp_path / "c.yaml")


@pytest.mark.parametrize("content, match", [
    ("{not json", "is not a JSON file"),
    ('{"images": [], "annotations": []}', "has no categories list"),
    ("[1, 2]", "holds a list"),
])
def test_coco_unusable_files_raise(tmp_path, content, match):
    (tmp_path / "x.json").write_text(content)
    with pytest.raises(DataError, match=match):
        read_coco(tmp_path / "x.json")


def test_coco_yaml_with_a_missing_file_raises(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "c.yaml").write_text("train: {images: images, annotations: nope.json}\n")
    with pytest.raises(DataError, match="nope.json' does not exist"):
        read_detection(tmp_path / "c.yaml")


# ---- VOC ------------------------------------------------------------------------------------
VOC_XML = """<annotation>
  <filename>{stem}.jpg</filename>
  <size><width>50</width><height>40</height><depth>3</depth></size>
  <object><name>dog</name><difficult>1</difficult>
    <bndbox><xmin>1</xmin><ymin>2</ymin><xmax>20</xmax><ymax>30</ymax></bndbox></object>
  <object><name>cat</name><difficult>0</difficult>
    <bndbox><xmin>11.5</xmin><ymin>5</ymin><xmax>50</xmax><ymax>40</ymax></bndbox></object>
</annotation>
"""


def test_voc_folder_is_read_with_voc_coordinates(tmp_path):
    png(tmp_path / "voc" / "JPEGImages" / "img1.jpg", 50, 40)
    (tmp_path / "voc" / "Annotations").mkdir()
    (tmp_path / "voc" / "Annotations" / "img1.xml").write_text(VOC_XML.format(stem="img1"))
    data = read_detection(tmp_path / "voc")
    assert data.names == ["cat", "dog"] and list(data.splits) == ["train"] and data.warnings == []
    rec = data.split("train")[0]
    assert (rec.width, rec.height) == (50, 40)
    assert rec.labels.tolist() == [1, 0]  # the difficult dog is kept
    assert rec.boxes.tolist() == [[0, 1, 20, 30], [10.5, 4, 50, 40]]


def test_voc_splits_and_bad_files(tmp_path):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    for stem in ("a", "b", "c"):
        png(root / "JPEGImages" / f"{stem}.jpg", 50, 40)
        (root / "Annotations" / f"{stem}.xml").write_text(VOC_XML.format(stem=stem))
    (root / "Annotations" / "c.xml").write_text("<annotation><object>")  # broken
    (root / "Annotations" / "b.xml").write_text(VOC_XML.format(stem="b").replace("b.jpg", "b"))  # no extension
    (root / "Annotations" / "d.xml").write_text(VOC_XML.format(stem="d").replace("<xmax>20", "<xmax>x"))
    png(root / "JPEGImages" / "d.jpg", 50, 40)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nc\nd\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("b\nzzz\n")
    data = read_voc(root, names=["dog"])
    assert [len(data.split(s)) for s in ("train", "val")] == [2, 1]
    assert data.split("train")[1].boxes.tolist() == []  # d: its dog has no numeric box, its cat is not a class
    assert data.split("val")[0].labels.tolist() == [0]
    assert data.warnings[0].startswith("1 annotation file is not valid XML; its image was skipped (Annotations/c.xml:")
    assert data.warnings[1:] == [
        "1 image id listed in ImageSets/Main has no annotation file; it was skipped (zzz)",
        "1 object has no name or no numeric bndbox (xmin, ymin, xmax, ymax); it was skipped "
        "(Annotations/d.xml object 1)",
        "3 objects have class names that are not in names; they were dropped (first: Annotations/a.xml object 2, cat)",
    ]


# ---- dispatch and command line --------------------------------------------------------------
def test_read_detection_says_which_forms_it_accepts(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    for p in (tmp_path / "missing.yaml", tmp_path / "notes.txt", tmp_path):
        with pytest.raises(DataError, match="a Pascal VOC folder"):
            read_detection(p)


def test_cli_convert(cli, tmp_path):
    r = cli("convert", "shapes", "--to", "yolo", "--out", tmp_path / "y", "--imgsz", 96,
            "--sizes", "train=3,val=2", "--classes", 2, "--max-objects", 3)
    assert r.code == 0, r.err
    assert "train       3 images" in r.out and "val         2 images" in r.out
    assert r.out.strip().splitlines()[-1] == f"wrote {tmp_path / 'y' / 'data.yaml'}"
    r = cli("convert", tmp_path / "y" / "data.yaml", "--to", "coco", "--out", tmp_path / "c")
    assert r.code == 0, r.err
    data = read_coco(tmp_path / "c" / "coco.yaml")
    assert data.names == ["circle", "ring"] and [len(v) for v in data.splits.values()] == [3, 2]
    (tmp_path / "y" / "labels" / "train" / "000001.txt").unlink()
    (tmp_path / "y" / "labels" / "train" / "000002.txt").write_text("7 0.5 0.5 0.1 0.1\n")
    r = cli("convert", tmp_path / "y" / "data.yaml", "--to", "yolo", "--out", tmp_path / "y2")
    assert r.code == 0 and r.out.count("warning: ") == 2
    assert "warning: 1 image has no label file; it was read as an image without objects (images/train/000001.png)" \
        in r.out
    r = cli("convert", tmp_path / "nope.yaml", "--to", "coco", "--out", tmp_path / "x")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and "does not exist" in r.err
    r = cli("convert", tmp_path / "y" / "data.yaml", "--to", "coco", "--out", tmp_path / "x", "--imgsz", 64)
    assert r.code == 2 and "--imgsz apply only to the built-in `shapes` data" in r.err
    r = cli("convert", "shapes", "--to", "coco", "--masks", "--out", tmp_path / "m", "--imgsz", 96,
            "--sizes", "val=2", "--classes", 2)
    assert r.code == 0, r.err
    ours = shapes_detection(96, {"val": 2}, num_classes=2, masks=True)
    assert min(_mask_ious(ours.split("val"), read_coco(tmp_path / "m" / "coco.yaml").split("val"))) == 1.0
    r = cli("convert", "shapes", "--to", "masks", "--masks", "--out", tmp_path / "x")
    assert r.code == 2 and "--masks applies to --to yolo or --to coco" in r.err


# ---- instance masks: exact polygons and round trips -------------------------------------------
def _random_masks(n: int, seed: int = 0):
    """Masks with holes, several parts and pixels touching only at corners."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(4, 48, 2))
        m = rng.random((h, w)) < rng.uniform(0.2, 0.8)
        yield ndimage.binary_opening(m) | (rng.random((h, w)) < 0.05) if i % 2 else m


def test_mask_polygons_rasterize_back_to_the_same_pixels():
    from cnnkit.data.formats.polygons import join_polygons, mask_to_polygons, polygons_to_mask

    for m in _random_masks(120):
        h, w = m.shape
        parts = mask_to_polygons(m)
        assert (polygons_to_mask(parts, h, w) == m).all()  # COCO: one polygon per part
        if parts:  # YOLO: one outline, normalized to 6 decimals and back
            line = np.round(join_polygons(parts) / (w, h), 6) * (w, h)
            assert (polygons_to_mask([line], h, w) == m).all()
    ring = np.zeros((7, 7), bool)
    ring[1:6, 1:6] = True
    ring[3, 3] = False
    (outline,) = mask_to_polygons(ring)  # one part: the hole hangs off the outside by a bridge
    assert {tuple(v) for v in outline.tolist()} == {(1, 1), (6, 1), (6, 6), (1, 6), (3, 3), (4, 3), (4, 4), (3, 4)}
    assert mask_to_polygons(np.zeros((3, 3), bool)) == []


def _mask_ious(a: list[DetRecord], b: list[DetRecord]) -> list[float]:
    out = []
    for ra, rb in zip(a, b, strict=True):
        ma, mb = ra.instance_masks(), rb.instance_masks()
        assert ma.shape == mb.shape and (ra.labels == rb.labels).all()
        inter = (ma & mb).sum((1, 2))
        out += (inter / np.maximum(1, (ma | mb).sum((1, 2)))).tolist()
    return out


def test_instance_masks_survive_coco_yolo_and_back(tmp_path):
    """ours (shapes masks) -> COCO -> YOLO-seg -> COCO: every object's mask read back at IoU 1."""
    ours = shapes_detection(128, {"train": 6, "val": 3, "test": 0}, num_classes=3, max_objects=4, masks=True)
    ours.splits.pop("test")
    c1 = read_coco(write_coco(ours, tmp_path / "c1"))
    y = read_yolo(write_yolo(c1, tmp_path / "y"))
    c2 = read_coco(write_coco(y, tmp_path / "c2"))
    for split in ours.splits:
        for other in (c1, y, c2):
            ious = _mask_ious(ours.split(split), other.split(split))
            assert len(ious) == sum(len(r.labels) for r in ours.split(split)) > 0
            assert min(ious) >= 0.99 and np.mean(ious) == 1.0
            for ra, rb in zip(ours.split(split), other.split(split)):  # boxes enclose the same pixels
                assert np.abs(ra.boxes - rb.boxes).max() <= 1.0


def test_coco_rle_segmentations_are_read_as_masks(tmp_path):
    from pycocotools import mask as mask_utils

    masks = list(_random_masks(3, seed=5))
    h, w = 48, 48
    full = np.zeros((3, h, w), bool)
    for k, m in enumerate(masks):
        full[k, :m.shape[0], :m.shape[1]] = m
    full = full[full.any((1, 2))]
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "a.png")
    anns = []
    for k, m in enumerate(full):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        if k % 2:  # uncompressed counts, as COCO's crowd annotations have them
            seg = {"size": [h, w], "counts": _uncompressed_counts(m)}
        else:
            seg = {"size": [h, w], "counts": rle["counts"].decode()}
        anns.append({"id": k + 1, "image_id": 1, "category_id": 1, "bbox": mask_utils.toBbox(rle).tolist(),
                     "segmentation": seg, "iscrowd": 0, "area": float(m.sum())})
    anns.append({"id": 9, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "iscrowd": 0, "area": 16,
                 "segmentation": {"size": [h + 1, w], "counts": "abc"}})
    doc = {"images": [{"id": 1, "file_name": "a.png", "width": w, "height": h}], "annotations": anns,
           "categories": [{"id": 1, "name": "blob"}]}
    (tmp_path / "inst.json").write_text(json.dumps(doc))
    data = read_coco(tmp_path / "inst.json")
    (rec,) = data.split("val")
    got = rec.instance_masks()
    assert (got[:len(full)] == full).all()
    assert got[len(full)].sum() == 16  # the object whose RLE does not fit keeps its box
    assert any("size other than its image" in w for w in data.warnings)


def _uncompressed_counts(m: np.ndarray) -> list[int]:
    flat = m.T.reshape(-1).astype(np.int8)  # column-major, as COCO runs go
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], change])).tolist()  # zeros first, then alternating runs
