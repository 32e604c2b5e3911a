"""The Python API: the same verbs and option names as the command line, for every task.

``cnnkit.train(TASK, ...)``, ``cnnkit.val(TASK, ...)`` and ``cnnkit.predict(TASK, ...)`` take
the options of ``cnnkit TASK train|val|predict`` as keywords (``--max-det`` is ``max_det``,
``--json`` is ``json_path``); ``cnnkit.load`` returns a predictor for any task and format;
``cnnkit.export`` writes ONNX or TorchScript. Each verb finds the task's workflow spec by name
(:mod:`cnnkit.tasks`) and runs the one workflow (:mod:`cnnkit.engine.workflow`).

Examples:
    >>> import cnnkit
    >>> result = cnnkit.train("classify", data="digits", epochs=5)
    >>> model = cnnkit.load(result.weights)
    >>> model(["digit.png"])[0].label
    >>> cnnkit.val("classify", result.run_dir, "digits", split="test")["top1"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cnnkit.tasks import TASKS, config_class, spec

__all__ = ["TASKS", "attack", "config_from_file", "explain", "export", "load", "predict", "prune", "robustness", "train",
           "val"]


def train(task: str, cfg: Any = None, *, resume: str | Path | None = None, verbose: bool = True, **options: Any):
    """Train a model for ``task`` with the options of ``cnnkit TASK train`` (or a full config
    object ``cfg``); ``resume`` continues a stopped run exactly. Returns a
    :class:`~cnnkit.engine.workflow.TrainResult` (run folder, val and test metrics)."""
    from cnnkit.engine.workflow import train as run

    return run(spec(task), cfg, resume=resume, verbose=verbose, **options)


def val(task: str, weights: str | Path | list, data: str, **options: Any) -> dict[str, Any]:
    """Evaluate ``weights`` (``.safetensors``, a run folder, ``.onnx`` or ``.torchscript``) on a
    split of ``data``; the options of ``cnnkit TASK val``. Returns the metrics dict (the
    ``--json`` file's content)."""
    return spec(task).val(weights, data, **options)


def predict(task: str, weights: str | Path | list, source: str | Path, **options: Any) -> list[dict[str, Any]]:
    """Predict a file or folder; the options of ``cnnkit TASK predict``. Returns one dict per
    input (the ``--json`` rows)."""
    return spec(task).predict(weights, source, **options)


def attack(task: str, weights: str | Path, data: str, **options: Any) -> dict[str, Any]:
    """The task's val metric on a split of ``data``, clean and under an adversarial attack; the
    options of ``cnnkit TASK attack`` (``method``, ``eps``, ``steps``, ``norm``, ``targeted``).
    Returns ``{"clean", "attacked", "success_rate", "mean_linf", ...}`` (the ``--json`` content).

    Examples:
        >>> cnnkit.attack("classify", "runs/classify/digits", "digits", method="pgd", eps="0.1")["attacked"]
    """
    return spec(task).attack(weights, data, **options)


def robustness(task: str, weights: str | Path, data: str, **options: Any) -> dict[str, Any]:
    """The task's val metric on a split of ``data``, clean and under image corruptions (the 15
    of ImageNet-C, occlusion, illumination) at severities 1-5; the options of ``cnnkit TASK
    robustness`` (``corruptions``, ``severities``, ``baseline``, ``limit``, ``seed``, ``out``).
    Returns ``{"clean", "corruptions": {name: [metric per severity]}, "mce", ...}`` (the
    ``--json`` content).

    Examples:
        >>> r = cnnkit.robustness("classify", "runs/classify/shapes", "shapes", corruptions="noise,blur")
        >>> r["corruptions"]["gaussian_noise"]
    """
    return spec(task).robustness(weights, data, **options)


def explain(task: str, weights: str | Path, source: str | Path | None = None, **options: Any) -> dict[str, Any]:
    """Heat maps of what ``weights``' answers rest on, for ``source`` images or a ``data`` split;
    the options of ``cnnkit TASK explain`` (``method``, ``target``, ``layer``, ``out``, ``eval``).
    Returns ``{"rows": [...], "summary": {method: scores}}`` (the ``--json`` file's content).

    Examples:
        >>> cnnkit.explain("classify", "runs/classify/train", "cat.png", method="gradcam,ig")
        >>> cnnkit.explain("detect", "runs/detect/train", data="shapes", eval=True)["summary"]
    """
    return spec(task).explain(weights, source, **options)


def load(path: str | Path, device: str = "cpu", backend: str | None = None, **options: Any):
    """A :class:`~cnnkit.runtime.pipeline.Predictor` for any task: from ``best.safetensors``
    (+ its card) or a run folder on PyTorch, from an exported ``.onnx`` on ONNX Runtime, or
    from a ``.torchscript`` file. ``options`` are the task's load options (detectors ``iou``
    and ``nms``, segmenters ``tile``).

    Examples:
        >>> model = cnnkit.load("runs/detect/train")
        >>> model("street.jpg", conf=0.25)[0].to_dict()
    """
    from cnnkit.runtime.pipeline import load as load_predictor

    return load_predictor(path, device, backend, **options)


def export(weights: str | Path, format: str = "onnx", **options: Any) -> dict[str, Any]:
    """Export ``weights`` to ONNX or TorchScript with the options of ``cnnkit export`` (``out``,
    ``dynamic``, ``opset``, ``imgsz``); the file carries the model card and is checked against
    eager PyTorch. Returns the report (path, size, largest difference)."""
    from cnnkit.methods.export import export as run

    return run(weights, format, **options)


def prune(weights: str | Path, ratio: float = 0.5, **options: Any) -> dict[str, Any]:
    """Remove ``ratio`` of the channels of every prunable layer with the options of ``cnnkit
    prune`` (``method``, ``data``, ``split``, ``images``, ``out``); fine-tune the result with
    ``train(..., init=report["file"])``. Returns the report (file, parameters and batch-1
    latency before and after)."""
    from cnnkit.methods.prune import prune as run

    return run(weights, ratio, **options)


def config_from_file(task: str, path: str | Path, overrides: dict[str, Any] | None = None):
    """``task``'s config from a ``config.yaml`` with ``overrides`` on top."""
    from cnnkit.engine.steps import config_from_file as read

    return read(config_class(task), task, path, overrides or {})
