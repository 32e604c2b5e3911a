"""Model registry: one decorator to register, one factory to build.

Every entry point takes ``num_classes``, ``in_chans`` and ``pretrained`` and returns a module
with the timm classifier interface: ``forward_features(x)``, ``forward_head(x, pre_logits=False)``,
``reset_classifier(num_classes)``, ``num_classes`` and ``pretrained_cfg`` (mean, std, input
size). Embeddings, distillation and Grad-CAM rely on that interface, never on
model-specific code.
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
    family: str  # "cnnkit", "timm"
    tiny: bool  # suited to tiny images (e.g. 8-32 px) on a CPU
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None,
                   family: str = "cnnkit", tiny: bool = False):
    """Register a model entry point under ``name`` (default: the function's name).

    Registering the same name twice is an error.
    """

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _REGISTRY:
            raise ValueError(f"model '{key}' is already registered")
        doc = (f.__doc__ or "").strip().splitlines()
        _REGISTRY[key] = ModelEntry(key, f, family, tiny, doc[0] if doc else "")
        return f

    return wrap(fn) if fn is not None else wrap


def _ensure_loaded() -> None:
    # Import the modules whose decorators fill the registry (no work happens at import).
    from cnnkit.models import smallcnn, timm_models  # noqa: F401


def list_models(pattern: str | None = None) -> list[str]:
    """Names of registered models, optionally filtered by a glob pattern."""
    _ensure_loaded()
    names = sorted(_REGISTRY)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def model_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; raises ModelError with close matches when unknown."""
    _ensure_loaded()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("timm:"):
        from cnnkit.models.timm_models import timm_entry

        return timm_entry(name)
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    raise ModelError(f"unknown model '{name}'; {hint}run `cnnkit models` to list them "
                     "(any timm model works as 'timm:NAME')")


def create_model(name: str, num_classes: int, in_chans: int = 3, pretrained: bool = False,
                 **kwargs) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`, or ``timm:NAME`` for any timm model.
        num_classes: size of the classifier output.
        in_chans: 1 for grayscale input, 3 for RGB (one more with a missing-data mask channel).
        pretrained: load published weights through torchvision/timm's own loaders (needs
            network access the first time; the weights are cached afterwards).
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
    entry = model_entry(name)
    model = entry.fn(num_classes=num_classes, in_chans=in_chans, pretrained=pretrained, **kwargs)
    model.cnnkit_arch = name
    return model
