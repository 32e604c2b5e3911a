"""Multi-label data: resolve ``--data`` to datasets whose targets are multi-hot vectors.

``--data`` is ``shapes`` (scenes with several shapes, tagged with every shape present), a
``path,labels`` CSV file (train and a seeded val split of it), or a folder holding
``train.csv`` and optionally ``val.csv`` and ``test.csv`` (the format is in
:mod:`cnnkit.data.formats.multilabel_csv`). Items are ``(uint8 (C, H, W), float (K,))``;
splits are wrapped in :class:`~cnnkit.data.classification.TransformedDataset` like
single-label data, so an unreadable image is skipped and counted, not a crash.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cnnkit.data.classification import ClassificationData, Skipped
from cnnkit.data.decode import read_image
from cnnkit.data.formats.multilabel_csv import LabeledImage, read_multilabel_csv
from cnnkit.data.shapes import _SPLITS, SHAPE_CLASSES, SceneParams, sample_scene
from cnnkit.errors import DataError

BUILTIN = ("shapes",)
CSV_SPLITS = ("train", "val", "test")
_DEFAULT_SIZES = {"train": 2000, "val": 400, "test": 400}


def multilabel_params(imgsz: int = 64) -> SceneParams:
    """Default settings of :class:`ShapesMultiLabel`: 1 to 3 shapes that do not overlap
    (circumscribed diameter 35-55% of the image), clutter 0.3, occluders on 20% of the shapes
    hiding at most 30% of one, lighting 0.4."""
    return SceneParams(imgsz=imgsz, min_objects=1, max_objects=3, size_range=(0.35, 0.55),
                       clutter=0.3, occlusion=0.2, max_occlusion=0.3, lighting=0.4, noise=0.02,
                       allow_overlap=False)


class ShapesMultiLabel(Dataset):
    """Scenes of 1 to 3 shapes; the target marks every shape class with a visible pixel.

    Random access and deterministic: item ``i`` of a split is rendered from
    ``np.random.default_rng([seed, split_index, i, 0x7A65])`` (train 0, val 1, test 2), so
    splits never share a scene and loader workers need no shared state. The target is the
    rendered scene's :meth:`~cnnkit.data.shapes.Scene.tags`, so labels match the pixels.

    Args:
        split: "train", "val" or "test".
        size: number of scenes; defaults to 2000 / 400 / 400.
        seed: dataset seed.
        params: generator settings; defaults to :func:`multilabel_params`.
        cache: keep rendered items in memory after first access.
    """

    name = "shapes"
    channels = 3
    default_imgsz = 64
    paths = None

    def __init__(self, split: str = "train", size: int | None = None, seed: int = 0,
                 params: SceneParams | None = None, cache: bool = True) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
        self.split, self.seed, self.cache = split, seed, cache
        self.size = _DEFAULT_SIZES[split] if size is None else int(size)
        self.params = params if params is not None else multilabel_params(self.default_imgsz)
        self.classes = list(SHAPE_CLASSES)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return self.size

    def scene(self, i: int):
        """The full :class:`~cnnkit.data.shapes.Scene` of item ``i`` (objects, masks, boxes)."""
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], int(i), 0x7A65])
        return sample_scene(self.params, rng)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return item ``i`` as (uint8 (3, H, W), float32 multi-hot (8,))."""
        if not -self.size <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} items")
        i = int(i) % self.size
        if i in self._cache:
            return self._cache[i]
        scene = self.scene(i)
        x = torch.from_numpy(np.ascontiguousarray(scene.image.transpose(2, 0, 1)))
        item = (x, torch.from_numpy(scene.tags(len(self.classes))))
        if self.cache:
            self._cache[i] = item
        return item


class MultiLabelFiles(Dataset):
    """Image files with label sets, decoded on access to ``(uint8 (C, H, W), float (K,))``."""

    def __init__(self, rows: list[LabeledImage], classes: list[str], channels: int,
                 name: str = "csv", default_imgsz: int = 224):
        index = {c: k for k, c in enumerate(classes)}
        self.paths = [r.path for r in rows]
        self.targets = torch.zeros(len(rows), len(classes))
        for n, r in enumerate(rows):
            self.targets[n, [index[lab] for lab in r.labels]] = 1.0
        self.classes, self.channels = list(classes), channels
        self.name, self.default_imgsz = name, default_imgsz

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return read_image(self.paths[i], self.channels), self.targets[i].clone()


def collate_multilabel(items: list) -> dict:
    """Stack ``(image, multi-hot)`` items into ``{"images", "targets", "skipped"}``.

    Shape:
        ``images`` (B, C, H, W); ``targets`` float32 (B, K); ``skipped`` a list of
        ``(path, reason)`` for items that could not be read.
    """
    good = [it for it in items if not isinstance(it, Skipped)]
    skipped = [(it.path, it.reason) for it in items if isinstance(it, Skipped)]
    if good:
        images = torch.stack([g[0] for g in good])
        targets = torch.stack([torch.as_tensor(g[1], dtype=torch.float32) for g in good])
    else:
        images, targets = torch.empty(0), torch.empty(0, 0)
    return {"images": images, "targets": targets, "skipped": skipped}


def _random_split(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random hold-out (at least one row on each side)."""
    if len(rows) < 2:
        return rows, []
    order = np.random.default_rng(seed).permutation(len(rows))
    n_held = min(max(1, int(round(len(rows) * fraction))), len(rows) - 1)
    held = sorted(order[:n_held].tolist())
    keep = sorted(order[n_held:].tolist())
    return [rows[i] for i in keep], [rows[i] for i in held]


def _csv_splits(path: Path, val_fraction: float, seed: int) -> dict[str, list[LabeledImage]]:
    if path.is_dir():
        train = path / "train.csv"
        if not train.is_file():
            raise DataError(f"folder '{path}' has no train.csv; give a path,labels CSV file or a "
                            "folder with train.csv (and optionally val.csv and test.csv)")
        rows = {s: read_multilabel_csv(path / f"{s}.csv") for s in CSV_SPLITS
                if (path / f"{s}.csv").is_file()}
    else:
        rows = {"train": read_multilabel_csv(path)}
    if "val" not in rows:
        rows["train"], rows["val"] = _random_split(rows["train"], val_fraction, seed)
        if not rows["val"]:
            raise DataError(f"'{path}' lists too few images to hold out a validation split; add "
                            "a val.csv or more rows")
    return rows


def load_multilabel_data(spec: str, seed: int = 0, val_fraction: float = 0.2,
                         channels: int | None = None,
                         classes: list[str] | None = None) -> ClassificationData:
    """Resolve a ``--data`` value for multi-label tasks.

    Args:
        spec: ``shapes``, a CSV file, or a folder with ``train.csv`` [``val.csv``, ``test.csv``].
        seed: seeds the val hold-out when there is no ``val.csv``.
        val_fraction: share of the rows held out for validation when there is no ``val.csv``.
        channels: 1 or 3; None detects it from the first images.
        classes: the label vocabulary, in order (e.g. a trained model's); None takes the
            sorted union of the labels in every split.

    Returns:
        The splits with their classes (multi-hot targets follow the class order).

    Raises:
        DataError: unknown name, missing file, bad rows, or a label outside ``classes``.
    """
    if spec in ("", None):
        raise DataError("no data given; pass --data shapes, --data FILE.csv or --data FOLDER "
                        "(with train.csv)")
    if spec == "shapes":
        splits = {s: ShapesMultiLabel(s, seed=0) for s in CSV_SPLITS}
        if channels not in (None, 3):
            raise DataError("data 'shapes' is RGB; drop --channels or pass --channels 3")
        if classes is not None and list(classes) != list(SHAPE_CLASSES):
            raise DataError(f"data 'shapes' has the classes {list(SHAPE_CLASSES)}, not {list(classes)}")
        return ClassificationData("shapes", list(SHAPE_CLASSES), 3, 64, dict(splits))
    path = Path(spec)
    if not path.exists():
        if path.suffix.lower() == ".csv" or "/" in spec or "\\" in spec:
            raise DataError(f"data path '{spec}' does not exist")
        import difflib

        close = difflib.get_close_matches(spec, BUILTIN, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise DataError(f"data '{spec}' is neither a built-in multi-label dataset "
                        f"({', '.join(BUILTIN)}) nor an existing CSV file or folder{hint}")
    if path.is_file() and path.suffix.lower() != ".csv":
        raise DataError(f"data file '{path}' is not a .csv file; multi-label data is a path,labels "
                        "CSV or a folder with train.csv")
    rows = _csv_splits(path, val_fraction, seed)
    found = sorted({lab for split in rows.values() for r in split for lab in r.labels})
    if classes is None:
        classes = found
        if not classes:
            raise DataError(f"'{path}' has no labels at all; write each image's labels in the "
                            "second column, separated by ';'")
    else:
        extra = [c for c in found if c not in classes]
        if extra:
            raise DataError(f"'{path}' has label(s) {extra} that are not among the model's classes "
                            f"{list(classes)}")
    if channels is None:
        from cnnkit.data.imagefolder import _detect_channels

        channels = _detect_channels([r.path for r in rows["train"]])
    name = str(path)
    splits = {s: MultiLabelFiles(r, list(classes), channels, name=name) for s, r in rows.items()}
    return ClassificationData(name, list(classes), channels, 224, dict(splits))


def write_samples(data: str, out: str | Path, split: str = "test", count: int = 16) -> Path:
    """Write the first ``count`` images of a split as PNG files plus their ``labels.csv``
    (the ``path,labels`` format); the twin of ``cnnkit multilabel samples``.

    Handy for looking at a built-in dataset, trying ``predict`` on it, or starting a CSV
    dataset of your own in the right format.

    Returns:
        The path of the written ``labels.csv``.
    """
    from PIL import Image

    from cnnkit.data.formats.multilabel_csv import write_multilabel_csv
    from cnnkit.errors import CnnkitError

    if count < 1:
        raise CnnkitError(f"--count must be at least 1, got {count}")
    ds = load_multilabel_data(data)
    items = ds.split(split)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(min(count, len(items))):
        img, target = items[i]
        labels = [c for c, t in zip(ds.classes, target.tolist()) if t > 0.5]
        path = out / f"{split}_{i:04d}.png"
        arr = img.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(path)
        rows.append((str(path), labels))
    csv_path = out / "labels.csv"
    write_multilabel_csv(csv_path, rows)
    return csv_path
