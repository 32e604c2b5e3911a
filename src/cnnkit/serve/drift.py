"""Data drift: are the images a model is asked about still like the ones it was checked on?

Each image is summarized by a few cheap features: the mean and standard deviation of each
channel of the decoded image (brightness, contrast, colour cast) and the model's confidence
in its answer (the top class probability, the best detection score, the highest tag
probability). A :class:`Reference` holds those features over a reference set (the model's
validation images); a :class:`DriftMonitor` keeps the last ``window`` requests' features and
scores each feature with the population stability index (PSI) against the reference, over
ten bins at the reference's deciles::

    PSI = sum_b (w_b - r_b) * ln(w_b / r_b)

(``r_b``, ``w_b``: the shares of reference and window values in bin ``b``). The drift score is
the largest PSI over the features; the usual reading is below 0.1 stable, 0.1-0.25 a moderate
shift and above 0.25 a significant one, so the default threshold is 0.25. PSI is written here
(a dozen lines) because it is a formula on two histograms, not worth a dependency.
"""

from __future__ import annotations

import json
import math
import threading
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch

BINS = 10
EPS = 1e-4  # share given to an empty bin, so ln stays finite


def image_features(image: torch.Tensor) -> list[float]:
    """Per-channel mean and standard deviation of a decoded ``(C, H, W)`` uint8 image, in [0, 1]."""
    x = image.float().div(255).flatten(1)
    return [*x.mean(1).tolist(), *x.std(1, correction=0).tolist()]


def feature_names(channels: int) -> list[str]:
    names = ["gray"] if channels == 1 else ["red", "green", "blue"][:channels]
    return [f"{n}_mean" for n in names] + [f"{n}_std" for n in names] + ["confidence"]


def confidence(row: dict[str, Any]) -> float | None:
    """The model's confidence in one answer (a ``to_dict()`` row), or None for tasks without one."""
    if "topk" in row:
        return float(row["score"])
    if "detections" in row:
        return max((d["score"] for d in row["detections"]), default=0.0)
    if "scores" in row and isinstance(row["scores"], dict):
        return max(row["scores"].values(), default=0.0)
    return None


class Reference:
    """Reference features (``(N, F)``, NaN where a feature is missing) and their bin edges."""

    def __init__(self, names: list[str], values: np.ndarray, source: str = ""):
        self.names, self.values, self.source = list(names), np.asarray(values, np.float64), source
        self.edges = [np.unique(np.nanquantile(col[~np.isnan(col)], np.linspace(0, 1, BINS + 1)[1:-1]))
                      if (~np.isnan(col)).any() else None for col in self.values.T]
        self.shares = [_shares(col, e) if e is not None else None for col, e in zip(self.values.T, self.edges)]

    @classmethod
    def from_predictor(cls, predictor, items: list, source: str = "", batch: int = 32) -> Reference:
        """Features of ``items`` (paths, bytes, arrays) under ``predictor``."""
        names = feature_names(predictor.card.input.channels)
        rows = []
        for i in range(0, len(items), batch):
            chunk = items[i:i + batch]
            images = [predictor.pipeline.decode(it) for it in chunk]
            results = predictor(images, batch=batch)
            for img, r in zip(images, results):
                c = confidence(r.to_dict())
                rows.append(image_features(img) + [math.nan if c is None else c])
        return cls(names, np.array(rows), source)

    def save(self, path: str | Path) -> None:
        from cnnkit.utils.io import write_json

        write_json(path, {"names": self.names, "values": np.where(np.isnan(self.values), None, self.values).tolist(),
                          "source": self.source})

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        d = json.loads(Path(path).read_text())
        return cls(d["names"], np.array(d["values"], dtype=np.float64), d.get("source", ""))


def _shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    values = values[~np.isnan(values)]
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return np.maximum(counts / max(1, len(values)), EPS)


def psi(reference: np.ndarray, window: np.ndarray) -> float:
    """Population stability index of two bin-share vectors."""
    return float(np.sum((window - reference) * np.log(window / reference)))


class DriftMonitor:
    """The last ``window`` requests' features against a :class:`Reference` (thread-safe).

    :meth:`report` gives the score once ``min_samples`` images have been seen."""

    def __init__(self, reference: Reference, window: int = 200, threshold: float = 0.25, min_samples: int = 30):
        self.reference, self.threshold, self.min_samples = reference, threshold, min_samples
        self.recent: deque[list[float]] = deque(maxlen=window)
        self.lock = threading.Lock()

    def add(self, features: list[float], row: dict[str, Any]) -> None:
        """One answered image: its :func:`image_features` and its answer row."""
        c = confidence(row)
        with self.lock:
            self.recent.append([*features, math.nan if c is None else c])

    def report(self) -> dict[str, Any]:
        with self.lock:
            values = np.array(self.recent, np.float64).reshape(-1, len(self.reference.names))
        out: dict[str, Any] = {"samples": len(values), "window": self.recent.maxlen, "threshold": self.threshold,
                               "reference": self.reference.source, "score": None, "drifted": None, "features": {}}
        if len(values) < self.min_samples:
            return out
        for name, col, edges, ref in zip(self.reference.names, values.T, self.reference.edges,
                                         self.reference.shares):
            if edges is not None and (~np.isnan(col)).any():
                out["features"][name] = round(psi(ref, _shares(col, edges)), 4)
        if out["features"]:
            out["score"] = max(out["features"].values())
            out["drifted"] = out["score"] > self.threshold
        return out
