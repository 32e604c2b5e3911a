"""The inference contract: a task's :class:`Pipeline`, a :class:`Backend` and a
:class:`ModelCard` make a :class:`Predictor`.

A pipeline turns inputs into tensors (``preprocess``), names the exportable network
(``core``: tensors in, a tuple of tensors out, no NMS or thresholds, the same module in train
and eval), turns raw outputs into typed results (``postprocess``), gives a differentiable
score per sample (``target``, for Grad-CAM and attacks) and the named feature stages
(``feature_layers``, for distillation and CAM). Every task implements it in
``cnnkit/tasks/<task>/pipeline.py``; :func:`pipeline_for` finds it from a card.

:func:`load` rebuilds a predictor from cnnkit weights (``.safetensors`` + card, or a run
folder) on the PyTorch backend, or from an exported ``.onnx`` file on ONNX Runtime; every
task's ``val``, ``predict`` and ``benchmark`` run through it, so both backends share the
same preprocessing and decoding.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.core.card import ModelCard
from cnnkit.data.decode import ImageLike, read_image
from cnnkit.errors import ImageDecodeError, ModelError

PIPELINES = {"classify": "classify", "multilabel": "multilabel", "detect": "detect", "instance": "detect",
             "segment": "segment", "medical": "medical"}


class Pipeline:
    """Base class of the per-task pipelines (see the module docstring).

    ``batchable`` is False for pipelines whose inputs cannot be stacked (sliding windows over
    full-resolution images or volumes, torchvision detectors' per-image outputs): the
    predictor then feeds one input at a time.
    """

    task = "?"
    batchable = True  # inputs of one call can be stacked (else the predictor feeds one at a time)
    fixed_batch = False  # the core only takes one sample per call (torchvision's detectors)
    channels_last = False  # feed the torch core channels_last tensors (measured faster for some models)

    def __init__(self, card: ModelCard):
        self.card = card
        self.classes = list(card.classes)

    def configure(self, **options) -> None:
        """Options fixed when the model is built (detectors: ``iou``, ``nms``); none by default."""
        if options:
            raise ModelError(f"{self.task} models take no build options ({', '.join(sorted(options))})")

    # ---- the model ----------------------------------------------------------------------
    def build(self) -> nn.Module:
        """The task's network for this card, freshly initialized."""
        raise NotImplementedError

    def core(self, model: nn.Module) -> nn.Module:
        """The exportable network: tensors in, a tuple of tensors out."""
        return model

    def feature_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """Named feature stages, shallow to deep."""
        return {}

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A random input of the core's shape (for export checks and benchmarks)."""
        g = torch.Generator().manual_seed(0)
        return torch.rand(self.card.input.shape(batch), generator=g)

    # ---- data ---------------------------------------------------------------------------
    def decode(self, item: Any, max_pixels: int | None = None) -> torch.Tensor:
        """One input (path, bytes, PIL image, array, tensor) as a uint8 tensor; encoded images
        over ``max_pixels`` are refused from their header."""
        return read_image(item, channels=self.card.input.channels, max_pixels=max_pixels).contiguous()

    def decode_meta(self, item: Any, max_pixels: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """:meth:`decode`, and what the input itself says about where its result belongs (a
        volume's affine), added to its meta; nothing by default."""
        return self.decode(item, max_pixels), {}

    def prepare(self, image: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """One decoded input -> the core's input tensor (no batch dim) and its meta."""
        raise NotImplementedError

    def preprocess(self, images: Sequence[ImageLike]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Inputs -> a batch for the core and one meta dict per input."""
        xs, metas = [], []
        for i, item in enumerate(images):
            image, extra = self.decode_meta(item)
            x, meta = self.prepare(image)
            meta.update(extra)
            meta["path"] = str(item) if isinstance(item, (str, Path)) else None
            xs.append(x)
            metas.append(meta)
        return torch.stack(xs), metas

    def run(self, backend, x: torch.Tensor, metas: list[dict[str, Any]]) -> tuple[torch.Tensor, ...]:
        """Raw outputs of a preprocessed batch (sliding-window pipelines override this)."""
        return backend(x)

    def postprocess(self, raw: tuple[torch.Tensor, ...], metas: list[dict[str, Any]], **options) -> list:
        raise NotImplementedError

    def target(self, raw: tuple[torch.Tensor, ...], selector: Any) -> torch.Tensor:
        """A differentiable score per sample ``(B,)`` picked by ``selector``."""
        raise NotImplementedError

    def target_prob(self, raw: tuple[torch.Tensor, ...], selector: Any) -> torch.Tensor:
        """:meth:`target` as a probability in [0, 1] (deletion and insertion curves)."""
        return torch.sigmoid(self.target(raw, selector))

    def select(self, raw: tuple[torch.Tensor, ...], target: Any, meta: dict[str, Any] | None = None) -> tuple[Any, str]:
        """The :meth:`target` selector of one input from its raw outputs and what the user
        asked for (``--target``: a class, a detection index; None: the model's own top
        answer), and a few words naming it. Raises a one-sentence error for a target the
        model does not have."""
        raise ModelError(f"{self.task} models cannot be explained yet (explain covers classify, multilabel, "
                         "detect, instance, segment and medical)")

    def attack_loss(self, raw: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...] | None,
                    targeted: int | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """A differentiable loss per sample ``(B,)`` that an attack maximizes: it grows as the
        answer in ``raw`` departs from the clean answer ``ref`` (or from the true ``labels``,
        where the task's evaluation gives them; or nears class ``targeted``)."""
        raise ModelError(f"{self.task} models cannot be attacked yet (attacks cover classify, multilabel, "
                         "detect and segment)")

    def attack_success(self, raw: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...],
                       targeted: int | None = None) -> torch.Tensor:
        """Per sample, how much of the clean answer the attack overturned, in [0, 1] (NaN where
        there was nothing to overturn)."""
        raise NotImplementedError

    def attack_margin(self, raw: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...] | None,
                      targeted: int | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The Carlini-Wagner margin per sample ``(B,)``: negative exactly when the answer is
        overturned (or is class ``targeted``). Only single-label classifiers have one."""
        raise ModelError(f"--method cw and autoattack need a margin between class scores, which {self.task} "
                         "models do not have; they attack single-label classifiers (use pgd here)")

    def attack_logits(self, raw: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The class scores ``(B, K)`` whose top one is the answer, which AutoAttack's attacks
        read. Only single-label classifiers have them."""
        return self.attack_margin(raw, None)  # raises the same sentence

    def explain_layer(self, model: nn.Module, selector: Any) -> tuple[str, nn.Module] | None:
        """The layer a CAM method should look at for this target when the user names none
        (None: the deepest of :meth:`feature_layers`)."""
        return None

    def box_on_image(self, selector: Any, raw, meta: dict[str, Any]) -> list[float] | None:
        """The selected target's box in the original image's pixels, drawn on explanations
        (detectors); None for targets without one."""
        return None

    def map_to_image(self, m: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
        """A map ``(h, w)`` over the core's input -> over the original image (as ``meta``
        recorded it); the inverse of :meth:`prepare`'s resize."""
        size = (int(meta["height"]), int(meta["width"]))
        return F.interpolate(m[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


def predicted_region(pred: torch.Tensor, classes: Sequence[str], target: Any, unit: str = "pixels",
                     whole: str = "image") -> tuple[Any, str]:
    """A segmenter's :meth:`Pipeline.select`: from the predicted class map ``pred``, the class
    ``target`` (a name or index; None: the foreground class with the most predicted
    ``unit``) and its predicted region (None, meaning the whole ``whole``, when it has none)."""
    from cnnkit.runtime.classifier import class_index

    if target is None:
        counts = torch.bincount(pred.flatten().cpu(), minlength=len(classes))[1:]
        cls = 1 + int(counts.argmax()) if len(counts) and counts.max() > 0 else min(1, len(classes) - 1)
    else:
        cls = class_index(classes, target)
    region = pred == cls
    if not region.any():
        return (cls, None), f"class {classes[cls]} (not predicted here: the whole {whole})"
    return (cls, region), f"class {classes[cls]} ({int(region.sum())} predicted {unit})"


def pipeline_for(card: ModelCard) -> Pipeline:
    """The task pipeline of ``card`` (``cnnkit.tasks.<task>.pipeline``)."""
    module = importlib.import_module(f"cnnkit.tasks.{PIPELINES[card.task]}.pipeline")
    return module.pipeline(card)


class Predictor:
    """A pipeline on a backend: ``predictor(images, **options) -> list of results``.

    Stateless after construction (options travel with each call), so one predictor can serve
    several threads. ``timing`` (a dict, optional) accumulates ``preprocess_ms``,
    ``inference_ms``, ``postprocess_ms`` and ``images`` over a call.

    Examples:
        >>> p = cnnkit.load("runs/classify/train")            # or "model.onnx"
        >>> p("digit.png")[0].label
        >>> p.raw(p.pipeline.example_input(2))[0].shape        # the core's outputs
    """

    def __init__(self, card: ModelCard, pipeline: Pipeline, backend, source: str | Path | None = None,
                 model: nn.Module | None = None):
        self.card, self.pipeline, self.backend, self.source = card, pipeline, backend, source
        self.model = model  # the torch module (None on ONNX Runtime)
        self.classes = list(card.classes)
        self.task = card.task

    @property
    def device(self) -> torch.device:
        return getattr(self.backend, "device", torch.device("cpu"))

    def raw(self, x: torch.Tensor, metas: list[dict[str, Any]] | None = None) -> tuple[torch.Tensor, ...]:
        """The core's outputs for a preprocessed batch."""
        return self.pipeline.run(self.backend, x, metas or [{}] * len(x))

    def __call__(self, images: ImageLike | Sequence[ImageLike], batch: int = 32,
                 skipped: list[tuple[str, str]] | None = None, timing: dict[str, float] | None = None,
                 **options) -> list:
        """Predict one input, a list, or a folder (searched recursively for images); unreadable
        files in a list of several are appended to ``skipped`` as ``(path, reason)`` when
        ``skipped`` is given (else, and for a single input, they raise)."""
        if isinstance(images, (str, Path)) and Path(images).is_dir():
            from cnnkit.data.decode import list_sources

            images = list_sources(images)
        items = [images] if isinstance(images, (str, Path, bytes)) or not isinstance(images, Sequence) else list(images)
        step = batch if self.pipeline.batchable else 1
        results: list = []
        timing = timing if timing is not None else {}
        for k in ("preprocess_ms", "inference_ms", "postprocess_ms", "images"):
            timing.setdefault(k, 0.0)
        for i in range(0, len(items), step):
            t0 = time.perf_counter()
            xs, metas = [], []
            for j, item in enumerate(items[i:i + step]):
                try:
                    x, meta = self.prepare(item, str(item) if isinstance(item, (str, Path)) else f"<image {i + j}>")
                except ImageDecodeError as e:
                    if len(items) == 1 or skipped is None:
                        raise
                    skipped.append((e.path, e.reason))
                    continue
                xs.append(x)
                metas.append(meta)
            if not xs:
                continue
            x = torch.stack(xs)
            t1 = time.perf_counter()
            raw = self.infer(x, metas)
            t2 = time.perf_counter()
            results += self.pipeline.postprocess(raw, metas, **options)
            t3 = time.perf_counter()
            timing["preprocess_ms"] += (t1 - t0) * 1e3
            timing["inference_ms"] += (t2 - t1) * 1e3
            timing["postprocess_ms"] += (t3 - t2) * 1e3
            timing["images"] += len(xs)
        return results

    def prepare(self, item: ImageLike, name: str | None = None, max_pixels: int | None = None
                ) -> tuple[torch.Tensor, dict[str, Any]]:
        """One input decoded and preprocessed: the core's input (no batch dim) and its meta
        (``meta["path"]`` is ``name``). ``max_pixels`` refuses larger images before decoding."""
        return self.decode_prepare(item, name, max_pixels)[1:]

    def decode_prepare(self, item: ImageLike, name: str | None = None, max_pixels: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """:meth:`prepare` that also returns the decoded image: ``(image, input, meta)``."""
        image, extra = self.pipeline.decode_meta(item, max_pixels)
        x, meta = self.pipeline.prepare(image)
        meta.update(extra)
        meta["path"] = name
        return image, x, meta

    def infer(self, x: torch.Tensor, metas: list[dict[str, Any]]) -> tuple[torch.Tensor, ...]:
        """The core's outputs for a stacked batch of prepared inputs (synchronized on CUDA, so
        timing it is honest)."""
        raw = self.pipeline.run(self.backend, x, metas)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return raw

    predict = __call__


def resize_image(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A uint8 or float image ``(C, H, W)`` resized (bilinear, antialiased) to ``size``."""
    from torchvision.transforms.v2 import functional as TF

    return TF.resize(x, list(size), antialias=True) if tuple(x.shape[-2:]) != tuple(size) else x


def interpolate_scores(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Class scores ``(B, K, h, w)`` resized bilinearly to ``size``."""
    if tuple(scores.shape[-2:]) == tuple(size):
        return scores
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)


def load(weights: str | Path, device: str | None = "cpu", backend: str | None = None, task: str | None = None,
         **build_options) -> Predictor:
    """A :class:`Predictor` from cnnkit weights (PyTorch), an exported ``.onnx`` (ONNX Runtime)
    or an exported ``.torchscript`` (PyTorch, no Python model code needed).

    Args:
        weights: ``best.safetensors``, its run folder, or an ``.onnx`` file from ``cnnkit export``.
        device: ``auto``, ``cpu``, ``cuda``...
        backend: ``torch`` or ``onnx``; default from the file type.
        task: the task the weights must be for (a clear error otherwise).
        **build_options: task options fixed when the model is built (detectors: ``iou``, ``nms``).
    """
    from cnnkit.utils.device import select_device

    dev = select_device(device)
    p = Path(weights)
    if p.suffix == ".onnx" or backend == "onnx":
        if p.suffix != ".onnx":
            raise ModelError(f"--backend onnx needs an .onnx file from `cnnkit export`, got '{p}'")
        from cnnkit.runtime.backend import OrtBackend, read_onnx_card

        card = ModelCard.from_dict(read_onnx_card(p), f"the model card inside '{p}'")
        _check_task(card, task, p)
        pipe = pipeline_for(card)
        pipe.configure(**build_options)
        return Predictor(card, pipe, OrtBackend(p, dev), p)
    from cnnkit.engine.trainer import resolve_amp
    from cnnkit.runtime.backend import TorchBackend

    if p.suffix == ".torchscript":
        from cnnkit.methods.export import read_torchscript

        module, raw_card = read_torchscript(p)
        card = ModelCard.from_dict(raw_card, f"the model card inside '{p}'")
        _check_task(card, task, p)
        pipe = pipeline_for(card)
        pipe.configure(**build_options)
        return Predictor(card, pipe, TorchBackend(module, dev), p)
    model, card, pipe = load_model(p, task, **build_options)

    backend = TorchBackend(pipe.core(model), dev, resolve_amp("auto", dev), pipe.channels_last)
    return Predictor(card, pipe, backend, p, model)


def load_torch(weights: str | Path, device: str | None, task: str | None, verb: str, **build_options) -> Predictor:
    """:func:`load` for methods that need the PyTorch model's gradients (``verb``: explain,
    attack): an exported file is refused with one sentence."""
    model = load(weights, device, task=task, **build_options)
    if model.model is None:
        raise ModelError(f"{verb} takes cnnkit weights (.safetensors or a run folder), not the exported "
                         f"'{Path(str(model.source)).name}': it needs the PyTorch model's gradients")
    return model


def _check_task(card: ModelCard, task: str | None, path: Path) -> None:
    if task is not None and card.task != task:
        raise ModelError(f"'{path}' holds a {card.task} model, not {task}")


def load_model(weights: str | Path, task: str | None = None, **build_options) -> tuple[nn.Module, ModelCard, Pipeline]:
    """``(model, card, pipeline)`` from ``best.safetensors`` + card or a run folder (eval mode)."""
    from cnnkit.engine.checkpoint import load_weights

    state, raw_card = load_weights(weights)
    if task is not None and raw_card.get("task") != task:
        raise ModelError(f"weights '{weights}' are for task '{raw_card.get('task')}', not {task}")
    card = ModelCard.from_dict(raw_card, f"the model card of '{weights}'")
    pipe = pipeline_for(card)
    pipe.configure(**build_options)
    model = pipe.build()
    if card.extra.get("pruned"):  # narrowed by `cnnkit prune`: rebuilt at the recorded widths
        from cnnkit.methods.prune import apply

        apply(model, card.extra["pruned"])
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise ModelError(f"weights '{weights}' do not match the '{card.arch}' architecture in "
                         "their model card") from None
    return model.eval(), card, pipe


def wants_objects(predictor: Predictor) -> bool:
    """Whether ``predictor``'s backend corrupts its inputs by object (robustness' occlusion), so
    an evaluation loop should work out where the objects are (:func:`show_objects`)."""
    return hasattr(predictor.backend, "objects")


def show_objects(predictor: Predictor, boxes: Sequence[torch.Tensor] | None) -> None:
    """Tell a backend that corrupts its inputs where the next batch's objects are: per image, the
    ``(N, 4)`` xyxy boxes in the core input's pixels (robustness' occlusion covers a share of
    each). Other backends have no ``objects`` and ignore it."""
    if boxes is not None and wants_objects(predictor):
        predictor.backend.objects = list(boxes)


def evaluate_loader(predictor: Predictor, loader, state, output=None, keep: int = 0) -> tuple[dict[str, Any], list, list]:
    """Run ``predictor`` over a loader of ``{"images", "targets", "skipped"}`` batches (images
    already prepared by the pipeline) and update the metric ``state`` with
    ``output(raw, batch)`` (default: the first raw output on the CPU).

    Returns ``(metrics, kept, skipped)``: ``kept`` holds the first ``keep`` ``(input, output,
    target)`` triples for drawing, ``skipped`` the ``(path, reason)`` of unreadable images.
    """
    output = output or (lambda raw, batch: raw[0].float().cpu())
    kept: list = []
    skipped: list = []
    for b in loader:
        skipped += b.get("skipped", [])
        if len(b["images"]) == 0:
            continue
        if hasattr(predictor.backend, "labels") and torch.is_tensor(b.get("targets")):
            predictor.backend.labels = b["targets"]  # an attacking backend pushes against the true labels
        show_objects(predictor, b.get("objects"))
        out = output(predictor.raw(b["images"]), b)
        state.update(out, b)
        if len(kept) < keep:
            n = min(keep - len(kept), len(b["images"]))
            kept += [(b["images"][i], out[i], b["targets"][i]) for i in range(n)]
    return state.compute(), kept, skipped


def evaluate_dataset(predictor: Predictor, dataset, task, batch: int = 64, workers: int = 0, keep: int = 0):
    """``(metrics, kept, skipped)`` of ``predictor`` on a dataset of ``(image, target)`` items:
    each image prepared by the predictor's pipeline (exactly as for predict), batched with
    ``task.collate`` and scored by ``task.metrics()``."""
    from cnnkit.data.classification import TransformedDataset, make_loader

    loader = make_loader(TransformedDataset(dataset, lambda img: predictor.pipeline.prepare(img)[0]), batch, False,
                         workers, task.collate)
    return evaluate_loader(predictor, loader, task.metrics(), keep=keep)


# the image classifiers' pipeline lives in its own module; it is still importable from here
from cnnkit.runtime.classifier import ImageClassifierPipeline, Normalized, class_index

__all__ = ["ImageClassifierPipeline", "Normalized", "Pipeline", "Predictor", "class_index", "evaluate_dataset",
           "evaluate_loader", "interpolate_scores", "load", "load_model", "load_torch", "pipeline_for", "resize_image", "show_objects",
           "wants_objects"]
