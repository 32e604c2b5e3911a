"""Defaults derived from the data (issue 19): what a user's folder of images trains at when
an option is left out.

Built-in datasets keep their tuned defaults. For a user's images, one fixed default is a trap:
a 224 px input upsamples 8x8 digits 28 times (the run is 700x slower and no better), and a
horizontal flip turns a mirrored digit or letter into another symbol. So the input size comes
from the images themselves (a sample of their headers, nothing decoded): the median image's
side, rounded to the network's stride and capped at the task's usual size, so images are never
upsampled beyond the smallest input the networks take; and folder augmentation keeps labels
(no flips unless asked). A small training set gets a smaller batch, so an epoch still takes
enough optimizer steps. Each choice carries its reason, printed in the run header and written
next to the value in ``config.yaml``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

MIN_SIDE = 16  # the smallest input cnnkit picks (8x8 digits train best at 16: the built-in default)
SAMPLE = 256  # image headers read to find the typical size
MIN_STEPS = 20  # optimizer steps per epoch a small training set still gets (the batch is halved for it)
MIN_BATCH = 8  # never below: batch-norm statistics of fewer images are noise


@dataclass(frozen=True)
class Derived:
    """One option's value chosen from the data, and why."""

    value: Any
    reason: str


def image_sizes(paths: Sequence[str], sample: int = SAMPLE, seed: int = 0) -> list[tuple[int, int]]:
    """``(height, width)`` of up to ``sample`` of ``paths`` (spread by a seeded draw), from
    their headers; unreadable files are left out (they are reported when loaded)."""
    paths = list(paths)
    if len(paths) > sample:
        paths = random.Random(seed).sample(paths, sample)
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                w, h = im.size
        except Exception:  # noqa: BLE001, S112 - unreadable: skipped here, counted by the loader
            continue
        out.append((int(h), int(w)))
    return out


def input_size(sizes: Sequence[tuple[int, int]], stride: int, cap: int, side: str = "area") -> Derived | None:
    """The square input for images of ``sizes``: the median image's side (``area``: the side of
    a square of its pixel count, for inputs squashed to a square; ``long``: its longer side, for
    letterboxed inputs), rounded to a multiple of ``stride``, at least :data:`MIN_SIDE` and at
    most ``cap``. None without sizes."""
    if not sizes:
        return None

    def length(s: tuple[int, int]) -> float:
        return math.sqrt(s[0] * s[1]) if side == "area" else max(s)

    h, w = sorted(sizes, key=length)[len(sizes) // 2]
    mid = length((h, w))
    size = max(MIN_SIDE, stride, round(mid / stride) * stride)
    what = f"median image {w}x{h} px"
    lo, hi = min(sizes, key=length), max(sizes, key=length)
    if lo != hi:
        what += f" (from {lo[1]}x{lo[0]} to {hi[1]}x{hi[0]})"
    if size > cap:
        return Derived(cap, f"{what}; capped at {cap}")
    if size > mid + stride / 2:
        return Derived(size, f"{what}; inputs are at least {size} px")
    return Derived(size, f"{what}, rounded to the network's stride {stride}")


def model_stride(model: str) -> int:
    """The input multiple a classifier wants: smallcnn skips pooling on small maps (8 is enough);
    registry and timm networks downsample 32x."""
    return 8 if model == "smallcnn" else 32


def folder_aug(size: int) -> Derived:
    """Augmentation for a user's classification images: label-keeping only. Small images (icons,
    digits, glyphs) get a mild affine jitter; larger ones a random resized crop keeping at least
    60% of the image. Never a flip: a mirrored digit, letter or arrow is another class."""
    if size < 64:
        return Derived("affine", f"small images ({size} px): a mild affine jitter; no flips (a mirrored "
                                 "image may be another class: add flip to --aug if yours allow it)")
    return Derived("crop=0.6", "random crops keeping 60% or more of the image; no flips (a mirrored image "
                               "may be another class: add flip to --aug if yours allow it)")


def adopt(cfg: Any, derived: dict[str, Derived], name: str, choice: Derived | None) -> None:
    """Set ``cfg.name`` to a derived ``choice`` (when there is one) and record why in ``derived``
    (the run header and ``config.yaml`` say so)."""
    if choice is not None:
        setattr(cfg, name, choice.value)
        derived[name] = choice


def derive_imgsz(cfg: Any, derived: dict[str, Derived], paths: Sequence[str | None], stride: int, cap: int,
                 side: str = "area") -> None:
    """``--imgsz`` left out, for a user's image files (``paths``; built-in data has none): the
    size :func:`input_size` picks for them."""
    if cfg.imgsz is None and paths and all(paths):
        adopt(cfg, derived, "imgsz", input_size(image_sizes(paths, seed=cfg.seed), stride, cap, side))


def fit_batch(n_train: int, default: int) -> int:
    """The batch for ``n_train`` training images: ``default``, halved while an epoch would take
    fewer than :data:`MIN_STEPS` optimizer steps, never below :data:`MIN_BATCH` (a task whose
    default is already smaller, such as 3-D volumes, keeps it)."""
    batch = default
    while batch // 2 >= MIN_BATCH and n_train / batch < MIN_STEPS:
        batch //= 2
    return batch


def resolve_batch_lr(cfg: Any, derived: dict[str, Derived], n_train: int, user_data: bool) -> None:
    """Fill ``cfg.batch`` and ``cfg.lr`` where the options were left out (None) with the task's
    defaults (``type(cfg).DEFAULT_BATCH`` / ``DEFAULT_LR``), except that a user's small training
    set (``user_data``; built-in data keep their tuned values) gets :func:`fit_batch`, recorded
    in ``derived``.

    The learning rate stays at the default: on digits folders of 100 to 400 images
    (``benchmarks/small_data_batch.py``) the smaller batch at the default LR did as well as or
    better than the same batch with the LR scaled by the square-root rule usual for AdamW.
    """
    default_batch = type(cfg).DEFAULT_BATCH
    if cfg.batch is None:
        cfg.batch = default_batch
        if user_data and (fitted := fit_batch(n_train, default_batch)) != default_batch:
            adopt(cfg, derived, "batch", Derived(fitted, (
                f"{n_train} training images: batch {fitted} makes an epoch {n_train // fitted} steps "
                f"(at {default_batch} it would be {n_train // default_batch}; at least {MIN_STEPS} wanted)")))
    if cfg.lr is None:
        cfg.lr = type(cfg).DEFAULT_LR
