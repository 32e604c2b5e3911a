"""The Python API: the same verbs and option names as the command line.

Examples:
    >>> import cnnkit
    >>> result = cnnkit.train("classify", data="digits", epochs=5)
    >>> model = cnnkit.load(result.weights)
    >>> model(["digit.png"])[0].label
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cnnkit.errors import CnnkitError

TASKS = ("classify", "multilabel", "detect", "instance", "segment", "medical")  # each is the module cnnkit.api.<task>


def _module(task: str):
    if task in TASKS:
        import importlib

        return importlib.import_module(f"cnnkit.api.{task}")
    import difflib

    close = difflib.get_close_matches(task, TASKS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise CnnkitError(f"unknown task '{task}'{hint}; tasks: {', '.join(TASKS)}")


def train(task: str, **options: Any):
    """Train a model for ``task`` with the options of ``cnnkit TASK train``."""
    resume = options.pop("resume", None)
    verbose = options.pop("verbose", True)
    return _module(task).train(resume=resume, verbose=verbose, **options)


def val(task: str, weights: str | Path, data: str, **options: Any) -> dict[str, Any]:
    """Evaluate ``weights`` on ``data``; the options of ``cnnkit TASK val``."""
    return _module(task).val(weights, data, **options)


def predict(task: str, weights: str | Path, source: str | Path, **options: Any) -> list[dict[str, Any]]:
    """Predict a file or folder; the options of ``cnnkit TASK predict``."""
    return _module(task).predict(weights, source, **options)


def load(path: str | Path, device: str = "cpu", backend: str | None = None, **options: Any):
    """A :class:`~cnnkit.runtime.pipeline.Predictor` for any task: from ``best.safetensors``
    (+ its card) or a run folder on PyTorch, or from an exported ``.onnx`` on ONNX Runtime.

    Examples:
        >>> model = cnnkit.load("runs/detect/train")
        >>> model("street.jpg", conf=0.25)[0].to_dict()
    """
    from cnnkit.runtime.pipeline import load as load_predictor

    return load_predictor(path, device, backend, **options)
