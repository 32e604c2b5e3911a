"""Multi-label classification's workflow spec. After the loop one threshold per class is
tuned on the validation split with the best weights and written into the card
(``thresholds.per_class``), so ``load``, ``val`` and ``predict`` use them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cnnkit.core.card import InputSpec, ModelCard, OutputSpec
from cnnkit.data.classification import TransformedDataset, make_loader, normalization_stats
from cnnkit.data.defaults import derive_imgsz, model_stride, resolve_batch_lr
from cnnkit.data.multilabel import load_multilabel_data
from cnnkit.data.transforms import Preprocess, parse_aug
from cnnkit.engine.progress import console
from cnnkit.engine.workflow import Evaluation, Setup, WorkflowSpec, provenance
from cnnkit.errors import DataError
from cnnkit.models.finetune import load_init
from cnnkit.tasks.multilabel.config import MultiLabelConfig
from cnnkit.tasks.multilabel.task import MultiLabelTask

DEFAULT_AUG = "affine,flip"  # no crops: a crop can cut a labelled object out of the image


def make_task(cfg: MultiLabelConfig, classes: list[str], thresholds: list[float] | None = None,
              tune: bool = False) -> MultiLabelTask:
    return MultiLabelTask(classes, cfg.loss, thresholds, cfg.asl_gamma_neg, cfg.asl_gamma_pos, cfg.asl_clip, tune=tune)


def evaluate_split(predictor, split, batch: int = 64, workers: int = 0, keep: int = 0,
                   task: MultiLabelTask | None = None):
    """``(metrics, kept, skipped)`` of a multi-label predictor on a dataset split (at the card's
    thresholds unless ``task`` says otherwise, e.g. ``tune=True``)."""
    from cnnkit.runtime.pipeline import evaluate_dataset

    task = task or MultiLabelTask(predictor.classes, thresholds=predictor.pipeline.thresholds)
    return evaluate_dataset(predictor, split, task, batch, workers, keep)


class MultiLabelSpec(WorkflowSpec):
    config = MultiLabelConfig
    curves = ("map", "micro_f1", "macro_f1")
    keep = 32

    def setup(self, cfg: MultiLabelConfig, device, verbose: bool, resuming: bool) -> Setup:
        data = load_multilabel_data(cfg.data, seed=cfg.seed, val_fraction=cfg.val_fraction, channels=cfg.channels)
        derived: dict = {}
        derive_imgsz(cfg, derived, getattr(data.splits["train"], "paths", None), model_stride(cfg.model),
                     data.default_imgsz)
        imgsz = cfg.imgsz or data.default_imgsz
        mean, std = normalization_stats(data, cfg.pretrained)
        pre = Preprocess(imgsz, mean, std, data.channels, illumination=cfg.illumination)
        aug = cfg.aug if cfg.aug is not None else DEFAULT_AUG
        task = make_task(cfg, data.classes)
        model_kwargs = {"drop_rate": cfg.drop_rate, "attention": cfg.attention, "pool": cfg.pool,
                        **({"width": cfg.width} if cfg.width else {})}
        model = MultiLabelTask.build_model(cfg.model, len(data.classes), data.channels, cfg.pretrained, **model_kwargs)
        if cfg.init and not resuming:
            note = load_init(model, cfg.init, data.channels, len(data.classes))
            if verbose and note:
                console().print(f"[yellow]note:[/] {note}")
        train_ds = TransformedDataset(data.split("train"), pre.train_transform(parse_aug(aug, imgsz)))
        if len(train_ds) == 0:
            raise DataError(f"the train split of '{cfg.data}' has no images")
        resolve_batch_lr(cfg, derived, len(train_ds), bool(getattr(data.splits["train"], "paths", None)))
        pin = device.type == "cuda"
        gen = torch.Generator().manual_seed(cfg.seed)
        train_loader = make_loader(train_ds, cfg.batch, True, cfg.workers, task.collate, gen, pin_memory=pin)
        val_loader = make_loader(TransformedDataset(data.split("val"), pre.eval_transform()), cfg.batch * 2, False,
                                 cfg.workers, task.collate, pin_memory=pin)
        card = ModelCard("multilabel", cfg.model, list(data.classes),
                         InputSpec(imgsz, imgsz, data.channels, mean=tuple(mean), std=tuple(std),
                                   illumination=cfg.illumination),
                         OutputSpec(("logits",), "sigmoid"), model_kwargs,
                         provenance=provenance(cfg, aug=aug, loss=cfg.loss, val_fraction=cfg.val_fraction))
        return Setup(model, task, train_loader, val_loader, card, data, derived=derived)

    def after_fit(self, cfg: MultiLabelConfig, run, setup: Setup, trainer, device, verbose: bool) -> None:
        """Tune one threshold per class on val with the best weights; write them into the card."""
        from cnnkit.engine.checkpoint import load_weights, save_weights
        from cnnkit.runtime.pipeline import load

        best = load(run.best, str(device), task="multilabel")
        tuned = evaluate_split(best, setup.data.split("val"), cfg.batch * 2, cfg.workers,
                               task=make_task(cfg, setup.data.classes, tune=True))[0]
        state, card = load_weights(run.best)
        card["thresholds"] = {"per_class": dict(zip(setup.data.classes, tuned["thresholds"]))}
        card["extra"] = {**card.get("extra", {}), "thresholds_tuned_on": "val"}
        save_weights(run.best, state, card)

    def evaluate(self, cfg: MultiLabelConfig, setup: Setup, predictor, split: str, keep: int = 0):
        metrics, kept, _ = evaluate_split(predictor, setup.data.split(split), cfg.batch * 2, cfg.workers, keep)
        return metrics, kept

    def public(self, metrics: dict[str, Any]) -> dict[str, Any]:
        keys = ("map", "micro_f1", "macro_f1", "loss", "num_images", "per_class")
        return {k: metrics[k] for k in keys if k in metrics}

    def line(self, m: dict[str, Any], split: str) -> str:
        return f"{split} map {m['map']:.4f}  micro_f1 {m['micro_f1']:.4f}  macro_f1 {m['macro_f1']:.4f}"

    def report(self, cfg, run, setup, predictor, trainer, val, test, kept, verbose) -> None:
        task = MultiLabelTask(predictor.classes, thresholds=predictor.pipeline.thresholds)
        plot_predictions(kept, task, setup.card.input.channels, run.plots / "val_predictions.png")
        if verbose:
            console().print(per_class_table(val, f"validation (best epoch {trainer.best_epoch}; "
                                                 "thresholds tuned on it)"))


    # ---- val and predict
    def val_records(self, model, data: str, split: str, verbose: bool):
        # a CSV without val.csv is split with the seed and val_fraction the model was trained with
        trained = model.card.provenance
        ds = load_multilabel_data(data, seed=int(trained.get("seed", 0)),
                                  val_fraction=float(trained.get("val_fraction", 0.2)),
                                  channels=model.card.input.channels, classes=model.classes)
        return ds.split(split)

    def val_metrics(self, model, records, options: dict[str, Any]) -> Evaluation:
        metrics, _, skipped = evaluate_split(model, records, options["batch"], options["workers"])
        if "map" not in metrics:
            raise DataError(f"the {options['split']} split of '{options['data']}' has no readable images")
        return Evaluation(metrics, skipped=skipped)

    def val_table(self, metrics: dict[str, Any], title: str):
        return per_class_table(metrics, title)

    def predict_view(self, model, results, timing, options):
        from rich.table import Table

        ms = (timing["preprocess_ms"] + timing["inference_ms"] + timing["postprocess_ms"]) / max(1, len(results))
        table = Table(title=f"{len(results)} image(s) · {ms:.1f} ms/image · {model.backend.name}")
        for col in ("path", "labels", "top scores"):
            table.add_column(col)
        for r in results:
            top = sorted(r.scores.items(), key=lambda kv: -kv[1])[:3]
            table.add_row(r.path, ", ".join(r.labels) or "(none)", ", ".join(f"{n} {s:.2f}" for n, s in top))
        return table, []


SPEC = MultiLabelSpec()


def per_class_table(metrics: dict[str, Any], title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("class", "ap", "precision", "recall", "f1", "support", "threshold"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, m in metrics.get("per_class", {}).items():
        ap = "-" if m["ap"] is None else f"{m['ap']:.4f}"
        table.add_row(name, ap, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}",
                      str(m["support"]), f"{m['threshold']:.2f}")
    table.add_section()
    table.add_row("all", f"mAP {metrics.get('map', 0):.4f}", "", f"micro {metrics.get('micro_f1', 0):.4f}",
                  f"macro {metrics.get('macro_f1', 0):.4f}", str(metrics.get("num_images", "")), "")
    return table


def plot_predictions(kept: list, task: MultiLabelTask, channels: int, path: Path) -> None:
    """A grid of validation images titled with the predicted labels (green: exactly right) and,
    below, the missed (-) and wrongly added (+) ones."""
    from cnnkit.utils.plotting import denormalize, plot_image_grid

    if not kept:
        return
    images, titles, colors = [], [], []
    for img, out, target in kept:
        pred = set(task.decode(out[None])[0].labels)
        truth = {c for c, t in zip(task.classes, target.tolist()) if t > 0.5}
        title = _short(sorted(pred), ", ") or "(none)"
        if pred != truth:
            title += "\n" + _short([f"-{c}" for c in sorted(truth - pred)] +
                                   [f"+{c}" for c in sorted(pred - truth)], " ")
        images.append(denormalize(img[:channels], (0.0,) * channels, (1.0,) * channels))  # [0, 1] inputs
        titles.append(title)
        colors.append("green" if pred == truth else "red")
    plot_image_grid(images, titles, path, colors, cols=6)


def _short(names: list[str], sep: str, width: int = 24) -> str:
    """Names joined by ``sep``, cut to their first 4 characters when the line would be too long."""
    text = sep.join(names)
    return text if len(text) <= width else " ".join(n[:5] if n[0] in "+-" else n[:4] for n in names)
