"""Classification data: resolve ``--data`` to datasets, transforms and loaders.

``--data`` is a built-in name (``digits``, ``shapes``) or a folder (ImageFolder layout).
Items are ``(uint8 (C, H, W), label)``; transforms run in the loader workers, and an image
that cannot be decoded is skipped, counted and listed instead of stopping the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from cnnkit.errors import DataError, ImageDecodeError

BUILTIN = ("digits", "shapes")


@dataclass
class ClassificationData:
    """Splits of one dataset plus what a model needs to know about it."""

    name: str
    classes: list[str]
    channels: int
    default_imgsz: int
    splits: dict[str, Dataset] = field(default_factory=dict)

    def split(self, name: str) -> Dataset:
        if name not in self.splits:
            raise DataError(f"dataset '{self.name}' has no '{name}' split (it has: "
                            f"{', '.join(self.splits)})")
        return self.splits[name]


def load_classification_data(spec: str, seed: int = 0, val_fraction: float = 0.2,
                             channels: int | None = None) -> ClassificationData:
    """Resolve a ``--data`` value (built-in name or ImageFolder path)."""
    if spec == "digits":
        from cnnkit.data.digits import DigitsDataset

        splits = {s: DigitsDataset(s) for s in ("train", "val", "test")}
    elif spec == "shapes":
        from cnnkit.data.shapes_classification import ShapesClassification

        splits = {s: ShapesClassification(s) for s in ("train", "val", "test")}
    elif spec in ("", None):
        raise DataError("no data given; pass --data digits, --data shapes or --data PATH")
    else:
        path = Path(spec)
        if not path.exists() and "/" not in spec and "\\" not in spec and not path.suffix:
            import difflib

            close = difflib.get_close_matches(spec, BUILTIN, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise DataError(f"data '{spec}' is neither a built-in dataset ({', '.join(BUILTIN)}) "
                            f"nor an existing folder; {hint}".rstrip("; ").rstrip())
        from cnnkit.data.imagefolder import scan_image_folder

        splits = scan_image_folder(path, val_fraction=val_fraction, seed=seed, channels=channels)
    if channels is not None and channels != splits["train"].channels:
        splits = {k: ChannelView(v, channels) for k, v in splits.items()}
    first = splits["train"]
    return ClassificationData(name=getattr(first, "name", spec), classes=list(first.classes),
                              channels=first.channels, default_imgsz=first.default_imgsz,
                              splits=splits)


class ChannelView(Dataset):
    """A built-in dataset with its images converted to ``channels`` (gray <-> RGB).

    Lets ``--channels 3`` feed 1-channel digits to a network pretrained on RGB images (the
    gray channel is repeated; RGB becomes gray with ITU-R 601 luma weights).
    """

    def __init__(self, base: Dataset, channels: int):
        self.base, self.channels = base, channels
        for attr in ("classes", "name", "default_imgsz", "targets", "paths"):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, label = self.base[i]
        if img.shape[0] == 1 and self.channels == 3:
            img = img.expand(3, -1, -1).contiguous()
        elif img.shape[0] == 3 and self.channels == 1:
            w = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
            img = (img.float() * w).sum(0, keepdim=True).round().clamp(0, 255).to(img.dtype)
        return img, label


class TransformedDataset(Dataset):
    """Applies ``transform`` to the image; unreadable images become a ``Skipped`` marker.

    With ``objects``, an item also carries its objects' boxes in the transformed image's pixels
    where the data knows them (``base.object_boxes(i)``, through a ``Subset`` too; the transform
    must be a resize), else None: ``(image, label, boxes)``."""

    def __init__(self, base: Dataset, transform, objects: bool = False):
        self.base = base
        self.transform = transform
        self.objects = objects

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        try:
            img, label = self.base[i]
        except ImageDecodeError as e:
            return Skipped(e.path, e.reason)
        x = self.transform(img)
        if not self.objects:
            return x, label
        return x, label, self._boxes(i, img.shape[-2:], x.shape[-2:])

    def _boxes(self, i: int, before, after) -> torch.Tensor | None:
        base = self.base
        while isinstance(base, Subset):
            base, i = base.dataset, base.indices[i]
        if not hasattr(base, "object_boxes"):
            return None
        (h0, w0), (h1, w1) = before, after
        return base.object_boxes(i) * torch.tensor([w1 / w0, h1 / h0] * 2)


@dataclass
class Skipped:
    path: str
    reason: str


def collate_classification(items: list) -> dict:
    """Stack ``(image, label)`` items into ``{"images", "targets", "skipped"}`` (and
    ``(image, label, boxes)`` items into ``"objects"`` too: per image, the boxes or none)."""
    good = [it for it in items if not isinstance(it, Skipped)]
    skipped = [(it.path, it.reason) for it in items if isinstance(it, Skipped)]
    if good:
        images = torch.stack([g[0] for g in good])
        targets = torch.tensor([g[1] for g in good], dtype=torch.long)
    else:
        images, targets = torch.empty(0), torch.empty(0, dtype=torch.long)
    out = {"images": images, "targets": targets, "skipped": skipped}
    if good and len(good[0]) > 2:  # TransformedDataset(objects=True); no boxes: the whole image
        out["objects"] = [g[2] if g[2] is not None else torch.zeros(0, 4) for g in good]
    return out


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, workers: int,
                collate_fn=collate_classification, generator: torch.Generator | None = None,
                drop_last: bool = False, pin_memory: bool = False, sampler=None) -> DataLoader:
    """A DataLoader with cnnkit's conventions (seedable generator, no persistent workers).

    Workers are not persistent so that every epoch's worker seeds come from the seeded
    ``generator``: an epoch replays identically after ``--resume``. A ``sampler`` (class
    rebalancing) replaces shuffling; give it the same ``generator`` so it replays too.
    """
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, num_workers=workers, collate_fn=collate_fn, generator=generator,
                      drop_last=drop_last, pin_memory=pin_memory, persistent_workers=False)


def normalization_stats(data: ClassificationData, pretrained: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std a classifier normalizes ``data`` with: digits' own (from scratch), else
    ImageNet's (gray: their luminance)."""
    from cnnkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    if data.name == "digits" and not pretrained:
        ds = data.splits["train"]
        x = getattr(ds, "base", ds).images.float() / 255.0  # (ChannelView: the gray source)
        return (round(float(x.mean()), 4),) * data.channels, (round(float(x.std()), 4),) * data.channels
    if data.channels == 1:
        return (0.449,), (0.226,)
    return IMAGENET_MEAN, IMAGENET_STD
