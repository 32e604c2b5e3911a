"""Model registry: one decorator to register, one factory to build, every family tagged by task.

Every entry point takes ``num_classes``, ``in_chans`` and ``pretrained`` (plus the family's own
options) and returns a module. Entries tagged ``classify`` (which also serve multilabel and as
backbones) have the timm classifier interface: ``forward_features(x)``,
``forward_head(x, pre_logits=False)``, ``reset_classifier(num_classes)``, ``num_classes`` and
``pretrained_cfg``. Detectors (``detect``, ``instance``), segmenters (``segment``) and volume
networks (``medical``) are registered by :mod:`cnnkit.models.families`; their task pipelines
(``cnnkit/tasks/<task>/pipeline.py``) give every family the same core, targets and feature
stages, so export, distillation and Grad-CAM never need model-specific code.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from cnnkit.errors import ModelError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    fn: Callable[..., nn.Module]
    family: str  # "cnnkit", "timm", "torchvision", "monai"
    tiny: bool  # suited to tiny images (e.g. 8-32 px) on a CPU
    description: str
    task: str = "classify"  # classify (also multilabel and backbones), detect, instance, segment, medical


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None,
                   family: str = "cnnkit", tiny: bool = False, task: str = "classify"):
    """Register a model entry point under ``name`` (default: the function's name).

    Registering the same name twice is an error.
    """

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _REGISTRY:
            raise ValueError(f"model '{key}' is already registered")
        doc = (f.__doc__ or "").strip().splitlines()
        _REGISTRY[key] = ModelEntry(key, f, family, tiny, doc[0] if doc else "", task)
        return f

    return wrap(fn) if fn is not None else wrap


def _ensure_loaded() -> None:
    # Import the modules whose decorators fill the registry (no work happens at import).
    from cnnkit.models import families, smallcnn, timm_models  # noqa: F401


def list_models(pattern: str | None = None, task: str | None = None) -> list[str]:
    """Names of registered models, optionally filtered by a glob pattern and a task tag."""
    _ensure_loaded()
    names = sorted(_REGISTRY)
    return [n for n in names if (pattern is None or fnmatch.fnmatch(n, pattern))
            and (task is None or _REGISTRY[n].task == task)]


def model_entry(name: str, task: str | None = None) -> ModelEntry:
    """The registry entry for ``name`` (of ``task`` when given); raises ModelError with close
    matches when unknown."""
    _ensure_loaded()
    if name in _REGISTRY:
        entry = _REGISTRY[name]
        if task is not None and entry.task != task:
            raise ModelError(f"'{name}' is a {entry.task} model, not a {task} one; run `cnnkit models` to "
                             "list each task's models")
        return entry
    if name.startswith("timm:"):
        from cnnkit.models.timm_models import timm_entry

        return timm_entry(name)
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    raise ModelError(f"unknown model '{name}'; {hint}run `cnnkit models` to list them "
                     "(any timm model works as 'timm:NAME')")


def create_model(name: str, num_classes: int, in_chans: int = 3, pretrained: bool = False,
                 task: str | None = None, **kwargs) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`, or ``timm:NAME`` for any timm model.
        num_classes: size of the classifier output.
        in_chans: 1 for grayscale input, 3 for RGB (one more with a missing-data mask channel).
        pretrained: load published weights through torchvision/timm's own loaders (needs
            network access the first time; the weights are cached afterwards).
        task: refuse a model of another task (``classify`` for classifiers and backbones).
        **kwargs: passed to the model constructor (for example ``drop_rate``).

    Examples:
        >>> m = create_model("smallcnn", num_classes=10, in_chans=1)
        >>> m(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """
    if num_classes < 1:
        raise ModelError(f"num_classes must be at least 1, got {num_classes}")
    if in_chans < 1:
        raise ModelError(f"in_chans must be at least 1, got {in_chans}")
    entry = model_entry(name, task)
    model = entry.fn(num_classes=num_classes, in_chans=in_chans, pretrained=pretrained, **kwargs)
    model.cnnkit_arch = name
    return model
