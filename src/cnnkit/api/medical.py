"""Volumetric medical segmentation behind ``cnnkit medical train|val|predict``.

3-D networks (:mod:`cnnkit.models.volumetric`: V-Net, 3-D U-Net) trained with the common
Trainer on whole volumes or random patches (``--patch``), scored per class by Dice and the
95th-percentile Hausdorff distance, and applied to volumes of any size by sliding-window
inference (MONAI) with the training size as the window.
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cnnkit
from cnnkit.api._common import config_from_file as _config_from_file
from cnnkit.api._common import (
    load_task_model,
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
    load_volume_data,
    read_nifti,
    write_nifti,
)
from cnnkit.engine.config import TrainConfig
from cnnkit.engine.progress import console
from cnnkit.engine.trainer import Trainer, resolve_amp
from cnnkit.errors import CnnkitError, DataError
from cnnkit.tasks.medical import MEDICAL_LOSSES, MedicalTask, VolumeMetrics
from cnnkit.utils.device import select_device
from cnnkit.utils.io import write_json
from cnnkit.utils.seed import seed_everything


@dataclass
class MedicalConfig(TrainConfig):
    """``cnnkit medical train`` options."""

    UNUSED = ("imgsz", "pretrained", "init", "freeze", "unfreeze_at", "layer_decay", "linear_probe")

    data: str = "phantoms"
    model: str = "unet3d"  # unet3d (default: learns phantoms in a minute on a CPU) or vnet
    loss: str = "dice+ce"  # dice or dice+ce
    patch: int | None = None  # train on random cubes of this side (a multiple of 16); None: whole volumes
    epochs: int = 30
    batch: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0

    def validate(self) -> None:
        super().validate()
        from cnnkit.models.volumetric import VOLUME_MODELS

        if self.model not in VOLUME_MODELS:
            raise CnnkitError(f"--model must be one of {', '.join(VOLUME_MODELS)}, got '{self.model}'")
        if self.loss not in MEDICAL_LOSSES:
            raise CnnkitError(f"--loss must be one of {', '.join(MEDICAL_LOSSES)}, got '{self.loss}'")
        defaults = type(self)()
        for name in self.UNUSED:
            if getattr(self, name) != getattr(defaults, name):
                raise CnnkitError(f"--{name.replace('_', '-')} does not apply to 3-D volumes (see --patch)")
        if self.patch is not None and (self.patch < 16 or self.patch % 16):
            raise CnnkitError(f"--patch must be a multiple of 16, got {self.patch}")


def config_from_file(path: str | Path, overrides: dict[str, Any]) -> MedicalConfig:
    return _config_from_file(MedicalConfig, "medical", path, overrides)


def build_model(arch: str, num_classes: int, in_chans: int = 1) -> torch.nn.Module:
    from cnnkit.models.volumetric import build_volume_model

    return build_volume_model(arch, num_classes, in_chans)


def _window(data: VolumeData, patch: int | None) -> int:
    """The training cube side: ``--patch``, else the first training volume's largest side
    rounded up to a multiple of 16."""
    if patch:
        return patch
    rec = data.split("train")[0]
    side = max(rec.load_label().shape)
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
    data = load_volume_data(cfg.data, cfg.seed)
    if not data.splits.get("train") or not data.splits.get("val"):
        raise DataError(f"'{cfg.data}' needs a train and a val split")
    k = len(data.names)
    window = _window(data, cfg.patch)
    model = build_model(cfg.model, k)
    task = MedicalTask(data.names, cfg.loss)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_ds = VolumeDataset(data.split("train"), k, window, train=True)
    val_ds = VolumeDataset(data.split("val"), k, window)
    train_loader = make_loader(train_ds, cfg.batch, True, cfg.workers, task.collate, gen,
                               drop_last=len(train_ds) > cfg.batch, pin_memory=device.type == "cuda")
    val_loader = make_loader(val_ds, cfg.batch, False, cfg.workers, task.collate)
    run = open_run(cfg, "medical", run)
    card = {"task": "medical", "arch": cfg.model, "model_kwargs": {}, "classes": data.names, "num_classes": k,
            "in_chans": 1, "window": window, "preprocess": {"normalize": "per-volume z-score"},
            "cnnkit_version": cnnkit.__version__,
            "trained": {"data": cfg.data, "epochs": cfg.epochs, "seed": cfg.seed, "loss": cfg.loss, "patch": cfg.patch,
                        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}}
    trainer = Trainer(task, model, train_loader, val_loader, cfg, device, run.root, card,
                      standard_hooks(cfg, run, verbose))
    train_time = run_trainer(trainer, ckpt, run, "medical", verbose)
    best = load(run.best, str(device))
    val_m = best.evaluate(data.split("val"))
    test_m = best.evaluate(data.split("test")) if data.splits.get("test") else None
    results = write_run_results(trainer, run, val_m, test_m, train_time)
    from cnnkit.utils.plotting import plot_curves

    plot_curves(trainer.history, run.plots / "results.png", ["dice"])
    if verbose:
        con.print(_line(val_m, "val") + ("  ·  " + _line(test_m, "test") if test_m else "")
                  + f"  ·  trained {train_time:.0f} s")
        con.print(f"results in {run.root}/ (weights/best.safetensors, metrics.csv, results.json, plots/)")
    return TrainResult(run.root, results, test_m, trainer.best_epoch, dict(trainer.skipped))


def _line(m: dict[str, Any], split: str) -> str:
    per = ", ".join(f"{n} {v:.3f}" for n, v in m["per_class_dice"].items() if v is not None)
    hd = f"  HD95 {m['hd95']:.2f} vox" if m.get("hd95") is not None else ""
    return f"{split} Dice {m['dice']:.4f} ({per}){hd}"


class VolumeModel:
    """A trained 3-D segmenter: ``segment`` a volume, ``evaluate`` records."""

    def __init__(self, model: torch.nn.Module, card: dict[str, Any], device: torch.device):
        self.model, self.card, self.device = model.to(device).eval(), card, device
        self.classes = list(card["classes"])
        self.window = int(card["window"])
        self.amp = resolve_amp("auto", device)

    @torch.no_grad()
    def segment(self, volume: np.ndarray | torch.Tensor, overlap: float = 0.25) -> torch.Tensor:
        """Class ids uint8 (D, H, W) of a (D, H, W) volume of any size (z-scored here):
        sliding ``window``-sided cubes with ``overlap`` and Gaussian blending (MONAI)."""
        from monai.inferers import sliding_window_inference

        v = torch.as_tensor(np.asarray(volume, np.float32))
        v = (v - v.mean()) / v.std().clamp(min=1e-6)
        x = v[None, None].to(self.device)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            out = sliding_window_inference(x, (self.window,) * 3, 2, self.model, overlap=overlap, mode="gaussian")
        return out.float().argmax(1)[0].to(torch.uint8).cpu()

    def evaluate(self, records: list[VolRecord]) -> dict[str, Any]:
        """Dice and HD95 per class over ``records`` (whole volumes, sliding window)."""
        ds = VolumeDataset(records, len(self.classes))
        state = VolumeMetrics(self.classes)
        for i in range(len(ds)):
            img, lab = ds.load(i)
            state.add_predictions(self.segment(img[0].numpy())[None], lab[None])
        return state.compute()


def load(path: str | Path, device: str = "cpu") -> VolumeModel:
    """Rebuild a trained 3-D segmenter from ``best.safetensors`` (or its run folder)."""
    model, card = load_task_model(path, "medical", build_model)
    return VolumeModel(model, card, select_device(device))


def val(weights: str | Path, data: str, split: str = "val", device: str = "auto",
        json_path: str | Path | None = None, verbose: bool = True) -> dict[str, Any]:
    """Dice and 95th-percentile Hausdorff distance per class on a split."""
    m = load(weights, device)
    ds = load_volume_data(data, m.card.get("trained", {}).get("seed", 0) if data == "phantoms" else 0)
    if list(ds.names) != m.classes:
        raise DataError(f"the classes of '{data}' ({', '.join(ds.names)}) differ from the model's "
                        f"({', '.join(m.classes)})")
    metrics = m.evaluate(ds.split(split))
    metrics["split"] = split
    if json_path:
        write_json(json_path, metrics)
    if verbose:
        console().print(_line(metrics, split))
    return metrics


def predict(weights: str | Path, source: str | Path, device: str = "auto", save_dir: str | Path | None = None,
            json_path: str | Path | None = None, verbose: bool = True) -> list[dict[str, Any]]:
    """Segment a NIfTI file or a folder of them; ``save_dir`` gets ``NAME`` label volumes (same
    affine as the input), ``json_path`` ``[{"path", "shape", "voxels": {class: count}}]``."""
    m = load(weights, device)
    p = Path(source)
    if not p.exists():
        raise DataError(f"source '{p}' does not exist")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.name.endswith(NIFTI_SUFFIXES))
    if not files:
        raise DataError(f"no .nii or .nii.gz files in '{p}'")
    rows = []
    for f in files:
        t0 = time.perf_counter()
        vol, affine = read_nifti(f)
        lab = m.segment(vol)
        counts = np.bincount(lab.numpy().ravel(), minlength=len(m.classes))
        row = {"path": str(f), "shape": list(vol.shape),
               "voxels": {n: int(c) for n, c in zip(m.classes, counts) if c}}
        if save_dir:
            out = Path(save_dir) / f.name
            write_nifti(out, lab.numpy(), affine)
            row["labels"] = str(out)
        rows.append(row)
        if verbose:
            what = ", ".join(f"{n} {c}" for n, c in row["voxels"].items() if n != m.classes[0]) or "background only"
            console().print(f"{f}: {'x'.join(map(str, vol.shape))} voxels, {what} "
                            f"({(time.perf_counter() - t0) * 1e3:.0f} ms)")
    if json_path:
        write_json(json_path, rows)
    return rows
