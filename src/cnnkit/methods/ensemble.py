"""Ensembles and test-time augmentation (TTA) for any model that returns class scores.

Both are plain ``nn.Module`` wrappers that return **log-probabilities** ``(B, K)``: whatever
applies ``softmax`` or ``argmax`` to a model's output (the task's metrics, its decoding,
:func:`cnnkit.engine.trainer.evaluate`) sees the combined probabilities and their ranking
unchanged, so an ensemble goes through the same evaluation and prediction code as one model.

- :class:`Ensemble` combines members trained on the same classes (same order) and channels:
  ``mode="mean"`` averages their softmax probabilities; ``mode="vote"`` takes the majority of
  their top-1 labels, ties broken by the mean probability.
- :class:`TTA` averages one model's probabilities over views of the input (identity,
  horizontal or vertical flip, zooms), parsed from a spec such as ``"flip,scale"`` by
  :func:`parse_tta`.
- :func:`build_ensemble` puts members, their preprocessing and TTA together. Members may
  differ in architecture and in preprocessing (input size, normalization): when they differ,
  the ensemble takes images scaled to [0, 1] at the largest member's size and
  :class:`Standardize` resizes and normalizes them for each member.

A few lines of tensor code each: ttach (the usual TTA package) wraps segmentation and
keypoints too and would add a dependency for three transforms.
"""

from __future__ import annotations

import difflib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.data.transforms import Preprocess
from cnnkit.errors import CnnkitError, ModelError

ENSEMBLE_MODES = ("mean", "vote")
TTA_NAMES = ("flip", "vflip", "scale")
DEFAULT_TTA_SCALE = 0.1


# ---------------------------------------------------------------------------------------
# Combining members
# ---------------------------------------------------------------------------------------
def combine(member_log_probs: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Combine members' log-probabilities into the ensemble's log-probabilities.

    ``mean`` returns ``log(mean_m softmax_m)``. ``vote`` returns the log of
    ``(shares + eps * mean_p) / (1 + eps)`` with ``shares`` the fraction of members whose
    top-1 is each class, ``mean_p`` the mean probability and ``eps = 1 / (2M)``: a class with
    more votes always ranks higher (vote shares differ by at least ``1/M``, the tie-break term
    by less than ``1/(2M)``), equal votes are ordered by mean probability, and the result is
    still a probability distribution.

    Args:
        member_log_probs: ``(M, B, K)`` log-probabilities (or logits) of ``M`` members.
        mode: ``"mean"`` or ``"vote"``.

    Shape:
        - Input: ``(M, B, K)``
        - Output: ``(B, K)`` log-probabilities.

    Examples:
        >>> lp = torch.tensor([[[5.0, 0.0]], [[0.0, 1.0]], [[0.0, 1.0]]])  # 3 members, 1 image
        >>> combine(lp, "mean").exp().argmax(1).item(), combine(lp, "vote").exp().argmax(1).item()
        (0, 1)
    """
    if mode not in ENSEMBLE_MODES:
        raise CnnkitError(f"ensemble mode must be one of {', '.join(ENSEMBLE_MODES)}, got '{mode}'")
    lp = member_log_probs.float().log_softmax(-1)  # (M, B, K)
    m, k = lp.shape[0], lp.shape[-1]
    if mode == "mean":
        return torch.logsumexp(lp, 0) - math.log(m)
    shares = F.one_hot(lp.argmax(-1), k).sum(0).float() / m  # (B, K)
    eps = 1.0 / (2 * m)
    p = (shares + eps * lp.exp().mean(0)) / (1 + eps)
    return p.clamp_min(torch.finfo(p.dtype).tiny).log()


class Ensemble(nn.Module):
    """Members' class scores combined by ``mean`` probability or majority ``vote``.

    Every member takes the same input tensor and returns ``(B, K)`` logits or
    log-probabilities over the same classes in the same order (checking classes and channels is
    the caller's part: :func:`build_ensemble` and :func:`load_ensemble` do it).

    Args:
        members: the models (at least one).
        mode: ``"mean"`` (average softmax probabilities) or ``"vote"`` (see :func:`combine`).

    Shape:
        - Input: whatever the members take, e.g. ``(B, C, H, W)``.
        - Output: ``(B, K)`` log-probabilities.

    Examples:
        >>> ens = Ensemble([create_model("smallcnn", 10, 1) for _ in range(3)], mode="vote")
        >>> ens(torch.randn(2, 1, 16, 16)).exp().sum(1)
        tensor([1.0000, 1.0000], grad_fn=<SumBackward1>)
    """

    def __init__(self, members: Sequence[nn.Module], mode: str = "mean"):
        super().__init__()
        if mode not in ENSEMBLE_MODES:
            raise CnnkitError(f"--ensemble must be one of {', '.join(ENSEMBLE_MODES)}, got '{mode}'")
        if not members:
            raise ModelError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.mode = mode

    def member_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's log-probabilities, stacked: ``(M, B, K)``."""
        return torch.stack([m(x).float().log_softmax(-1) for m in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine(self.member_outputs(x), self.mode)


# ---------------------------------------------------------------------------------------
# Test-time augmentation
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class View:
    """One test-time view of a batch: optional flips, then a zoom by ``scale``.

    ``scale > 1`` enlarges the content and centre-crops back to the input size; ``scale < 1``
    shrinks it and pads back with the border pixels (``replicate``), so a dark or plain
    background stays as it was. The output has the input's shape.
    """

    hflip: bool = False
    vflip: bool = False
    scale: float = 1.0

    @property
    def name(self) -> str:
        parts = [n for n, on in (("hflip", self.hflip), ("vflip", self.vflip)) if on]
        if self.scale != 1.0:
            parts.append(f"scale{self.scale:g}")
        return "+".join(parts) or "identity"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.hflip:
            x = x.flip(-1)
        if self.vflip:
            x = x.flip(-2)
        if self.scale == 1.0:
            return x
        h, w = x.shape[-2:]
        nh, nw = max(1, round(h * self.scale)), max(1, round(w * self.scale))
        if (nh, nw) == (h, w):
            return x
        y = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False,
                          antialias=self.scale < 1)
        if self.scale > 1:
            top, left = (nh - h) // 2, (nw - w) // 2
            return y[..., top:top + h, left:left + w]
        top, left = (h - nh) // 2, (w - nw) // 2
        return F.pad(y, (left, w - nw - left, top, h - nh - top), mode="replicate")


def _scale_factors(value: str) -> tuple[float, ...]:
    try:
        parts = [float(v) for v in value.split(":")] if value else [DEFAULT_TTA_SCALE]
    except ValueError:
        parts = []
    if len(parts) == 1 and 0 < parts[0] < 1:
        return (1 - parts[0], 1 + parts[0])
    if len(parts) == 2 and all(p > 0 for p in parts):
        return tuple(parts)
    raise CnnkitError(f"--tta 'scale={value}' needs S in (0, 1) (zooms 1-S and 1+S) or two "
                      "positive factors LOW:HIGH, e.g. scale=0.1 or scale=0.9:1.1")


def parse_tta(spec: str | None) -> list[View]:
    """Parse a comma-separated TTA spec into views; every combination of the names is one view.

    Names: ``flip`` (horizontal), ``vflip`` (vertical), ``scale[=S]`` (zoom by ``1-S`` and
    ``1+S``, default ``S=0.1``; or ``scale=LOW:HIGH``); ``none`` (or an empty spec) for no
    TTA. The identity view is always included. Use only views that keep the label: a flipped
    digit or text is another symbol, so ``flip`` suits objects and scenes, ``scale`` suits
    almost everything.

    Raises:
        CnnkitError: an unknown name (with the closest known one) or a bad ``scale`` value.

    Examples:
        >>> [v.name for v in parse_tta("flip,scale")]
        ['identity', 'scale0.9', 'scale1.1', 'hflip', 'hflip+scale0.9', 'hflip+scale1.1']
    """
    options = {"hflip": (False,), "vflip": (False,), "scale": (1.0,)}
    for item in (s.strip() for s in (spec or "").split(",")):
        if not item or item == "none":
            continue
        name, _, value = item.partition("=")
        if name == "flip" and not value:
            options["hflip"] = (False, True)
        elif name == "vflip" and not value:
            options["vflip"] = (False, True)
        elif name == "scale":
            options["scale"] = (1.0, *_scale_factors(value))
        elif name in ("flip", "vflip"):
            raise CnnkitError(f"--tta '{item}' takes no value; write '{name}'")
        else:
            close = difflib.get_close_matches(name, TTA_NAMES, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise CnnkitError(f"unknown --tta view '{name}'; {hint}choose from {', '.join(TTA_NAMES)}")
    return [View(h, v, s) for h, v, s in itertools.product(options["hflip"], options["vflip"],
                                                           options["scale"])]


class TTA(nn.Module):
    """Average a model's softmax probabilities over test-time views of the input.

    Args:
        model: returns ``(B, K)`` logits or log-probabilities (a model or an :class:`Ensemble`).
        views: from :func:`parse_tta`; a spec string is parsed for you.

    Shape:
        - Input: ``(B, C, H, W)``
        - Output: ``(B, K)`` log-probabilities, ``log(mean_v softmax(model(view_v(x))))``.

    Examples:
        >>> tta = TTA(create_model("smallcnn", 10, 1), "flip,scale")
        >>> len(tta.views), tta(torch.randn(2, 1, 16, 16)).shape
        (6, torch.Size([2, 10]))
    """

    def __init__(self, model: nn.Module, views: Sequence[View] | str):
        super().__init__()
        self.model = model
        self.views = list(parse_tta(views) if isinstance(views, str) else views) or [View()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lp = torch.stack([self.model(v(x)).float().log_softmax(-1) for v in self.views])  # (V, B, K)
        return torch.logsumexp(lp, 0) - math.log(len(self.views))


# ---------------------------------------------------------------------------------------
# Members with different preprocessing
# ---------------------------------------------------------------------------------------
class Standardize(nn.Module):
    """Resize images in [0, 1] to a member's input size and normalize them with its mean/std.

    Used when ensemble members were trained with different preprocessing; the ensemble's own
    input is then ``[0, 1]`` images at the largest member's size (see
    :func:`ensemble_preprocess`). A member whose size is that size sees exactly what it sees
    alone; a smaller one gets an antialiased downscale of the larger image, which can differ
    from resizing the original by rounding.

    Shape:
        - Input: ``(B, C, H, W)`` in ``[0, 1]``.
        - Output: the model's output.
    """

    def __init__(self, model: nn.Module, pre: Preprocess):
        super().__init__()
        self.model = model
        self.imgsz = pre.imgsz
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.imgsz, self.imgsz):
            x = F.interpolate(x, size=(self.imgsz, self.imgsz), mode="bilinear", align_corners=False,
                              antialias=True)
        return self.model((x - self.mean) / self.std)


def ensemble_preprocess(pres: Sequence[Preprocess]) -> tuple[Preprocess, bool]:
    """The preprocessing an ensemble's input gets, and whether members need :class:`Standardize`.

    Members with identical preprocessing share it (no adapter, exactly their own inputs);
    otherwise the input is ``[0, 1]`` images (mean 0, std 1) at the largest member's size.

    Raises:
        ModelError: members take different channel counts, resize modes or observation-mask
            inputs, or members with a mask channel (``--missing-input mask``) differ otherwise.
    """
    first = pres[0]
    for i, p in enumerate(pres[1:], start=2):
        if p.channels != first.channels:
            raise ModelError(f"ensemble member {i} takes {p.channels}-channel images but member 1 "
                             f"takes {first.channels}; members must take the same channels")
        if p.resize != first.resize:
            raise ModelError(f"ensemble member {i} resizes with '{p.resize}' but member 1 with "
                             f"'{first.resize}'; members must resize the same way")
        mask, mask1 = getattr(p, "mask_channel", False), getattr(first, "mask_channel", False)
        if mask != mask1:
            raise ModelError(f"ensemble member {i} {'takes' if mask else 'does not take'} an observation-mask "
                             f"channel (--missing-input mask) but member 1 {'does' if mask1 else 'does not'}; "
                             "members must take the same inputs")
    if all(p == first for p in pres):
        return first, False
    if getattr(first, "mask_channel", False):
        raise ModelError("ensemble members with a mask channel (--missing-input mask) must share their "
                         "input size and normalization")
    c = first.channels
    return Preprocess(imgsz=max(p.imgsz for p in pres), mean=(0.0,) * c, std=(1.0,) * c, channels=c,
                      resize=first.resize), True


def build_ensemble(models: Sequence[nn.Module], pres: Sequence[Preprocess], mode: str = "mean",
                   tta: str | Sequence[View] | None = None) -> tuple[nn.Module, Preprocess]:
    """One module (and the preprocessing of its input) for members, their preprocessing and TTA.

    TTA wraps each member before they are combined, so in ``vote`` mode every member votes with
    its TTA-averaged prediction (for ``mean`` the order makes no difference). A single member
    without TTA comes back unchanged with its own preprocessing.

    Args:
        models: the member models (same classes in the same order; not checked here).
        pres: each member's :class:`~cnnkit.data.transforms.Preprocess`.
        mode: ``"mean"`` or ``"vote"``.
        tta: a spec for :func:`parse_tta`, parsed views, or ``None``.

    Examples:
        >>> pre = Preprocess(16, (0.5,), (0.25,), 1)
        >>> module, inp = build_ensemble([model_a, model_b], [pre, pre], "mean", "scale")
        >>> module(inp(image)[None]).exp().sum().item()
        1.0
    """
    if mode not in ENSEMBLE_MODES:
        raise CnnkitError(f"--ensemble must be one of {', '.join(ENSEMBLE_MODES)}, got '{mode}'")
    if len(models) != len(pres) or not models:
        raise ModelError("build_ensemble needs one Preprocess per member and at least one member")
    views = parse_tta(tta) if isinstance(tta, str) or tta is None else list(tta)
    pre, adapt = ensemble_preprocess(pres)
    members = [Standardize(m, p) if adapt else m for m, p in zip(models, pres)]
    if len(views) > 1:
        members = [TTA(m, views) for m in members]
    if len(members) == 1:
        return members[0], pre
    return Ensemble(members, mode), pre


def load_ensemble(weights: str | Path | Sequence[str | Path], device: str | None = "cpu",
                  ensemble: str = "mean", tta: str | None = None):
    """Load one or more weights as one classifier: an ensemble (``mean`` or ``vote``) and/or TTA.

    Returns a :class:`~cnnkit.runtime.pipeline.Predictor`. One weights file without TTA is
    exactly ``cnnkit.load`` (an ``.onnx`` runs in ONNX Runtime).
    Several must be classifiers of the same classes in the same order and with the same
    channels; they may differ in architecture and input size (see
    :func:`build_ensemble`). The card's ``extra`` records what was
    combined: ``ensemble = {"mode", "members"}`` and ``tta`` (view names).

    Examples:
        >>> model = load_ensemble(["runs/a", "runs/b", "runs/c"], ensemble="vote", tta="scale")
        >>> model("digit.png")[0].label
    """
    from dataclasses import replace

    from cnnkit.engine.checkpoint import resolve_weights
    from cnnkit.runtime.backend import TorchBackend
    from cnnkit.runtime.pipeline import Predictor, load, pipeline_for

    paths = [weights] if isinstance(weights, (str, Path)) else list(weights)
    if not paths:
        raise CnnkitError("--weights needs at least one weights file or run folder")
    if ensemble not in ENSEMBLE_MODES:
        raise CnnkitError(f"--ensemble must be one of {', '.join(ENSEMBLE_MODES)}, got '{ensemble}'")
    views = parse_tta(tta)
    if len(paths) == 1 and len(views) == 1:
        return load(paths[0], device, task="classify")
    if any(Path(p).suffix == ".onnx" for p in paths):
        raise CnnkitError("ensembles and --tta combine PyTorch weights; give .safetensors files or run folders")
    members = [load(p, device, task="classify") for p in paths]
    first = members[0]
    for path, m in zip(paths[1:], members[1:]):
        if m.classes != first.classes:
            ours, theirs = ((f"{len(m.classes)} classes", f"{len(first.classes)}")
                            if len(m.classes) != len(first.classes) else (f"classes {m.classes}", f"{first.classes}"))
            raise ModelError(f"weights '{path}' were trained on {ours} but '{paths[0]}' on {theirs}; "
                             "ensemble members need the same classes in the same order")
    # every member's core takes [0, 1] images and normalizes itself: the ensemble only resizes
    pres = [Preprocess(m.card.input.height, (0.0,) * m.card.input.channels, (1.0,) * m.card.input.channels,
                       m.card.input.channels, mask_channel=m.card.input.mask_channel) for m in members]
    module, pre = build_ensemble([m.backend.core for m in members], pres, ensemble, views)
    extra = dict(first.card.extra)
    if len(members) > 1:
        extra["ensemble"] = {"mode": ensemble, "members": [str(resolve_weights(p)) for p in paths]}
    if len(views) > 1:
        extra["tta"] = [v.name for v in views]
    card = replace(first.card, input=replace(first.card.input, height=pre.imgsz, width=pre.imgsz), extra=extra)
    return Predictor(card, pipeline_for(card), TorchBackend(module, first.device), paths[0], module)
