"""torchvision/timm families, built through timm so that every family shares one interface.

timm implements resnet, mobilenetv3, efficientnet, densenet and convnext with the same
``forward_features`` / ``forward_head`` / ``reset_classifier`` API and any ``in_chans``;
with ``pretrained=True`` its own loader fetches the published weights (for resnets the
``tv_in1k`` tags are torchvision's original ImageNet weights).
"""

from __future__ import annotations

import torch.nn as nn

from cnnkit.errors import ModelError
from cnnkit.models.registry import ModelEntry, register_model

# cnnkit name -> timm name (with the pretrained tag used when pretrained=True)
FAMILIES: dict[str, str] = {
    "resnet18": "resnet18.tv_in1k",
    "resnet34": "resnet34.tv_in1k",
    "resnet50": "resnet50.tv_in1k",
    "mobilenet_v3_small": "mobilenetv3_small_100.lamb_in1k",
    "mobilenet_v3_large": "mobilenetv3_large_100.ra_in1k",
    "efficientnet_b0": "efficientnet_b0.ra_in1k",
    "densenet121": "densenet121.tv_in1k",
    "convnext_tiny": "convnext_tiny.fb_in1k",
}


def build_timm(timm_name: str, num_classes: int, in_chans: int, pretrained: bool,
               attention: str | None = None, pool: str = "avg", **kwargs) -> nn.Module:
    """Create a timm model, turning a failed weight download into one clear sentence.

    ``attention`` goes into every residual block (resnets only, through timm's
    ``block_args``); ``pool`` replaces the global pooling (any family).
    """
    import timm

    from cnnkit.models.blocks import ATTENTION

    if attention not in (None, "", "none"):
        if not timm_name.startswith("resnet"):
            raise ModelError(f"--attention is supported for smallcnn and the resnet family, not "
                             f"'{timm_name.split('.')[0]}'")
        if attention not in ATTENTION:
            raise ModelError(f"unknown attention '{attention}'; choose from {', '.join(ATTENTION)}")
        kwargs["block_args"] = dict(attn_layer=attention)
    if pool in ("avg", "max", "avgmax"):
        kwargs["global_pool"] = pool
    if pretrained:
        _check_hub(timm_name)
    try:
        model = timm.create_model(timm_name, pretrained=pretrained, num_classes=num_classes,
                                  in_chans=in_chans, **kwargs)
        if pool not in ("avg", "max", "avgmax"):
            _swap_pool(model, pool, num_classes)
        return model
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ModelError(f"timm has no model '{timm_name}'; see timm.list_models()") from None
        if not pretrained:
            raise
        raise _offline_error(timm_name, e) from None
    except (OSError, ValueError, ImportError) as e:  # hub/network errors are OSError subclasses
        if not pretrained:
            raise
        raise _offline_error(timm_name, e) from None


def _swap_pool(model: nn.Module, name: str, num_classes: int) -> None:
    """Replace a timm classifier's global pool (resnet, densenet, efficientnet style heads)."""
    from cnnkit.models.blocks import make_pool

    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if (not isinstance(getattr(model, "global_pool", None), nn.Module) or not isinstance(head, nn.Linear)
            or head.in_features != getattr(model, "num_features", -1)):
        raise ModelError(f"--pool {name} is not supported for '{type(model).__name__}' (its head is not "
                         "pool + linear); use avg, max or avgmax")
    pool, mult = make_pool(name)
    model.global_pool = pool
    model.num_features = model.num_features * mult
    # (not timm's reset_classifier: it would rebuild timm's own pool from a pool_type name)
    setattr(model, model.pretrained_cfg.get("classifier", "fc"), nn.Linear(model.num_features, num_classes))


HUB_HOST = ("huggingface.co", 443)


def _check_hub(timm_name: str, timeout: float = 3.0) -> None:
    """Fail fast (one sentence) when the weight hub is unreachable, instead of minutes of retries.

    With ``HF_HUB_OFFLINE=1`` the check is skipped and timm loads weights already in the local
    Hugging Face cache.
    """
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
    except OSError:
        raise ModelError(f"pretrained weights for '{timm_name}' need a download and there is no network; "
                         "start from local weights with --init PATH (a cnnkit .safetensors or a "
                         "timm/torchvision state dict), or set HF_HUB_OFFLINE=1 to use weights already "
                         "in the Hugging Face cache") from None


def _offline_error(timm_name: str, e: Exception) -> ModelError:
    reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
    return ModelError(f"pretrained weights for '{timm_name}' could not be downloaded ({reason}); "
                      "check the network, or start from local weights with --init PATH "
                      "(a cnnkit .safetensors or a timm/torchvision state dict)")


def _make_entry(name: str, timm_name: str) -> None:
    def fn(num_classes: int = 1000, in_chans: int = 3, pretrained: bool = False, **kwargs) -> nn.Module:
        return build_timm(timm_name, num_classes, in_chans, pretrained, **kwargs)

    fn.__name__ = name
    fn.__doc__ = f"{name} (timm '{timm_name.split('.')[0]}', pretrained tag '{timm_name}')."
    register_model(fn, name=name, family="timm")


for _name, _timm in FAMILIES.items():
    _make_entry(_name, _timm)


def timm_entry(name: str) -> ModelEntry:
    """An unregistered entry for ``timm:NAME`` (any model timm knows)."""
    timm_name = name.split(":", 1)[1]

    def fn(num_classes: int = 1000, in_chans: int = 3, pretrained: bool = False, **kwargs) -> nn.Module:
        return build_timm(timm_name, num_classes, in_chans, pretrained, **kwargs)

    return ModelEntry(name, fn, "timm", False, f"timm model '{timm_name}'")
