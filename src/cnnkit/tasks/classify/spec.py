"""Single-label classification's workflow spec: data, model, task and card for a run, the
SMOTE head after the loop, the final evaluation through the predictor, plots and tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cnnkit.core.card import InputSpec, ModelCard, OutputSpec
from cnnkit.data.classification import (
    ClassificationData,
    TransformedDataset,
    load_classification_data,
    make_loader,
    normalization_stats,
)
from cnnkit.data.defaults import resolve_batch_lr
from cnnkit.data.mix import make_batch_mix
from cnnkit.data.sampling import (
    LabelView,
    bootstrap,
    class_counts,
    class_weights,
    long_tail,
    make_sampler,
    noisy_labels,
)
from cnnkit.data.transforms import Preprocess, parse_aug
from cnnkit.engine.progress import console, per_class_table
from cnnkit.engine.workflow import Evaluation, Setup, WorkflowSpec, provenance
from cnnkit.errors import DataError, ModelError
from cnnkit.models.finetune import load_init
from cnnkit.tasks.classify.config import SAMPLERS, ClassifyConfig, parse_imbalance
from cnnkit.tasks.classify.task import ClassifyTask

# Per-dataset defaults used when --imgsz / --aug are not given.
DATA_DEFAULTS = {"digits": {"aug": "affine"}, "shapes": {"aug": "affine,flip"}}
FOLDER_AUG = "crop=0.6"  # (no flip: a mirrored image may be another class)


def default_aug(data: ClassificationData) -> str:
    return DATA_DEFAULTS.get(data.name, {}).get("aug", FOLDER_AUG)


def user_images(data: ClassificationData) -> bool:
    """Whether ``data`` is a user's image files (not a built-in dataset with tuned defaults)."""
    return data.name not in DATA_DEFAULTS and bool(getattr(data.splits["train"], "paths", None))


def folder_defaults(cfg, data: ClassificationData) -> dict:
    """For a user's images (not a built-in dataset), the input size and augmentation the options
    left out, chosen from the images (:mod:`cnnkit.data.defaults`); ``cfg`` takes the values."""
    from cnnkit.data.defaults import adopt, derive_imgsz, folder_aug, model_stride

    derived: dict = {}
    paths = getattr(data.splits["train"], "paths", None)
    if not user_images(data):
        return derived
    derive_imgsz(cfg, derived, paths, model_stride(cfg.model), data.default_imgsz)
    if cfg.aug is None and not cfg.batch_aug:
        adopt(cfg, derived, "aug", folder_aug(cfg.imgsz or data.default_imgsz))
    return derived


def evaluate_split(predictor, split: Dataset, batch: int = 64, workers: int = 0, keep: int = 0):
    """``(metrics, kept, skipped)`` of a single-label predictor on a dataset split."""
    from cnnkit.runtime.pipeline import evaluate_dataset

    return evaluate_dataset(predictor, split, ClassifyTask(predictor.classes), batch, workers, keep)


class ClassifySpec(WorkflowSpec):
    config = ClassifyConfig
    curves = ("top1", "macro_f1", "balanced_accuracy")
    keep = 32

    def setup(self, cfg: ClassifyConfig, device, verbose: bool, resuming: bool) -> Setup:
        con = console()
        data = load_classification_data(cfg.data, seed=cfg.seed, val_fraction=cfg.val_fraction, channels=cfg.channels)
        derived = folder_defaults(cfg, data)
        imgsz = cfg.imgsz or data.default_imgsz
        mean, std = normalization_stats(data, cfg.pretrained)
        pre = Preprocess(imgsz, mean, std, data.channels, mask_channel=cfg.missing_input == "mask",
                         illumination=cfg.illumination)
        # with --batch-aug the default per-image augmentation is off (it would augment twice)
        aug = cfg.aug if cfg.aug is not None else ("none" if cfg.batch_aug else default_aug(data))
        train_tf = pre.train_transform(parse_aug(aug, imgsz), cfg.missing, cfg.missing_mode)
        imb = parse_imbalance(cfg.imbalance)
        train_split, val_split = _experiment_splits(cfg, data)
        num_classes = len(data.classes)
        task = _make_task(cfg, data.classes, train_split.targets, imb)
        model_kwargs = {"drop_rate": cfg.drop_rate, "attention": cfg.attention, "pool": cfg.pool,
                        **({"width": cfg.width} if cfg.width else {})}
        model = ClassifyTask.build_model(cfg.model, num_classes, pre.model_channels, cfg.pretrained, **model_kwargs)
        if cfg.init and not resuming:
            note = load_init(model, cfg.init, data.channels, num_classes)
            if verbose and note:
                con.print(f"[yellow]note:[/] {note}")
        gen = torch.Generator().manual_seed(cfg.seed)
        train_ds = TransformedDataset(train_split, train_tf)
        if len(train_ds) == 0:
            raise DataError(f"the train split of '{cfg.data}' has no images")
        resolve_batch_lr(cfg, derived, len(train_ds), user_images(data))
        sampler_name = next((k for k in SAMPLERS if k in imb), None)
        sampler = make_sampler(sampler_name, train_split.targets, num_classes, gen) if sampler_name else None
        pin = device.type == "cuda"
        train_loader = make_loader(train_ds, cfg.batch, True, cfg.workers, task.collate, gen, pin_memory=pin,
                                   sampler=sampler)
        val_loader = make_loader(TransformedDataset(val_split, pre.eval_transform()), cfg.batch * 2, False,
                                 cfg.workers, task.collate, pin_memory=pin)
        batch_transforms = []
        if cfg.batch_aug:
            from cnnkit.data.batch_aug import BatchAugment

            batch_transforms.append(BatchAugment.from_spec(cfg.batch_aug, mean, std))
        if (mix := make_batch_mix(num_classes, cfg.mixup, cfg.cutmix)) is not None:
            batch_transforms.append(mix)
        if verbose and (cfg.imbalance_ratio < 1 or cfg.label_noise > 0 or cfg.bootstrap or sampler_name):
            con.print(f"train split: {len(train_split)} images, per class "
                      f"{class_counts(train_split.targets, num_classes).tolist()}"
                      + (f"; sampler {sampler_name}" if sampler_name else ""))
        card = ModelCard("classify", cfg.model, list(data.classes),
                         InputSpec(imgsz, imgsz, data.channels, mean=tuple(mean), std=tuple(std),
                                   mask_channel=pre.mask_channel, illumination=cfg.illumination),
                         OutputSpec(("logits",), "softmax"), model_kwargs, provenance=provenance(cfg, aug=aug))
        return Setup(model, task, train_loader, val_loader, card, data, batch_transforms=batch_transforms,
                     state={"imb": imb, "pre": pre, "train_split": train_split, "val_split": val_split},
                     derived=derived)

    def after_fit(self, cfg: ClassifyConfig, run, setup: Setup, trainer, device, verbose: bool) -> None:
        if "smote" in setup.state["imb"]:
            pre = setup.state["pre"]
            _smote_head(run, TransformedDataset(setup.state["train_split"], pre.eval_transform()), setup.task,
                        cfg, device, verbose)

    def evaluate(self, cfg: ClassifyConfig, setup: Setup, predictor, split: str, keep: int = 0):
        ds = setup.state["val_split"] if split == "val" else setup.data.split(split)
        metrics, kept, _ = evaluate_split(predictor, ds, cfg.batch * 2, cfg.workers, keep)
        return metrics, kept

    def public(self, metrics: dict[str, Any]) -> dict[str, Any]:
        keys = ("top1", "top5", "macro_f1", "balanced_accuracy", "loss", "num_images", "per_class",
                "confusion_matrix")
        return {k: metrics[k] for k in keys if k in metrics}

    def line(self, m: dict[str, Any], split: str) -> str:
        return f"{split} top1 {m['top1']:.4f}  macro_f1 {m['macro_f1']:.4f}"

    def report(self, cfg, run, setup, predictor, trainer, val, test, kept, verbose) -> None:
        from cnnkit.utils.plotting import plot_confusion

        plot_confusion(val["confusion_matrix"], setup.data.classes, run.plots / "confusion_matrix.png",
                       title=f"confusion matrix (val, epoch {trainer.best_epoch})")
        plot_predictions(kept, setup.task, setup.card.input.channels, run.plots / "val_predictions.png")
        if verbose:
            console().print(per_class_table(val, f"validation (best epoch {trainer.best_epoch})"))


    # ---- val and predict
    call_options = ("topk",)

    def val(self, weights, data: str, *, verbose: bool = True, **options: Any) -> dict[str, Any]:
        """Evaluate weights, or several as one ensemble (``ensemble="mean"`` or ``"vote"``; the
        result then also has ``ensemble``, ``members_top1`` and ``mean_member_top1``), with
        test-time augmentation (``tta="scale"``, ...); ``missing="0,0.1,0.3"`` draws the
        accuracy-vs-missing-data curve of each weights instead
        (:func:`cnnkit.methods.missing.missing_curve`)."""
        if options.get("missing") is None:
            return super().val(weights, data, verbose=verbose, **options)
        from cnnkit.core.options import resolve
        from cnnkit.methods.missing import missing_curve

        o = resolve(self.config.VAL, {"weights": weights, "data": data, **options}, "cnnkit classify val")
        try:
            ratios = [float(r) for r in str(o["missing"]).split(",") if r.strip()]
        except ValueError:
            raise DataError(f"--missing takes comma-separated numbers, e.g. 0,0.1,0.3,0.5; got '{o['missing']}'") from None
        paths = [weights] if isinstance(weights, (str, Path)) else list(weights)
        return missing_curve(paths, data, ratios, split=o["split"], mode=o["missing_mode"], batch=o["batch"],
                             device=o["device"], plot=o["plot"], json_path=o["json_path"], verbose=verbose)

    def load(self, options: dict[str, Any]):
        from cnnkit.methods.ensemble import load_ensemble

        return load_ensemble(options["weights"], options["device"], options["ensemble"], options["tta"])

    def val_records(self, model, data: str, split: str, verbose: bool):
        ds = load_classification_data(data, channels=model.card.input.channels)
        n = len(model.card.extra.get("ensemble", {}).get("members", [])) or 1
        check_classes(model, ds.classes, f"weights '{model.source}'" if n == 1 else f"the {n} ensemble weights", data)
        records = ds.split(split)
        if len(records) == 0:
            raise DataError(f"the {split} split of '{data}' has no images")
        return records

    def explain_truth(self, records, i: int) -> list:
        """The labelled class, and the shape's pixels where the data knows them (``shapes``)."""
        mask = records.mask(i) if hasattr(records, "mask") else None
        return [(int(records[i][1]), mask)]

    def val_metrics(self, model, records, options: dict[str, Any]) -> Evaluation:
        from cnnkit.runtime.backend import TorchBackend
        from cnnkit.runtime.pipeline import Predictor, evaluate_loader, wants_objects

        task = ClassifyTask(model.classes)
        loader = make_loader(TransformedDataset(records, lambda img: model.pipeline.prepare(img)[0],
                                                objects=wants_objects(model)),  # robustness' occlusion
                             options["batch"], False, options["workers"], task.collate)
        metrics, _, skipped = evaluate_loader(model, loader, task.metrics())
        extra, notes = {}, []
        if "ensemble" in model.card.extra:
            ens = model.card.extra["ensemble"]
            tops = [evaluate_loader(Predictor(model.card, model.pipeline, TorchBackend(m, model.device)), loader,
                                    task.metrics())[0]["top1"] for m in model.model.members]
            mean = sum(tops) / len(tops)
            extra.update(ensemble=ens, members_top1=tops, mean_member_top1=mean)
            notes.append(f"ensemble of {len(tops)} ({ens['mode']}): top1 {metrics['top1']:.4f} · members "
                         + " ".join(f"{t:.4f}" for t in tops) + f" (mean {mean:.4f}, gain {metrics['top1'] - mean:+.4f})")
        if "tta" in model.card.extra:
            extra["tta"] = model.card.extra["tta"]
            notes.append(f"tta: {len(extra['tta'])} views ({', '.join(extra['tta'])})")
        return Evaluation(metrics, extra, skipped, notes)

    def val_table(self, metrics: dict[str, Any], title: str):
        return per_class_table(metrics, title)

    def predict_view(self, model, results, timing, options):
        from rich.table import Table

        extra = ""
        if "ensemble" in model.card.extra:
            ens = model.card.extra["ensemble"]
            extra += f" · ensemble of {len(ens['members'])} ({ens['mode']})"
        if "tta" in model.card.extra:
            extra += f" · tta {len(model.card.extra['tta'])} views"
        ms = (timing["preprocess_ms"] + timing["inference_ms"] + timing["postprocess_ms"]) / max(1, len(results))
        table = Table(title=f"{len(results)} image(s) · {ms:.1f} ms/image · {model.backend.name}{extra}")
        k = min(options["topk"], len(model.classes))
        for col in ("path", "label", "score", f"top{k}"):
            table.add_column(col)
        for r in results:
            table.add_row(r.path, r.label, f"{r.score:.3f}", ", ".join(f"{n} {s:.2f}" for n, s in r.topk[1:]))
        return table, []


SPEC = ClassifySpec()


def check_classes(model, classes: list[str], name: str, data: str) -> None:
    """Refuse data whose classes are not ``model``'s, in the same order."""
    if list(classes) == model.classes:
        return
    if len(classes) != len(model.classes):
        raise ModelError(f"{name} were trained on {len(model.classes)} classes but data "
                         f"'{data}' has {len(classes)}; evaluate on data with the same classes")
    raise ModelError(f"{name} were trained on classes {model.classes} but data '{data}' has "
                     f"{classes}; evaluate on data with the same classes")


def _experiment_splits(cfg: ClassifyConfig, data: ClassificationData) -> tuple[Dataset, Dataset]:
    """The train and val splits after --imbalance-ratio, --label-noise and --bootstrap.

    Label noise goes into train and val alike (both are "your labelled data"); test, when
    there is one, stays clean, so it measures what the noise cost.
    """
    train, val = data.split("train"), data.split("val")
    k = len(data.classes)
    if cfg.imbalance_ratio < 1:
        train = LabelView(train, long_tail(train.targets, k, cfg.imbalance_ratio, cfg.seed))
    if cfg.label_noise > 0:
        train = LabelView(train, range(len(train)),
                          noisy_labels(train.targets, k, cfg.label_noise, cfg.noise_type, cfg.seed))
        val = LabelView(val, range(len(val)),
                        noisy_labels(val.targets, k, cfg.label_noise, cfg.noise_type, cfg.seed + 1))
    if cfg.bootstrap:
        train = LabelView(train, bootstrap(len(train), cfg.seed))
    return train, val


def _make_task(cfg: ClassifyConfig, classes: list[str], targets: list[int],
               imb: dict[str, float | None]) -> ClassifyTask:
    weights = None
    if "class-weights" in imb:
        weights = class_weights(targets, len(classes), "inverse")
    elif "class-balanced" in imb:
        weights = class_weights(targets, len(classes), "effective", imb["class-balanced"] or 0.999)
    loss = "focal" if "focal" in imb else cfg.loss
    return ClassifyTask(classes, cfg.label_smoothing, loss=loss, class_weights=weights,
                        ohem=(imb["ohem"] or 0.5) if "ohem" in imb else 0.0,
                        focal_gamma=imb.get("focal") or 2.0, temperature=cfg.train_temperature)


@torch.no_grad()
def _embed(model: torch.nn.Module, ds: Dataset, task: ClassifyTask, device: torch.device,
           batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Pre-logit embeddings ``(N, D)`` and labels of a dataset (unreadable images left out)."""
    feats, labels = [], []
    model.eval()
    for b in make_loader(ds, batch, False, 0, task.collate):
        if len(b["targets"]) == 0:
            continue
        x = b["images"].to(device)
        feats.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu())
        labels.append(b["targets"])
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def _smote_head(run, train_ds: Dataset, task: ClassifyTask, cfg: ClassifyConfig,
                device: torch.device, verbose: bool) -> None:
    """``--imbalance smote``: SMOTE in feature space, then retrain the linear head on it.

    The trained network embeds every training image (no augmentation); imbalanced-learn's
    SMOTE adds synthetic minority embeddings between neighbours of the same class until every
    class matches the largest; the classifier head is retrained on the balanced embeddings
    (full-batch L-BFGS from the trained head) and the best weights are rewritten.
    """
    from imblearn.over_sampling import SMOTE

    from cnnkit.engine.checkpoint import load_weights, save_weights
    from cnnkit.runtime.pipeline import load_model

    model = load_model(run.best)[0].to(device)
    head = model.get_classifier()
    if not isinstance(head, torch.nn.Linear):
        raise ModelError(f"--imbalance smote retrains a linear classifier head; '{cfg.model}' has "
                         f"{type(head).__name__}")
    x, y = _embed(model, train_ds, task, device)
    counts = np.bincount(y)
    smallest = int(counts[counts > 0].min())
    if smallest < 2:
        raise DataError("--imbalance smote needs at least 2 training images in every class")
    xs, ys = SMOTE(k_neighbors=min(5, smallest - 1), random_state=cfg.seed).fit_resample(x, y)
    xt, yt = torch.as_tensor(xs, dtype=torch.float32, device=device), torch.as_tensor(ys, device=device)
    head.train()
    opt = torch.optim.LBFGS(head.parameters(), lr=0.5, max_iter=200, line_search_fn="strong_wolfe")
    decay = 1e-4

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(xt), yt) + decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    state, card = load_weights(run.best)
    state.update({k: v.detach().cpu() for k, v in model.state_dict().items()})
    card["provenance"] = {**card.get("provenance", {}), "smote": {"real": len(y), "synthetic": int(len(ys) - len(y))}}
    save_weights(run.best, state, card)
    if verbose:
        console().print(f"smote: {len(ys) - len(y)} synthetic embeddings added; classifier head retrained")


def plot_predictions(kept: list, task, channels: int, path: Path) -> None:
    """A grid of kept ``(image in [0, 1], logits, target)`` samples titled with the prediction
    (red where it is wrong); ``task.decode`` turns logits into a prediction."""
    from cnnkit.utils.plotting import denormalize, plot_image_grid

    if not kept:
        return
    images, titles, colors = [], [], []
    for img, out, target in kept:
        pred = task.decode(out[None])[0]
        truth = task.classes[int(target)]
        images.append(denormalize(img[:channels], (0.0,) * channels, (1.0,) * channels))  # [0, 1]; no mask channel
        titles.append(f"{pred.label} {pred.score:.2f}" + ("" if pred.label == truth else f"\n(true {truth})"))
        colors.append("green" if pred.label == truth else "red")
    plot_image_grid(images, titles, path, colors)


