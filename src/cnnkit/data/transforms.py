"""Preprocessing and augmentation on torchvision transforms v2.

:class:`Preprocess` is the one eval-time pipeline (resize, scale, normalize); its settings
live in the model card so predict and serve rebuild it exactly. Training adds augmentations
chosen by name with :func:`parse_aug`, e.g. ``"flip,rotate=15,scale=0.8:1.2,jitter=0.4"``: a
catalog of torchvision v2 transforms plus the few it lacks (:class:`RandomGamma`,
:class:`RandomShadow`, and auto-augment policies that also move boxes and masks). All accept
``tv_tensors.Image``, ``BoundingBoxes`` and ``Mask`` together, so detection and segmentation
reuse them; :mod:`cnnkit.data.batch_aug` runs the common subset on whole batches.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

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
    mask_channel: bool = False  # the model takes an extra observation-mask channel (--missing-input mask)
    illumination: str = "none"  # lighting normalized on [0, 1] pixels before mean/std (cnnkit.data.illumination)

    def transforms(self) -> list[v2.Transform]:
        return [v2.Resize((self.imgsz, self.imgsz), antialias=True)]

    def normalize(self) -> list[v2.Transform]:
        from cnnkit.data.illumination import Illumination

        light = [Illumination(self.illumination)] if self.illumination != "none" else []
        return [v2.ToDtype(torch.float32, scale=True), *light, v2.Normalize(list(self.mean), list(self.std))]

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.eval_transform()(img)

    def _missing(self, ratio: float | tuple[float, float], mode: str) -> list:
        from cnnkit.data.missing import AddMaskChannel, DropPixels

        if ratio == 0 or ratio == (0, 0):
            return [AddMaskChannel()] if self.mask_channel else []
        return [DropPixels(ratio, mode, self.mask_channel)]

    def eval_transform(self, missing: float = 0.0, missing_mode: str = "patch") -> v2.Compose:
        """Resize and normalize; ``missing > 0`` also drops that share of every image."""
        return v2.Compose(self.transforms() + self.normalize() + self._missing(missing, missing_mode))

    def train_transform(self, aug: list[v2.Transform], missing: float = 0.0,
                        missing_mode: str = "patch") -> v2.Compose:
        """Resize, augment, normalize; ``missing > 0`` drops a share drawn from ``[0, missing]``."""
        return v2.Compose(self.transforms() + aug + self.normalize()
                          + self._missing((0.0, missing) if missing else 0.0, missing_mode))

    @property
    def model_channels(self) -> int:
        """Input channels of the network: the image's, plus one for the mask channel."""
        return self.channels + int(self.mask_channel)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(imgsz=int(d["imgsz"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   channels=int(d.get("channels", 3)), resize=d.get("resize", "squash"),
                   mask_channel=bool(d.get("mask_channel", False)))


def _range(value: str, default: tuple[float, float], name: str) -> tuple[float, float]:
    if not value:
        return default
    parts = value.split(":")
    try:
        if len(parts) == 1:
            v = float(parts[0])
            return (1 - v, 1 + v) if name in ("scale", "gamma") else (-v, v)
        if len(parts) == 2:
            return float(parts[0]), float(parts[1])
    except ValueError:
        pass
    raise CnnkitError(f"augmentation '{name}={value}' needs a number or a LOW:HIGH range")


def _num(value: str, default: float, name: str) -> float:
    try:
        return float(value) if value else default
    except ValueError:
        raise CnnkitError(f"augmentation '{name}={value}' needs a number") from None


def _prob(value: str, default: float, name: str) -> float:
    p = _num(value, default, name)
    if not 0.0 <= p <= 1.0:
        raise CnnkitError(f"augmentation '{name}={value}' needs a probability between 0 and 1")
    return p


def _positive_range(value: str, default: tuple[float, float], name: str) -> tuple[float, float]:
    lo, hi = _range(value, default, name)
    if not 0.0 < lo <= hi:
        raise CnnkitError(f"augmentation '{name}={value}' needs 0 < LOW <= HIGH")
    return lo, hi


def _ints(value: str, default: tuple[int, int], name: str, usage: str) -> tuple[int, int]:
    if not value:
        return default
    parts = value.split(":")
    try:
        out = [int(v) for v in parts]
    except ValueError:
        out = []
    if len(out) not in (1, 2) or min(out) < 0:
        raise CnnkitError(f"augmentation '{name}={value}' needs {usage}")
    return (out[0], out[1]) if len(out) == 2 else (out[0], default[1])


AUG_NAMES = ("none", "flip", "vflip", "rotate", "scale", "translate", "affine", "crop", "jitter",
             "erase", "cutout", "blur", "noise", "gamma", "shadow", "randaugment", "trivialaugment",
             "autoaugment")
GEOMETRIC_AUGS = ("flip", "vflip", "rotate", "scale", "translate", "affine", "crop", "randaugment",
                  "trivialaugment", "autoaugment")


def unknown_aug(name: str, choices: tuple[str, ...] = AUG_NAMES) -> CnnkitError:
    """The error for an augmentation name that is not in ``choices``, with a did-you-mean hint."""
    import difflib

    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return CnnkitError(f"unknown augmentation '{name}'{hint}; choose from {', '.join(choices)}")


def split_aug(spec: str | None) -> list[tuple[str, str]]:
    """``"flip,rotate=15"`` -> ``[("flip", ""), ("rotate", "15")]`` (names lower-cased)."""
    out = []
    for token in [t.strip() for t in (spec or "").split(",") if t.strip()]:
        name, _, value = token.partition("=")
        out.append((name.strip().lower(), value.strip()))
    return out


def parse_aug(spec: str | None, imgsz: int) -> list[v2.Transform]:
    """Parse a comma-separated augmentation spec into v2 transforms (applied after resize).

    Every transform takes uint8 or float images of 1 or 3 channels and accepts
    ``tv_tensors.BoundingBoxes`` and ``tv_tensors.Mask`` beside the image: geometric ones move
    them with the pixels, the others pass them through unchanged. rotate/scale/translate/affine
    merge into one ``RandomAffine`` that runs first; the rest run in the order given.

    Names:
        geometry: ``flip[=P]`` (horizontal), ``vflip[=P]``, ``rotate=DEG``, ``scale=LO:HI`` (or
            ``scale=S`` for 1-S:1+S), ``translate=F`` (fraction of the size), ``affine`` (rotate
            10, translate 0.1, scale 0.9:1.1 together), ``crop=LO`` (random resized crop keeping
            LO..1 of the area).
        colour and sensor: ``jitter=S`` (brightness/contrast/saturation S, hue S/4),
            ``blur=SIGMA``, ``noise=STD`` (Gaussian, STD as a fraction of the full range).
        illumination: ``gamma=LO:HI`` (or ``gamma=G`` for 1-G:1+G; log-uniform),
            ``shadow=P`` (a soft-edged shadow over part of the image with probability P).
        occlusion: ``erase=P`` or ``cutout=P`` (random erasing with probability P).
        policies: ``randaugment`` (or ``randaugment=N:M``: N ops of magnitude M of 30),
            ``trivialaugment``, ``autoaugment`` (the ImageNet policy).
        ``none`` for nothing.

    Raises:
        CnnkitError: an unknown name or a value of the wrong form.

    Examples:
        >>> [type(t).__name__ for t in parse_aug("flip,rotate=15,noise=0.05", 64)]
        ['RandomAffine', 'RandomHorizontalFlip', 'GaussianNoise']
    """
    out: list[v2.Transform] = []
    affine: dict = {}
    for name, value in split_aug(spec):
        if name == "none":
            continue
        if name == "flip":
            out.append(v2.RandomHorizontalFlip(_prob(value, 0.5, name)))
        elif name == "vflip":
            out.append(v2.RandomVerticalFlip(_prob(value, 0.5, name)))
        elif name == "rotate":
            affine["degrees"] = _num(value, 15.0, name)
        elif name == "scale":
            affine["scale"] = _positive_range(value, (0.9, 1.1), name)
        elif name == "translate":
            t = _num(value, 0.1, name)
            if not 0.0 <= t <= 1.0:
                raise CnnkitError(f"augmentation 'translate={value}' needs a fraction between 0 and 1")
            affine["translate"] = (t, t)
        elif name == "affine":
            affine.setdefault("degrees", 10.0)
            affine.setdefault("translate", (0.1, 0.1))
            affine.setdefault("scale", (0.9, 1.1))
        elif name == "crop":
            out.append(v2.RandomResizedCrop(imgsz, scale=(_prob(value, 0.5, name), 1.0), antialias=True))
        elif name == "jitter":
            s = _num(value, 0.4, name)
            out.append(v2.ColorJitter(brightness=s, contrast=s, saturation=s, hue=min(0.5, s / 4)))
        elif name in ("erase", "cutout"):
            out.append(_Erase(_prob(value, 0.25, name)))
        elif name == "blur":
            out.append(v2.GaussianBlur(kernel_size=5, sigma=(0.1, _num(value, 1.5, name))))
        elif name == "noise":
            std = _num(value, 0.05, name)
            if std < 0:
                raise CnnkitError(f"augmentation 'noise={value}' needs a standard deviation >= 0")
            out.append(v2.GaussianNoise(sigma=std))
        elif name == "gamma":
            out.append(RandomGamma(_positive_range(value, (0.7, 1.5), name)))
        elif name == "shadow":
            out.append(RandomShadow(_prob(value, 0.5, name)))
        elif name == "randaugment":
            n, m = _ints(value, (2, 9), name, "N:M, N ops (>= 0) of magnitude M (0-30)")
            if m > 30:
                raise CnnkitError(f"augmentation 'randaugment={value}' needs a magnitude M from 0 to 30")
            out.append(RandAugment(num_ops=n, magnitude=m, interpolation=v2.InterpolationMode.BILINEAR))
        elif name == "trivialaugment":
            if value:
                raise CnnkitError("augmentation 'trivialaugment' takes no value")
            out.append(TrivialAugmentWide(interpolation=v2.InterpolationMode.BILINEAR))
        elif name == "autoaugment":
            if value:
                raise CnnkitError("augmentation 'autoaugment' takes no value")
            out.append(AutoAugment(interpolation=v2.InterpolationMode.BILINEAR))
        else:
            raise unknown_aug(name)
    if affine:
        out.insert(0, v2.RandomAffine(degrees=affine.get("degrees", 0.0),
                                      translate=affine.get("translate"), scale=affine.get("scale")))
    return out


_TARGETS = tuple(t for t in (tv_tensors.BoundingBoxes, tv_tensors.Mask,
                             getattr(tv_tensors, "KeyPoints", None)) if t is not None)


class _Erase(v2.RandomErasing):
    """Random erasing (cutout) filled with 0 on uint8 or float images.

    Boxes and masks pass through unchanged (an occluded object keeps its box and mask), without
    the warning ``v2.RandomErasing`` prints on every call that gets them.
    """

    def __init__(self, p: float):
        super().__init__(p=p, value=0)

    def _call_kernel(self, functional, inpt, *args, **kwargs):
        if isinstance(inpt, _TARGETS):
            return inpt
        return super()._call_kernel(functional, inpt, *args, **kwargs)


class _ImageOnly(v2.Transform):
    """Base of the hand-written photometric transforms: ``make_params`` draws the parameters,
    ``apply`` changes the image (uint8 or float tensor ``(..., C, H, W)``); boxes, masks and
    other targets pass through untouched because no pixel moves."""

    def apply(self, image: torch.Tensor, params: dict) -> torch.Tensor:
        raise NotImplementedError

    def transform(self, inpt, params: dict):
        if isinstance(inpt, _TARGETS) or params.get("skip"):
            return inpt
        if isinstance(inpt, PIL.Image.Image):
            return F.to_pil_image(self.apply(F.pil_to_tensor(inpt), params), mode=inpt.mode)
        out = self.apply(inpt.as_subclass(torch.Tensor), params)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out

    # torchvision < 0.21 calls these private names.
    def _get_params(self, flat_inputs: list) -> dict:
        return self.make_params(flat_inputs)

    def _transform(self, inpt, params: dict):
        return self.transform(inpt, params)


class RandomGamma(_ImageOnly):
    """Random gamma correction ``out = in ** gamma`` (on [0, 1]); ``gamma`` log-uniform in ``gamma``.

    torchvision has ``F.adjust_gamma`` but no random transform around it.

    Args:
        gamma: (low, high) range of the exponent; < 1 brightens the shadows, > 1 darkens them.
    """

    def __init__(self, gamma: tuple[float, float] = (0.7, 1.5)):
        super().__init__()
        self.gamma = gamma

    def make_params(self, flat_inputs: list) -> dict:
        lo, hi = math.log(self.gamma[0]), math.log(self.gamma[1])
        return {"gamma": math.exp(lo + (hi - lo) * float(torch.rand(())))}

    def apply(self, image: torch.Tensor, params: dict) -> torch.Tensor:
        return F.adjust_gamma(image, params["gamma"])


def shadow(image: torch.Tensor, angle: float, offset: float, darkness: float,
           softness: float) -> torch.Tensor:
    """Darken one side of a straight soft-edged boundary across the image.

    The boundary is the line ``x cos(angle) + y sin(angle) = offset`` in coordinates where the
    image spans [-1, 1] on both axes; the side beyond it loses ``darkness`` of its light, with a
    smooth ramp ``softness`` wide (same units) between lit and shadowed parts.

    Shape:
        image: ``(..., C, H, W)``, uint8 or float in [0, 1]; the output has the same shape and dtype.
    """
    h, w = image.shape[-2:]
    ys = (torch.arange(h, device=image.device, dtype=torch.float32) + 0.5) * (2.0 / h) - 1.0
    xs = (torch.arange(w, device=image.device, dtype=torch.float32) + 0.5) * (2.0 / w) - 1.0
    d = xs[None, :] * math.cos(angle) + ys[:, None] * math.sin(angle) - offset  # (H, W)
    ramp = (d / max(softness, 1e-6) + 0.5).clamp(0.0, 1.0)
    factor = 1.0 - darkness * ramp * ramp * (3.0 - 2.0 * ramp)  # smoothstep
    out = image.float() * factor
    if image.is_floating_point():
        return out.to(image.dtype)
    return out.round_().clamp_(0, 255).to(image.dtype)


class RandomShadow(_ImageOnly):
    """With probability ``p``, cast a soft shadow (an illumination change) over part of the image.

    Hand-written (about 30 lines): torchvision has no shadow or illumination-gradient transform,
    and albumentations' polygon shadow would add a dependency for one transform. The boundary
    passes within the middle half of the image at a random angle, so the shadow covers roughly a
    quarter to three quarters of it. Boxes and masks pass through unchanged.

    Args:
        p: probability of applying the shadow.
        darkness: (low, high) fraction of the light removed in the shadow.
        softness: (low, high) width of the penumbra as a fraction of the image size.
    """

    def __init__(self, p: float = 0.5, darkness: tuple[float, float] = (0.3, 0.7),
                 softness: tuple[float, float] = (0.02, 0.3)):
        super().__init__()
        self.p, self.darkness, self.softness = p, darkness, softness

    def make_params(self, flat_inputs: list) -> dict:
        u = torch.rand(5).tolist()
        return {"skip": u[0] >= self.p, "angle": 2 * math.pi * u[1], "offset": u[2] - 0.5,
                "darkness": self.darkness[0] + (self.darkness[1] - self.darkness[0]) * u[3],
                "softness": 2 * (self.softness[0] + (self.softness[1] - self.softness[0]) * u[4])}

    def apply(self, image: torch.Tensor, params: dict) -> torch.Tensor:
        return shadow(image, params["angle"], params["offset"], params["darkness"], params["softness"])


_GEOMETRIC_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})


class _TargetsFollow:
    """Lets torchvision's auto-augment policies take boxes and masks beside the image.

    torchvision's ``AutoAugment``, ``RandAugment`` and ``TrivialAugmentWide`` refuse
    ``BoundingBoxes`` and ``Mask`` inputs. This mixin keeps their sampling and image ops and
    runs each geometric op (shear, translate, rotate) through the same v2 functional on the
    boxes and masks too, so they stay aligned; photometric ops leave them alone. The targets
    of the call in progress are held on the instance (a transform runs one call at a time).
    """

    _following: list

    def _flatten_and_extract_image_or_video(self, inputs, unsupported_types=()):
        flat_with_spec, image = super()._flatten_and_extract_image_or_video(inputs, unsupported_types=())
        flat = flat_with_spec[0]
        self._following = [(i, x) for i, x in enumerate(flat) if isinstance(x, _TARGETS)]
        return flat_with_spec, image

    def _apply_image_or_video_transform(self, image, transform_id, magnitude, interpolation, fill):
        if transform_id in _GEOMETRIC_OPS:
            self._following = [(i, super(_TargetsFollow, self)._apply_image_or_video_transform(
                t, transform_id, magnitude, interpolation, fill)) for i, t in self._following]
        return super()._apply_image_or_video_transform(image, transform_id, magnitude, interpolation, fill)

    def _unflatten_and_insert_image_or_video(self, flat_with_spec, image):
        for i, t in self._following:
            flat_with_spec[0][i] = t
        self._following = []
        return super()._unflatten_and_insert_image_or_video(flat_with_spec, image)


class RandAugment(_TargetsFollow, v2.RandAugment):
    """``v2.RandAugment`` whose geometric ops also move boxes and masks."""


class TrivialAugmentWide(_TargetsFollow, v2.TrivialAugmentWide):
    """``v2.TrivialAugmentWide`` whose geometric ops also move boxes and masks."""


class AutoAugment(_TargetsFollow, v2.AutoAugment):
    """``v2.AutoAugment`` (ImageNet policy) whose geometric ops also move boxes and masks."""
