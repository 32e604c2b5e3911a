"""Post-training int8 for any task: an ONNX Runtime static QDQ model calibrated on the task's
own images, with the model card inside and a per-layer sensitivity report.

Steps:

1. the fp32 core is exported to ONNX (:func:`cnnkit.methods.export.export`) and prepared for
   quantization (ONNX Runtime's ``quant_pre_process``: shape inference and graph fusions);
2. calibration inputs are images of a split of ``--data``, run through the model's own
   pipeline on PyTorch, and what the core receives is recorded: resized, letterboxed, tiled or
   windowed exactly as at inference, for every task alike;
3. ``onnxruntime.quantization.quantize_static`` writes a QDQ model: int8 weights (per tensor or
   per output channel), uint8 activations with ranges from ``minmax``, ``entropy`` or
   ``percentile`` calibration; ``exclude`` leaves named nodes in float. Weights use 7 bits of
   the 8 by default (``weight_bits``, ORT's ``reduce_range``): on x86 CPUs without VNNI
   (AVX2 only, such as AMD Zen 2 and 3) ONNX Runtime's uint8 x int8 kernels add pairs of
   products in 16 bits, which saturate with full-range weights (255 x 127 x 2 > 32767). On
   a MobileNetV3 on such a CPU the int8 logits were 7 dB from fp32 with 8-bit weights and 14
   dB with 7; CPUs with VNNI or ARM do not saturate, and ``weight_bits=8`` is finer there;
4. a check on held-out inputs of the same split: the signal-to-quantization-noise ratio (SQNR,
   dB) of every raw output against fp32, and per layer (``onnxruntime.quantization
   .qdq_loss_debug``) the SQNR of each quantized activation, worst first, so the layers that
   lose too much can be named in ``exclude``.

The file is an ordinary cnnkit ``.onnx``: ``val``, ``predict``, ``benchmark`` and ``serve`` take
it as weights (on ONNX Runtime) with the same pre- and post-processing.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnkit.errors import CnnkitError, DataError

METHODS = ("minmax", "entropy", "percentile")
WEIGHT_BITS = 7  # ORT's reduce_range: safe from u8s8 saturation on every CPU (see the module docstring)
CHECK_SAMPLES = 16  # held-out inputs for the output and per-layer check
WORST = 5  # layers listed in the sensitivity report


class _Recorder:
    """A backend that keeps a copy of every input the pipeline gives the core (one row per
    sample) while the real backend answers."""

    def __init__(self, backend):
        self.backend, self.inputs = backend, []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def __call__(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.inputs += list(xs[0].detach().float().cpu())
        return self.backend(*xs)


def core_inputs(predictor, items: list) -> list[torch.Tensor]:
    """The inputs ``predictor``'s core receives for ``items`` (anything the predictor takes),
    one tensor per core sample."""
    from cnnkit.runtime.pipeline import Predictor

    rec = _Recorder(predictor.backend)
    Predictor(predictor.card, predictor.pipeline, rec, predictor.source, predictor.model)(items, batch=8)
    return rec.inputs


def calibration_inputs(predictor, data: str, split: str, n: int, seed: int = 0) -> tuple[list, list]:
    """``(calibration, check)``: core inputs from ``n`` images of ``split`` of ``data`` and from
    up to :data:`CHECK_SAMPLES` other images of it (spread at random, ``seed`` fixed)."""
    from cnnkit.tasks import spec

    s = spec(predictor.task)
    records = s.val_records(predictor, data, split, verbose=False)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    take, held = order[:n], order[n:n + CHECK_SAMPLES] or order[:CHECK_SAMPLES]
    calib = core_inputs(predictor, s.record_inputs(records, take))
    check = core_inputs(predictor, s.record_inputs(records, held))
    if not calib:
        raise DataError(f"the {split} split of '{data}' gave no readable images to calibrate on")
    return calib, check


def _reader(name: str, inputs: list[torch.Tensor], batch: int):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{name: torch.stack(inputs[i:i + batch]).numpy()}
                                 for i in range(0, len(inputs), batch)])

        def get_next(self):
            return next(self.batches, None)

    return Reader()


def quantize(weights: str | Path, data: str, out: str | Path | None = None, calib: int = 256,
             method: str = "minmax", per_channel: bool = False, exclude: tuple[str, ...] = (),
             split: str = "train", sensitivity: bool = True, verbose: bool = True,
             weight_bits: int = WEIGHT_BITS) -> dict[str, Any]:
    """Write an int8 ONNX Runtime model of ``weights`` calibrated on ``calib`` images of
    ``split`` of ``data``.

    Args:
        weights: cnnkit weights of any task (``best.safetensors`` or a run folder).
        data: the task's data (as for ``val``), whose ``split`` images calibrate.
        out: the file to write (default: beside the weights, ``best.int8.onnx``).
        calib: images used for calibration.
        method: activation ranges from ``minmax``, ``entropy`` or ``percentile`` (99.999).
        per_channel: one weight scale per output channel instead of per tensor.
        exclude: names of ONNX nodes left in float (the sensitivity report names them).
        sensitivity: measure the per-layer error (one more run of both models).
        weight_bits: 7 (integers -64..64: no saturation on x86 without VNNI) or 8 (-127..127).

    Returns:
        ``{"file", "size_mb", "fp32_size_mb", "outputs_sqnr_db", "layers", "excluded",
        "calibration", "seconds", "card"}``; ``layers`` lists the :data:`WORST` layers
        (node, op, SQNR of its own quantization and accumulated from the input, in dB).
    """
    from cnnkit.core.card import ModelCard
    from cnnkit.engine.checkpoint import resolve_weights
    from cnnkit.methods.export import export
    from cnnkit.runtime.backend import read_onnx_card
    from cnnkit.runtime.pipeline import load

    if method not in METHODS:
        raise CnnkitError(f"--method must be one of {', '.join(METHODS)}, got '{method}'")
    if calib < 1:
        raise CnnkitError(f"--calib must be at least 1 image, got {calib}")
    if weight_bits not in (7, 8):
        raise CnnkitError(f"--weight-bits must be 7 or 8, got {weight_bits}")
    src = resolve_weights(weights)
    if src.suffix != ".safetensors":
        raise CnnkitError(f"quantize takes cnnkit weights (.safetensors or a run folder), not '{src.name}'")
    out = Path(out) if out else src.with_name(src.stem + ".int8.onnx")
    t0 = time.perf_counter()
    predictor = load(src, "cpu")
    calib_x, check_x = calibration_inputs(predictor, data, split, calib)
    calibration = {"data": data, "split": split, "images": len(calib_x)}
    with tempfile.TemporaryDirectory(prefix="cnnkit-int8-") as tmp:
        fp32 = Path(export(src, "onnx", Path(tmp) / "fp32.onnx", check=False, verbose=False)["file"])
        card = ModelCard.from_dict(read_onnx_card(fp32), "the exported card")
        card = replace(card, extra={**card.extra, "quantized": {
            "format": "onnx-qdq-int8", "from": str(src), "method": method, "per_channel": per_channel,
            "weight_bits": weight_bits, "calibration": calibration, "excluded": list(exclude)}})
        # torchvision's detectors (one image per call) return a varying list of kept detections,
        # which cannot be compared element by element: val compares them
        dense = not predictor.pipeline.fixed_batch
        report = quantize_onnx(fp32, out, card, calib_x, check_x, method, per_channel, exclude, sensitivity,
                               batch=8 if dense else 1, compare_outputs=dense, weight_bits=weight_bits)
    report.update(calibration={**calibration, "method": method, "per_channel": per_channel,
                               "weight_bits": weight_bits},
                  seconds=round(time.perf_counter() - t0, 1), card=card.to_dict())
    if verbose:
        _print(report, card)
    return report


def quantize_onnx(fp32: Path, out: Path, card, calib_x: list[torch.Tensor], check_x: list[torch.Tensor],
                  method: str = "minmax", per_channel: bool = False, exclude: tuple[str, ...] = (),
                  sensitivity: bool = True, batch: int = 8, compare_outputs: bool = True,
                  weight_bits: int = WEIGHT_BITS) -> dict[str, Any]:
    """The int8 QDQ model of the fp32 ONNX file ``fp32`` calibrated on the core inputs
    ``calib_x``, written to ``out`` with ``card`` in its metadata and checked on ``check_x``
    (see :func:`quantize`, which prepares these from weights and data)."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from cnnkit.methods.export import set_card
    from cnnkit.utils.io import atomic_write

    ort.set_default_logger_severity(3)  # calibration runs warn about every dynamic output shape
    with tempfile.TemporaryDirectory(prefix="cnnkit-int8-") as tmp:
        prepared = _pre_process(fp32, Path(tmp) / "prep.onnx")
        graph = onnx.load(str(prepared), load_external_data=False).graph
        nodes = {n.name for n in graph.node}
        unknown = [n for n in exclude if n not in nodes]
        if unknown:
            raise CnnkitError(f"--exclude names node '{unknown[0]}', which the model does not have "
                              "(the sensitivity report of a run without --exclude lists node names)")
        calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                     "percentile": CalibrationMethod.Percentile}[method]
        kept = [n for n in output_nodes(graph) if n not in exclude]
        qdq = Path(tmp) / "int8.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                quantize_static(str(prepared), str(qdq), _reader("images", calib_x, batch),
                                quant_format=QuantFormat.QDQ, per_channel=per_channel,
                                reduce_range=weight_bits == 7,  # weights only: activations keep 0..255
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=calibrate, nodes_to_exclude=[*exclude, *kept],
                                extra_options={"CalibMovingAverage": False})
            except Exception as e:  # noqa: BLE001 - ORT raises many types; the user gets one sentence
                raise CnnkitError(f"int8 quantization of {card.arch} failed "
                                  f"({str(e).splitlines()[0][:200]})") from None
        m = onnx.load(str(qdq))
        set_card(m, card)
        onnx.save(m, str(qdq))
        sqnr = (_output_sqnr(prepared, qdq, check_x, batch) if compare_outputs
                else {n: None for n in card.output.names})
        layers = _sensitivity(prepared, qdq, check_x, batch) if sensitivity else []
        atomic_write(out, lambda p: shutil.copyfile(qdq, p))
    return {"file": str(out), "size_mb": round(out.stat().st_size / 2**20, 3),
            "fp32_size_mb": round(fp32.stat().st_size / 2**20, 3), "outputs_sqnr_db": sqnr, "layers": layers,
            "excluded": list(exclude), "float_outputs": kept}


def output_nodes(graph) -> list[str]:
    """The nodes that produce the graph's outputs: they stay in float.

    The raw outputs are what post-processing thresholds and decodes, and 8 bits hold them
    coarsely: fastdet's boxes output spans about 850 px in 256 steps (3.4 px each), which cost
    0.019 mAP50-95 on shapes; with the nodes that write the outputs in float (every convolution
    still int8) the loss was 0.008. ``graph``: an ONNX ``GraphProto``."""
    outputs = {o.name for o in graph.output}
    return [n.name for n in graph.node if outputs & set(n.output) and n.name]


def _pre_process(fp32: Path, prep: Path) -> Path:
    """ONNX Runtime's recommended preparation (shape inference, fusions); the plain export
    where it cannot run (some detectors' graphs)."""
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=True)
        return prep
    except Exception:  # noqa: BLE001 - optional step; quantize_static works on the plain export
        return fp32


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run(path: Path, inputs: list[torch.Tensor], batch: int) -> list[list[np.ndarray]]:
    """Every output of the model for ``inputs``, per output: a list of per-call arrays."""
    sess = _session(path)
    name = sess.get_inputs()[0].name
    outs: list[list[np.ndarray]] = [[] for _ in sess.get_outputs()]
    for i in range(0, len(inputs), batch):
        for k, o in enumerate(sess.run(None, {name: torch.stack(inputs[i:i + batch]).numpy()})):
            outs[k].append(np.asarray(o, np.float64))
    return outs


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float | None:
    """Signal-to-quantization-noise ratio, ``10 log10(|ref|^2 / |ref - got|^2)`` in dB (None
    when the shapes differ or the reference is zero; inf when equal)."""
    ref, got = np.asarray(ref, np.float64).ravel(), np.asarray(got, np.float64).ravel()
    if ref.shape != got.shape or not ref.size or not np.any(ref):
        return None
    noise = float(np.sum((ref - got) ** 2))
    return float("inf") if noise == 0 else round(float(10 * np.log10(float(np.sum(ref ** 2)) / noise)), 2)


def _output_sqnr(fp32: Path, qdq: Path, inputs: list[torch.Tensor], batch: int) -> dict[str, float | None]:
    """SQNR of each raw output of ``qdq`` against ``fp32`` (outputs whose shape depends on
    the values, such as a detector's kept boxes, are compared where the shapes agree)."""
    import onnx

    names = [o.name for o in onnx.load(str(fp32), load_external_data=False).graph.output]
    a, b = _run(fp32, inputs, batch), _run(qdq, inputs, batch)
    out = {}
    for name, xs, ys in zip(names, a, b):
        pairs = [(x, y) for x, y in zip(xs, ys) if x.shape == y.shape]
        out[name] = sqnr_db(np.concatenate([x.ravel() for x, _ in pairs]),
                            np.concatenate([y.ravel() for _, y in pairs])) if pairs else None
    return out


WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
PASS_THROUGH = {"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Mul", "BatchNormalization"}


def _sensitivity(fp32: Path, qdq: Path, inputs: list[torch.Tensor], batch: int) -> list[dict[str, Any]]:
    """The :data:`WORST` layers by the quantization noise they add.

    ONNX Runtime's debugger (``qdq_loss_debug``) gives, for each quantized activation, its SQNR
    against the float model's, accumulated from the input. Noise powers add, so a layer's own
    share is its output's relative noise minus the largest relative noise of its inputs
    (``n = 10^(-SQNR/10)``); ``sqnr_db`` is that share in dB (lower is worse) and
    ``accumulated_sqnr_db`` the output's. A fused activation is reported as the weighted node
    that feeds it (the node ``--exclude`` takes)."""
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    with tempfile.TemporaryDirectory(prefix="cnnkit-int8-debug-") as tmp:
        fa, qa = Path(tmp) / "float.onnx", Path(tmp) / "qdq.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                modify_model_output_intermediate_tensors(str(fp32), str(fa))
                modify_model_output_intermediate_tensors(str(qdq), str(qa))
                float_acts = collect_activations(str(fa), _reader("images", inputs, batch))
                qdq_acts = collect_activations(str(qa), _reader("images", inputs, batch))
                errors = compute_activation_error(create_activation_matching(qdq_acts, float_acts))
            except Exception:  # noqa: BLE001 - a report, not the product: skip it where ORT's debugger fails
                return []
    graph = onnx.load(str(fp32), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    acc = {t: float(e["xmodel_err"]) for t, e in errors.items() if e.get("xmodel_err") is not None}
    noise = {t: 10 ** (-v / 10) if np.isfinite(v) else 0.0 for t, v in acc.items()}
    memo: dict[str, float] = {}

    def upstream(t: str, depth: int = 0) -> float:
        """Relative noise arriving on tensor ``t`` (0 for inputs and weights)."""
        if t in noise:
            return noise[t]
        if t in memo or t not in producer or depth > 50:
            return memo.get(t, 0.0)
        memo[t] = max((upstream(i, depth + 1) for i in producer[t].input if i), default=0.0)
        return memo[t]

    def weighted(node):
        """The weighted node behind a chain of activations (the node to exclude)."""
        seen = 0
        while node.op_type not in WEIGHTED and node.op_type in PASS_THROUGH and seen < 4:
            inner = [producer[i] for i in node.input if i in producer]
            if not inner:
                break
            node, seen = inner[0], seen + 1
        return node

    rows = {}
    for t, n_out in noise.items():
        if t not in producer:
            continue
        node = producer[t]
        n_in = max((upstream(i) for i in node.input if i), default=0.0)
        added = max(n_out - n_in, 1e-12)
        layer = weighted(node)
        row = {"node": layer.name, "op": layer.op_type, "tensor": t, "sqnr_db": round(-10 * np.log10(added), 2),
               "accumulated_sqnr_db": round(acc[t], 2) if np.isfinite(acc[t]) else None}
        if layer.name not in rows or row["sqnr_db"] < rows[layer.name]["sqnr_db"]:
            rows[layer.name] = row
    return sorted(rows.values(), key=lambda r: r["sqnr_db"])[:WORST]


def _print(report: dict[str, Any], card) -> None:
    from rich.table import Table

    from cnnkit.engine.progress import console

    con = console()
    c = report["calibration"]
    con.print(f"int8 {card.task} {card.arch}: {report['file']} ({report['size_mb']:.2f} MB, fp32 "
              f"{report['fp32_size_mb']:.2f} MB) · calibrated on {c['images']} {c['split']} images of {c['data']} "
              f"({c['method']}{', per-channel' if c['per_channel'] else ''}, {c['weight_bits']}-bit weights) · "
              f"{report['seconds']:.0f} s")
    sq = report["outputs_sqnr_db"]
    if any(v is not None for v in sq.values()):
        outs = ", ".join(f"{k} {'-' if v is None else f'{v:.1f}'} dB" for k, v in sq.items())
        con.print(f"check on {CHECK_SAMPLES} held-out inputs, int8 vs fp32 raw outputs (SQNR, higher is closer): {outs}")
    if report["layers"]:
        t = Table(title="layers adding most int8 noise (leave one in float with --exclude NODE)")
        for col in ("node", "op", "own SQNR dB", "accumulated dB"):
            t.add_column(col, justify="left" if col in ("node", "op") else "right", overflow="fold")
        for r in report["layers"]:
            acc = r["accumulated_sqnr_db"]
            t.add_row(r["node"], r["op"], f"{r['sqnr_db']:.1f}", "-" if acc is None else f"{acc:.1f}")
        con.print(t)
    con.print(f"use it: cnnkit {card.task} val --weights {report['file']} --data {c['data']}")
