"""Preprocessing and augmentation on torchvision transforms v2.

:class:`Preprocess` is the one eval-time pipeline (resize, scale, normalize); its settings
live in the model card so predict and serve rebuild it exactly. Training adds augmentations
chosen by name with :func:`parse_aug`, e.g. ``"flip,rotate=15,scale=0.8:1.2,jitter=0.4"``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torchvision.transforms import v2

from cnnkit.errors import CnnkitError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocess:
    """uint8 ``(C, H, W)`` image -> normalized float ``(C, imgsz, imgsz)``.

    The image is resized to a square (``resize="squash"``, all content kept) with
    antialiasing, scaled to [0, 1] and normalized with ``mean``/``std``.
    """

    imgsz: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3
    resize: str = "squash"

    def transforms(self) -> list[v2.Transform]:
        return [v2.Resize((self.imgsz, self.imgsz), antialias=True)]

    def normalize(self) -> list[v2.Transform]:
        return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(self.mean), list(self.std))]

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.eval_transform()(img)

    def eval_transform(self) -> v2.Compose:
        return v2.Compose(self.transforms() + self.normalize())

    def train_transform(self, aug: list[v2.Transform]) -> v2.Compose:
        return v2.Compose(self.transforms() + aug + self.normalize())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(imgsz=int(d["imgsz"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   channels=int(d.get("channels", 3)), resize=d.get("resize", "squash"))


def _range(value: str, default: tuple[float, float], name: str) -> tuple[float, float]:
    if not value:
        return default
    parts = value.split(":")
    try:
        if len(parts) == 1:
            v = float(parts[0])
            return (1 - v, 1 + v) if name == "scale" else (-v, v)
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise CnnkitError(f"augmentation '{name}={value}' needs a number or a LOW:HIGH range") from None


def _num(value: str, default: float, name: str) -> float:
    try:
        return float(value) if value else default
    except ValueError:
        raise CnnkitError(f"augmentation '{name}={value}' needs a number") from None


AUG_NAMES = ("none", "flip", "vflip", "rotate", "scale", "translate", "affine", "crop", "jitter",
             "erase", "blur")


def parse_aug(spec: str | None, imgsz: int) -> list[v2.Transform]:
    """Parse a comma-separated augmentation spec into v2 transforms (applied after resize).

    Names: ``flip`` (horizontal), ``vflip``, ``rotate=DEG``, ``scale=LO:HI``, ``translate=F``,
    ``affine`` (rotate 10, translate 0.1, scale 0.9:1.1 together), ``crop=LO`` (random resized
    crop keeping LO..1 of the area), ``jitter=S`` (brightness/contrast/saturation S, hue S/4),
    ``erase=P`` (random erasing with probability P), ``blur=SIGMA``; ``none`` for nothing.
    """
    out: list[v2.Transform] = []
    affine: dict = {}
    for token in [t.strip() for t in (spec or "").split(",") if t.strip()]:
        name, _, value = token.partition("=")
        name = name.strip().lower()
        if name == "none":
            continue
        if name == "flip":
            out.append(v2.RandomHorizontalFlip(_num(value, 0.5, name)))
        elif name == "vflip":
            out.append(v2.RandomVerticalFlip(_num(value, 0.5, name)))
        elif name == "rotate":
            affine["degrees"] = _num(value, 15.0, name)
        elif name == "scale":
            affine["scale"] = _range(value, (0.9, 1.1), name)
        elif name == "translate":
            t = _num(value, 0.1, name)
            affine["translate"] = (t, t)
        elif name == "affine":
            affine.setdefault("degrees", 10.0)
            affine.setdefault("translate", (0.1, 0.1))
            affine.setdefault("scale", (0.9, 1.1))
        elif name == "crop":
            out.append(v2.RandomResizedCrop(imgsz, scale=(_num(value, 0.5, name), 1.0), antialias=True))
        elif name == "jitter":
            s = _num(value, 0.4, name)
            out.append(v2.ColorJitter(brightness=s, contrast=s, saturation=s, hue=min(0.5, s / 4)))
        elif name == "erase":
            out.append(_Erase(_num(value, 0.25, name)))
        elif name == "blur":
            out.append(v2.GaussianBlur(kernel_size=5, sigma=(0.1, _num(value, 1.5, name))))
        else:
            import difflib

            close = difflib.get_close_matches(name, AUG_NAMES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise CnnkitError(f"unknown augmentation '{name}'{hint}; choose from {', '.join(AUG_NAMES)}")
    if affine:
        out.insert(0, v2.RandomAffine(degrees=affine.get("degrees", 0.0),
                                      translate=affine.get("translate"), scale=affine.get("scale")))
    return out


class _Erase(v2.Transform):
    """Random erasing on uint8 images (v2.RandomErasing needs float input for value=0 fill)."""

    def __init__(self, p: float):
        super().__init__()
        self.inner = v2.RandomErasing(p=p, value=0)

    def forward(self, *inputs):
        return self.inner(*inputs)
