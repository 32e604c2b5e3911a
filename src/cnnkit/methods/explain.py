"""Explanations for every task's model: heat maps of what a decision rests on, and whether they
are right.

:func:`explain` loads cnnkit weights, picks the target through the task pipeline
(:meth:`~cnnkit.runtime.pipeline.Pipeline.select`: a class, a detection, a segmented class's
pixels) and computes one map per image over the core's differentiable score
(:meth:`~cnnkit.runtime.pipeline.Pipeline.target`):

- ``gradcam`` (Selvaraju et al., 2017), ``gradcam++`` (Chattopadhay et al., 2018), ``scorecam``
  (Wang et al., 2020) and ``eigencam`` (Muhammad and Yeasin, 2020) on a feature layer: by
  default the deepest of the pipeline's :meth:`~cnnkit.runtime.pipeline.Pipeline.feature_layers`,
  so nobody picks layers or reshape functions by hand. Written here (a forward hook and one
  backward pass, batched on the model's device) because pytorch-grad-cam, the reference they
  are checked against (``benchmarks/explain_gradcam.py``), needs a target layer and a reshape
  function per architecture and post-processes in NumPy/OpenCV per image; the formulas and the
  normalization (ReLU, min-max per image, bilinear resize, min-max again) are pytorch-grad-cam's,
  so the maps agree. EigenCAM is the first principal component of the layer's activations: it does not
  depend on the target (its sign is fixed so that the map correlates with the mean
  activation; pytorch-grad-cam leaves it to the SVD).
- ``saliency`` (gradient magnitude, Simonyan et al., 2014), ``ig`` (integrated gradients,
  Sundararajan et al., 2017) and ``occlusion`` (Zeiler and Fergus, 2014) on the input, from
  captum.

Every map is in [0, 1] at the core's input size and is mapped back onto the original image
(undoing the resize or letterbox) for the ``.npy`` file and the PNG overlay.

:func:`faithfulness` scores maps: energy-in-mask (the share of the map's mass inside the
object) and the pointing game (is the map's peak on the object) where the object's pixels are
known, and deletion / insertion curves (Petsiuk et al., 2018) everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.core.options import EXPLAIN_METHODS
from cnnkit.errors import CnnkitError, ModelError, TargetError
from cnnkit.methods.faithfulness import (  # noqa: F401 (the scores are part of this module's interface)
    CURVE_STEPS,
    _blur,
    _mode,
    _normalize,
    deletion_insertion,
    energy_in_mask,
    pointing_hit,
    random_map,
)

METHODS = EXPLAIN_METHODS
CAM_METHODS = ("gradcam", "gradcam++", "scorecam", "eigencam")  # on a feature layer; the rest on the pixels
SCORECAM_BATCH = 16  # masked copies per forward pass (pytorch-grad-cam's batch)
IG_STEPS = 32


def check_method(method: str) -> str:
    if method not in METHODS:
        raise CnnkitError(f"--method must be one of {', '.join(METHODS)}, got '{method}'")
    return method


def resolve_layer(pipeline, model: nn.Module, name: str | None) -> tuple[str, nn.Module]:
    """``(name, module)`` of the layer a CAM method hooks: ``name`` (a feature stage or any
    module path of ``model``), by default the pipeline's deepest feature stage."""
    stages = pipeline.feature_layers(model)
    if name is None:
        if not stages:
            raise ModelError(f"the {pipeline.card.arch} model names no feature stages; give --layer")
        name = list(stages)[-1]
        return name, stages[name]
    if name in stages:
        return name, stages[name]
    modules = dict(model.named_modules())
    if name and name in modules:
        return name, modules[name]
    import difflib

    close = difflib.get_close_matches(name, list(stages) + list(modules), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ModelError(f"--layer '{name}' is not a layer of this model{hint}; its feature stages: "
                     f"{', '.join(stages) or '(none)'}")


def forward(pipeline, core: nn.Module, x: torch.Tensor):
    """The core's raw outputs for a batch, run the way the pipeline runs its backend (one
    image at a time for torchvision's detectors, sliding windows for tiled segmenters), with
    gradients."""
    def backend(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = core(t)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    return pipeline.run(backend, x, [{}] * len(x))


def score_fn(pipeline, core: nn.Module, selector: Any, prob: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x (B, C, H, W) -> (B,)``: the selected target's score (or probability) per sample."""
    pick = pipeline.target_prob if prob else pipeline.target

    def f(x: torch.Tensor) -> torch.Tensor:
        return pick(forward(pipeline, core, x), selector).float()

    return f


def _resize(cam: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(cam[:, None], size=tuple(size), mode=_mode(size), align_corners=False)[:, 0]


class _Activations:
    """Forward hook keeping the layer's output of the latest call, and counting the calls."""

    def __init__(self, layer: nn.Module):
        self.value: torch.Tensor | None = None
        self.calls = 0
        self.handle = layer.register_forward_hook(self)

    def __call__(self, module, args, output) -> None:
        self.value = output[0] if isinstance(output, (tuple, list)) else output
        self.calls += 1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def cam(method: str, f: Callable[[torch.Tensor], torch.Tensor], layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A CAM method's maps ``(B, H, W)`` (``(B, D, H, W)`` for volumes) in [0, 1] for inputs
    ``x`` and score function ``f``."""
    with _Activations(layer) as hook, torch.enable_grad():
        score = f(x)
        a = hook.value
        if a is None or a.ndim != x.ndim:
            raise ModelError("the CAM layer must output feature maps of the input's dimensions ((B, C, h, w) for "
                             "images, (B, C, d, h, w) for volumes); pick a convolutional stage with --layer")
        if hook.calls > 1:
            raise ModelError("the CAM layer ran once per sliding window, and a CAM map needs one pass over the "
                             "whole input; use saliency, ig or occlusion for inputs larger than the model's window")
        if method == "eigencam":
            weights = None
        elif method == "scorecam":
            weights = _scorecam_weights(f, a.detach(), x)
        else:
            g = torch.autograd.grad(score.sum(), a, allow_unused=True)[0]
            g = torch.zeros_like(a) if g is None else g
            weights = _grad_weights(method, a.detach(), g.detach())
    a = a.detach().float()
    m = _eigen(a) if weights is None else (weights.view(*weights.shape, *[1] * (a.ndim - 2)) * a).sum(1)
    return _normalize(_resize(_normalize(m.clamp(min=0)), x.shape[2:]))  # scaled again after the resize, as
    # pytorch-grad-cam does, so the peak is 1


def _grad_weights(method: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Channel weights ``(B, C)``: Grad-CAM's mean gradient, or Grad-CAM++'s weighted positive
    gradients (the closed form for an exponential score, as in the paper and pytorch-grad-cam)."""
    space = tuple(range(2, g.ndim))
    if method == "gradcam":
        return g.mean(space)
    g2 = g.pow(2)
    alpha = g2 / (2 * g2 + a.sum(space, keepdim=True) * g2 * g + 1e-6)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    return (g.clamp(min=0) * alpha).sum(space)


@torch.no_grad()
def _scorecam_weights(f, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Score-CAM: each channel, upsampled and scaled to [0, 1], masks the input; the channel's
    weight is the softmax over channels of the masked inputs' scores."""
    size = x.shape[2:]
    up = F.interpolate(a.float(), size=size, mode=_mode(size), align_corners=True)
    flat = up.flatten(2)
    view = (*flat.shape[:2], *[1] * len(size))
    lo, hi = flat.min(2).values.view(view), flat.max(2).values.view(view)
    up = (up - lo) / (hi - lo + 1e-8)
    weights = []
    for b in range(len(x)):
        masked = x[b:b + 1] * up[b][:, None]  # (C, channels, H, W)
        scores = torch.cat([f(masked[i:i + SCORECAM_BATCH]) for i in range(0, len(masked), SCORECAM_BATCH)])
        weights.append(scores.float().softmax(0))
    return torch.stack(weights)


def _eigen(a: torch.Tensor) -> torch.Tensor:
    """First principal component of each sample's activations ``(C, h, w)`` as a map, signed
    to correlate with the mean activation."""
    out = []
    for s in a:
        flat = s.flatten(1).T  # (h*w, C)
        centered = flat - flat.mean(0)
        _, _, vh = torch.linalg.svd(centered, full_matrices=False)
        proj = centered @ vh[0]
        if torch.dot(proj, flat.mean(1) - flat.mean()) < 0:
            proj = -proj
        out.append(proj.view(s.shape[1:]))
    return torch.stack(out)


def attribution(method: str, f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                window: int | None = None) -> torch.Tensor:
    """captum's saliency, integrated gradients or occlusion as maps ``(B, H, W)`` in [0, 1]:
    saliency takes the largest gradient magnitude over channels, integrated gradients (from a
    black image) the summed magnitude, occlusion (grey patches of ``window`` pixels, default an
    eighth of the image, half-overlapping) the positive score drop."""
    from captum.attr import IntegratedGradients, Occlusion, Saliency

    x = x.detach().clone().requires_grad_(method != "occlusion")
    with torch.enable_grad():
        if method == "saliency":
            m = Saliency(f).attribute(x, abs=True).amax(1)
        elif method == "ig":
            m = IntegratedGradients(f).attribute(x, baselines=torch.zeros_like(x), n_steps=IG_STEPS,
                                                 internal_batch_size=IG_STEPS // 2).abs().sum(1)
        else:
            space = x.shape[2:]
            k = window or max(2, min(space) // 8)
            stride = max(1, k // 2)
            c = x.shape[1]
            with torch.no_grad():
                m = Occlusion(f).attribute(x, sliding_window_shapes=(c, *[k] * len(space)),
                                           strides=(c, *[stride] * len(space)), baselines=0.5,
                                           perturbations_per_eval=16 if len(space) == 2 else 4).sum(1).clamp(min=0)
    return _normalize(m.detach().float())


def explain_one(method: str, pipeline, core: nn.Module, layer: nn.Module | None, x: torch.Tensor,
                selector: Any) -> torch.Tensor:
    """The map ``(H, W)`` of one prepared input ``x (C, H, W)`` (``(D, H, W)`` of a volume
    ``(C, D, H, W)``) for ``selector``."""
    f = score_fn(pipeline, core, selector)
    xb = x[None]
    if method in CAM_METHODS:
        return cam(method, f, layer, xb)[0]
    return attribution(method, f, xb)[0]


# ---- the command -----------------------------------------------------------------------------
def parse_methods(text: str) -> list[str]:
    """``gradcam``, ``gradcam,ig`` or ``all``."""
    names = list(METHODS) if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise CnnkitError(f"--method takes one or more of {', '.join(METHODS)} (comma-separated) or all")
    return [check_method(n) for n in names]


def overlay(image: torch.Tensor, m: np.ndarray, box: Sequence[float] | None = None):
    """A PIL image: ``image`` (uint8 ``(C, H, W)``) under the map's jet colours (half
    transparent), with the explained detection's box drawn when there is one."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    img = image[:3].permute(1, 2, 0).cpu().numpy()
    img = np.repeat(img, 3, 2) if img.shape[2] == 1 else img
    heat = colormaps["jet"](np.clip(m, 0, 1))[..., :3] * 255
    out = Image.fromarray((0.5 * img + 0.5 * heat).round().clip(0, 255).astype(np.uint8))
    if box is not None:
        ImageDraw.Draw(out).rectangle([float(v) for v in box], outline=(255, 255, 255), width=2)
    return out


def overlay_volume(volume: torch.Tensor, m: np.ndarray):
    """A PIL image for a volume ``(D, H, W)`` and its map: the three orthogonal slices through
    the map's peak (axial, coronal, sagittal), each the scan (grey, between its 1st and 99th
    percentiles) under the map's colours, side by side."""
    from PIL import Image

    v = volume.float().cpu().numpy()
    lo, hi = np.percentile(v, [1, 99])
    grey = ((v - lo) / max(hi - lo, 1e-6) * 255).clip(0, 255).astype(np.uint8)
    d, h, w = np.unravel_index(int(np.argmax(m)), m.shape)
    cuts = [(grey[d], m[d]), (grey[:, h], m[:, h]), (grey[:, :, w], m[:, :, w])]
    tiles = [overlay(torch.from_numpy(np.ascontiguousarray(g))[None], np.ascontiguousarray(c)) for g, c in cuts]
    out = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), max(t.height for t in tiles)),
                    (255, 255, 255))
    x = 0
    for t in tiles:
        out.paste(t, (x, 0))
        x += t.width + 4
    return out


def _items(spec, model, o: dict[str, Any], verbose: bool) -> tuple[list, list[tuple[str, str]]]:
    """``[(name, image uint8, [(target, object mask or None), ...]), ...]`` and the unreadable
    files: the ``--source`` images with ``--target``, or the first ``--limit`` images of a
    ``--data`` split with their ground-truth targets and object pixels."""
    from cnnkit.errors import ImageDecodeError

    skipped: list[tuple[str, str]] = []
    items = []
    if o["data"]:
        records = spec.val_records(model, o["data"], o["split"], verbose)
        for i in range(min(o["limit"], len(records))):
            try:
                image = model.pipeline.decode(spec.record_input(records, i))
            except ImageDecodeError as e:
                skipped.append((e.path, e.reason))
                continue
            items.append((f"{o['split']}_{i:04d}", image, spec.explain_truth(records, i)))
        return items, skipped
    for path in spec.sources({"source": o["source"]})[:o["limit"]]:
        try:
            image = model.pipeline.decode(path)
        except ImageDecodeError as e:
            if Path(o["source"]).is_file():
                raise
            skipped.append((e.path, e.reason))
            continue
        items.append((Path(path).stem, image, [(o["target"], None)]))
    return items, skipped


def run(spec, o: dict[str, Any], verbose: bool = True) -> dict[str, Any]:
    """``cnnkit TASK explain`` with resolved options ``o`` (see ``cnnkit TASK explain --help``)."""
    from cnnkit.utils.io import atomic_path, write_json

    methods = parse_methods(o["method"])
    if bool(o["source"]) == bool(o["data"]):
        raise CnnkitError("give --source (images to explain) or --data (a split with ground truth, for --eval), "
                          "one of the two")
    if o["data"] and o["target"] is not None:
        raise CnnkitError("--target picks what to explain in --source images; with --data the ground truth picks it")
    from cnnkit.runtime.pipeline import load_torch

    model = load_torch(o["weights"], o["device"], spec.name, "explain")
    pipe, core = model.pipeline, model.backend.core
    layer_name, layer = (resolve_layer(pipe, model.model, o["layer"]) if set(methods) & set(CAM_METHODS)
                         else (None, None))
    items, skipped = _items(spec, model, o, verbose)
    out = Path(o["out"])
    rows: list[dict[str, Any]] = []
    layers_used: set[str] = set()
    for name, image, truths in items:
        x, meta = pipe.prepare(image)
        x = x.to(model.device)
        with torch.no_grad():
            raw = forward(pipe, core, x[None])
        for t, (target, mask) in enumerate(truths):
            try:
                picked = pipe.select(raw, target, meta)
            except TargetError as e:  # no detection at that index: skip the image in a folder
                if len(items) == 1:
                    raise
                skipped.append((name, str(e)))
                continue
            if picked is None:  # the detector missed this ground-truth object
                rows.append({"image": name, "target": f"object {t}", "method": None, "missed": True})
                continue
            selector, desc = picked
            box = pipe.box_on_image(selector, raw, meta)
            stem = name if len(truths) == 1 else f"{name}_t{t}"
            picked_layer = None if o["layer"] or layer is None else pipe.explain_layer(model.model, selector)
            used_name, used = picked_layer or (layer_name, layer)
            if used_name:  # None: no CAM method asked for
                layers_used.add(used_name)
            maps = {method: explain_one(method, pipe, core, used, x, selector) for method in methods}
            if o["eval"]:
                maps["random"] = random_map(x.shape[1:], len(rows)).to(x.device)
            for method, m in maps.items():
                full = pipe.map_to_image(m, meta).cpu().numpy().astype(np.float32)
                row = {"image": name, "target": desc, "method": method}
                if not full.any():
                    row["empty"] = True
                if method != "random":
                    with atomic_path(out / f"{stem}.{method}.npy") as p, open(p, "wb") as fh:
                        np.save(fh, full)
                    with atomic_path(out / f"{stem}.{method}.png") as p:
                        (overlay(image, full, box) if full.ndim == 2 else overlay_volume(image, full)).save(
                            p, format="PNG")
                    row["png"] = str(out / f"{stem}.{method}.png")
                if o["eval"]:
                    d, i = deletion_insertion(score_fn(pipe, core, selector, prob=True), x, m)
                    row.update(deletion_auc=round(d, 4), insertion_auc=round(i, 4))
                    if mask is not None:
                        mk = np.asarray(mask, bool)
                        row.update(energy_in_mask=round(energy_in_mask(full, mk), 4),
                                   pointing=pointing_hit(full, mk), mask_share=round(float(mk.mean()), 4))
                rows.append(row)
    result = {"method": methods, "layer": ", ".join(sorted(layers_used)) or None, "out": str(out),
              "images": len(items), "rows": rows, "skipped": skipped}
    if o["eval"]:
        result["summary"] = summarize(rows)
    if o["json_path"]:
        write_json(o["json_path"], result)
    if verbose:
        _print(result)
    return result


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean of each faithfulness score per method (the pointing game as a hit rate)."""
    out: dict[str, dict[str, float]] = {}
    for method in dict.fromkeys(r["method"] for r in rows if r.get("method")):
        mine = [r for r in rows if r.get("method") == method]
        s: dict[str, float] = {"maps": len(mine)}
        for k in ("energy_in_mask", "pointing", "deletion_auc", "insertion_auc", "mask_share"):
            vals = [float(r[k]) for r in mine if k in r]
            if vals:
                s[k] = round(float(np.mean(vals)), 4)
        out[method] = s
    missed = sum(1 for r in rows if r.get("missed"))
    if missed:
        out["missed"] = {"objects": missed}
    return out


def _print(result: dict[str, Any]) -> None:
    from rich.table import Table

    from cnnkit.engine.progress import console

    con = console()
    made = [r for r in result["rows"] if r.get("png")]
    layer = f" (CAM on {result['layer']})" if result["layer"] else ""
    con.print(f"{len(made)} maps{layer} for {result['images']} images -> {result['out']}/ (PNG overlays and .npy)")
    for path, reason in result["skipped"]:
        con.print(f"skipped {path}: {reason}")
    empty = sum(1 for r in made if r.get("empty"))
    if empty:
        con.print(f"{empty} maps are empty: nothing at the layer raises the target's score (CAM methods keep "
                  "positive evidence only); explain the predicted class, or try --method ig or occlusion")
    if "summary" not in result:
        for r in made[:20]:
            con.print(f"  {r['image']}: {r['target']} · {r['method']} -> {r['png']}")
        return
    summary = {k: v for k, v in result["summary"].items() if k != "missed"}
    has_mask = any("energy_in_mask" in s for s in summary.values())
    t = Table(title="Is the explanation right? (mean over maps; random = smooth random maps)")
    cols = ["method", "maps"] + (["energy in mask", "pointing game"] if has_mask else []) + \
        ["deletion AUC (lower better)", "insertion AUC (higher better)"]
    for c in cols:
        t.add_column(c, justify="left" if c == "method" else "right")
    for method, s in summary.items():
        cells = [method, str(int(s["maps"]))]
        if has_mask:
            cells += [f"{s.get('energy_in_mask', float('nan')):.3f}", f"{s.get('pointing', float('nan')):.3f}"]
        cells += [f"{s['deletion_auc']:.3f}", f"{s['insertion_auc']:.3f}"]
        t.add_row(*cells)
    con.print(t)
    if has_mask:
        share = next(s["mask_share"] for s in summary.values() if "mask_share" in s)
        con.print(f"the objects cover {share:.1%} of the image on average: a map that ignores them puts about "
                  "that share of its energy on them")
    if "missed" in result["summary"]:
        con.print(f"{result['summary']['missed']['objects']} ground-truth objects were not detected and are left out")
