"""Post-training int8 (`cnnkit quantize`) for every task: the file carries its card, runs through
`val` on ONNX Runtime within the loss the issue allows, and reports the layers that lose most."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import cnnkit
from cnnkit.methods.quantize import quantize, sqnr_db

# fixture -> (data, metric, largest loss allowed against fp32)
CASES = {
    "digits_run": ("digits", "top1", 0.01),
    "multilabel_run": (None, "map", 0.01),
    "tiny_run": (None, "map50_95", 0.01),
    "seg_run": (None, "miou", 0.01),
    "instance_run": ("shapes", "mask_map50_95", 0.01),
    "medical_run": ("phantoms", "dice", 0.01),
}


def _data(name, request):
    if name == "multilabel_run":
        return str(request.getfixturevalue(name).parent / "data")
    if name == "tiny_run":
        return str(request.getfixturevalue("tiny_yolo"))
    if name == "seg_run":
        return str(request.getfixturevalue("seg_data"))
    return CASES[name][0]


@pytest.fixture(scope="module")
def small_builtins():
    """The built-in shapes and phantoms at the sizes the session's instance and medical runs used."""
    import cnnkit.data.detection as dd
    import cnnkit.data.volumes as dv

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dd, "SHAPES_DET_SIZES", {"train": 8, "val": 4, "test": 4})
        mp.setattr(dv, "PHANTOM_SIZES", {"train": 4, "val": 2})
        yield


@pytest.fixture(scope="module")
def int8(request, tmp_path_factory, small_builtins):
    """``{fixture name: (run, int8 file, report)}``, quantized once per module."""
    out = {}
    for name in CASES:
        run = request.getfixturevalue(name)
        path = tmp_path_factory.mktemp("int8") / f"{name}.int8.onnx"
        out[name] = (run, path, quantize(run, _data(name, request), path, calib=64, verbose=False))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_int8_runs_through_val_within_the_allowed_loss(int8, request, name):
    run, path, report = int8[name]
    data, key, allowed = _data(name, request), CASES[name][1], CASES[name][2]
    task = cnnkit.load(path).task
    fp32 = cnnkit.val(task, run, data, verbose=False)
    q = cnnkit.val(task, path, data, verbose=False)
    assert q["backend"] == "onnx"
    assert fp32[key] - q[key] <= allowed, (name, fp32[key], q[key])
    # really int8: integer weights and quantize/dequantize pairs in the graph
    m = onnx.load(str(path))
    ops = {n.op_type for n in m.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in m.graph.initializer)
    # 7-bit weights by default: no u8s8 saturation on x86 without VNNI (the grid's ends are used)
    assert _int8_weight_range(m) == 64
    assert report["size_mb"] < report["fp32_size_mb"]
    # the nodes writing the raw outputs stay in float (8 bits cannot hold box coordinates)
    producer = {o: n for n in m.graph.node for o in n.output}
    assert report["float_outputs"]
    assert all(producer[o.name].op_type != "DequantizeLinear" for o in m.graph.output), name
    card = json.loads({p.key: p.value for p in m.metadata_props}["cnnkit_card"])
    assert card["extra"]["quantized"]["calibration"]["images"] == report["calibration"]["images"] > 0
    assert card["extra"]["quantized"]["weight_bits"] == 7
    sqnr = report["outputs_sqnr_db"]
    if name != "instance_run":  # Mask R-CNN's kept detections vary in number: compared by val above
        assert all(v is not None and v > 10 for v in sqnr.values()), sqnr


def _int8_weight_range(m) -> int:
    """The largest |integer| among the int8 initializers of an ONNX model."""
    from onnx import numpy_helper

    return max(int(np.abs(numpy_helper.to_array(t).astype(np.int32)).max())
               for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT8)


def test_sensitivity_names_layers_and_exclude_leaves_them_in_float(int8, tmp_path):
    """The report lists real nodes worst first; --exclude of the worst one keeps its weights in
    float (fewer int8 weight tensors)."""
    run, path, report = int8["digits_run"]
    layers = report["layers"]
    assert layers and layers == sorted(layers, key=lambda r: r["sqnr_db"])
    worst = layers[0]["node"]
    again = quantize(run, "digits", tmp_path / "ex.int8.onnx", calib=64, exclude=(worst,), sensitivity=False,
                     verbose=False)

    def count(p):
        return sum(t.data_type == onnx.TensorProto.INT8 for t in onnx.load(str(p)).graph.initializer)

    assert again["excluded"] == [worst]
    if layers[0]["op"] in ("Conv", "Gemm", "MatMul"):
        assert count(tmp_path / "ex.int8.onnx") < count(path)


def test_sqnr_against_hand_computed_values():
    ref = np.array([3.0, 4.0])
    assert sqnr_db(ref, ref) == float("inf")
    assert sqnr_db(ref, np.array([3.0, 3.0])) == pytest.approx(10 * np.log10(25 / 1), abs=0.01)
    assert sqnr_db(ref, np.zeros(3)) is None


def test_cli_quantize_and_its_errors(digits_run, cli, tmp_path):
    out = tmp_path / "d.int8.onnx"
    r = cli("quantize", "--weights", digits_run, "--data", "digits", "--calib", "32", "--out", out,
            "--no-sensitivity", "--json", tmp_path / "q.json", "--weight-bits", "8")
    assert r.code == 0, r.err
    assert "int8 classify" in r.out and json.loads((tmp_path / "q.json").read_text())["file"] == str(out)
    assert _int8_weight_range(onnx.load(str(out))) == 127 and "8-bit weights" in " ".join(r.out.split())
    r = cli("classify", "predict", "--weights", out, "--source", str(tmp_path / "nothing.png"))
    assert r.code == 2
    bad = {
        ("--exclude", "no_such_node"): "no_such_node",
        ("--method", "bogus"): "bogus",
        ("--calib", "0"): "0",
        ("--weight-bits", "9"): "9",
    }
    for args, word in bad.items():
        r = cli("quantize", "--weights", digits_run, "--data", "digits", "--out", tmp_path / "x.onnx", *args)
        assert r.code == 2 and word in r.err and "Traceback" not in r.err, r.err
        assert sum(line.startswith("Error:") for line in r.err.splitlines()) == 1, r.err
    empty = tmp_path / "empty"
    (empty / "train" / "0").mkdir(parents=True)
    (empty / "train" / "0" / "broken.png").write_bytes(b"not an image")
    r = cli("quantize", "--weights", digits_run, "--data", str(empty), "--out", tmp_path / "y.onnx")
    assert r.code == 2 and "Traceback" not in r.err, r.err
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()


def test_benchmark_lists_int8_beside_fp32(digits_run, tmp_path):
    from cnnkit.errors import CnnkitError
    from cnnkit.methods.benchmark import benchmark

    r = benchmark(digits_run, "digits", batch=4, formats=("torch", "onnx", "int8"), runs=3, warmup=1, split="test",
                  verbose=False)
    rows = {row["format"]: row for row in r["rows"]}
    assert rows["int8"]["file"].endswith(".int8.onnx") and rows["int8"]["size_mb"] < rows["onnx"]["size_mb"]
    assert abs(rows["int8"]["metric_delta"]) <= 0.01
    with pytest.raises(CnnkitError, match="--data"):
        benchmark(digits_run, None, formats=("int8",), verbose=False)


def test_predict_and_serve_take_the_int8_file(int8, tmp_path):
    """The int8 file is weights like any other: `predict --json` and `cnnkit serve` answer with
    the same schema and, on digits, the fp32 model's labels for nearly every image."""
    import httpx
    from PIL import Image
    from servers import running

    from cnnkit.data.digits import digits_arrays
    from cnnkit.serve import load_models, model_name

    run, path, _ = int8["digits_run"]
    folder = tmp_path / "digits"
    folder.mkdir()
    for i, a in enumerate(digits_arrays("test")[0][:40]):
        Image.fromarray(a).save(folder / f"{i:02d}.png")
    fp32 = {Path(r["path"]).name: r["label"] for r in cnnkit.predict("classify", run, folder, verbose=False)}
    q = cnnkit.predict("classify", path, folder, verbose=False, json_path=tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text()) == q
    assert sum(fp32[Path(r["path"]).name] == r["label"] for r in q) >= 38
    assert model_name(run / "weights" / "best.int8.onnx") == f"{run.resolve().name}-int8"
    models = load_models([f"d8={path}"])
    assert models["d8"].backend.name == "onnx"
    with running(models) as (url, _):
        parts = [("file", (f.name, f.read_bytes(), "image/png")) for f in sorted(folder.iterdir())[:8]]
        answer = httpx.post(f"{url}/v1/models/d8/predict", files=parts, timeout=60).json()
    assert [a["label"] for a in answer] == [r["label"] for r in q[:8]]
