"""Whole-batch augmentation on the batch's device (GPU when training on a GPU).

Per-image augmentation (:func:`cnnkit.data.transforms.parse_aug`) runs in the loader workers on
the CPU, one image at a time. :class:`BatchAugment` applies the common subset to a collated,
normalized float batch ``(B, C, H, W)`` in a handful of tensor operations, with parameters drawn
per sample: on a GPU this takes the augmentation load off the CPU workers.

torchvision's v2 transforms draw one set of parameters per call, so a batch would share one
rotation; kornia does per-sample batch augmentation but is a large dependency for the few
kernels needed here, so they are written out below (``F.affine_grid`` + ``F.grid_sample``,
blends and masks).

Layout (STYLE habit 6): functional kernels (:func:`affine_batch`, :func:`erase_batch`,
:func:`adjust_batch`), a parameter sampler (:meth:`BatchAugment.sample_params`) and the
module-like :class:`BatchAugment` that chains them, so any draw can be replayed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cnnkit.data.transforms import AUG_NAMES, _num, _positive_range, _prob, split_aug, unknown_aug
from cnnkit.errors import CnnkitError

BATCH_AUG_NAMES = ("none", "flip", "vflip", "rotate", "scale", "translate", "affine", "jitter", "erase",
                   "cutout", "noise", "gamma")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as torchvision's rgb_to_grayscale


def affine_batch(x: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor, tx: torch.Tensor,
                 ty: torch.Tensor) -> torch.Tensor:
    """Rotate, scale and translate each image of a batch about its centre; outside is 0.

    Per image, this equals ``torchvision.transforms.v2.functional.affine(img, angle, [tx, ty],
    scale, shear=0, interpolation=BILINEAR)``: a point at offset ``p`` from the centre moves to
    ``scale * R p + (tx, ty)``, where a positive angle turns clockwise on screen (torchvision's
    ``affine`` convention; ``rotate``'s is the opposite).

    Args:
        x: images.
        angle: degrees, one per image (clockwise).
        scale: zoom factors, one per image.
        tx: horizontal shifts in pixels, one per image.
        ty: vertical shifts in pixels (down is positive), one per image.

    Shape:
        x: ``(B, C, H, W)`` float; angle, scale, tx, ty: ``(B,)``; output: ``(B, C, H, W)``.
    """
    b, _, h, w = x.shape
    a = torch.deg2rad(-angle.to(x.dtype))  # counter-clockwise on screen in the algebra below
    scale, tx, ty = scale.to(x.dtype), tx.to(x.dtype), ty.to(x.dtype)
    cos, sin = torch.cos(a) / scale, torch.sin(a) / scale
    # affine_grid maps output to input coordinates normalized to [-1, 1]: the inverse map
    # p_in = R(-angle) (p_out - t) / scale, rescaled by (W/2, H/2) on each axis.
    theta = torch.stack([
        torch.stack([cos, -sin * h / w, -(cos * tx - sin * ty) * 2 / w], 1),
        torch.stack([sin * w / h, cos, -(sin * tx + cos * ty) * 2 / h], 1),
    ], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def erase_batch(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: torch.Tensor,
                width: torch.Tensor, value: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Fill one rectangle per image with ``value`` (height 0 leaves an image as it is).

    Shape:
        x: ``(B, C, H, W)``; top, left, height, width: ``(B,)`` integer pixels; value: a number
        or a tensor broadcastable to ``(1, C, 1, 1)``; output like x.
    """
    _, _, h, w = x.shape
    rows = torch.arange(h, device=x.device)[None, :, None]  # (1, H, 1)
    cols = torch.arange(w, device=x.device)[None, None, :]  # (1, 1, W)
    inside = ((rows >= top[:, None, None]) & (rows < (top + height)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + width)[:, None, None]))  # (B, H, W)
    return torch.where(inside[:, None], torch.as_tensor(value, dtype=x.dtype, device=x.device), x)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


def adjust_batch(x: torch.Tensor, brightness: torch.Tensor | None = None,
                 contrast: torch.Tensor | None = None, saturation: torch.Tensor | None = None,
                 gamma: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image brightness, contrast, saturation and gamma on images in [0, 1], in that order.

    Each step is torchvision's definition (``adjust_brightness``: ``x * b``; ``adjust_contrast``:
    blend with the mean grey level; ``adjust_saturation``: blend with the grey image, 3 channels
    only; ``adjust_gamma``: ``x ** g``), clamped to [0, 1]; a step given None is skipped.

    Shape:
        x: ``(B, C, H, W)`` in [0, 1]; factors: ``(B,)``; output like x.
    """
    def per(v: torch.Tensor) -> torch.Tensor:
        return v.to(x.dtype).view(-1, 1, 1, 1)

    if brightness is not None:
        x = (x * per(brightness)).clamp(0, 1)
    if contrast is not None:
        mean = _gray(x).mean((2, 3), keepdim=True)
        x = (per(contrast) * x + (1 - per(contrast)) * mean).clamp(0, 1)
    if saturation is not None and x.shape[1] == 3:
        x = (per(saturation) * x + (1 - per(saturation)) * _gray(x)).clamp(0, 1)
    if gamma is not None:
        x = x.clamp(0, 1).pow(per(gamma))
    return x


@dataclass
class BatchAugment:
    """Per-sample random augmentation of a normalized float batch, on the batch's device.

    Random numbers come from torch's global generator of the batch's device, so
    ``torch.manual_seed`` (or ``torch.cuda.manual_seed``) replays a draw.

    Args:
        mean: the normalization mean of the batch (1 value or one per channel); the
            augmentations work on the de-normalized [0, 1] images, so fills are black and
            colour changes match the per-image ones.
        std: the normalization std (1 value or one per channel).
        hflip: probability of a horizontal flip.
        vflip: probability of a vertical flip.
        degrees: rotation drawn from [-degrees, degrees].
        scale: zoom drawn from [low, high].
        translate: shift drawn from [-translate, translate] of the width/height.
        brightness: factor drawn from [1 - b, 1 + b] (contrast and saturation the same way).
        contrast: see ``brightness``.
        saturation: see ``brightness`` (3-channel batches only).
        gamma: exponent drawn log-uniformly from [low, high].
        noise: std of Gaussian noise, as a fraction of the full range.
        erase: probability of erasing (to black) one rectangle of 2-33 % of the image.

    Examples:
        >>> aug = BatchAugment.from_spec("flip,rotate=15,jitter=0.2", mean=(0.5,), std=(0.5,))
        >>> out = aug({"images": torch.zeros(4, 1, 8, 8), "targets": torch.arange(4)})
        >>> out["images"].shape, out["targets"].tolist()
        (torch.Size([4, 1, 8, 8]), [0, 1, 2, 3])
    """

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    hflip: float = 0.0
    vflip: float = 0.0
    degrees: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    translate: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    gamma: tuple[float, float] = (1.0, 1.0)
    noise: float = 0.0
    erase: float = 0.0

    @classmethod
    def from_spec(cls, spec: str | None, mean: tuple[float, ...] = (0.0,),
                  std: tuple[float, ...] = (1.0,)) -> BatchAugment:
        """Build from the ``--aug`` names that run on batches, with the same defaults.

        Supported: ``flip vflip rotate scale translate affine jitter erase cutout noise gamma
        none``; ``jitter=S`` changes brightness, contrast and saturation by S (no hue shift on
        batches). Other catalog names (crop, blur, shadow, the policies) stay per-image.

        Raises:
            CnnkitError: an unknown name, a name that does not run on batches, or a bad value.
        """
        kw: dict = {}
        for name, value in split_aug(spec):
            if name == "none":
                continue
            if name not in BATCH_AUG_NAMES:
                if name in AUG_NAMES:
                    raise CnnkitError(f"augmentation '{name}' does not run on whole batches (batches "
                                      f"support: {', '.join(BATCH_AUG_NAMES)}); keep it in the "
                                      "per-image augmentation")
                raise unknown_aug(name, BATCH_AUG_NAMES)
            if name == "flip":
                kw["hflip"] = _prob(value, 0.5, name)
            elif name == "vflip":
                kw["vflip"] = _prob(value, 0.5, name)
            elif name == "rotate":
                kw["degrees"] = abs(_num(value, 15.0, name))
            elif name == "scale":
                kw["scale"] = _positive_range(value, (0.9, 1.1), name)
            elif name == "translate":
                kw["translate"] = _prob(value, 0.1, name)
            elif name == "affine":
                kw.setdefault("degrees", 10.0)
                kw.setdefault("translate", 0.1)
                kw.setdefault("scale", (0.9, 1.1))
            elif name == "jitter":
                s = _num(value, 0.4, name)
                if s < 0:
                    raise CnnkitError(f"augmentation 'jitter={value}' needs a strength >= 0")
                kw["brightness"] = kw["contrast"] = kw["saturation"] = s
            elif name in ("erase", "cutout"):
                kw["erase"] = _prob(value, 0.25, name)
            elif name == "noise":
                kw["noise"] = _num(value, 0.05, name)
                if kw["noise"] < 0:
                    raise CnnkitError(f"augmentation 'noise={value}' needs a standard deviation >= 0")
            elif name == "gamma":
                kw["gamma"] = _positive_range(value, (0.7, 1.5), name)
        return cls(mean=tuple(mean), std=tuple(std), **kw)

    @property
    def geometric(self) -> bool:
        return self.degrees > 0 or tuple(self.scale) != (1.0, 1.0) or self.translate > 0

    @property
    def photometric(self) -> bool:
        return (self.brightness > 0 or self.contrast > 0 or self.saturation > 0
                or tuple(self.gamma) != (1.0, 1.0))

    def sample_params(self, b: int, h: int, w: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        """Draw one set of parameters per image (all tensors of shape ``(B,)`` on ``device``)."""
        u = torch.rand(15, b, device=device)

        def between(lo: float, hi: float, v: torch.Tensor) -> torch.Tensor:
            return lo + (hi - lo) * v

        def factor(s: float, v: torch.Tensor) -> torch.Tensor:
            return between(max(0.0, 1 - s), 1 + s, v)

        # erase: area 2-33 % of the image, aspect ratio 0.3-3.3 (v2.RandomErasing's defaults)
        area = between(0.02, 0.33, u[9]) * h * w
        ratio = torch.exp(between(math.log(0.3), math.log(3.3), u[10]))
        eh = torch.sqrt(area * ratio).round().clamp(1, h).long()
        ew = torch.sqrt(area / ratio).round().clamp(1, w).long()
        eh = torch.where(u[8] < self.erase, eh, torch.zeros_like(eh))
        lg = (math.log(self.gamma[0]), math.log(self.gamma[1]))
        return {
            "hflip": u[0] < self.hflip, "vflip": u[1] < self.vflip,
            "angle": between(-self.degrees, self.degrees, u[2]),
            "scale": between(self.scale[0], self.scale[1], u[3]),
            "tx": (between(-self.translate, self.translate, u[4]) * w).round(),
            "ty": (between(-self.translate, self.translate, u[5]) * h).round(),
            "brightness": factor(self.brightness, u[6]), "contrast": factor(self.contrast, u[7]),
            "saturation": factor(self.saturation, u[11]),
            "gamma": torch.exp(between(lg[0], lg[1], u[12])),
            "erase_top": (u[13] * (h - eh + 1)).long().clamp(max=h - 1),
            "erase_left": (u[14] * (w - ew + 1)).long().clamp(max=w - 1),
            "erase_h": eh, "erase_w": ew,
        }

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Augment a normalized batch with given parameters (see :meth:`sample_params`).

        Shape:
            x: ``(B, C, H, W)`` float, normalized with ``mean``/``std``; output the same.
        """
        c = x.shape[1]
        mean = self._stat(self.mean, c, x)
        std = self._stat(self.std, c, x)
        black = -mean / std  # what 0 (black) becomes after normalization, (1, C, 1, 1)
        if self.hflip > 0:
            x = torch.where(params["hflip"].view(-1, 1, 1, 1), x.flip(-1), x)
        if self.vflip > 0:
            x = torch.where(params["vflip"].view(-1, 1, 1, 1), x.flip(-2), x)
        if self.geometric:  # fill with black, as the per-image RandomAffine does
            x = affine_batch(x - black, params["angle"], params["scale"], params["tx"], params["ty"]) + black
        if self.photometric or self.noise > 0:
            x = (x * std + mean).clamp(0, 1)  # back to [0, 1]
            if self.photometric:
                x = adjust_batch(x, params["brightness"] if self.brightness > 0 else None,
                                 params["contrast"] if self.contrast > 0 else None,
                                 params["saturation"] if self.saturation > 0 else None,
                                 params["gamma"] if tuple(self.gamma) != (1.0, 1.0) else None)
            if self.noise > 0:
                x = (x + torch.randn_like(x) * self.noise).clamp(0, 1)
            x = (x - mean) / std
        if self.erase > 0:
            x = erase_batch(x, params["erase_top"], params["erase_left"], params["erase_h"],
                            params["erase_w"], black)
        return x

    def __call__(self, batch: dict) -> dict:
        """Return ``batch`` with ``batch["images"]`` augmented (other keys as they are).

        Raises:
            CnnkitError: the images are not a 4-D floating-point batch.
        """
        x = batch["images"]
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise CnnkitError(f"BatchAugment needs normalized float images of shape (B, C, H, W), got "
                              f"{shape}{f' {x.dtype}' if isinstance(x, torch.Tensor) else ''}")
        out = dict(batch)
        if x.shape[0]:
            b, _, h, w = x.shape
            out["images"] = self.apply(x, self.sample_params(b, h, w, x.device))
        return out

    @staticmethod
    def _stat(values: tuple[float, ...], c: int, x: torch.Tensor) -> torch.Tensor:
        if len(values) not in (1, c):
            raise CnnkitError(f"BatchAugment was built for {len(values)} channel(s) but the batch "
                              f"has {c}; pass the batch's normalization mean and std")
        return torch.tensor(values, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
