"""Adversarial attacks on every task's model, measured with the task's own metric.

:class:`AttackBackend` wraps a predictor's PyTorch backend: each batch the task's evaluation
sends it is first perturbed to hurt the model (FGSM, Goodfellow et al., 2015; PGD, Madry et al.,
2018, in the L-infinity or L2 ball), then run. So ``val``'s own loop gives top-1, mAP or mIoU
under attack, for classifiers, detectors and segmenters alike, with no task code here. Attacks
work on the core's input, images in [0, 1] (normalization is inside every core), so ``--eps``
is in pixel units whatever the model's mean and std.

What an attack pushes against is the pipeline's :meth:`~cnnkit.runtime.pipeline.Pipeline.attack_loss`,
a loss per sample that grows as the answer falls apart, or that shrinks toward a ``--targeted``
class. Classifiers are attacked against their true labels (the evaluation loop hands each
batch's labels to the backend, as torchattacks takes them); detectors and segmenters against
their own answer on the clean image (the detections' scores, every pixel's class), which needs
no ground truth. Written here rather than taken from torchattacks (the peer in
``benchmarks/attack_torchattacks.py``) because torchattacks and ART attack classifiers only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from cnnkit.engine.adversarial import METHODS, NORMS, AttackConfig, parse_eps, perturb
from cnnkit.errors import CnnkitError

__all__ = ["METHODS", "NORMS", "AttackBackend", "AttackConfig", "parse_eps", "perturb", "run"]


@dataclass
class AttackStats:
    """What the attack did over every batch: per-sample success, perturbation sizes, and the
    first images (clean, adversarial) for the picture."""

    success: list[float] = field(default_factory=list)
    linf: list[float] = field(default_factory=list)
    l2: list[float] = field(default_factory=list)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    keep: int = 8
    broke: dict[str, int] = field(default_factory=dict)  # AutoAttack: images each of its attacks broke first

    def summary(self) -> dict[str, Any]:
        n = max(1, len(self.linf))
        rated = [v for v in self.success if not math.isnan(v)]  # NaN: nothing to overturn (no detections)
        return {"samples": len(self.linf),
                "success_rate": round(sum(rated) / len(rated), 4) if rated else None,
                "mean_linf": round(sum(self.linf) / n, 5), "mean_l2": round(sum(self.l2) / n, 4),
                **({"broken_by": dict(self.broke)} if self.broke else {})}


class AttackBackend:
    """A PyTorch backend whose every call runs on adversarial inputs (see the module docstring)."""

    def __init__(self, inner, pipeline, cfg: AttackConfig):
        if not hasattr(inner, "core"):
            raise CnnkitError("attacks need cnnkit weights (.safetensors or a run folder): gradients do not flow "
                              "through an exported file")
        self.inner, self.pipeline, self.cfg = inner, pipeline, cfg
        self.core, self.device, self.name = inner.core, inner.device, f"torch+{cfg.method}"
        self.stats = AttackStats()
        self.labels: torch.Tensor | None = None
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def _raw(self, x: torch.Tensor):
        out = self.core(x)
        return out if isinstance(out, (tuple, list)) else (out,)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = x.to(self.device).float()
        labels, self.labels = self.labels, None  # given by the evaluation loop for this batch only
        t = self.cfg.targeted
        ref = None
        if labels is None or t is not None:
            with torch.no_grad():
                ref = tuple(r.detach() for r in self._raw(x))
        if self.cfg.method == "autoattack":
            from cnnkit.engine.autoattack import auto_attack

            def logits(a: torch.Tensor) -> torch.Tensor:
                return self.pipeline.attack_logits(self._raw(a))

            if labels is None:  # away from the clean answer
                labels = self.pipeline.attack_logits(ref).argmax(1)
            c = self.cfg
            adv, broke = auto_attack(logits, x, labels.to(self.device), c.eps, c.norm, c.steps, c.queries,
                                     self.generator)
            for stage, count in broke.items():
                self.stats.broke[stage] = self.stats.broke.get(stage, 0) + count
        else:
            adv = perturb(lambda a: self.pipeline.attack_loss(self._raw(a), ref, t, labels), x, self.cfg,
                          self.generator, lambda a: self.pipeline.attack_margin(self._raw(a), ref, t, labels))
        out = self.inner(adv)
        s = self.stats
        if ref is not None:  # with true labels, success comes from the clean and attacked accuracy instead
            s.success += self.pipeline.attack_success(out, ref, t).float().cpu().tolist()
        d = (adv - x).flatten(1)
        s.linf += d.abs().amax(1).cpu().tolist()
        s.l2 += d.norm(dim=1).cpu().tolist()
        for i in range(min(len(x), s.keep - len(s.kept))):
            s.kept.append((x[i].cpu(), adv[i].cpu()))
        return out


def draw(kept: list[tuple[torch.Tensor, torch.Tensor]], eps: float, path) -> None:
    """Rows of clean | adversarial | difference (amplified so the budget spans the grey range)."""
    from torchvision.utils import make_grid

    from cnnkit.utils.io import atomic_path

    tiles = []
    for clean, adv in kept:
        c = clean[:3] if clean.shape[0] >= 3 else clean[:1].expand(3, -1, -1)
        a = adv[:3] if adv.shape[0] >= 3 else adv[:1].expand(3, -1, -1)
        tiles += [c, a, ((a - c) / (2 * eps) + 0.5).clamp(0, 1)]
    grid = make_grid(torch.stack(tiles), nrow=3, padding=2, pad_value=1.0)
    from PIL import Image

    with atomic_path(path) as p:
        Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(p, format="PNG")


def run(spec, o: dict[str, Any], verbose: bool = True) -> dict[str, Any]:
    """``cnnkit TASK attack`` with resolved options ``o``: the task's val metric on a split,
    clean and under attack, the attack's success rate and perturbation size, and a picture."""
    from pathlib import Path

    from cnnkit.core.options import parse_fraction
    from cnnkit.methods.benchmark import METRIC
    from cnnkit.runtime.pipeline import class_index, load_torch
    from cnnkit.utils.io import write_json

    if o["method"] == "autoattack" and o["targeted"] is not None:
        raise CnnkitError("--method autoattack is untargeted (its APGD-T and FAB-T pick their own target classes); "
                          "use pgd or cw with --targeted")
    cfg = AttackConfig(o["method"], parse_eps(o["eps"]), o["steps"],
                       parse_fraction(o["alpha"], "--alpha") if o["alpha"] is not None else None, o["norm"], None,
                       seed=o["seed"], c=o["c"], kappa=o["kappa"], queries=o["queries"])
    model = load_torch(o["weights"], o["device"], spec.name, "attack",
                       **{k: o[k] for k in spec.load_options if k in o and o[k] is not None})
    if o["targeted"] is not None:
        cfg.targeted = class_index(model.classes, o["targeted"])
    records = spec.val_records(model, o["data"], o["split"], verbose)
    if o["limit"] and len(records) > o["limit"]:
        records = records[:o["limit"]] if isinstance(records, list) else \
            torch.utils.data.Subset(records, range(o["limit"]))
    clean = spec.val_metrics(model, records, o).metrics
    model.backend = attacker = AttackBackend(model.backend, model.pipeline, cfg)
    attacked = spec.val_metrics(model, records, o).metrics
    key = METRIC.get(spec.name, "top1")
    summary = attacker.stats.summary()
    if summary["success_rate"] is None and clean.get(key):  # attacked against the true labels
        summary["success_rate"] = round(max(0.0, 1 - attacked.get(key, 0.0) / clean[key]), 4)
    out = Path(o["out"])
    picture = out / f"{cfg.method}_{cfg.norm}.png"
    if attacker.stats.kept:  # CW has no budget: its difference is scaled by the largest change drawn
        scale = cfg.eps if cfg.method != "cw" else max(float((a - c).abs().max()) for c, a in attacker.stats.kept)
        draw(attacker.stats.kept, max(scale, 1e-6), picture)
    cw = cfg.method == "cw"
    result = {"method": cfg.method, "norm": cfg.norm, "eps": None if cw else cfg.eps,
              "steps": 1 if cfg.method == "fgsm" else cfg.steps, "alpha": cfg.eps if cfg.method == "fgsm" else cfg.alpha,
              **({"c": cfg.c, "kappa": cfg.kappa} if cw else {}),
              **({"queries": cfg.queries} if cfg.method == "autoattack" else {}), "targeted": o["targeted"], "metric": key,
              "clean": clean.get(key), "attacked": attacked.get(key), **summary,
              "clean_metrics": _numbers(clean), "attacked_metrics": _numbers(attacked),
              "picture": str(picture) if attacker.stats.kept else None, "data": o["data"], "split": o["split"],
              "weights": str(o["weights"])}
    if o["json_path"]:
        write_json(o["json_path"], result)
    if verbose:
        _print(result)
    return result


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _print(r: dict[str, Any]) -> None:
    from rich.table import Table

    from cnnkit.engine.progress import console

    if r["method"] == "cw":
        what = f"CW L2, c {r['c']:g}, kappa {r['kappa']:g}, {r['steps']} Adam steps at {r['alpha']:.4g}"
    else:
        what = f"{r['method'].upper()} {r['norm']} eps {r['eps']:.4g}" + (
            f", {r['steps']} steps of {r['alpha']:.4g}" if r["method"] == "pgd" else "")
    if r["method"] == "autoattack":
        what = (f"AutoAttack {r['norm']} eps {r['eps']:.4g} (APGD-CE, APGD-T, FAB-T: {r['steps']} steps; "
                f"Square: {r['queries']} queries)")
    what += f", toward '{r['targeted']}'" if r["targeted"] is not None else ""
    t = Table(title=f"{what} · {r['data']} {r['split']} · {r['samples']} images")
    for c in ("metric", "clean", "under attack"):
        t.add_column(c, justify="left" if c == "metric" else "right")
    for k, v in r["clean_metrics"].items():
        if k in r["attacked_metrics"] and not k.startswith("num_"):
            t.add_row(k if k != r["metric"] else f"[bold]{k}[/bold]", f"{v:.4f}", f"{r['attacked_metrics'][k]:.4f}")
    con = console()
    con.print(t)
    rate = "n/a" if r["success_rate"] is None else f"{r['success_rate']:.1%}"
    con.print(f"attack success {rate} · mean perturbation L-inf {r['mean_linf']:.4f}, L2 {r['mean_l2']:.3f}"
              + (f" · clean / adversarial / difference in {r['picture']}" if r["picture"] else ""))
    if r.get("broken_by"):
        con.print("images each attack broke first: " + ", ".join(f"{k} {v}" for k, v in r["broken_by"].items()))


