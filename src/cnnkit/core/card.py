"""The model card: everything needed to rebuild, feed and read a trained model.

A card travels beside every weights file (``best.json`` next to ``best.safetensors``) and
inside every exported ONNX file (metadata key ``cnnkit_card``). Predict, val, export,
benchmark and serve read preprocessing and decoding settings from it, never from code kept in
step by hand. This module imports no torch, so the command line can read cards cheaply.

Version 1 cards (written before the card was typed) have four ``preprocess`` layouts, one per
task family; :meth:`ModelCard.from_dict` reads them all and :meth:`ModelCard.to_dict` writes
version 2.

Examples:
    >>> card = ModelCard.from_dict({"task": "classify", "arch": "smallcnn", "classes": ["a", "b"],
    ...     "in_chans": 1, "preprocess": {"imgsz": 16, "mean": [0.5], "std": [0.25], "channels": 1}})
    >>> card.input.height, card.input.resize, card.input.channels
    (16, 'resize', 1)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from cnnkit.errors import ModelError

CARD_VERSION = 2
TASKS = ("classify", "multilabel", "detect", "instance", "segment", "medical")
RESIZE_MODES = ("resize", "letterbox", "tile", "sliding3d", "volume")


@dataclass
class InputSpec:
    """What the network's first input is and how an image becomes it.

    ``resize``: ``resize`` (squash to ``height x width``), ``letterbox`` (longer side to the
    size, padded right and bottom with ``pad_value``), ``tile`` (full resolution, a sliding
    ``height x width`` window), ``sliding3d`` (a volume, sliding cubes of side ``height``) or
    ``volume`` (a volume resized to a cube of side ``height``). The network takes values in
    ``value_range`` and normalizes with ``mean``/``std`` itself (``normalize="model"``), or the
    volume is z-scored before it (``normalize="zscore"``).
    """

    height: int
    width: int
    channels: int = 3
    resize: str = "resize"
    value_range: tuple[float, float] | None = (0.0, 1.0)  # None: any real value (z-scored volumes)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    normalize: str = "model"
    pad_value: int = 114
    mask_channel: bool = False  # an extra observation-mask channel (--missing-input mask)
    dims: int = 2  # 2: images (B, C, H, W); 3: volumes (B, C, D, H, W)
    illumination: str = "none"  # lighting normalized inside the core (cnnkit.data.illumination; not torchvision detectors)

    @property
    def model_channels(self) -> int:
        return self.channels + int(self.mask_channel)

    def shape(self, batch: int = 1) -> tuple[int, ...]:
        """The network input's shape for ``batch`` samples."""
        if self.dims == 3:
            return (batch, self.model_channels, self.height, self.height, self.width)
        return (batch, self.model_channels, self.height, self.width)


@dataclass
class OutputSpec:
    """The network's raw outputs (names, in order) and what kind of decoding they need."""

    names: tuple[str, ...] = ("logits",)
    kind: str = "softmax"  # softmax, sigmoid, fastdet, detections, masks, seg-logits, volume-logits


@dataclass
class ModelCard:
    """A typed, versioned model card."""

    task: str
    arch: str
    classes: list[str]
    input: InputSpec
    output: OutputSpec = field(default_factory=OutputSpec)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)  # per-class (multilabel), conf/iou/nms/max_det (detect)
    provenance: dict[str, Any] = field(default_factory=dict)  # data, epochs, seed, aug, date, cnnkit version, ...
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # category_ids, ensemble, tta, head, ...
    version: int = CARD_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def head(self) -> str:
        """``classify`` or ``segment`` for medical models, else the task."""
        return self.extra.get("head", "classify" if self.task in ("classify", "multilabel") else self.task)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.input.value_range is not None:
            d["input"]["value_range"] = list(self.input.value_range)
        for k in ("mean", "std"):
            if d["input"][k] is not None:
                d["input"][k] = list(d["input"][k])
        d["output"]["names"] = list(self.output.names)
        d["format"] = d.pop("version")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "model card") -> ModelCard:
        try:
            d = json.loads(text)
        except json.JSONDecodeError:
            raise ModelError(f"{where} is not valid JSON") from None
        return cls.from_dict(d, where)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "model card") -> ModelCard:
        """Read a card of any version (1: the layouts written before this class existed)."""
        if not isinstance(d, dict) or "task" not in d or "arch" not in d or "classes" not in d:
            raise ModelError(f"{where} lacks the task, arch or classes of a cnnkit model card")
        if d["task"] not in TASKS:
            raise ModelError(f"{where} is for an unknown task '{d['task']}'")
        version = int(d.get("format", 1))
        if version > CARD_VERSION:
            raise ModelError(f"{where} has format {version}; this cnnkit reads up to {CARD_VERSION} "
                             "(upgrade cnnkit)")
        if version >= 2:
            try:
                return _from_v2(cls, d)
            except (KeyError, TypeError, ValueError) as e:
                raise ModelError(f"{where} is incomplete or malformed ({type(e).__name__}: {e})") from None
        try:
            return _from_v1(cls, d)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"{where} is incomplete or malformed ({type(e).__name__}: {e})") from None


def _from_v2(cls: type[ModelCard], d: dict[str, Any]) -> ModelCard:
    i, o = dict(d["input"]), dict(d.get("output", {}))
    if i.get("value_range") is not None:
        i["value_range"] = tuple(i["value_range"])
    for k in ("mean", "std"):
        if i.get(k) is not None:
            i[k] = tuple(i[k])
    if "names" in o:
        o["names"] = tuple(o["names"])
    return cls(task=d["task"], arch=d["arch"], classes=list(d["classes"]), input=InputSpec(**i),
               output=OutputSpec(**o), model_kwargs=dict(d.get("model_kwargs") or {}),
               thresholds=dict(d.get("thresholds") or {}), provenance=dict(d.get("provenance") or {}),
               metrics=dict(d.get("metrics") or {}), extra=dict(d.get("extra") or {}), version=CARD_VERSION)


def _from_v1(cls: type[ModelCard], d: dict[str, Any]) -> ModelCard:
    """Version 1: the per-task layouts of cnnkit 0.1 (classify/multilabel, detect/instance,
    segment, medical)."""
    task = d["task"]
    pre = dict(d.get("preprocess") or {})
    size = d.get("imgsz") or [pre.get("imgsz", 0)] * 2
    h, w = int(size[0]), int(size[-1])
    provenance = {**(d.get("trained") or {}), "cnnkit_version": d.get("cnnkit_version")}
    extra = {k: d[k] for k in ("category_ids", "ensemble", "tta", "head", "thresholds_tuned_on", "epoch") if k in d}
    thresholds: dict[str, Any] = {}
    if task in ("classify", "multilabel"):
        inp = InputSpec(h, w, int(pre.get("channels", d.get("in_chans", 3))), "resize",
                        mean=tuple(pre["mean"]), std=tuple(pre["std"]),
                        mask_channel=bool(pre.get("mask_channel", False)))
        out = OutputSpec(("logits",), "sigmoid" if task == "multilabel" else "softmax")
        if task == "multilabel":
            given = d.get("thresholds") or {}
            thresholds = {"per_class": {c: float(given.get(c, 0.5)) for c in d["classes"]}}
    elif task in ("detect", "instance"):
        inp = InputSpec(h, w, 3, "letterbox", pad_value=int(pre.get("pad", 114)))
        if d["arch"] == "fastdet":
            out = OutputSpec(("scores", "boxes"), "fastdet")
        else:
            out = OutputSpec(("boxes", "scores", "labels") + (("masks",) if task == "instance" else ()),
                             "detections")
        thresholds = {"iou": float(d.get("iou", 0.6)), "nms": d.get("nms", "hard"),
                      "max_det": int(d.get("max_det", 100))}
    elif task == "segment":
        inp = InputSpec(h, w, int(d.get("in_chans", 3)), "tile" if pre.get("resize") == "crop" else "resize")
        extra["ignore_index"] = pre.get("ignore_index", 255)
        out = OutputSpec(("logits",), "seg-logits")
    else:  # medical
        window = int(d.get("window", 0))
        classify = d.get("head") == "classify"
        inp = InputSpec(window, window, int(d.get("in_chans", 1)), "volume" if classify else "sliding3d",
                        normalize="zscore", value_range=None, dims=3)
        out = OutputSpec(("logits",), "softmax" if classify else "volume-logits")
        extra.setdefault("head", "classify" if classify else "segment")
    return cls(task=task, arch=d["arch"], classes=list(d["classes"]), input=inp, output=out,
               model_kwargs=dict(d.get("model_kwargs") or {}), thresholds=thresholds, provenance=provenance,
               metrics=dict(d.get("metrics") or {}), extra=extra, version=CARD_VERSION)
