"""Export every task to ONNX (and TorchScript) and run it in ONNX Runtime: the raw outputs match
eager PyTorch, predictions match, and val metrics match; bad files are one sentence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from task_inputs import task_images as _images

import cnnkit
from cnnkit.methods.export import export

TASK_RUNS = ("digits_run", "multilabel_run", "tiny_run", "instance_run", "seg_run", "medical_run")


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory):
    """``{fixture name: (run folder, onnx path, export report)}``, exported once per module."""
    out = {}
    for name in TASK_RUNS:
        run = request.getfixturevalue(name)
        path = tmp_path_factory.mktemp("onnx") / f"{name}.onnx"
        out[name] = (run, path, export(run, "onnx", path, verbose=False))
    return out


@pytest.mark.parametrize("name", TASK_RUNS)
def test_export_matches_eager_and_carries_the_card(exported, name):
    from cnnkit.core.card import ModelCard
    from cnnkit.engine.checkpoint import load_weights
    from cnnkit.runtime.backend import read_onnx_card

    run, path, report = exported[name]
    assert report["max_abs_diff"] <= 1e-4, report["max_abs_diff"]
    card = ModelCard.from_dict(read_onnx_card(path))
    trained = ModelCard.from_dict(load_weights(run)[1])
    assert card.task == trained.task and card.classes == trained.classes and card.input == trained.input
    assert card.extra["exported"]["format"] == "onnx"


def _same(task: str, a, b) -> None:
    """Results of the two backends agree (decoded outputs, not only raw tensors)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if task == "classify":
            assert x.label == y.label and abs(x.score - y.score) < 1e-4
        elif task == "multilabel":
            assert x.labels == y.labels and max(abs(x.scores[c] - y.scores[c]) for c in x.scores) < 1e-4
        elif task in ("detect", "instance"):
            assert len(x) == len(y) and torch.equal(x.labels, y.labels)
            assert torch.allclose(x.boxes, y.boxes, atol=1e-2) and torch.allclose(x.scores, y.scores, atol=1e-4)
            if x.masks is not None:
                assert (x.masks == y.masks).float().mean() > 0.999
        elif task == "segment":
            assert (x.mask == y.mask).float().mean() > 0.999
        else:
            assert (x.labels == y.labels).float().mean() > 0.999


@pytest.mark.parametrize("name", TASK_RUNS)
def test_onnx_runtime_predicts_what_torch_predicts(exported, name, request, tmp_path):
    run, path, _ = exported[name]
    torch_model, ort_model = cnnkit.load(run), cnnkit.load(path)
    assert torch_model.backend.name == "torch" and ort_model.backend.name == "onnx"
    items = _images(name, request, tmp_path)
    opts = {"conf": 0.001} if torch_model.task in ("detect", "instance") else {}
    a, b = torch_model(items, **opts), ort_model(items, **opts)
    if torch_model.task in ("detect", "instance"):
        assert sum(len(r) for r in a) > 0  # something to compare
    _same(torch_model.task, a, b)
    assert len(a) == len(items) and a[0].to_dict().keys() == b[0].to_dict().keys()


def test_val_on_onnx_matches_torch(exported, request, monkeypatch, cli, tmp_path):
    """val with --weights model.onnx: top-1 identical, mAP and mIoU within 0.002."""
    import cnnkit.data.detection as dd
    import cnnkit.data.volumes as dv

    monkeypatch.setattr(dd, "SHAPES_DET_SIZES", {"train": 8, "val": 4, "test": 4})
    monkeypatch.setattr(dv, "PHANTOM_SIZES", {"train": 4, "val": 2})
    data = {"digits_run": "digits", "multilabel_run": str(exported["multilabel_run"][0].parent / "data"),
            "tiny_run": str(request.getfixturevalue("tiny_yolo")), "instance_run": "shapes",
            "seg_run": str(request.getfixturevalue("seg_data")), "medical_run": "phantoms"}
    key = {"digits_run": "top1", "multilabel_run": "map", "tiny_run": "map50_95", "instance_run": "mask_map50_95",
           "seg_run": "miou", "medical_run": "dice"}
    for name, (run, path, _) in exported.items():
        task = cnnkit.load(path).task
        a = cnnkit.val(task, run, data[name], verbose=False)
        b = cnnkit.val(task, path, data[name], verbose=False)
        assert b["backend"] == "onnx" if "backend" in b else True
        tol = 0.0 if name == "digits_run" else 0.002
        assert abs(a[key[name]] - b[key[name]]) <= tol, (name, a[key[name]], b[key[name]])
    # the command line takes the .onnx the same way
    r = cli("classify", "val", "--weights", exported["digits_run"][1], "--data", "digits", "--json", tmp_path / "m.json")
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "m.json").read_text())["backend"] == "onnx"


def test_cli_export_and_torchscript(digits_run, cli, tmp_path):
    r = cli("export", "--weights", digits_run, "--format", "torchscript", "--out", tmp_path / "m.torchscript")
    assert r.code == 0, r.err
    assert "largest difference" in r.out
    a = cnnkit.val("classify", digits_run, "digits", verbose=False)
    b = cnnkit.val("classify", tmp_path / "m.torchscript", "digits", verbose=False)
    assert a["top1"] == b["top1"]
    r = cli("export", "--weights", digits_run, "--out", tmp_path / "d.onnx", "--dynamic", "--imgsz", "24", "24")
    assert r.code == 0, r.err
    model = cnnkit.load(tmp_path / "d.onnx")
    assert model.card.input.height == 24 and model.raw(torch.rand(3, 1, 32, 40))[0].shape == (3, 10)


def test_bad_exported_files_are_one_sentence(exported, digits_run, cli, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    def err(*args):
        r = cli(*args)
        assert r.code == 2 and r.err.count("\n") == 1 and "Traceback" not in r.err, r.err
        return r.err

    src = tmp_path / "imgs"
    src.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(src / "a.png")
    assert "does not exist" in err("classify", "predict", "--weights", tmp_path / "nope.onnx", "--source", src)
    (tmp_path / "corrupt.onnx").write_bytes(b"\x08\x07garbage" * 10)
    assert "not a readable ONNX model" in err("classify", "predict", "--weights", tmp_path / "corrupt.onnx",
                                              "--source", src)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])])
    onnx.save(helper.make_model(graph), tmp_path / "plain.onnx")
    assert "no cnnkit model card" in err("classify", "predict", "--weights", tmp_path / "plain.onnx", "--source", src)
    # external data that points outside the model's folder is refused before anything is read
    w = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    w.data_location = TensorProto.EXTERNAL
    w.ClearField("float_data")
    entry = w.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    g2 = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [w])
    (tmp_path / "evil").mkdir()
    with open(tmp_path / "evil" / "m.onnx", "wb") as f:
        f.write(helper.make_model(g2).SerializeToString())
    assert "outside its folder" in err("classify", "predict", "--weights", tmp_path / "evil" / "m.onnx",
                                       "--source", src)
    assert "opsets" in err("export", "--weights", digits_run, "--opset", "99", "--out", tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    assert "does not exist" in err("export", "--weights", tmp_path / "missing", "--out", tmp_path / "y.onnx")
    # a detector's .onnx given to classify, and images of the wrong channel count
    assert "not classify" in err("classify", "predict", "--weights", exported["tiny_run"][1], "--source", src)
    from cnnkit.errors import DataError

    model = cnnkit.load(exported["digits_run"][1])
    with pytest.raises(DataError, match="takes inputs of shape Nx1x16x16, got 2x3x16x16"):
        model.raw(torch.rand(2, 3, 16, 16))


def test_predictor_is_stateless_across_threads(exported, request, tmp_path):
    """One predictor per backend serves several threads at once with the same answers as
    sequential calls (nothing is mutated per call; options travel with each call)."""
    from concurrent.futures import ThreadPoolExecutor

    run, path, _ = exported["tiny_run"]
    items = _images("tiny_run", request, tmp_path)
    for model in (cnnkit.load(run), cnnkit.load(path)):
        expected = {conf: [r.to_dict() for r in model(items, conf=conf)] for conf in (0.001, 0.01, 0.05)}
        jobs = [conf for conf in (0.001, 0.01, 0.05) for _ in range(4)]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda c, m=model: (c, [r.to_dict() for r in m(items, conf=c)]), jobs))
        assert all(rows == expected[c] for c, rows in got)
        assert expected[0.001] != expected[0.05]  # the per-call option took effect


def test_benchmark_interleaves_formats_and_reports_each(digits_run, tmp_path):
    """Formats are timed in rounds that take them in turn (a drifting machine moves all alike);
    every format gets ``runs`` timings; ORT's top-1 on digits equals eager's."""
    from cnnkit.methods import benchmark as bm

    calls: list[str] = []

    class Fake:
        device = torch.device("cpu")

        def __init__(self, name):
            self.name = name

        def raw(self, x):
            calls.append(self.name)

    x = torch.zeros(1)
    times = bm.time_interleaved({"a": Fake("a"), "b": Fake("b")}, {"a": x, "b": x}, runs=7, warmup=2)
    assert {k: len(v) for k, v in times.items()} == {"a": 7, "b": 7}
    assert calls[:4] == ["a", "a", "b", "b"]  # warm-up, then rounds alternate
    timed = calls[4:]
    assert timed.index("b") < len(timed) - timed[::-1].index("a") - 1  # a runs again after b started
    assert timed.count("a") == 7 + (bm.ROUNDS - 1)  # one untimed warm-up call per later round

    r = bm.benchmark(digits_run, "digits", batch=4, formats=("torch", "onnx"), runs=3, warmup=1, split="test",
                     json_path=tmp_path / "b.json", verbose=False)
    rows = {row["format"]: row for row in r["rows"]}
    assert set(rows) == {"torch", "onnx"} and rows["torch"]["speedup"] == 1.0
    assert rows["onnx"]["speedup"] == round(rows["torch"]["b1_median_ms"] / rows["onnx"]["b1_median_ms"], 3)
    assert rows["onnx"]["batch"] == 4 and rows["onnx"]["metric_name"] == "top1"
    assert rows["onnx"]["metric_delta"] == 0.0
    assert json.loads((tmp_path / "b.json").read_text())["rows"][1]["format"] == "onnx"


@pytest.mark.parametrize("name", ["tiny_run", "seg_run"])
def test_decoder_upsampling_exports_as_a_constant_scale(exported, name):
    """fastdet's neck and the U-Net's decoder upsample by a constant scale in ONNX (no ``Shape``
    ops feeding the ``Resize``), the form ONNX Runtime keeps in its blocked layout; the eager
    step gives exactly what resizing to the skip's size gives, also off the stride grid."""
    import onnx
    import torch.nn.functional as F

    from cnnkit.models.blocks import upsample_nearest

    graph = onnx.load(str(exported[name][1])).graph
    consts = {o for n in graph.node if n.op_type == "Constant" for o in n.output} | {i.name for i in graph.initializer}
    resizes = [n for n in graph.node if n.op_type == "Resize"]
    assert resizes and all(n.input[2] in consts and (len(n.input) < 4 or not n.input[3]) for n in resizes)
    x = torch.rand(2, 3, 5, 7)
    for size in ((10, 14), (15, 7), (11, 13)):
        assert torch.equal(upsample_nearest(x, size), F.interpolate(x, size=size, mode="nearest"))
