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

import time
from pathlib import Path
from typing import Any

from cnnkit.api._common import config_from_file as _config_from_file
from cnnkit.data.volumes import NIFTI_SUFFIXES, load_volume_data, read_nifti, write_nifti
from cnnkit.engine import workflow
from cnnkit.engine.progress import console
from cnnkit.engine.workflow import TrainResult
from cnnkit.errors import CnnkitError, DataError
from cnnkit.runtime.pipeline import Predictor
from cnnkit.runtime.pipeline import load as load_predictor
from cnnkit.tasks.medical.config import MedicalConfig
from cnnkit.tasks.medical.spec import SPEC, evaluate
from cnnkit.utils.io import write_json


def config_from_file(path: str | Path, overrides: dict[str, Any]) -> MedicalConfig:
    return _config_from_file(MedicalConfig, "medical", path, overrides)


def train(cfg: MedicalConfig | None = None, *, resume: str | Path | None = None, verbose: bool = True,
          **overrides: Any) -> TrainResult:
    """Train a 3-D segmenter or volume classifier; the Python twin of ``cnnkit medical train``.

    Examples:
        >>> result = cnnkit.train("medical", data="phantoms", model="vnet", epochs=20)
        >>> result.metrics["dice"]
    """
    return workflow.train(SPEC, cfg, resume=resume, verbose=verbose, **overrides)


def load(path: str | Path, device: str = "cpu") -> Predictor:
    """A volume segmenter's or classifier's :class:`~cnnkit.runtime.pipeline.Predictor` from
    ``best.safetensors``, its run folder or an exported ``.onnx``; it takes NIfTI paths or
    (D, H, W) arrays of any size."""
    return load_predictor(path, device, task="medical")


def val(weights: str | Path, data: str, split: str = "val", device: str = "auto",
        json_path: str | Path | None = None, verbose: bool = True) -> dict[str, Any]:
    """Dice and 95th-percentile Hausdorff distance per class on a split (segmenters), or
    accuracy, balanced accuracy, macro F1 and AUROC (classifiers)."""
    m = load(weights, device)
    ds = load_volume_data(data, m.card.provenance.get("seed", 0) if data == "phantoms" else 0, m.pipeline.classify)
    metrics = evaluate(m, workflow.eval_records(m, ds, data, split))
    metrics.update(split=split, backend=m.backend.name)
    return workflow.finish_val(metrics, json_path, verbose, line=SPEC.line(metrics, split))


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
