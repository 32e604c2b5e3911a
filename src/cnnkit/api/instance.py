"""Instance segmentation workflows behind ``cnnkit instance train|val|predict``.

Instance segmentation is detection with a mask per object, so these are the detection
workflows (:mod:`cnnkit.api.detect`) run with a mask-predicting model (Mask R-CNN), masks
carried through letterboxing and augmentation, and COCO mask AP (pycocotools ``segm``)
beside box AP. ``results.json`` keys: ``mask_map50_95``, ``mask_map50``, ``mask_map75``,
``box_map50_95``, ``box_map50``, ``mask_per_class_ap`` (and the box keys of ``detect``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cnnkit.api import detect as _detect
from cnnkit.runtime.pipeline import Predictor
from cnnkit.tasks.detect.config import InstanceConfig

__all__ = ["InstanceConfig", "config_from_file", "load", "predict", "train", "val"]


def config_from_file(path: str | Path, overrides: dict[str, Any]) -> InstanceConfig:
    return _detect.config_from_file(path, overrides, InstanceConfig)


def train(cfg: InstanceConfig | None = None, *, resume: str | Path | None = None, verbose: bool = True,
          **overrides: Any):
    """Train Mask R-CNN; the Python twin of ``cnnkit instance train``.

    Examples:
        >>> result = cnnkit.train("instance", data="shapes", epochs=20)
        >>> result.metrics["mask_map50"]
    """
    return _detect.train(cfg, resume=resume, verbose=verbose, _cls=InstanceConfig, **overrides)


def val(weights: str | Path, data: str, **options: Any) -> dict[str, Any]:
    """Box and mask COCO AP of a split; the options of :func:`cnnkit.api.detect.val`."""
    return _detect.val(weights, data, task="instance", **options)


def predict(weights: str | Path, source: str | Path, **options: Any) -> list[dict[str, Any]]:
    """Objects with boxes and masks (COCO RLE in the JSON); the options of
    :func:`cnnkit.api.detect.predict`."""
    return _detect.predict(weights, source, task="instance", **options)


def load(path: str | Path, device: str = "cpu") -> Predictor:
    """Rebuild a trained Mask R-CNN; its results carry a ``masks`` tensor per image."""
    return _detect.load(path, device, "instance")
