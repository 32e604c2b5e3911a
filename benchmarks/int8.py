"""Post-training int8: `cnnkit quantize` against ONNX Runtime fp32 and two int8 peers, in one run.

    python benchmarks/int8.py [--repeats 3] [--runs 30] [--accuracy] [--minutes 2]

Latency (batch 1, the core only, as `cnnkit benchmark` times it): resnet18 at 224 px, fastdet
(width 16) at 320 px and the smallcnn U-Net at 128 px, freshly initialized (latency does not
depend on the weights), each measured ``--repeats`` times in a fresh process; the formats are
timed in interleaved rounds with a pause before each turn (`cnnkit.methods.benchmark`):

- ``ort_fp32``: the exported fp32 ONNX on ONNX Runtime;
- ``cnnkit_int8``: `cnnkit quantize`'s QDQ model (ORT's ``quant_pre_process``, uint8
  activations, int8 weights per tensor, MinMax), calibrated on 32 inputs;
- ``ort_default``: the peer ONNX Runtime's own ``quantize_static`` with its default settings
  on the same export and inputs;
- ``torch_fx``: the peer torch.ao FX int8 (``prepare_fx``/``convert_fx`` with the ``x86``
  qconfig mapping) of the same eager core, or where FX cannot trace the core's input
  normalization, of the network inside it; where FX cannot trace the network either, the
  table says why.

Accuracy (``--accuracy``): small models trained here for ``--minutes`` each (classify smallcnn
on the built-in digits, fastdet width 16 on shapes at 160 px, the smallcnn U-Net on shapes at
128 px), then val of fp32, `cnnkit quantize` (calibrated on 256 train images; its default
7-bit weights and ``--weight-bits 8``) and the ORT default peer (same calibration inputs) on
the val split. ``--no-latency`` skips the latency table. Goal (issue 17): int8 at least 1.8x
ORT fp32 at batch 1, losing at most 1 point of top-1, 0.01 mAP50-95, 0.01 mIoU. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from _common import save
from export_runtime import CASES

VARIANTS = ("ort_fp32", "cnnkit_int8", "ort_default", "torch_fx")


class Session:
    """An ONNX file on ONNX Runtime with the ``raw(x)`` face `time_interleaved` times."""

    device = torch.device("cpu")

    def __init__(self, path: Path):
        import onnxruntime as ort

        self.sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.name = self.sess.get_inputs()[0].name

    def raw(self, x: torch.Tensor):
        return self.sess.run(None, {self.name: x.numpy()})


class Module:
    device = torch.device("cpu")

    def __init__(self, module):
        self.module = module

    def raw(self, x: torch.Tensor):
        with torch.no_grad():
            return self.module(x)


def ort_default(fp32: Path, out: Path, inputs: list[torch.Tensor], batch: int) -> Path:
    """The peer: ONNX Runtime's ``quantize_static`` with its defaults."""
    from onnxruntime.quantization import quantize_static

    from cnnkit.methods.quantize import _reader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(str(fp32), str(out), _reader("images", inputs, batch))
    return out


def torch_fx(core: torch.nn.Module, inputs: list[torch.Tensor]):
    """The peer: torch.ao FX int8 (x86 qconfig) of ``core``, calibrated on ``inputs``."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(core.eval(), get_default_qconfig_mapping("x86"), (inputs[0][None],))
        with torch.no_grad():
            for i in range(0, len(inputs), 8):
                prepared(torch.stack(inputs[i:i + 8]))
        return convert_fx(prepared)


def measure(name: str, runs: int, warmup: int) -> dict:
    """One latency case in this process: median ms per variant at batch 1."""
    import onnxruntime as ort

    from cnnkit.engine.checkpoint import save_weights
    from cnnkit.methods.benchmark import time_interleaved
    from cnnkit.methods.export import export
    from cnnkit.methods.quantize import quantize_onnx
    from cnnkit.runtime.pipeline import pipeline_for

    ort.set_default_logger_severity(3)
    card, _ = next((c, b) for n, c, b in CASES if n == name)
    row: dict = {"model": name}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        pipe = pipeline_for(card)
        model = pipe.build().eval()
        w = tmp / "best.safetensors"
        save_weights(w, model.state_dict(), card.to_dict())
        fp32 = Path(export(w, "onnx", tmp / "fp32.onnx", check=False, verbose=False)["file"])
        g = torch.Generator().manual_seed(0)
        xs = [torch.rand(card.input.shape(1)[1:], generator=g) for _ in range(32)]
        runners = {"ort_fp32": Session(fp32)}
        quantize_onnx(fp32, tmp / "c8.onnx", card, xs, xs[:4], sensitivity=False)
        runners["cnnkit_int8"] = Session(tmp / "c8.onnx")
        runners["ort_default"] = Session(ort_default(fp32, tmp / "d8.onnx", xs, 8))
        core = pipe.core(model)
        for target, note in ((core, None), (getattr(core, "model", None), "the network without its normalization")):
            if target is None:
                continue
            try:
                runners["torch_fx"] = Module(torch_fx(target, xs))
                row.pop("torch_fx_error", None)
                if note:
                    row["torch_fx_note"] = note
                break
            except Exception as e:  # noqa: BLE001 - FX cannot trace every model; say why in the table
                row["torch_fx_error"] = str(e).splitlines()[0][:160]
        x = xs[0][None]
        times = time_interleaved(runners, {k: x for k in runners}, runs, warmup)
    for k, v in times.items():
        row[f"{k}_ms"] = round(statistics.median(v), 3)
    return row


ACCURACY = [  # task, data, train options, metric
    ("classify", "digits", {"model": "smallcnn"}, "top1"),
    ("detect", "shapes", {"imgsz": 160, "width": 16}, "map50_95"),
    ("segment", "shapes", {"imgsz": 128, "encoder": "smallcnn"}, "miou"),
]


def accuracy(minutes: float, folder: Path) -> list[dict]:
    """fp32 vs cnnkit int8 vs the ORT default peer on the val split of small trained models."""
    import cnnkit
    from cnnkit.methods.export import export
    from cnnkit.methods.quantize import calibration_inputs, quantize

    rows = []
    for task, data, options, key in ACCURACY:
        run = folder / task
        if not (run / "weights" / "best.safetensors").is_file():
            cnnkit.train(task, data=data, time=minutes, out=str(run), verbose=False, **options)
        fp32 = cnnkit.val(task, run, data, verbose=False)[key]
        q = quantize(run, data, folder / f"{task}.int8.onnx", calib=256, sensitivity=False, verbose=False)
        int8 = cnnkit.val(task, q["file"], data, verbose=False)[key]
        q8 = quantize(run, data, folder / f"{task}.int8-8bit.onnx", calib=256, sensitivity=False, verbose=False,
                      weight_bits=8)  # full-range weights: ORT's u8s8 kernels saturate on x86 without VNNI
        int8_8bit = cnnkit.val(task, q8["file"], data, verbose=False)[key]
        # the peer, on the same export and calibration inputs, with the card put back so val reads it
        predictor = cnnkit.load(run)
        calib_x, _ = calibration_inputs(predictor, data, "train", 256)
        onnx32 = Path(export(run, "onnx", folder / f"{task}.fp32.onnx", check=False, verbose=False)["file"])
        peer = ort_default(onnx32, folder / f"{task}.ortdefault.onnx", calib_x,
                           1 if predictor.pipeline.fixed_batch else 8)
        _copy_card(onnx32, peer)
        default = cnnkit.val(task, peer, data, verbose=False)[key]
        row = {"task": task, "data": data, "metric": key, "fp32": round(fp32, 4), "cnnkit_int8": round(int8, 4),
               "cnnkit_int8_8bit_weights": round(int8_8bit, 4), "ort_default": round(default, 4),
               "cnnkit_int8_loss": round(fp32 - int8, 4), "cnnkit_int8_8bit_weights_loss": round(fp32 - int8_8bit, 4),
               "ort_default_loss": round(fp32 - default, 4), "outputs_sqnr_db": q["outputs_sqnr_db"],
               "outputs_sqnr_db_8bit_weights": q8["outputs_sqnr_db"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _copy_card(src: Path, dst: Path) -> None:
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    m = onnx.load(str(dst))
    for key in ("cnnkit_card", "cnnkit_task"):
        entry = m.metadata_props.add()
        entry.key, entry.value = key, meta[key]
    onnx.save(m, str(dst))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per latency case")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--accuracy", action="store_true", help="also train small models and compare val metrics")
    ap.add_argument("--minutes", type=float, default=2.0, help="training budget per accuracy model")
    ap.add_argument("--keep", default=None, help="folder for the accuracy runs (reused when present)")
    ap.add_argument("--no-latency", action="store_true", help="accuracy only (the latency table needs the "
                                                                "machine to itself)")
    ap.add_argument("--tag", default="", help="suffix of the results file (benchmarks/results/int8{TAG}.json)")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: measure one case, print its row
    args = ap.parse_args()
    if args.case:
        print(json.dumps(measure(args.case, args.runs, args.warmup)))
        return
    rows = []
    for name, _, _ in [] if args.no_latency else CASES:
        reps = []
        for _ in range(args.repeats):
            cmd = [sys.executable, __file__, "--case", name, "--runs", str(args.runs), "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            reps.append(json.loads(out.strip().splitlines()[-1]))
        row = {"model": name, "repeats": reps}
        for v in VARIANTS:
            got = [r[f"{v}_ms"] for r in reps if f"{v}_ms" in r]
            row[f"{v}_ms"] = round(statistics.median(got), 3) if got else None
            if got and v != "ort_fp32":
                ratios = [r["ort_fp32_ms"] / r[f"{v}_ms"] for r in reps if f"{v}_ms" in r]
                row[f"{v}_speedup"] = round(statistics.median(ratios), 3)
                row[f"{v}_speedup_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
        for key in ("torch_fx_error", "torch_fx_note"):
            if any(key in r for r in reps):
                row[key] = next(r[key] for r in reps if key in r)
        rows.append(row)
        print(f"{name:<14} ORT fp32 {row['ort_fp32_ms']:6.2f} ms | cnnkit int8 {row['cnnkit_int8_ms']:6.2f} "
              f"({row['cnnkit_int8_speedup']:.2f}x) | ORT default int8 {row['ort_default_ms']:6.2f} "
              f"({row['ort_default_speedup']:.2f}x) | torch.ao FX "
              + (f"{row['torch_fx_ms']:6.2f} ({row['torch_fx_speedup']:.2f}x)" if row["torch_fx_ms"] else
                 f"n/a ({row.get('torch_fx_error', '')})"), flush=True)
    result = {"runs": args.runs, "repeats": args.repeats, "latency": rows}
    if args.accuracy:
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            result["accuracy"] = accuracy(args.minutes, Path(args.keep))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                result["accuracy"] = accuracy(args.minutes, Path(tmp))
    save(f"int8{args.tag}", result)


if __name__ == "__main__":
    main()
