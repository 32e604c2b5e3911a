"""Feature extraction and visualization behind ``cnnkit classify layers|features|visualize``.

The model-level work (hooks, pooling, drawing) lives in :mod:`cnnkit.methods.features`; this
module loads weights, reads images and writes files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnkit.data.decode import list_sources
from cnnkit.errors import CnnkitError, DataError, ImageDecodeError
from cnnkit.methods import features as F
from cnnkit.runtime.pipeline import Predictor
from cnnkit.runtime.pipeline import load as _load
from cnnkit.tasks.classify.pipeline import legacy_preprocess
from cnnkit.utils.io import atomic_write, write_json

WHAT = ("filters", "featuremaps")


@dataclass
class FeatureSet:
    """Features of a set of image files: ``array[i]`` belongs to ``paths[i]``."""

    array: np.ndarray
    paths: list[str]
    layer: str
    pooled: bool
    skipped: list[tuple[str, str]] = field(default_factory=list)


def load(path, device: str = "auto") -> Predictor:
    return _load(path, device, task="classify")


def image_batches(files: list[Path], batch: int, prepare, skipped: list[tuple[str, str]]):
    """Yield ``(images (B, C, H, W), paths)`` for ``files``, decoded and preprocessed by ``prepare``.

    An unreadable file in a list of several is appended to ``skipped`` as ``(path, reason)``;
    a single unreadable file raises its :class:`~cnnkit.errors.ImageDecodeError`.
    """
    import torch

    from cnnkit.errors import ImageDecodeError

    for i in range(0, len(files), batch):
        xs, paths = [], []
        for f in files[i:i + batch]:
            try:
                xs.append(prepare(f))
                paths.append(str(f))
            except ImageDecodeError as e:
                if len(files) == 1:
                    raise
                skipped.append((str(f), e.reason))
        if xs:
            yield torch.stack(xs), paths


def _check_batch(batch: int) -> None:
    if batch < 1:
        raise CnnkitError(f"--batch must be at least 1, got {batch}")


def input_shape(model: Predictor) -> tuple[int, int, int]:
    """``(C, H, W)`` of one preprocessed image for this model."""
    i = model.card.input
    return (i.model_channels, i.height, i.width)


def raw_transform(model: Predictor):
    """Decode and normalize one image as the raw network (not the core) takes it."""
    from cnnkit.data.decode import read_image

    if model.model is None:
        raise CnnkitError("feature extraction needs PyTorch weights (.safetensors or a run folder), not .onnx")
    transform = legacy_preprocess(model.card).eval_transform()
    return lambda f: transform(read_image(f, model.card.input.channels))


def layers(weights: str | Path, device: str = "auto") -> dict[str, Any]:
    """The named stages of a trained model and their output shapes for its input size.

    Returns:
        ``{"arch", "input_shape": (C, H, W), "layers": {name: shape}}`` with the layers in
        stage order; a stage gives ``(C, H, W)``, ``pre_logits`` ``(D,)``, ``logits``
        ``(num_classes,)``.
    """
    model = load(weights, device)
    shape = input_shape(model)
    return {"arch": model.card.arch, "input_shape": shape,
            "layers": F.layer_shapes(model.model, shape)}


def extract_files(model: Predictor, files: list[Path], layer: str, pooled: bool = True,
                  batch: int = 64) -> FeatureSet:
    """Features of image files, decoded and run in batches of ``batch``.

    Unreadable files are skipped and listed in ``skipped`` when there are several; a single
    unreadable file is an error.

    Shape:
        ``array`` is ``(N, C)`` pooled or ``(N, C, H, W)`` maps, N the number of readable files.
    """
    _check_batch(batch)
    layer = F.resolve_layer(model.model, layer)
    chunks: list[np.ndarray] = []
    paths: list[str] = []
    skipped: list[tuple[str, str]] = []
    for x, names in image_batches(files, batch, raw_transform(model), skipped):
        paths += names
        chunks.append(F.extract(model.model, x, layer, pooled, batch).numpy())
    if not chunks:
        raise DataError(f"none of the {len(files)} images could be read")
    return FeatureSet(np.concatenate(chunks), paths, layer, pooled, skipped)


def features(weights: str | Path, source: str | Path, layer: str, out: str | Path | None = None,
             pooled: bool = True, batch: int = 64, device: str = "auto",
             verbose: bool = True) -> np.ndarray:
    """Features of a file or folder of images from one named layer; ``cnnkit classify features``.

    Args:
        weights: ``best.safetensors`` or its run folder.
        source: an image file or a folder (searched recursively, sorted by path).
        layer: a stage from :func:`layers` (``stages.3``, ``layer4``, ``pre_logits``, ...) or
            any module name of the model.
        out: write the array to this ``.npy`` file, and beside it a ``.json`` file (same name)
            whose ``paths`` list gives the image of each row.
        pooled: global-average-pool each map to one value per channel; False keeps the maps.
        batch: images per forward pass.
        device: auto, cpu, cuda, cuda:N or mps.
        verbose: print the shape and where the files went.

    Returns:
        float32 features, one row per readable image in path order (unreadable images in a
        folder are skipped and reported).

    Shape:
        pooled ``(N, C)``; maps ``(N, C, H, W)``; ``pre_logits`` ``(N, D)``; ``logits``
        ``(N, num_classes)``.

    Examples:
        >>> feats = features("runs/classify/digits", "runs/demo/samples", "pre_logits")
        >>> feats.shape
        (8, 128)
    """
    _check_batch(batch)
    if out is not None and Path(out).suffix != ".npy":
        raise CnnkitError(f"--out must be a .npy file, got '{out}'")
    model = load(weights, device)
    fs = extract_files(model, list_sources(source), layer, pooled, batch)
    if out is not None:
        out = Path(out)

        def write(p: Path) -> None:
            with open(p, "wb") as fh:
                np.save(fh, fs.array)

        atomic_write(out, write)
        write_json(out.with_suffix(".json"), {
            "weights": str(weights), "layer": fs.layer, "pooled": fs.pooled,
            "shape": list(fs.array.shape), "paths": fs.paths,
            "skipped": [{"path": p, "reason": r} for p, r in fs.skipped]})
    if verbose:
        from cnnkit.engine.progress import console

        con = console()
        if fs.array.ndim > 2:
            kind = "feature maps"
        else:
            kind = "vectors" if fs.layer in F.SPECIAL_LAYERS or not fs.pooled else "pooled vectors"
        con.print(f"features of '{fs.layer}': {len(fs.paths)} image(s) -> array {tuple(fs.array.shape)} "
                  f"({kind})")
        for p, reason in fs.skipped:
            con.print(f"[yellow]skipped[/] {p}: {reason}")
        if out is not None:
            con.print(f"written to {out} (image paths in row order: {out.with_suffix('.json')})")
    return fs.array


def _unique_name(stem: str, used: set[str]) -> str:
    name, k = stem, 1
    while name in used:
        k += 1
        name = f"{stem}_{k}"
    used.add(name)
    return name


def visualize(weights: str | Path, what: str, source: str | Path | None = None,
              out_dir: str | Path = "runs/classify/visualize", layers: list[str] | None = None,
              topk: int = 8, device: str = "auto", verbose: bool = True) -> list[Path]:
    """Write PNGs of first-layer filters or of per-stage feature maps; ``cnnkit classify visualize``.

    Args:
        weights: ``best.safetensors`` or its run folder.
        what: ``filters`` (one ``filters.png``) or ``featuremaps`` (one
            ``featuremaps_<image name>.png`` per image of ``source``: the input, then a row per
            stage with the ``topk`` most active channels).
        source: an image file or folder (needed for ``featuremaps``).
        out_dir: folder for the PNGs.
        layers: stages to draw (default: every stage from :func:`layers` that gives a map).
        topk: channels to show per stage.
        device: auto, cpu, cuda, cuda:N or mps.
        verbose: print the files written.

    Returns:
        the PNG paths written.
    """
    if what not in WHAT:
        raise CnnkitError(f"--what must be one of {', '.join(WHAT)}, got '{what}'")
    if topk < 1:
        raise CnnkitError(f"--topk must be at least 1, got {topk}")
    if what == "featuremaps" and source is None:
        raise CnnkitError("--what featuremaps needs --source (an image file or a folder)")
    model = load(weights, device)
    out_dir = Path(out_dir)
    written: list[Path] = []
    skipped: list[tuple[str, str]] = []
    if what == "filters":
        written.append(F.plot_filters(model.model, out_dir / "filters.png"))
    else:
        written, skipped = _featuremaps(model, list_sources(source), out_dir, layers, topk)
    if verbose:
        from cnnkit.engine.progress import console

        con = console()
        for p, reason in skipped:
            con.print(f"[yellow]skipped[/] {p}: {reason}")
        con.print(f"wrote {len(written)} PNG file(s) to {out_dir}/: "
                  f"{', '.join(p.name for p in written[:5])}{' ...' if len(written) > 5 else ''}")
    return written


def _featuremaps(model: Predictor, files: list[Path], out_dir: Path, names: list[str] | None,
                 topk: int) -> tuple[list[Path], list[tuple[str, str]]]:
    from cnnkit.utils.plotting import denormalize

    net = model.model
    names = [F.resolve_layer(net, n) for n in names] if names else \
        [n for n in F.list_layers(net) if n not in F.SPECIAL_LAYERS]
    written: list[Path] = []
    skipped: list[tuple[str, str]] = []
    used: set[str] = set()
    for f in files:
        try:
            x = raw_transform(model)(f)
        except ImageDecodeError as e:
            if len(files) == 1:
                raise
            skipped.append((str(f), e.reason))
            continue
        outs = F.capture(net, x[None].to(model.device), [*names, "logits"])
        maps = {n: outs[n][0] for n in names}
        flat = [n for n, m in maps.items() if m.ndim != 3]
        if flat:
            raise CnnkitError(f"layer '{flat[0]}' gives a vector, not a feature map; draw stages "
                              f"such as {', '.join(F.list_layers(net)[:3])}")
        probs = outs["logits"][0].float().softmax(0)
        top = probs.topk(min(3, len(model.classes)))
        guess = ", ".join(f"{model.classes[i]} {p:.2f}"
                          for p, i in zip(top.values.tolist(), top.indices.tolist()))
        image = denormalize(x[:model.card.input.channels], model.card.input.mean, model.card.input.std)
        name = _unique_name(f"featuremaps_{f.stem}", used)
        title = f"{f.name}\n{model.card.arch} predicts: {guess}"
        written.append(F.plot_feature_maps(image, maps, out_dir / f"{name}.png", topk, title))
    if not written:
        raise DataError(f"none of the {len(files)} images could be read")
    return written, skipped
