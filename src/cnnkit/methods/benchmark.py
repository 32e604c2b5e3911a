"""``cnnkit benchmark``: one model in every format, side by side, and its smaller variants
(pruned, distilled) beside it.

For each format (PyTorch eager, TorchScript, ONNX Runtime fp32, and with ``data`` ONNX Runtime
int8 calibrated on its train split by :func:`cnnkit.methods.quantize.quantize`) the same core
runs on the same inputs: file size, median and 90th-percentile latency of the core at batch 1 and batch N,
images per second at batch N, and, given ``data``, the task's metric on a split through the
full ``val`` of that format (preprocessing and decoding included), with its change against
eager. Like Ultralytics' ``benchmark`` mode, for every task.

The formats are timed in interleaved rounds (each round times every format in turn, after one
warm-up call of its own), so a machine that drifts during the run (frequency scaling, another
process, caches) moves every format alike instead of whichever happened to run then. Before each
format's turn the benchmark pauses briefly: ONNX Runtime's worker threads keep spinning after a
call, and on a 2-core machine eager PyTorch started right after ORT ran about 2x slower for
several calls (a U-Net at 128 px: 32 ms against 16 ms), which would have flattered ORT.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cnnkit.errors import CnnkitError

FORMATS = ("torch", "torchscript", "onnx", "int8")
DEFAULT_FORMATS = ("torch", "torchscript", "onnx")  # int8 needs --data to calibrate
METRIC = {"classify": "top1", "multilabel": "map", "detect": "map50_95", "instance": "mask_map50_95",
          "segment": "miou", "medical": "dice"}


ROUNDS = 5  # interleaved rounds over the formats
SETTLE_S = 0.1  # pause before each format's turn, so the previous runtime's threads go idle


def time_core(predictor, x: torch.Tensor, runs: int, warmup: int) -> list[float]:
    """Milliseconds per call of ``predictor.raw(x)`` over ``runs`` calls after ``warmup``."""
    for _ in range(warmup):
        predictor.raw(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        predictor.raw(x)
        if predictor.device.type == "cuda":
            torch.cuda.synchronize(predictor.device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_interleaved(predictors: dict[str, Any], inputs: dict[str, torch.Tensor], runs: int,
                     warmup: int) -> dict[str, list[float]]:
    """``runs`` timed calls per format, spread over :data:`ROUNDS` rounds that take the formats
    in turn (``warmup`` calls each before the first round, one more before each later round,
    and a pause of :data:`SETTLE_S` before each turn)."""
    for name, p in predictors.items():
        time_core(p, inputs[name], 0, warmup)
    rounds = min(ROUNDS, runs)
    times: dict[str, list[float]] = {name: [] for name in predictors}
    for r in range(rounds):
        n = runs // rounds + (r < runs % rounds)
        for name, p in predictors.items():
            if len(predictors) > 1:
                time.sleep(SETTLE_S)
            times[name] += time_core(p, inputs[name], n, 1 if r else 0)
    return times


def p90(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, round(0.9 * (len(xs) - 1)))]


def parse_variants(specs: str | list[str] | None) -> dict[str, str]:
    """``--variants`` (``NAME=WEIGHTS`` comma-separated, or a list): ``{name: weights}``."""
    items = specs.split(",") if isinstance(specs, str) else list(specs or [])
    out: dict[str, str] = {}
    for item in (i.strip() for i in items if i.strip()):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise CnnkitError(f"--variants takes NAME=WEIGHTS items (pruned=runs/ft), got '{item}'")
        if name in out or name == "fp32":
            raise CnnkitError(f"variant name '{name}' is used twice (fp32 is the --weights model)")
        out[name] = path
    return out


def benchmark(weights: str | Path, data: str | None = None, batch: int = 16, formats: tuple[str, ...] = DEFAULT_FORMATS,
              runs: int = 20, warmup: int = 3, device: str = "cpu", split: str = "val",
              out_dir: str | Path | None = None, json_path: str | Path | None = None,
              verbose: bool = True, variants: dict[str, str | Path] | None = None) -> dict[str, Any]:
    """Benchmark ``weights`` (``best.safetensors`` or a run folder) in ``formats``, and beside
    it ``variants`` (``{name: weights}`` of the same task and classes: a pruned, distilled or
    otherwise smaller model) in the same formats and the same interleaved rounds.

    Exported files go to ``out_dir`` (default: a temporary folder, removed afterwards).
    Returns ``{"task", "arch", "batch", "rows": [...]}``; each row has ``variant`` (``fp32``
    for ``weights``), ``format``, ``file``, ``size_mb``, ``params``, ``b1_median_ms``,
    ``b1_p90_ms``, ``bN_median_ms``, ``bN_p90_ms``, ``images_per_s``, ``speedup`` (batch-1
    median of ``weights`` on eager PyTorch / this row) and, with ``data``, ``metric`` and
    ``metric_delta`` (this row minus that first row).
    """
    import cnnkit
    from cnnkit.engine.checkpoint import resolve_weights
    from cnnkit.methods.export import export
    from cnnkit.runtime.pipeline import load
    from cnnkit.utils.io import write_json

    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise CnnkitError(f"--formats takes {', '.join(FORMATS)}; got '{unknown[0]}'")
    if "int8" in formats and not data:
        raise CnnkitError("the int8 format is calibrated on the task's images: give --data (its train split calibrates)")
    if batch < 1 or runs < 1 or warmup < 0:
        raise CnnkitError("--batch and --runs must be at least 1, --warmup at least 0")
    sources = {"fp32": resolve_weights(weights)}
    for name, w in (variants or {}).items():
        sources[name] = resolve_weights(w)
    for name, src in sources.items():
        if src.suffix != ".safetensors":
            raise CnnkitError(f"benchmark takes cnnkit weights (.safetensors or a run folder), not '{src.name}'")
    tmp = None if out_dir else tempfile.TemporaryDirectory(prefix="cnnkit-bench-")
    folder = Path(out_dir or tmp.name)
    rows: list[dict[str, Any]] = []
    try:
        files, params = {}, {}
        for name, src in sources.items():
            stem = "model" if name == "fp32" else name
            for fmt in formats:
                key = (name, fmt)
                if fmt == "torch":
                    files[key] = src
                elif fmt == "int8":
                    from cnnkit.methods.quantize import quantize

                    files[key] = Path(quantize(src, data, folder / f"{stem}.int8.onnx", sensitivity=False,
                                               verbose=False)["file"])
                else:
                    files[key] = Path(export(src, fmt, folder / f"{stem}.{fmt}", verbose=False)["file"])
        preds = {key: load(f, device) for key, f in files.items()}
        for name, src in sources.items():
            model = load(src, "cpu").model
            params[name] = sum(t.numel() for t in model.parameters())
        p = preds[("fp32", formats[0])]
        for (name, _), q in preds.items():
            if q.task != p.task or q.classes != p.classes:
                raise CnnkitError(f"variant '{name}' is a {q.task} model of other classes than --weights; "
                                  "variants must answer the same task")
        n = 1 if p.pipeline.fixed_batch else batch
        t1 = time_interleaved(preds, {k: q.pipeline.example_input(1) for k, q in preds.items()}, runs, warmup)
        tn = t1 if n == 1 else time_interleaved(preds, {k: q.pipeline.example_input(n) for k, q in preds.items()},
                                                runs, warmup)
        base = None
        for key, file in files.items():
            name, fmt = key
            row: dict[str, Any] = {"variant": name, "format": fmt, "file": str(file),
                                   "size_mb": round(file.stat().st_size / 2**20, 3), "params": params[name],
                                   "b1_median_ms": round(statistics.median(t1[key]), 3),
                                   "b1_p90_ms": round(p90(t1[key]), 3),
                                   "batch": n, "bN_median_ms": round(statistics.median(tn[key]), 3),
                                   "bN_p90_ms": round(p90(tn[key]), 3),
                                   "images_per_s": round(n * 1e3 / statistics.median(tn[key]), 1)}
            if data:
                metrics = cnnkit.val(p.task, file, data, split=split, device=device, verbose=False)
                mkey = METRIC[p.task] if p.task != "medical" or "dice" in metrics else "top1"
                row.update(metric_name=mkey, metric=metrics.get(mkey))
            base = base or row
            row["speedup"] = round(base["b1_median_ms"] / row["b1_median_ms"], 3)
            if data and base.get("metric") is not None and row.get("metric") is not None:
                row["metric_delta"] = round(row["metric"] - base["metric"], 5)
            rows.append(row)
        card = p.card
    finally:
        if tmp is not None:
            tmp.cleanup()
    result = {"task": card.task, "arch": card.arch, "weights": str(sources["fp32"]), "device": device, "batch": batch,
              "runs": runs, "input": list(p.pipeline.example_input(1).shape[1:]), "data": data, "split": split,
              "threads": torch.get_num_threads(), "rows": rows}
    if json_path:
        write_json(json_path, result)
    if verbose:
        _print(result)
    return result


def _print(result: dict[str, Any]) -> None:
    from rich.table import Table

    from cnnkit.engine.progress import console

    rows = result["rows"]
    t = Table(title=f"{result['task']} {result['arch']} · input {'x'.join(map(str, result['input']))} · "
                    f"{result['device']} ({result['threads']} threads) · {result['runs']} runs")
    several = len({r["variant"] for r in rows}) > 1
    cols = (["model"] if several else []) + ["format", "MB", "params M", "b1 median ms", "b1 p90 ms",
                                             f"b{rows[0]['batch']} median ms", "p90 ms", "images/s", "speedup"]
    has_metric = any("metric" in r for r in rows)
    if has_metric:
        cols += [rows[0].get("metric_name", "metric"), f"Δ vs {rows[0]['variant']} {rows[0]['format']}"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("model", "format") else "right")
    for r in rows:
        cells = ([r["variant"]] if several else []) + [
            r["format"], f"{r['size_mb']:.2f}", f"{r['params'] / 1e6:.3f}", f"{r['b1_median_ms']:.2f}",
            f"{r['b1_p90_ms']:.2f}", f"{r['bN_median_ms']:.2f}", f"{r['bN_p90_ms']:.2f}", f"{r['images_per_s']:.1f}",
            f"{r['speedup']:.2f}x"]
        if has_metric:
            m = r.get("metric")
            cells += ["-" if m is None else f"{m:.4f}", f"{r.get('metric_delta', 0.0):+.4f}"]
        t.add_row(*cells)
    console().print(t)
