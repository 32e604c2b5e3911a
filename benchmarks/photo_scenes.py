"""A second dataset of a different kind: the `shapes` objects drawn on real photographs.

    make bench-data                                       # Debian opencv-doc: OpenCV's sample images
    python benchmarks/photo_scenes.py --out data/photo_scenes [--sizes train=300,val=60] [--imgsz 128]
    python benchmarks/photo_scenes.py --detection --out data/photo_det [--sizes train=200,val=50] [--imgsz 320]

The built-in `shapes` scenes draw objects on a smooth two-colour gradient with thin clutter; here
the background is a random crop (a quarter to all of the shorter side, resized) of one of the colour
photographs that ship with OpenCV's samples: edges, textures and colours the U-Net's defaults never
saw while they were chosen. Objects, lighting and noise are those of `shapes` segmentation
(`cnnkit.data.shapes.sample_scene` with a photographic ``background``), without its occluders:
they are painted in the local background's mean colour, which on a photograph is a flat patch that
looks like one more square rather than like background. Train and val crops come from different
photographs, so a model cannot learn a val background by heart.

The result is a mask-folder dataset (`data.yaml`, images/, masks/) any `cnnkit segment` command
reads, deterministic in ``--seed``. With ``--detection`` it is a YOLO dataset of boxes instead (the
scene settings of `shapes` detection: objects 8-45% of the image, 1-4 of 3 classes, no occluders;
objects under 3 px across are not labelled), which `cnnkit detect` and Ultralytics both read.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
# colour photographs of distinct scenes (no synthetic images, charts, text or pairs of one scene
# split across train and val)
TRAIN_PHOTOS = ("aero1.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "board.jpg", "building.jpg", "butterfly.jpg",
                "ela_original.jpg", "fruits.jpg", "graf1.png", "home.jpg", "leuvenA.jpg", "messi5.jpg",
                "orange.jpg", "rubberwhale1.png", "squirrel_cls.jpg", "stuff.jpg", "left.jpg",
                "Blender_Suzanne1.jpg", "licenseplate_motion.jpg")
VAL_PHOTOS = ("HappyFish.jpg", "smarties.png", "starry_night.jpg", "pca_test1.jpg", "blox.jpg", "chicky_512.png")


def load_photos(names) -> list[np.ndarray]:
    missing = [n for n in names if not (OPENCV_DATA / n).is_file()]
    if missing:
        raise SystemExit(f"OpenCV's sample images are missing ({', '.join(missing[:3])}...); run `make bench-data`")
    return [np.asarray(Image.open(OPENCV_DATA / n).convert("RGB")) for n in names]


def photo_crop(photo: np.ndarray, imgsz: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (a quarter to all of the shorter side), resized to ``imgsz``, maybe mirrored."""
    h, w = photo.shape[:2]
    side = int(rng.uniform(0.25, 1.0) * min(h, w))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((imgsz, imgsz), Image.BILINEAR)
    out = np.asarray(crop)
    return np.ascontiguousarray(out[:, ::-1]) if rng.random() < 0.5 else out


def _scenes(params, sizes: dict[str, int], seed: int, salt: int, num_classes: int):
    """``{split: [Scene, ...]}``: ``params``' scenes on photographic crops, train and val from
    different photographs, deterministic in ``seed`` (``salt`` keeps each kind's draws its own)."""
    from cnnkit.data.shapes import sample_scene

    splits = {}
    for k, (split, n) in enumerate(sizes.items()):
        photos = load_photos(TRAIN_PHOTOS if split == "train" else VAL_PHOTOS)
        scenes = []
        for i in range(n):
            rng = np.random.default_rng([seed, k, i, salt])
            bg = photo_crop(photos[int(rng.integers(len(photos)))], params.imgsz, rng)
            count = int(rng.integers(params.min_objects, params.max_objects + 1))
            scenes.append(sample_scene(params, rng, classes=rng.integers(0, num_classes, count), background=bg))
        splits[split] = scenes
    return splits


def photo_segmentation(imgsz: int = 128, sizes: dict[str, int] | None = None, seed: int = 0, num_classes: int = 4,
                       max_objects: int = 4):
    """`shapes` segmentation scenes on photographic backgrounds, as a :class:`SegmentationData`."""
    from cnnkit.data.segmentation import SegmentationData, SegRecord, shapes_segmentation_params
    from cnnkit.data.shapes import SHAPE_CLASSES

    params = dataclasses.replace(shapes_segmentation_params(imgsz, max_objects), occlusion=0.0)
    splits = _scenes(params, sizes or {"train": 300, "val": 60}, seed, 0xF070, num_classes)
    return SegmentationData("photo_scenes", ["background", *SHAPE_CLASSES[:num_classes]],
                            {split: [SegRecord(image=sc.image, mask=sc.semantic_mask(), image_id=i)
                                     for i, sc in enumerate(scenes)] for split, scenes in splits.items()})


def photo_detection(imgsz: int = 320, sizes: dict[str, int] | None = None, seed: int = 0, num_classes: int = 3,
                    max_objects: int = 4):
    """`shapes` detection scenes on photographic backgrounds, as a :class:`DetectionData`
    (objects under 3 px across are not labelled)."""
    from cnnkit.data.detection import DetectionData, DetRecord, shapes_detection_params
    from cnnkit.data.shapes import SHAPE_CLASSES

    params = dataclasses.replace(shapes_detection_params(imgsz, max_objects, num_classes), occlusion=0.0)
    splits = {}
    for split, scenes in _scenes(params, sizes or {"train": 200, "val": 50}, seed, 0xDE70, num_classes).items():
        splits[split] = []
        for i, sc in enumerate(scenes):
            keep = (sc.boxes[:, 2:] - sc.boxes[:, :2]).min(1) >= 3
            splits[split].append(DetRecord(None, imgsz, imgsz, sc.boxes[keep], sc.labels[keep], image_id=i,
                                           occlusion=sc.occlusion[keep], image=sc.image))
    return DetectionData("photo_scenes", list(SHAPE_CLASSES[:num_classes]), splits)


def write_photo_detection(out: str | Path, imgsz: int = 320, sizes: dict[str, int] | None = None,
                          seed: int = 0) -> Path:
    """Write the detection dataset in YOLO format under ``out`` (once: an existing one is reused);
    returns data.yaml."""
    from cnnkit.data.formats.yolo import write_yolo

    out = Path(out)
    if not (out / "data.yaml").is_file():
        write_yolo(photo_detection(imgsz, sizes, seed), out)
    return out / "data.yaml"


def write_photo_scenes(out: str | Path, imgsz: int = 128, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write the dataset as mask folders under ``out`` (once: an existing one is reused); returns data.yaml."""
    from cnnkit.data.segmentation import write_mask_folders

    out = Path(out)
    if (out / "data.yaml").is_file():
        return out / "data.yaml"
    return write_mask_folders(photo_segmentation(imgsz, sizes, seed), out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/photo_scenes")
    ap.add_argument("--detection", action="store_true", help="boxes in YOLO format instead of masks")
    ap.add_argument("--imgsz", type=int, default=None, help="image side (default: 128 for masks, 320 for boxes)")
    ap.add_argument("--sizes", default=None, help="images per split (default: train=300,val=60; boxes train=200,val=50)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sizes = {k: int(v) for k, v in (kv.split("=") for kv in args.sizes.split(","))} if args.sizes else None
    if args.detection:
        print(write_photo_detection(args.out, args.imgsz or 320, sizes, args.seed))
    else:
        print(write_photo_scenes(args.out, args.imgsz or 128, sizes, args.seed))


if __name__ == "__main__":
    main()
