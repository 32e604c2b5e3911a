"""Weights (safetensors + JSON model card) and full training checkpoints, written atomically.

``best.safetensors`` + ``best.json`` are enough to rebuild a model with no code or config from
the training run. ``last.ckpt`` holds the whole training state for exact resume; it is read
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cnnkit.errors import ModelError
from cnnkit.utils.io import atomic_write, write_json

EXPORTED = (".onnx", ".torchscript")
# top-level keys a card of format 1 or 2 knows; any other key a caller adds goes to ``extra``
CARD_KEYS = {"format", "task", "arch", "classes", "input", "output", "model_kwargs", "thresholds", "provenance",
             "metrics", "extra", "num_classes", "in_chans", "imgsz", "preprocess", "cnnkit_version", "trained",
             "category_ids", "iou", "nms", "max_det", "head", "window", "thresholds_tuned_on", "ensemble", "tta"}  # files from `cnnkit export`, run by cnnkit.runtime


def resolve_weights(path: str | Path) -> Path:
    """Accept a ``.safetensors`` file, a ``weights/`` folder or a run folder (or an exported
    ``.onnx`` / ``.torchscript``, which :func:`load_weights` refuses: the runtime reads those)."""
    p = Path(path)
    if p.is_dir():
        for cand in (p / "weights" / "best.safetensors", p / "best.safetensors"):
            if cand.is_file():
                return cand
        raise ModelError(f"no weights found in folder '{p}' (looked for weights/best.safetensors)")
    if not p.exists():
        raise ModelError(f"weights file '{p}' does not exist")
    if p.suffix in EXPORTED:
        return p
    if p.suffix != ".safetensors":
        raise ModelError(f"weights file '{p}' is not a .safetensors file; pass "
                         "runs/.../weights/best.safetensors or its run folder")
    return p


def card_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], card: dict[str, Any]) -> None:
    """Write ``path`` (safetensors) and its ``.json`` model card, each atomically. The card (a
    dict of any format, or a :class:`~cnnkit.core.card.ModelCard`) is written in the current
    format (other top-level keys, such as the Trainer's ``epoch``, go to ``extra``); an
    incomplete dict is written as given."""
    from safetensors.torch import save_file

    from cnnkit.core.card import ModelCard

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    if not isinstance(card, ModelCard):
        extra = {k: v for k, v in card.items() if k not in CARD_KEYS}  # e.g. the Trainer's epoch, a snapshot index
        try:
            card = ModelCard.from_dict(card, f"the model card for '{path}'")
        except ModelError:  # not a complete card: written as given (loading will say what is wrong)
            write_json(card_path(path), card)
            return
        card.extra.update(extra)
    write_json(card_path(path), card.to_dict())


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read weights and model card; errors are one sentence."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = resolve_weights(path)
    if p.suffix in EXPORTED:
        raise ModelError(f"'{p}' is an exported model; this needs cnnkit weights (.safetensors or a run folder)")
    cp = card_path(p)
    if not cp.is_file():
        raise ModelError(f"model card '{cp}' is missing; cnnkit weights come with a .json card "
                         "beside the .safetensors file")
    try:
        card = json.loads(cp.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise ModelError(f"model card '{cp}' is not valid JSON") from None
    try:
        state = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"weights file '{p}' is unreadable ({str(e).splitlines()[0][:100]})") from None
    return state, card


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save ``state`` to a temp file and rename it onto ``path``."""
    atomic_write(path, lambda p: torch.save(state, p))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint with ``weights_only=True``."""
    p = Path(path)
    if p.is_dir():
        p = p / "weights" / "last.ckpt" if (p / "weights" / "last.ckpt").exists() else p / "last.ckpt"
    if not p.is_file():
        raise ModelError(f"checkpoint '{p}' does not exist; --resume takes a run folder or its "
                         "weights/last.ckpt")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise ModelError(f"checkpoint '{p}' is unreadable ({str(e).splitlines()[0][:100]})") from None
