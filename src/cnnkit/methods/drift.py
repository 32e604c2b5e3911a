"""Data drift: are the images a model is asked about still like the ones it was checked on?

Each image is summarized by a few cheap features: the mean and standard deviation of each
channel of the decoded image (brightness, contrast, colour cast), the model's confidence in
its answer (the top class probability, the best detection score, the highest tag
probability) and the model's embedding of the image (torch or ONNX Runtime): its deepest
feature stage (``Pipeline.feature_layers``) averaged over positions, which follows what the
model sees rather than raw pixels. Embeddings have hundreds of dimensions, so the reference
keeps their first principal axes: the features are the projections on the top ``PCS`` axes
(``embedding_pc1``...) and the distance to the reference mean (``embedding_distance``).

A :class:`Reference` holds those features over a reference set (the model's validation
images); a :class:`DriftMonitor` keeps the last ``window`` requests' features and scores each
feature with the population stability index (PSI) against the reference, over ten bins at the
reference's deciles::

    PSI = sum_b (w_b - r_b) * ln(w_b / r_b)

(``r_b``, ``w_b``: the shares of reference and window values in bin ``b``, each count plus
0.5, so that an empty bin does not dominate). The drift score is the largest PSI over the
features; the usual reading is below 0.1 stable, 0.1-0.25 a moderate shift and above 0.25 a
significant one, so the default threshold is 0.25. By chance alone PSI over ten bins of n
samples is about 9/n, so no score is given before 100 images (40 clean digits scored 0.93 with
raw shares). PSI is written here (a dozen lines) because it is a formula on two histograms,
not worth a dependency.
"""

from __future__ import annotations

import json
import math
import threading
from collections import deque
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

BINS = 10
PSEUDO = 0.5  # count added to every bin (Jeffreys smoothing), so an empty bin stays finite
MIN_REFERENCE = 30  # images a reference needs for its deciles
MIN_SAMPLES = 100  # window images before a score: PSI over 10 bins of n samples is about 9/n by chance
PCS = 4  # principal axes of the embeddings kept as features


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


class EmbeddingTap:
    """Catches a predictor's embedding of each image: the output of the deepest stage of
    ``pipeline.feature_layers``, averaged over positions. On the torch backend a forward hook
    on that stage; on ONNX Runtime the stage's output tensor fetched beside the graph's
    outputs (:meth:`OrtBackend.tap`). Either records only inside :meth:`run` on the calling
    thread (other threads' calls pass untouched)."""

    def __init__(self, layer: torch.nn.Module | None = None, backend=None):
        self.local = threading.local()
        self.handle = layer.register_forward_hook(self._hook) if layer is not None else None
        self.backend = backend

    @classmethod
    def attach(cls, predictor) -> EmbeddingTap | None:
        """A tap on ``predictor``'s deepest feature stage, or None (TorchScript has no named
        modules; a model without stages; an ONNX graph whose stage output is not found)."""
        from cnnkit.runtime.backend import OrtBackend

        model = getattr(predictor, "model", None)
        if isinstance(model, torch.nn.Module):
            stages = predictor.pipeline.feature_layers(model)
            return cls(list(stages.values())[-1]) if stages else None
        if isinstance(predictor.backend, OrtBackend):
            found = onnx_stage_output(predictor.pipeline, predictor.backend)
            if found is not None:
                tensor, x, want = found
                tap = cls(backend=predictor.backend)
                predictor.backend.tap(tensor, partial(tap._hook, None, ()))
                got = tap.run(lambda: predictor.backend(x), len(x))[1]
                if got is not None and got.shape == want:  # the guess checked on the tapped session itself
                    return tap
                tap.close()
        return None

    def _hook(self, module, inputs, output) -> None:
        rows = getattr(self.local, "rows", None)
        if rows is None:
            return
        while isinstance(output, (dict, list, tuple)) and output:  # an FPN's maps: the deepest
            output = list(output.values())[-1] if isinstance(output, dict) else output[-1]
        if torch.is_tensor(output) and output.ndim >= 2:
            rows.append(output.detach().float().flatten(2).mean(2).cpu() if output.ndim > 2
                        else output.detach().float().cpu())

    def run(self, fn, n: int):
        """``(fn(), embeddings)``: ``(n, D)`` float64 rows of the images ``fn`` ran, or None when
        the calls did not give one row per image (a tiled segmenter runs per tile)."""
        self.local.rows = []
        try:
            out = fn()
            rows = self.local.rows
        finally:
            self.local.rows = None
        emb = torch.cat(rows).double().numpy() if rows else None
        return out, emb if emb is not None and len(emb) == n else None

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()
        if self.backend is not None:
            self.backend.tap(None)


def onnx_stage_output(pipeline, backend) -> tuple[str, torch.Tensor, tuple[int, ...]] | None:
    """``(tensor name, input, embedding shape)``: the tensor in ``backend``'s ONNX graph that
    the deepest feature stage of ``pipeline`` writes, an example input and the embedding shape
    PyTorch's stage gives on it; or None.

    PyTorch's TorchScript-based exporter names each node by the scopes of the modules it ran
    in (``/model/stages/stages.3/stages.3.1/.../Relu``; a wrapper's level may have no scope),
    so the stage's output is the last node under the stage's scope. The model is rebuilt from
    the card (untrained) to find the stage's path; :meth:`EmbeddingTap.attach` checks the guess
    (the tapped tensor must have the returned shape, else no embedding rather than a wrong one).
    """
    import onnx

    model = pipeline.build().eval()
    core = pipeline.core(model)
    stages = pipeline.feature_layers(model)
    if not stages:
        return None
    layer = list(stages.values())[-1]
    path = next((n for n, m in core.named_modules() if m is layer), None)
    if not path:
        return None
    parts = path.split(".")

    full = [".".join(parts[:i + 1]) for i in range(len(parts))]

    def inside(node_name: str) -> bool:
        """Whether the node's scopes reach the stage: each scope is one of the stage path's
        levels (a wrapper's level may have no scope of its own), in order."""
        level = 0
        for scope in node_name.split("/")[1:-1]:
            while level < len(full) and not (full[level] == scope or full[level].endswith("." + scope)):
                level += 1
            if level == len(full):
                return False
            if level == len(full) - 1:
                return True
            level += 1
        return False

    graph = onnx.load(str(backend.path), load_external_data=False).graph
    tensor = next((n.output[0] for n in reversed(graph.node) if n.output and inside(n.name)), None)
    if tensor is None:
        return None
    x = pipeline.example_input(1)
    caught: list[torch.Tensor] = []
    tap = EmbeddingTap(layer)
    tap.local.rows = caught
    try:
        with torch.no_grad():
            core(x)
    finally:
        tap.close()
    if len(caught) != 1:
        return None
    return tensor, x, tuple(caught[0].shape)


class Reference:
    """Reference features (``(N, F)``, NaN where a feature is missing) and their bin edges;
    with ``embedding`` (``{"mean": (D,), "axes": (k, D)}``) the last ``k + 1`` features are
    the embedding's projections and its distance to the mean (:meth:`embed`)."""

    def __init__(self, names: list[str], values: np.ndarray, source: str = "",
                 embedding: dict[str, Any] | None = None):
        self.names, self.values, self.source = list(names), np.asarray(values, np.float64), source
        self.embedding = {k: np.asarray(v, np.float64) for k, v in embedding.items()} if embedding else None
        self.edges = [np.unique(np.nanquantile(col[~np.isnan(col)], np.linspace(0, 1, BINS + 1)[1:-1]))
                      if (~np.isnan(col)).any() else None for col in self.values.T]
        self.shares = [_shares(col, e) if e is not None else None for col, e in zip(self.values.T, self.edges)]

    def embed(self, embedding: np.ndarray | None) -> list[float]:
        """The embedding features of one image (``[]`` for a reference without embeddings,
        NaNs when the image has none)."""
        return _project(self.embedding, embedding) if self.embedding is not None else []

    @classmethod
    def from_predictor(cls, predictor, items: list, source: str = "", batch: int = 32) -> Reference:
        """Features of ``items`` (paths, bytes, arrays) under ``predictor``."""
        names = feature_names(predictor.card.input.channels)
        tap = EmbeddingTap.attach(predictor)
        rows, embs = [], []
        try:
            for i in range(0, len(items), batch):
                chunk = items[i:i + batch]
                images = [predictor.pipeline.decode(it) for it in chunk]
                call = partial(predictor, images, batch=batch)
                results, emb = tap.run(call, len(images)) if tap else (call(), None)
                embs.append(emb)
                for img, r in zip(images, results):
                    c = confidence(r.to_dict())
                    rows.append(image_features(img) + [math.nan if c is None else c])
        finally:
            if tap:
                tap.close()
        values, embedding = np.array(rows), None
        if embs and all(e is not None for e in embs):
            e = np.concatenate(embs)
            mean = e.mean(0)
            axes = np.linalg.svd(e - mean, full_matrices=False)[2][:PCS]
            embedding = {"mean": mean, "axes": axes}
            values = np.concatenate([values, np.array([_project(embedding, x) for x in e])], 1)
            names += [f"embedding_pc{i + 1}" for i in range(len(axes))] + ["embedding_distance"]
        return cls(names, values, source, embedding)

    def save(self, path: str | Path) -> None:
        from cnnkit.utils.io import write_json

        d = {"names": self.names, "values": np.where(np.isnan(self.values), None, self.values).tolist(),
             "source": self.source}
        if self.embedding is not None:
            d["embedding"] = {k: v.tolist() for k, v in self.embedding.items()}
        write_json(path, d)

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        d = json.loads(Path(path).read_text())
        return cls(d["names"], np.array(d["values"], dtype=np.float64), d.get("source", ""), d.get("embedding"))


REFERENCE_FILE = "drift.json"  # beside best.safetensors: written by training, read by cnnkit serve
REFERENCE_IMAGES = 200  # most val images a training run summarizes (the default window's size)


def write_training_reference(spec, predictor, data: str, path: Path, seed: int = 0) -> Path:
    """The drift reference of a freshly trained model: its features on (up to
    :data:`REFERENCE_IMAGES` of) the val split of ``data``, read as ``val`` reads it."""
    import random

    records = spec.val_records(predictor, data, "val", verbose=False)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    items = spec.record_inputs(records, sorted(order[:REFERENCE_IMAGES]))
    if len(items) < MIN_REFERENCE:
        from cnnkit.errors import DataError

        raise DataError(f"the val split has {len(items)} readable images; a drift reference needs {MIN_REFERENCE}")
    Reference.from_predictor(predictor, items, f"{data} (val)").save(path)
    return path


def _project(embedding: dict[str, np.ndarray], x: np.ndarray | None) -> list[float]:
    """An image's embedding features: its projections on the reference's axes and its distance
    to the reference mean (NaNs without an embedding)."""
    if x is None:
        return [math.nan] * (len(embedding["axes"]) + 1)
    d = np.asarray(x, np.float64) - embedding["mean"]
    return [*(embedding["axes"] @ d).tolist(), float(np.linalg.norm(d))]


def _shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    values = values[~np.isnan(values)]
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return (counts + PSEUDO) / (len(values) + PSEUDO * len(counts))


def psi(reference: np.ndarray, window: np.ndarray) -> float:
    """Population stability index of two bin-share vectors."""
    return float(np.sum((window - reference) * np.log(window / reference)))


class DriftMonitor:
    """The last ``window`` requests' features against a :class:`Reference` (thread-safe).

    :meth:`report` gives the score once ``min_samples`` images have been seen."""

    def __init__(self, reference: Reference, window: int = 200, threshold: float = 0.25,
                 min_samples: int = MIN_SAMPLES):
        self.reference, self.threshold, self.min_samples = reference, threshold, min(min_samples, window)
        self.recent: deque[list[float]] = deque(maxlen=window)
        self.lock = threading.Lock()

    def add(self, features: list[float], row: dict[str, Any], embedding: np.ndarray | None = None) -> None:
        """One answered image: its :func:`image_features`, its answer row and its embedding."""
        c = confidence(row)
        values = [*features, math.nan if c is None else c, *self.reference.embed(embedding)]
        with self.lock:
            self.recent.append(values)

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
