"""How a model holds up under corrupted inputs, measured with the task's own metric.

:class:`CorruptionBackend` wraps any backend (PyTorch, ONNX Runtime, an int8 file): each batch
the task's evaluation sends it is corrupted first (:mod:`cnnkit.methods.corruptions`, batched,
on the model's device), then run. So ``val``'s own loop gives top-1, mAP or mIoU per corruption
and severity, for classifiers, detectors and segmenters alike, with no task code here (the
same design as :mod:`cnnkit.methods.attack`). Corruptions act on the core's input: the image
after the pipeline's resize or letterbox, in [0, 1], as ImageNet-C corrupts the 224 px crops.

Each corruption and severity draws from its own seeded generator, so two models evaluated on
the same data (a model and its ``--baseline``) see the same corrupted images.

Occlusion covers a share of each object's box. The evaluation loops say where the objects are
through :func:`cnnkit.runtime.pipeline.show_objects` (boxes in the core input's pixels): a
detector's ground-truth boxes, a segmenter's connected regions of each class, a ``shapes``
classifier's shape; where the data gives no location (a folder of images), the object is the
whole image.

The corruption error of Hendrycks & Dietterich (2019): for corruption ``c``,
``CE_c = sum_s E_{s,c} / sum_s E^base_{s,c}`` (``E = 1 - metric``), and the mean over the 15
ImageNet-C corruptions is the mCE; the relative mCE does the same with the errors' rise over
each model's clean error. Occlusion and illumination are reported beside it, not inside it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from cnnkit.errors import CnnkitError
from cnnkit.methods.corruptions import CORRUPTIONS, GROUPS, IMAGENET_C, corrupt


def parse_corruptions(text: str) -> list[str]:
    """``"all"``, ``"noise,fog"``... -> corruption names in the canonical order."""
    want: set[str] = set()
    for part in (p.strip() for p in str(text).split(",")):
        if part in GROUPS:
            want.update(GROUPS[part])
        elif part in CORRUPTIONS:
            want.add(part)
        else:
            raise CnnkitError(f"--corruptions: '{part}' is not a corruption or group; corruptions: "
                              f"{', '.join(CORRUPTIONS)}; groups: {', '.join(GROUPS)}")
    return [c for c in CORRUPTIONS if c in want]


def parse_severities(text: str) -> list[int]:
    """``"1-5"``, ``"3"``, ``"1,3,5"`` -> sorted severities in 1..5."""
    out: set[int] = set()
    try:
        for part in str(text).split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        out = set()
    if not out or not out <= {1, 2, 3, 4, 5}:
        raise CnnkitError(f"--severities takes severities 1 to 5 as a range or a list (1-5, 1,3,5), got '{text}'")
    return sorted(out)


class CorruptionBackend:
    """A backend whose every call runs on corrupted inputs (see the module docstring): the
    first ``channels`` input channels are the image, later ones (an observation mask) pass.
    ``objects``, set before a call (:func:`~cnnkit.runtime.pipeline.show_objects`), holds the
    batch's object boxes for occlusion; it holds for that one call."""

    def __init__(self, inner, channels: int, name: str, severity: int, seed: int, keep: int = 0):
        self.inner, self.channels = inner, channels
        self.corruption, self.severity = name, severity
        self.device = getattr(inner, "device", torch.device("cpu"))
        self.name = f"{inner.name}+{name}"
        self.generator = torch.Generator().manual_seed(seed)
        self.keep, self.kept = keep, []
        self.objects: list[torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = x.to(self.device)
        c = self.channels
        boxes, self.objects = self.objects, None
        if boxes is not None and len(boxes) != len(x):
            boxes = None  # a sliding window's tiles: the boxes were the whole image's
        image = corrupt(x[:, :c], self.corruption, self.severity, self.generator, boxes)
        out = torch.cat([image, x[:, c:].float()], 1) if x.shape[1] > c else image
        for i in range(min(len(x), self.keep - len(self.kept))):
            self.kept.append(image[i].cpu())
        return self.inner(out, *rest)


def seed_of(seed: int, name: str, severity: int) -> int:
    """The generator seed of one corruption and severity (fixed across models and runs)."""
    return seed * 1009 + CORRUPTIONS.index(name) * 10 + severity


def evaluate(spec, model, records, o: dict[str, Any], names: list[str], severities: list[int], key: str,
             verbose: bool, label: str = "") -> tuple[float, dict[str, list[float | None]], dict[str, list]]:
    """``(clean, {corruption: [metric per severity]}, {corruption: [example image per severity]})``
    of ``model`` on ``records``."""
    from cnnkit.engine.progress import console

    clean = spec.val_metrics(model, records, o).metrics.get(key)
    inner, channels = model.backend, model.card.input.channels
    table: dict[str, list[float | None]] = {}
    examples: dict[str, list] = {}
    total, done = len(names) * len(severities), 0
    try:
        for name in names:
            table[name], examples[name] = [], []
            for s in severities:
                model.backend = backend = CorruptionBackend(inner, channels, name, s, seed_of(o["seed"], name, s), 1)
                table[name].append(spec.val_metrics(model, records, o).metrics.get(key))
                examples[name].append(backend.kept[0] if backend.kept else None)
                done += 1
            if verbose:
                shown = " ".join("-" if v is None else f"{v:.3f}" for v in table[name])
                console().print(f"{label}{name:<19} {shown}   ({done}/{total})", highlight=False)
    finally:
        model.backend = inner
    return clean, table, examples


def corruption_errors(clean: float, table: dict[str, list], base_clean: float, base: dict[str, list]
                      ) -> dict[str, dict[str, float | None]]:
    """Per corruption: ``ce`` (summed errors over the baseline's) and ``relative_ce`` (summed
    rise over clean error, over the baseline's), None where a denominator is zero."""
    out = {}
    for name, values in table.items():
        errors = [1 - v for v in values if v is not None]
        base_errors = [1 - v for v in base.get(name, []) if v is not None]
        if len(errors) != len(values) or len(base_errors) != len(errors):
            out[name] = {"ce": None, "relative_ce": None}
            continue
        den = sum(base_errors)
        rel_den = sum(e - (1 - base_clean) for e in base_errors)
        out[name] = {"ce": round(sum(errors) / den, 4) if den > 0 else None,
                     "relative_ce": round(sum(e - (1 - clean) for e in errors) / rel_den, 4) if rel_den > 1e-9
                     else None}
    return out


def run(spec, o: dict[str, Any], verbose: bool = True) -> dict[str, Any]:
    """``cnnkit TASK robustness`` with resolved options ``o``: the task's val metric on a split,
    clean and under each corruption and severity, the corruption errors against a baseline
    model when one is given, a heat map and example pictures."""
    from cnnkit.methods.benchmark import METRIC
    from cnnkit.runtime.pipeline import load
    from cnnkit.utils.io import write_json

    if spec.name == "medical":
        raise CnnkitError("cnnkit medical robustness is not there yet: the corruptions act on 2-D images")
    o = {**o, "save_json": None}  # val options robustness does not offer (one file per pass would be written)
    names = parse_corruptions(o["corruptions"])
    severities = parse_severities(o["severities"])
    load_options = {k: o[k] for k in spec.load_options if k in o and o[k] is not None}
    model = load(o["weights"], o["device"], task=spec.name, **load_options)
    records = spec.val_records(model, o["data"], o["split"], verbose)
    if o["limit"] and len(records) > o["limit"]:
        records = records[:o["limit"]] if isinstance(records, list) else \
            torch.utils.data.Subset(records, range(o["limit"]))
    key = METRIC.get(spec.name, "top1")
    if verbose:
        from cnnkit.engine.progress import console

        console().print(f"{key} of {Path(str(o['weights'])).name} on {o['data']} {o['split']} ({len(records)} images) "
                        f"under {len(names)} corruptions at severities {','.join(map(str, severities))}",
                        highlight=False)
    clean, table, examples = evaluate(spec, model, records, o, names, severities, key, verbose)
    result: dict[str, Any] = {"metric": key, "clean": clean, "severities": severities, "corruptions": table,
                              "mean": _mean(table, names), "mean_imagenet_c": _mean(table, IMAGENET_C),
                              "data": o["data"], "split": o["split"], "images": len(records),
                              "weights": str(o["weights"])}
    if o["baseline"]:
        base = load(o["baseline"], o["device"], task=spec.name, **load_options)
        base_clean, base_table, _ = evaluate(spec, base, records, o, names, severities, key, verbose, "baseline ")
        errors = corruption_errors(clean, table, base_clean, base_table)
        ce = [errors[n]["ce"] for n in IMAGENET_C if n in errors]
        rel = [errors[n]["relative_ce"] for n in IMAGENET_C if n in errors]
        result["baseline"] = {"weights": str(o["baseline"]), "clean": base_clean, "corruptions": base_table,
                              "mean_imagenet_c": _mean(base_table, IMAGENET_C)}
        result["errors"] = errors
        result["mce"] = round(sum(ce) / len(ce), 4) if ce and None not in ce else None
        result["relative_mce"] = round(sum(rel) / len(rel), 4) if rel and None not in rel else None
    out = Path(o["out"])
    result["heatmap"] = str(out / "robustness.png")
    heatmap(result, Path(result["heatmap"]))
    result["examples"] = str(out / "corruptions.png")
    draw_examples(examples, severities, Path(result["examples"]))
    if o["json_path"]:
        write_json(o["json_path"], result)
    if verbose:
        _print(result)
    return result


def _mean(table: dict[str, list], names) -> float | None:
    values = [v for n in names if n in table for v in table[n]]
    if not values or any(v is None for v in values):
        return None
    return round(sum(values) / len(values), 4)


def heatmap(r: dict[str, Any], path: Path) -> None:
    """The metric per corruption (rows) and severity (columns), clean first, as a PNG."""
    import numpy as np

    from cnnkit.utils.plotting import _plt, _save

    plt = _plt()
    names = list(r["corruptions"])
    cols = ["clean", *map(str, r["severities"])]
    values = np.array([[r["clean"], *r["corruptions"][n]] for n in names], dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(cols), 0.8 + 0.32 * len(names)))
    im = ax.imshow(values, cmap="viridis", vmin=0, vmax=max(1e-9, np.nanmax(values)), aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        if not math.isnan(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if v > 0.6 * np.nanmax(values) else "white")
    ax.set_xticks(range(len(cols)), cols, fontsize=8)
    ax.set_yticks(range(len(names)), [n.replace("_", " ") for n in names], fontsize=8)
    ax.set_xlabel("severity")
    title = f"{r['metric']} under corruption"
    if r.get("mce") is not None:
        title += f" · mCE {r['mce']:.1%} (relative {r['relative_mce']:.1%})" if r.get("relative_mce") is not None \
            else f" · mCE {r['mce']:.1%}"
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    _save(fig, path)


def draw_examples(examples: dict[str, list], severities: list[int], path: Path) -> None:
    """The first image under each corruption (rows) at each severity (columns), as a PNG."""
    from torchvision.utils import make_grid

    from cnnkit.utils.io import atomic_path

    tiles = []
    for row in examples.values():
        for t in row:
            if t is None:
                continue
            tiles.append(t[:3] if t.shape[0] >= 3 else t[:1].expand(3, -1, -1))
    if not tiles:
        return
    size = max(max(t.shape[-2:]) for t in tiles)
    tiles = [torch.nn.functional.pad(t, (0, size - t.shape[-1], 0, size - t.shape[-2]), value=1.0) for t in tiles]
    grid = make_grid(torch.stack(tiles), nrow=len(severities), padding=2, pad_value=1.0)
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as p:
        Image.fromarray((grid.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype("uint8")).save(p, format="PNG")


def _print(r: dict[str, Any]) -> None:
    from rich.table import Table

    from cnnkit.engine.progress import console

    base = r.get("errors")
    t = Table(title=f"{r['metric']} under corruption · {r['data']} {r['split']} · {r['images']} images · "
                    f"clean {r['clean']:.4f}", title_justify="left")
    t.add_column("corruption")
    for s in r["severities"]:
        t.add_column(str(s), justify="right")
    t.add_column("mean", justify="right")
    if base:
        t.add_column("CE", justify="right")
        t.add_column("rel. CE", justify="right")
    for name, values in r["corruptions"].items():
        shown = ["-" if v is None else f"{v:.3f}" for v in values]
        ok = [v for v in values if v is not None]
        row = [name.replace("_", " "), *shown, f"{sum(ok) / len(ok):.3f}" if ok else "-"]
        if base:
            e = base[name]
            row += ["-" if e["ce"] is None else f"{e['ce']:.1%}",
                    "-" if e["relative_ce"] is None else f"{e['relative_ce']:.1%}"]
        t.add_row(*row)
    con = console()
    con.print(t)
    line = []
    if r["mean_imagenet_c"] is not None:
        line.append(f"mean {r['metric']} over ImageNet-C {r['mean_imagenet_c']:.4f} (clean {r['clean']:.4f})")
    if base:
        mce = "n/a" if r["mce"] is None else f"{r['mce']:.1%}"
        rel = "n/a" if r["relative_mce"] is None else f"{r['relative_mce']:.1%}"
        line.append(f"mCE {mce}, relative mCE {rel} against {Path(r['baseline']['weights']).name} "
                    f"(clean {r['baseline']['clean']:.4f})")
    line.append(f"heat map {r['heatmap']}, examples {r['examples']}")
    con.print(" · ".join(line), highlight=False)
