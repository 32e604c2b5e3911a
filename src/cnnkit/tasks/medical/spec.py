"""Medical volumes' workflow spec: phantoms or NIfTI folders, the 3-D network (segmenter or
classifier), task and card for a run, and the final evaluation through the predictor (Dice
and HD95 per class with sliding windows, or accuracy, balanced accuracy, F1 and AUROC)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnkit.core.card import InputSpec, ModelCard, OutputSpec
from cnnkit.data.classification import make_loader
from cnnkit.data.defaults import resolve_batch_lr
from cnnkit.data.volumes import (
    VolRecord,
    VolumeData,
    VolumeDataset,
    collate_volumes,
    load_volume_data,
)
from cnnkit.engine.workflow import Evaluation, Setup, WorkflowSpec, provenance
from cnnkit.errors import CnnkitError, DataError
from cnnkit.runtime.pipeline import Predictor
from cnnkit.tasks.medical.config import MedicalConfig
from cnnkit.tasks.medical.task import MedicalTask, VolumeMetrics
from cnnkit.tasks.softmax import ClassificationMetrics, SoftmaxTask


def _window(data: VolumeData, patch: int | None) -> int:
    """The training cube side: ``--patch``, else the first training volume's largest side
    rounded up to a multiple of 16 (classifiers resize every volume to it)."""
    if patch:
        return patch
    rec = data.split("train")[0]
    side = max(rec.load_image().shape, default=16)
    return int(np.ceil(side / 16) * 16)


def evaluate(model: Predictor, records: list[VolRecord]) -> dict[str, Any]:
    """Segmenters: Dice and HD95 per class over ``records`` (whole volumes, sliding window).
    Classifiers: accuracy, balanced accuracy, macro F1, per-class figures and confusion matrix
    (:class:`~cnnkit.tasks.softmax.ClassificationMetrics`) plus macro AUROC (torchmetrics)."""
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


class MedicalSpec(WorkflowSpec):
    config = MedicalConfig
    drift_reference = False  # drift features are 2-D image statistics

    def curve_keys(self, cfg: MedicalConfig) -> tuple[str, ...]:
        return ("top1",) if cfg.classify else ("dice",)

    def setup(self, cfg: MedicalConfig, device, verbose: bool, resuming: bool) -> Setup:
        from cnnkit.models.volumetric import build_volume_model

        data = load_volume_data(cfg.data, cfg.seed, cfg.classify)
        if not data.splits.get("train") or not data.splits.get("val"):
            raise DataError(f"'{cfg.data}' needs a train and a val split")
        k = len(data.names)
        window = max(32, _window(data, cfg.patch)) if cfg.classify else _window(data, cfg.patch)
        model = build_volume_model(cfg.model, k, 1)
        task = SoftmaxTask(data.names) if cfg.classify else MedicalTask(data.names, cfg.loss)
        task.collate = collate_volumes
        gen = torch.Generator().manual_seed(cfg.seed)
        train_ds = VolumeDataset(data.split("train"), k, window, train=True, classify=cfg.classify)
        val_ds = VolumeDataset(data.split("val"), k, window, classify=cfg.classify)
        resolve_batch_lr(cfg, {}, len(train_ds), False)  # (volumes: the default batch is already small)
        train_loader = make_loader(train_ds, cfg.batch, True, cfg.workers, task.collate, gen,
                                   drop_last=len(train_ds) > cfg.batch, pin_memory=device.type == "cuda")
        val_loader = make_loader(val_ds, cfg.batch, False, cfg.workers, task.collate)
        head = "classify" if cfg.classify else "segment"
        card = ModelCard("medical", cfg.model, list(data.names),
                         InputSpec(window, window, 1, "volume" if cfg.classify else "sliding3d", value_range=None,
                                   normalize="zscore", dims=3),
                         OutputSpec(("logits",), "softmax" if cfg.classify else "volume-logits"),
                         provenance=provenance(cfg, loss=cfg.loss, patch=cfg.patch), extra={"head": head})
        return Setup(model, task, train_loader, val_loader, card, data)

    def evaluate(self, cfg: MedicalConfig, setup: Setup, predictor, split: str, keep: int = 0):
        return evaluate(predictor, setup.data.split(split)), []

    def line(self, m: dict[str, Any], split: str) -> str:
        return _line(m, split)

    # ---- val and predict
    predict_batch = 1

    def val_records(self, model, data: str, split: str, verbose: bool) -> list:
        from cnnkit.engine.workflow import eval_records

        seed = model.card.provenance.get("seed", 0) if data == "phantoms" else 0
        return eval_records(model, load_volume_data(data, seed, model.pipeline.classify), data, split)

    def record_input(self, records, i: int):
        return records[i].load_image()

    def val_metrics(self, model, records, options: dict[str, Any]) -> Evaluation:
        return Evaluation(evaluate(model, records))

    def explain_truth(self, records, i: int) -> list:
        """Segmenters: every foreground class in the label volume, with its voxels.
        Classifiers: the volume's class, with the voxels of the label volume's highest class
        where the record has one and that class is present (phantoms: the lesion, for volumes
        of class "lesion"); else no voxels (deletion and insertion still score the map)."""
        r = records[i]
        label = r.load_label() if (r.label is not None or r.label_path) else None
        if r.target is not None:  # a classifier's volume
            mask = None
            if label is not None and r.target > 0 and (top := int(label.max())) > 0:
                mask = label == top
            return [(int(r.target), mask)]
        if label is None:
            raise DataError(f"volume {r.name} has no label volume to explain against")
        return [(int(c), label == c) for c in sorted(set(np.unique(label).tolist()) - {0})]

    def sources(self, options: dict[str, Any]) -> list:
        """The NIfTI files of ``source``; with ``save_dir``, refuse to write a label volume over
        an input."""
        from cnnkit.data.volumes import NIFTI_SUFFIXES

        p = Path(options["source"])
        if not p.exists():
            raise DataError(f"source '{p}' does not exist")
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.name.endswith(NIFTI_SUFFIXES))
        if not files:
            raise DataError(f"no .nii or .nii.gz files in '{p}'")
        if options.get("save_dir"):
            inputs = {f.resolve() for f in files}
            clash = next((f for f in files if _label_path(f, p, options["save_dir"]).resolve() in inputs), None)
            if clash is not None:
                raise CnnkitError(f"--save-dir would overwrite the input '{clash}' with its labels; "
                                  "choose another folder")
        return files

    def save_results(self, model, results: list, out: Path, options: dict[str, Any]) -> str:
        """Each label volume as NIfTI with its input's name, subfolder and affine."""
        import nibabel as nib

        from cnnkit.data.volumes import write_nifti

        if model.pipeline.classify:
            return "classifiers write no volumes; --save-dir left empty"
        for r in results:
            f = Path(r.path)
            target = _label_path(f, Path(options["source"]), out)
            write_nifti(target, r.labels.numpy(), r.affine if r.affine is not None else nib.load(str(f)).affine)
            r.labels_file = str(target)
        return f"label volumes in {out}/"

    def result_line(self, model, r) -> str:
        if model.pipeline.classify:
            return f"{r.path}: {r.label} ({r.score:.3f})"
        row = r.to_dict()
        what = ", ".join(f"{n} {c}" for n, c in row["voxels"].items() if n != model.classes[0]) or "background only"
        return f"{r.path}: {'x'.join(map(str, row['shape']))} voxels, {what}"


def _label_path(f: Path, source: Path, out) -> Path:
    """Where ``f``'s label volume goes: its path below the source folder, under ``out``."""
    return Path(out) / (f.name if source.is_file() else f.relative_to(source))


SPEC = MedicalSpec()
