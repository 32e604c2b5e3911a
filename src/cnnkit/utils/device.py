"""Device selection with clear errors."""

from __future__ import annotations

import torch

from cnnkit.errors import CnnkitError


def select_device(spec: str | None = None) -> torch.device:
    """Turn ``auto``/``cpu``/``cuda``/``cuda:N``/``mps`` into a device, or explain why not.

    ``auto`` (or None) picks CUDA when available, then MPS, then CPU.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec.isdigit():
        spec = f"cuda:{spec}"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise CnnkitError(f"unknown device '{spec}'; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CnnkitError(f"device '{spec}' was asked for but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CnnkitError(f"device '{spec}' does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CnnkitError("device 'mps' was asked for but MPS is not available here; use --device cpu")
    return dev
