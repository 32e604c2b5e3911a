"""Semantic segmentation workflows behind ``cnnkit segment train|val|predict``.

Wires segmentation data (:mod:`cnnkit.data.segmentation`), the networks
(:mod:`cnnkit.models.segmentation`), the task (:mod:`cnnkit.tasks.segment.task`) and the Trainer.
Two ways to feed images of any size, recorded in the model card so that val and predict
match training:

- ``resize`` (default): every image is resized to ``imgsz`` x ``imgsz``; predictions are
  resized back to the original size.
- ``crop`` (``--crop``): training takes random ``imgsz`` crops at the original resolution;
  val and predict slide an ``imgsz`` window over the whole image with overlap and Gaussian
  blending (MONAI's ``sliding_window_inference``), so large images keep their detail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cnnkit.api._common import config_from_file as _config_from_file
from cnnkit.data.decode import list_sources
from cnnkit.data.segmentation import write_mask
from cnnkit.engine import workflow
from cnnkit.engine.progress import console
from cnnkit.engine.workflow import TrainResult
from cnnkit.runtime.pipeline import Predictor
from cnnkit.runtime.pipeline import load as load_predictor
from cnnkit.tasks.segment.config import SegmentConfig
from cnnkit.tasks.segment.spec import SPEC, evaluate, load_data, metrics_table, overlay, scores  # noqa: F401
from cnnkit.utils.io import write_json


def config_from_file(path: str | Path, overrides: dict[str, Any]) -> SegmentConfig:
    return _config_from_file(SegmentConfig, "segment", path, overrides)


def train(cfg: SegmentConfig | None = None, *, resume: str | Path | None = None, verbose: bool = True,
          **overrides: Any) -> TrainResult:
    """Train a segmentation network; the Python twin of ``cnnkit segment train``.

    Returns:
        :class:`~cnnkit.engine.workflow.TrainResult`; ``metrics`` holds the validation ``miou``,
        ``dice``, ``pixel_acc`` and ``per_class_iou`` at the images' original size.

    Examples:
        >>> result = cnnkit.train("segment", data="shapes", model="unet", epochs=20)
        >>> result.metrics["miou"]
    """
    return workflow.train(SPEC, cfg, resume=resume, verbose=verbose, **overrides)


# ---------------------------------------------------------------------------------------
# Loading and using a trained segmenter
def load(path: str | Path, device: str = "cpu", tile: bool | None = None) -> Predictor:
    """A segmenter :class:`~cnnkit.runtime.pipeline.Predictor` from ``best.safetensors``, its
    run folder or an exported ``.onnx``. ``tile`` (default: as trained; True for ``--crop``
    models) slides the card's window over full-resolution images."""
    return load_predictor(path, device, task="segment", tile=tile)


def val(weights: str | Path, data: str, split: str = "val", device: str = "auto", tile: bool | None = None,
        json_path: str | Path | None = None, verbose: bool = True) -> dict[str, Any]:
    """Evaluate a segmenter (``.safetensors``, run folder or ``.onnx``) on a dataset split at the
    images' original size: mIoU, Dice, pixel accuracy, per-class IoU and Dice."""
    from cnnkit.engine.checkpoint import resolve_weights

    m = load(weights, device, tile)
    if data == "shapes":
        trained = m.card.provenance
        ds = load_data("shapes", trained.get("seed", 0), m.card.input.height, trained.get("classes", len(m.classes) - 1),
                   trained.get("max_objects", 4), trained.get("scenes") if split == "train" else 0)
    else:
        ds = load_data(data, 0, None)
    records = workflow.eval_records(m, ds, data, split)
    metrics = evaluate(m, records)
    metrics.update(split=split, weights=str(resolve_weights(weights)), backend=m.backend.name)
    return workflow.finish_val(metrics, json_path, verbose,
                               metrics_table(metrics, f"{split} split of {data} ({len(records)} images)"),
                               SPEC.line(metrics, split), metrics.pop("skipped_images", []))


def predict(weights: str | Path, source: str | Path, device: str = "auto", tile: bool | None = None,
            json_path: str | Path | None = None, save_dir: str | Path | None = None,
            verbose: bool = True) -> list[dict[str, Any]]:
    """Segment a file or folder: with ``save_dir`` write ``NAME_mask.png`` (class ids as a palette
    PNG) and ``NAME_overlay.png`` per image; ``json_path`` writes
    ``[{"path", "width", "height", "classes": {name: pixel share}, "mask"}]``."""
    from PIL import Image

    from cnnkit.data.decode import read_image

    m = load(weights, device, tile)
    skipped: list[tuple[str, str]] = []
    timing: dict[str, float] = {}
    results = m(list_sources(source), batch=8, skipped=skipped, timing=timing)
    out = Path(save_dir) if save_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        used: set[str] = set()
        for r in results:
            stem = Path(r.path).stem
            base, n = stem, 1
            while base in used:  # same name in two sub-folders
                n += 1
                base = f"{stem}_{n}"
            used.add(base)
            r.mask_file = str(out / f"{base}_mask.png")
            write_mask(r.mask_file, r.mask.numpy())
            img = read_image(r.path, channels=3)
            Image.fromarray(overlay(img, r.mask).permute(1, 2, 0).numpy()).save(out / f"{base}_overlay.png")
    rows = [r.to_dict() for r in results]
    if json_path:
        write_json(json_path, rows)
    if verbose:
        con = console()
        for r in results:
            fr = r.fractions()
            what = ", ".join(f"{k} {v:.0%}" for k, v in sorted(fr.items(), key=lambda kv: -kv[1]) if k != m.classes[0])
            con.print(f"{r.path}: {r.width}x{r.height}, {what or 'background only'}")
        n = max(1, timing["images"])
        con.print(f"speed: {timing['preprocess_ms'] / n:.1f} ms preprocess, {timing['inference_ms'] / n:.1f} ms "
                  f"inference, {timing['postprocess_ms'] / n:.1f} ms postprocess per image ({m.backend.name})")
        for p, reason in skipped:
            con.print(f"[yellow]skipped[/] {p}: {reason}")
        if out is not None:
            con.print(f"masks and overlays in {out}/")
    return rows
