"""Export any task's model to ONNX or TorchScript, with its card inside, checked against eager.

What is exported is the task pipeline's ``core`` (tensors in, a tuple of tensors out), so the
exported file needs exactly the preprocessing and decoding the card describes, and
``cnnkit TASK val|predict --weights model.onnx`` runs it in ONNX Runtime with the same
pipeline. ONNX files carry the card as metadata (``cnnkit_card``); TorchScript files as the
extra file ``cnnkit_card.json``.

The ONNX graph is written by PyTorch's TorchScript-based exporter (``dynamo=False``): on the
pinned torch it exports every family here, torchvision's detectors included, where the
``torch.export`` path fails on their data-dependent proposal code.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from cnnkit.core.card import ModelCard
from cnnkit.errors import CnnkitError, ModelError
from cnnkit.utils.io import atomic_write

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript"}
DEFAULT_OPSET = 17
TOLERANCE = 1e-4  # fp32 raw outputs, eager vs exported
TS_CARD = "cnnkit_card.json"


def opset_range() -> tuple[int, int]:
    """The opsets the installed TorchScript-based exporter can write."""
    from torch.onnx import _constants as c

    return int(getattr(c, "ONNX_MIN_OPSET", 7)), int(getattr(c, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))


def _resized_card(card: ModelCard, imgsz: tuple[int, int] | None) -> ModelCard:
    if imgsz is None:
        return card
    h, w = imgsz
    if card.task in ("detect", "instance") and card.arch != "fastdet":
        raise CnnkitError(f"--imgsz cannot change a {card.arch}: torchvision fixes its input size in the model; "
                          f"it takes {card.input.height} px")
    if card.task == "medical" or card.input.resize == "letterbox" and h != w:
        raise CnnkitError(f"--imgsz for a {card.task} model takes one size (a square or cube side), got {h} {w}")
    if h < 8 or w < 8 or (card.task in ("detect", "instance", "segment") and (h % 32 or w % 32)):
        raise CnnkitError(f"--imgsz {h} {w} is not a size this model takes (detectors and segmenters: multiples of 32)")
    return replace(card, input=replace(card.input, height=h, width=w))


def export(weights: str | Path, format: str = "onnx", out: str | Path | None = None, dynamic: bool = False,
           opset: int | None = None, imgsz: tuple[int, int] | None = None, check: bool = True,
           verbose: bool = True) -> dict[str, Any]:
    """Export ``weights`` (``best.safetensors`` or a run folder) to ``format``.

    Args:
        weights: cnnkit weights of any task.
        format: ``onnx`` or ``torchscript``.
        out: the file to write (default: beside the weights, ``best.onnx`` / ``best.torchscript``).
        dynamic: also let height and width vary (the batch always varies, except for
            torchvision's detectors, which take one image per call).
        opset: ONNX opset (default 17).
        imgsz: ``(height, width)`` of the exported input (default: the card's).
        check: run eager and exported on the same sample inputs and report the largest
            difference of the raw outputs.

    Returns:
        ``{"file", "format", "size_mb", "max_abs_diff", "outputs", "seconds", "card"}``.
    """
    from cnnkit.engine.checkpoint import resolve_weights
    from cnnkit.runtime.pipeline import load_model, pipeline_for

    if format not in FORMATS:
        raise CnnkitError(f"--format must be one of {', '.join(FORMATS)}, got '{format}'")
    lo, hi = opset_range()
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if format == "onnx" and not lo <= opset <= hi:
        raise CnnkitError(f"the installed PyTorch exporter writes ONNX opsets {lo} to {hi}, not {opset}")
    src = resolve_weights(weights)
    if src.suffix != ".safetensors":
        raise CnnkitError(f"export takes cnnkit weights (.safetensors or a run folder), not '{src.name}'")
    model, card, _ = load_model(src)
    card = _resized_card(card, imgsz)
    pipe = pipeline_for(card)
    core = pipe.core(model).eval()
    out = Path(out) if out else src.with_suffix(SUFFIX[format])
    out.parent.mkdir(parents=True, exist_ok=True)
    x = pipe.example_input(1 if pipe.fixed_batch else 2)
    card = replace(card, extra={**card.extra, "exported": {"format": format, "from": str(src), "dynamic": dynamic,
                                                          **({"opset": opset} if format == "onnx" else {})}})
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about data-dependent control flow
        ref = _as_tuple(core(x))
        if format == "onnx":
            _export_onnx(core, x, out, card, dynamic, opset, not pipe.fixed_batch)
        else:
            traced = torch.jit.trace(core, (x,), check_trace=False)
            atomic_write(out, lambda p: torch.jit.save(traced, str(p), _extra_files={TS_CARD: card.to_json()}))
    seconds = time.perf_counter() - t0
    diff = None
    if check:
        got = _run_exported(out, format, x)
        diff = max_difference(ref, got)
    report = {"file": str(out), "format": format, "size_mb": round(out.stat().st_size / 2**20, 3),
              "max_abs_diff": diff, "outputs": list(card.output.names), "seconds": round(seconds, 2),
              "input_shape": list(x.shape), "card": card.to_dict()}
    if verbose:
        from cnnkit.engine.progress import console

        con = console()
        con.print(f"exported {card.task} {card.arch} to {out} ({report['size_mb']:.2f} MB, {format}"
                  + (f", opset {opset}" if format == "onnx" else "") + f", {seconds:.1f} s)")
        if diff is not None:
            ok = diff <= TOLERANCE
            con.print(f"check: eager vs {format} on {tuple(x.shape)} inputs: largest difference {diff:.2e} "
                      + ("[green](within 1e-4)[/]" if ok else "[yellow](above 1e-4)[/]"))
        con.print(f"use it: cnnkit {card.task} predict --weights {out} --source IMAGES"
                  if format == "onnx" else f"use it: torch.jit.load('{out}')")
    return report


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def max_difference(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    """The largest absolute difference between two tuples of outputs (inf if shapes differ)."""
    worst = 0.0
    for x, y in zip(a, b):
        x, y = torch.as_tensor(x).float().cpu(), torch.as_tensor(y).float().cpu()
        if x.shape != y.shape:
            return float("inf")
        if x.numel():
            worst = max(worst, float((x - y).abs().max()))
    return worst


def _export_onnx(core: torch.nn.Module, x: torch.Tensor, out: Path, card: ModelCard, dynamic: bool, opset: int,
                 dynamic_batch: bool) -> None:
    import onnx

    names = list(card.output.names)
    axes: dict[str, dict[int, str]] = {}
    if dynamic_batch:  # sliding windows and val batches feed several samples per call
        axes["images"] = {0: "batch"}
        axes.update({n: {0: "batch"} for n in names})
    else:
        axes.update({n: {0: "detections"} for n in names} if card.task in ("detect", "instance") else {})
    if dynamic:
        spatial = {2: "height", 3: "width"} if card.input.dims == 2 else {2: "depth", 3: "height", 4: "width"}
        axes.setdefault("images", {}).update(spatial)

    def write(tmp: Path) -> None:
        try:
            torch.onnx.export(core, (x,), str(tmp), dynamo=False, opset_version=opset, input_names=["images"],
                              output_names=names, dynamic_axes=axes or None, do_constant_folding=True)
        except Exception as e:  # the exporter raises many types; the user gets one sentence
            raise ModelError(f"ONNX export of {card.arch} at opset {opset} failed "
                             f"({str(e).splitlines()[0][:200]})") from None
        m = onnx.load(str(tmp))
        set_card(m, card)
        onnx.save(m, str(tmp))

    atomic_write(out, write)


def set_card(m, card: ModelCard) -> None:
    """Put ``card`` into the metadata of the ONNX model ``m`` (replacing any card there)."""
    meta = {p.key: p for p in m.metadata_props}
    for key, value in (("cnnkit_card", card.to_json()), ("cnnkit_task", card.task)):
        entry = meta.get(key) or m.metadata_props.add()
        entry.key, entry.value = key, value
    m.producer_name = "cnnkit"


def _run_exported(path: Path, format: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if format == "onnx":
        from cnnkit.runtime.backend import OrtBackend

        return OrtBackend(path)(x)
    module, _ = read_torchscript(path)
    with torch.no_grad():
        return _as_tuple(module(x))


def read_torchscript(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A TorchScript file from :func:`export` and its card (as a dict)."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"TorchScript file '{p}' does not exist")
    files = {TS_CARD: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still the portable format
            module = torch.jit.load(str(p), map_location="cpu", _extra_files=files)
    except Exception as e:  # torch raises RuntimeError and others for a damaged archive
        raise ModelError(f"'{p}' is not a readable TorchScript file ({str(e).splitlines()[0][:120]})") from None
    if not files[TS_CARD]:
        raise ModelError(f"TorchScript file '{p}' has no cnnkit model card; export it with `cnnkit export`")
    try:
        return module, json.loads(files[TS_CARD])
    except json.JSONDecodeError:
        raise ModelError(f"the model card inside '{p}' is not valid JSON") from None
