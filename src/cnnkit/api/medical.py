"""Medical volumes behind ``cnnkit medical train|val|predict``: segmentation and classification.

Segmenters (:mod:`cnnkit.models.volumetric`: 3-D U-Net, V-Net, slice-wise 2-D U-Net) are
trained with the common Trainer on whole volumes or random patches (``--patch``), scored per
class by Dice and the 95th-percentile Hausdorff distance, and applied to volumes of any size
by sliding-window inference (MONAI) with the training size as the window.

Classifiers (DenseNet-121 in 3-D, or in 2-D over the slices) label whole volumes; volumes are
resized to the training side, and val reports accuracy, balanced accuracy, macro F1 and
AUROC. The model chooses the task: ``--model densenet3d|densenet2d`` classifies.
"""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cnnkit
from cnnkit.api._common import config_from_file as _config_from_file
from cnnkit.api._common import (
    open_run,
    resolve_config,
    run_trainer,
    standard_hooks,
    write_run_results,
)
from cnnkit.api.classify import TrainResult
from cnnkit.data.classification import make_loader
from cnnkit.data.volumes import (
    NIFTI_SUFFIXES,
    VolRecord,
    VolumeData,
    VolumeDataset,
    collate_volumes,
    load_volume_data,
    read_nifti,
    write_nifti,
)
from cnnkit.engine.progress import console
from cnnkit.engine.trainer import Trainer
from cnnkit.errors import CnnkitError, DataError
from cnnkit.runtime.pipeline import Predictor
from cnnkit.runtime.pipeline import load as load_predictor
from cnnkit.tasks.classify.task import ClassificationMetrics, ClassifyTask
from cnnkit.tasks.medical.config import MedicalConfig
from cnnkit.tasks.medical.task import MedicalTask, VolumeMetrics
from cnnkit.utils.device import select_device
from cnnkit.utils.io import write_json
from cnnkit.utils.seed import seed_everything


def config_from_file(path: str | Path, overrides: dict[str, Any]) -> MedicalConfig:
    return _config_from_file(MedicalConfig, "medical", path, overrides)


def build_model(arch: str, num_classes: int, in_chans: int = 1) -> torch.nn.Module:
    from cnnkit.models.volumetric import build_volume_model

    return build_volume_model(arch, num_classes, in_chans)


def _window(data: VolumeData, patch: int | None) -> int:
    """The training cube side: ``--patch``, else the first training volume's largest side
    rounded up to a multiple of 16 (classifiers resize every volume to it)."""
    if patch:
        return patch
    rec = data.split("train")[0]
    side = max(rec.load_image().shape, default=16)
    return int(np.ceil(side / 16) * 16)


def train(cfg: MedicalConfig | None = None, *, resume: str | Path | None = None, verbose: bool = True,
          **overrides: Any) -> TrainResult:
    """Train a 3-D segmenter; the Python twin of ``cnnkit medical train``.

    Examples:
        >>> result = cnnkit.train("medical", data="phantoms", model="vnet", epochs=20)
        >>> result.metrics["dice"]
    """
    con = console()
    cfg, ckpt, run = resolve_config(MedicalConfig, "medical", cfg, resume, overrides, verbose)
    device = select_device(cfg.device)
    seed_everything(cfg.seed)
    data = load_volume_data(cfg.data, cfg.seed, cfg.classify)
    if not data.splits.get("train") or not data.splits.get("val"):
        raise DataError(f"'{cfg.data}' needs a train and a val split")
    k = len(data.names)
    window = max(32, _window(data, cfg.patch)) if cfg.classify else _window(data, cfg.patch)
    model = build_model(cfg.model, k)
    task = ClassifyTask(data.names) if cfg.classify else MedicalTask(data.names, cfg.loss)
    task.collate = collate_volumes
    gen = torch.Generator().manual_seed(cfg.seed)
    train_ds = VolumeDataset(data.split("train"), k, window, train=True, classify=cfg.classify)
    val_ds = VolumeDataset(data.split("val"), k, window, classify=cfg.classify)
    train_loader = make_loader(train_ds, cfg.batch, True, cfg.workers, task.collate, gen,
                               drop_last=len(train_ds) > cfg.batch, pin_memory=device.type == "cuda")
    val_loader = make_loader(val_ds, cfg.batch, False, cfg.workers, task.collate)
    run = open_run(cfg, "medical", run)
    card = {"task": "medical", "arch": cfg.model, "model_kwargs": {}, "classes": data.names, "num_classes": k,
            "head": "classify" if cfg.classify else "segment", "in_chans": 1, "window": window,
            "preprocess": {"normalize": "per-volume z-score", "resize": "trilinear" if cfg.classify else None},
            "cnnkit_version": cnnkit.__version__,
            "trained": {"data": cfg.data, "epochs": cfg.epochs, "seed": cfg.seed, "loss": cfg.loss, "patch": cfg.patch,
                        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}}
    trainer = Trainer(task, model, train_loader, val_loader, cfg, device, run.root, card,
                      standard_hooks(cfg, run, verbose))
    train_time = run_trainer(trainer, ckpt, run, "medical", verbose)
    best = load(run.best, str(device))
    val_m = evaluate(best, data.split("val"))
    test_m = evaluate(best, data.split("test")) if data.splits.get("test") else None
    results = write_run_results(trainer, run, val_m, test_m, train_time)
    from cnnkit.utils.plotting import plot_curves

    plot_curves(trainer.history, run.plots / "results.png", ["top1"] if cfg.classify else ["dice"])
    if verbose:
        con.print(_line(val_m, "val") + ("  ·  " + _line(test_m, "test") if test_m else "")
                  + f"  ·  trained {train_time:.0f} s")
        con.print(f"results in {run.root}/ (weights/best.safetensors, metrics.csv, results.json, plots/)")
    return TrainResult(run.root, results, test_m, trainer.best_epoch, dict(trainer.skipped))


def _line(m: dict[str, Any], split: str) -> str:
    if "top1" in m:
        auc = f", AUROC {m['auroc']:.4f}" if m.get("auroc") is not None else ""
        return (f"{split} accuracy {m['top1']:.4f}, balanced {m['balanced_accuracy']:.4f}, "
                f"macro F1 {m['macro_f1']:.4f}{auc}")
    per = ", ".join(f"{n} {v:.3f}" for n, v in m["per_class_dice"].items() if v is not None)
    hd = f"  HD95 {m['hd95']:.2f} vox" if m.get("hd95") is not None else ""
    undefined = sum(m.get("hd95_undefined", {}).values())
    if undefined:
        hd += f" ({undefined} class-volumes missed or falsely found, not in HD95)"
    return f"{split} Dice {m['dice']:.4f} ({per}){hd}"


def load(path: str | Path, device: str = "cpu") -> Predictor:
    """A volume segmenter's or classifier's :class:`~cnnkit.runtime.pipeline.Predictor` from
    ``best.safetensors``, its run folder or an exported ``.onnx``; it takes NIfTI paths or
    (D, H, W) arrays of any size."""
    return load_predictor(path, device, task="medical")


def evaluate(model: Predictor, records: list[VolRecord]) -> dict[str, Any]:
    """Segmenters: Dice and HD95 per class over ``records`` (whole volumes, sliding window).
    Classifiers: accuracy, balanced accuracy, macro F1, per-class figures and confusion matrix
    (:class:`~cnnkit.tasks.classify.task.ClassificationMetrics`) plus macro AUROC (torchmetrics)."""
    if model.pipeline.classify:
        from torchmetrics.functional.classification import multiclass_auroc

        if any(r.target is None for r in records):
            raise DataError("these volumes have no class labels; give a YAML with class subfolders per split")
        probs = torch.tensor([[r.probs[c] for c in model.classes] for r in
                              (model(r.load_image())[0] for r in records)])
        targets = torch.tensor([int(r.target) for r in records])
        state = ClassificationMetrics(model.classes)
        state.update(probs.clamp(min=1e-7).log(), {"targets": targets})
        m = state.compute()
        both = len(set(targets.tolist())) > 1
        m["auroc"] = float(multiclass_auroc(probs, targets, len(model.classes), average="macro")) if both else None
        m["num_volumes"] = len(records)
        return m
    ds = VolumeDataset(records, len(model.classes))
    state = VolumeMetrics(model.classes)
    for i in range(len(ds)):
        img, lab = ds.load(i)
        state.add_predictions(model(img[0].numpy())[0].labels[None], lab[None])
    return state.compute()


def val(weights: str | Path, data: str, split: str = "val", device: str = "auto",
        json_path: str | Path | None = None, verbose: bool = True) -> dict[str, Any]:
    """Dice and 95th-percentile Hausdorff distance per class on a split (segmenters), or
    accuracy, balanced accuracy, macro F1 and AUROC (classifiers)."""
    m = load(weights, device)
    ds = load_volume_data(data, m.card.provenance.get("seed", 0) if data == "phantoms" else 0, m.pipeline.classify)
    if list(ds.names) != m.classes:
        raise DataError(f"the classes of '{data}' ({', '.join(ds.names)}) differ from the model's "
                        f"({', '.join(m.classes)})")
    metrics = evaluate(m, ds.split(split))
    metrics.update(split=split, backend=m.backend.name)
    if json_path:
        write_json(json_path, metrics)
    if verbose:
        console().print(_line(metrics, split))
    return metrics


def predict(weights: str | Path, source: str | Path, device: str = "auto", save_dir: str | Path | None = None,
            json_path: str | Path | None = None, verbose: bool = True) -> list[dict[str, Any]]:
    """Segment (or classify) a NIfTI file or a folder of them. Segmenters: ``save_dir`` gets
    ``NAME`` label volumes (same affine as the input), ``json_path`` ``[{"path", "shape",
    "voxels": {class: count}}]``. Classifiers: ``[{"path", "shape", "label", "score",
    "probs": {class: p}}]``."""
    m = load(weights, device)
    p = Path(source)
    if not p.exists():
        raise DataError(f"source '{p}' does not exist")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.name.endswith(NIFTI_SUFFIXES))
    if not files:
        raise DataError(f"no .nii or .nii.gz files in '{p}'")
    # label volumes keep each input's path below the source folder, never on an input itself
    outs = {f: Path(save_dir) / (f.name if p.is_file() else f.relative_to(p)) for f in files} if save_dir else {}
    inputs = {f.resolve() for f in files}
    clash = next((f for f, o in outs.items() if o.resolve() in inputs), None)
    if clash is not None:
        raise CnnkitError(f"--save-dir would overwrite the input '{clash}' with its labels; choose another folder")
    rows = []
    for f in files:
        t0 = time.perf_counter()
        vol, affine = read_nifti(f)
        r = m(vol)[0]
        r.path = str(f)
        if m.pipeline.classify:
            rows.append(r.to_dict())
            if verbose:
                console().print(f"{f}: {r.label} ({r.score:.3f}, {(time.perf_counter() - t0) * 1e3:.0f} ms)")
            continue
        if save_dir:
            write_nifti(outs[f], r.labels.numpy(), affine)
            r.labels_file = str(outs[f])
        row = r.to_dict()
        rows.append(row)
        if verbose:
            what = ", ".join(f"{n} {c}" for n, c in row["voxels"].items() if n != m.classes[0]) or "background only"
            console().print(f"{f}: {'x'.join(map(str, vol.shape))} voxels, {what} "
                            f"({(time.perf_counter() - t0) * 1e3:.0f} ms)")
    if json_path:
        write_json(json_path, rows)
    return rows
