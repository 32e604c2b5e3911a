"""Intermediate features of any cnnkit model: named stages, extraction, and pictures of them.

Every cnnkit model has the timm interface (``forward_features``, ``forward_head(pre_logits=)``,
``feature_info``), so one set of functions serves smallcnn and every timm backbone:

- :func:`list_layers` names the stages a user cares about: ``stem`` (where the model has such a
  module), the ``feature_info`` stages (``stages.0-3`` for smallcnn, ``act1 layer1-4`` for
  resnets, ...), ``pre_logits`` (the model's own pooled embedding) and ``logits``. Any other
  module name from ``model.named_modules()`` is accepted too.
- :func:`extract` runs batches through the model with forward hooks (not torch.fx: smallcnn's
  pooling depends on the feature-map size, which symbolic tracing cannot follow) and returns
  feature maps or globally average-pooled vectors.
- :func:`plot_filters` and :func:`plot_feature_maps` draw first-layer filters and the most
  active channels of each stage.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from cnnkit.errors import ModelError

# Names that are not modules: the model's own embedding and its classifier output.
SPECIAL_LAYERS = ("pre_logits", "logits")


class _Captured(Exception):
    """Raised inside a hook to stop the forward pass once every wanted layer has run."""


def _arch(model: nn.Module) -> str:
    return getattr(model, "cnnkit_arch", type(model).__name__)


def _feature_modules(model: nn.Module) -> list[str]:
    info = getattr(model, "feature_info", None)
    if info is None:
        return []
    dicts = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
    return [d["module"] for d in dicts if isinstance(d, Mapping) and d.get("module")]


def list_layers(model: nn.Module) -> list[str]:
    """The named stages of ``model``, from the input side to the output.

    ``stem`` (when the model has a module of that name and it is not already a stage), the
    ``feature_info`` stages, then ``pre_logits`` and ``logits``. A model without
    ``feature_info`` lists its top-level children instead.

    Examples:
        >>> list_layers(create_model("smallcnn", 10, 1))
        ['stem', 'stages.0', 'stages.1', 'stages.2', 'stages.3', 'pre_logits', 'logits']
    """
    stages = _feature_modules(model)
    if not stages:
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        stages = [n for n, m in model.named_children() if m is not head]
    modules = dict(model.named_modules())
    stem = ["stem"] if "stem" in modules and "stem" not in stages else []
    return stem + [s for s in stages if s in modules] + list(SPECIAL_LAYERS)


def resolve_layer(model: nn.Module, name: str) -> str:
    """Check that ``name`` is a listed layer or a module of ``model``; return it.

    Raises:
        ModelError: for an unknown name, with the closest names as a hint.
    """
    if name in SPECIAL_LAYERS or (name and name in dict(model.named_modules())):
        return name
    listed = list_layers(model)
    close = difflib.get_close_matches(name, listed, n=1, cutoff=0.6) or difflib.get_close_matches(
        name, [n for n, _ in model.named_modules() if n], n=1, cutoff=0.75)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ModelError(f"unknown layer '{name}' in {_arch(model)}; {hint}the stages are "
                     f"{', '.join(listed)} (any module name from named_modules() also works)")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block, then the caller's mode back (no silent side effect)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def capture(model: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Outputs of several layers for one batch, in one forward pass.

    Forward hooks record the first output of each module layer; the pass stops as soon as
    all of them have run (so asking for ``stem`` costs one stem). The hooks are removed before
    this returns, whatever happens. Runs under ``no_grad`` in the model's current mode.

    Args:
        model: a cnnkit model (timm interface).
        x: a preprocessed batch on the model's device.
        layers: names accepted by :func:`resolve_layer`.

    Returns:
        ``{name: output}``, detached copies on the model's device.

    Shape:
        x ``(B, C, H, W)``; a stage gives ``(B, C', H', W')``, ``pre_logits`` ``(B, D)``,
        ``logits`` ``(B, num_classes)``.
    """
    layers = [resolve_layer(model, n) for n in layers]
    module_layers = [n for n in layers if n not in SPECIAL_LAYERS]
    need_pre, need_logits = "pre_logits" in layers, "logits" in layers
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args, output) -> None:
            if name in out:
                return
            if not isinstance(output, torch.Tensor):
                raise ModelError(f"layer '{name}' of {_arch(model)} returns {type(output).__name__}, "
                                 "not a tensor; pick a module that outputs a feature map")
            out[name] = output.detach().clone()  # clone: a later in-place op (ReLU) must not change it
            if len(out) == len(module_layers) and not (need_pre or need_logits):
                raise _Captured

        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in dict.fromkeys(module_layers)]
    try:
        with torch.no_grad():
            try:
                if need_pre:
                    feats = model.forward_features(x)
                    out["pre_logits"] = model.forward_head(feats, pre_logits=True).detach()
                    if need_logits:
                        out["logits"] = model.forward_head(feats).detach()
                elif need_logits:
                    out["logits"] = model(x).detach()
                else:
                    model(x)
            except _Captured:
                pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in module_layers if n not in out]
    if missing:
        raise ModelError(f"layer '{missing[0]}' of {_arch(model)} does not run in the forward pass; "
                         "pick another layer")
    return {n: out[n] for n in layers}


def pool(t: torch.Tensor) -> torch.Tensor:
    """Global average over every axis after the channel axis.

    Shape:
        ``(B, C, H, W)`` -> ``(B, C)``; a ``(B, D)`` input is returned as it is.
    """
    return t.mean(dim=tuple(range(2, t.ndim))) if t.ndim > 2 else t


def extract(model: nn.Module, images: torch.Tensor | Sequence[torch.Tensor], layer: str,
            pooled: bool = True, batch: int = 64) -> torch.Tensor:
    """Features of one layer for many images, computed in batches.

    The model runs in eval mode (its previous mode is restored afterwards) on its own device.

    Args:
        model: a cnnkit model (timm interface).
        images: preprocessed images, a ``(N, C, H, W)`` tensor or a sequence of ``(C, H, W)``.
        layer: a name from :func:`list_layers` or any module name.
        pooled: average each channel's map over space (global average pooling). ``pre_logits``
            and ``logits`` are vectors already and ignore it.
        batch: images per forward pass.

    Returns:
        float32 features on the CPU, one row per image, in order.

    Shape:
        pooled ``(N, C)``; maps ``(N, C, H', W')``; ``pre_logits`` ``(N, D)``; ``logits``
        ``(N, num_classes)``.

    Examples:
        >>> model = create_model("smallcnn", 10, in_chans=1)
        >>> extract(model, torch.zeros(5, 1, 16, 16), "stages.3", pooled=False).shape
        torch.Size([5, 128, 4, 4])
    """
    if batch < 1:
        raise ModelError(f"batch must be at least 1, got {batch}")
    layer = resolve_layer(model, layer)
    n = len(images)
    if n == 0:
        raise ModelError("no images to extract features from")
    device = next(model.parameters()).device
    chunks: list[torch.Tensor] = []
    with _eval_mode(model):
        for i in range(0, n, batch):
            part = images[i:i + batch]
            x = part if isinstance(part, torch.Tensor) else torch.stack(list(part))
            y = capture(model, x.to(device), [layer])[layer]
            chunks.append((pool(y) if pooled else y).float().cpu())
    return torch.cat(chunks)


def layer_shapes(model: nn.Module, input_shape: Sequence[int],
                 layers: Sequence[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Output shape (without the batch axis) of each layer for one input of ``input_shape``.

    Args:
        model: a cnnkit model.
        input_shape: ``(C, H, W)`` of one preprocessed image.
        layers: names to measure; default :func:`list_layers`.

    Shape:
        a stage gives ``(C', H', W')``; ``pre_logits`` ``(D,)``; ``logits`` ``(num_classes,)``.
    """
    layers = list(layers or list_layers(model))
    device = next(model.parameters()).device
    with _eval_mode(model):
        outs = capture(model, torch.zeros(1, *input_shape, device=device), layers)
    return {n: tuple(t.shape[1:]) for n, t in outs.items()}


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The first ``Conv2d`` in module order (the one that sees the pixels) and its name."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    raise ModelError(f"{_arch(model)} has no Conv2d layer whose filters could be drawn")


# ---------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------
def filter_images(weight: torch.Tensor) -> list[np.ndarray]:
    """Each filter of a conv weight as a displayable image, min-max normalized on its own.

    Three input channels are shown in colour (normalized jointly, so hues are kept); one
    channel in grey; any other count as the grey mean over the input channels.

    Shape:
        weight ``(O, I, kh, kw)`` -> O arrays ``(kh, kw, 3)`` (I = 3) or ``(kh, kw)``, in [0, 1].
    """
    w = weight.detach().float().cpu()
    if w.shape[1] != 3:
        w = w.mean(1, keepdim=True)
    images = []
    for f in w:  # (I, kh, kw)
        lo, hi = f.min(), f.max()
        f = (f - lo) / (hi - lo) if hi > lo else torch.full_like(f, 0.5)
        images.append(f[0].numpy() if f.shape[0] == 1 else f.permute(1, 2, 0).numpy())
    return images


def plot_filters(model: nn.Module, path: str | Path) -> Path:
    """Draw the first convolution's filters as a grid PNG.

    Returns:
        ``path``.
    """
    from cnnkit.utils.plotting import _plt, _save

    name, conv = first_conv(model)
    images = filter_images(conv.weight)
    o, i, kh, kw = conv.weight.shape
    cols = min(16, max(4, math.ceil(math.sqrt(o * 1.5))))
    rows = math.ceil(o / cols)
    plt = _plt()
    cell = 0.55 if kh <= 5 else 0.75
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols, cell * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, img in enumerate(images):
        axes.flat[k].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1,
                            interpolation="nearest")
    colour = "RGB" if i == 3 else ("grayscale" if i == 1 else f"mean of {i} channels")
    fig.suptitle(f"{_arch(model)} · first-layer filters '{name}' · {o} × {kh}×{kw} ({colour})\n"
                 "each filter scaled to its own min-max", fontsize=9)
    fig.subplots_adjust(wspace=0.08, hspace=0.08)
    path = Path(path)
    _save(fig, path)
    return path


def top_channels(fmap: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` channels with the largest mean activation, strongest first.

    Shape:
        fmap ``(C, H, W)``.
    """
    return pool(fmap[None])[0].topk(min(k, fmap.shape[0])).indices.tolist()


def plot_feature_maps(image: np.ndarray, maps: Mapping[str, torch.Tensor], path: str | Path,
                      topk: int = 8, title: str = "") -> Path:
    """One PNG: the input image, then a row per stage with its mean map and top-k channels.

    Each row shares one colour scale, so channels of a stage compare by brightness; the
    first panel of a row is the mean over all channels.

    Args:
        image: the input as the model sees it (``(H, W)`` or ``(H, W, 3)`` in [0, 1]).
        maps: ``{stage name: (C, H', W') feature map}`` for one image, in stage order.
        path: the PNG to write.
        topk: how many of the most active channels to show per stage.
        title: a line above the figure (for example the image name and prediction).

    Returns:
        ``path``.
    """
    from cnnkit.utils.plotting import _plt, _save

    plt = _plt()
    rows, cols = len(maps) + 1, topk + 1
    cell = 1.15
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols + 0.9, cell * rows + 0.5), squeeze=False)
    fig.subplots_adjust(wspace=0.06, hspace=0.35)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
    axes[0, 0].imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1,
                      interpolation="nearest")
    axes[0, 0].set_ylabel("input", fontsize=8)
    axes[0, 0].set_title(f"{image.shape[1]}×{image.shape[0]}", fontsize=7)
    for ax in axes[0, 1:]:
        ax.set_visible(False)
    legend = (f"rows: stages, input side first · columns: the mean over all channels, then the "
              f"{topk} most active channels\n(mean activation in each panel's title; one colour "
              "scale per row)")
    box = axes[0, 1].get_position()
    fig.text(box.x0, box.y0 + box.height / 2, f"{title}\n\n{legend}" if title else legend,
             fontsize=8.5, va="center", ha="left")
    for r, (name, fmap) in enumerate(maps.items(), start=1):
        fmap = fmap.detach().float().cpu()
        idx = top_channels(fmap, topk)
        panels = [fmap.mean(0)] + [fmap[c] for c in idx]
        lo = min(float(p.min()) for p in panels)
        hi = max(float(p.max()) for p in panels)
        hi = hi if hi > lo else lo + 1e-6
        c, h, w = fmap.shape
        for j, p in enumerate(panels):
            ax = axes[r, j]
            ax.imshow(p.numpy(), cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
            label = "mean" if j == 0 else f"ch {idx[j - 1]}"
            ax.set_title(f"{label} {float(p.mean()):.2f}", fontsize=7)
        axes[r, 0].set_ylabel(f"{name}\n{c}×{h}×{w}", fontsize=8)
    path = Path(path)
    _save(fig, path)
    return path
