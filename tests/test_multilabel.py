"""Multi-label classification: loss, metrics parity, thresholds, CSV and shapes data, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import COLOURS, make_colour_csv
from PIL import Image

from cnnkit.data.classification import Skipped
from cnnkit.data.formats.multilabel_csv import (
    LabeledImage,
    read_multilabel_csv,
    write_multilabel_csv,
)
from cnnkit.data.multilabel import (
    ShapesMultiLabel,
    collate_multilabel,
    load_multilabel_data,
    multilabel_params,
)
from cnnkit.data.shapes import SHAPE_CLASSES
from cnnkit.errors import DataError
from cnnkit.tasks.multilabel.task import (
    MultiLabelMetrics,
    MultiLabelTask,
    asymmetric_loss,
    tune_thresholds,
)


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


# ---------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------
def test_asl_without_focusing_or_clipping_is_bce():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 6, generator=g) * 3
    y = (torch.rand(16, 6, generator=g) > 0.6).float()
    bce = F.binary_cross_entropy_with_logits(x, y)
    assert torch.allclose(asymmetric_loss(x, y, gamma_neg=0, gamma_pos=0, clip=0), bce, atol=1e-5)
    task = MultiLabelTask(["a"] * 6, loss="asl", gamma_neg=0, gamma_pos=0, clip=0)
    assert torch.allclose(task.loss(x, {"targets": y})["loss"], bce, atol=1e-5)
    # gradients agree too (the mean reduction, not a sum)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    asymmetric_loss(xa, y, 0, 0, 0).backward()
    F.binary_cross_entropy_with_logits(xb, y).backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-6)


def test_asl_down_weights_easy_negatives_not_positives():
    def pair(p: float, y: float) -> tuple[float, float]:
        x, t = _logit(torch.tensor([[p]])), torch.tensor([[y]])
        return (float(asymmetric_loss(x, t, gamma_neg=4, gamma_pos=0, clip=0.05)),
                float(F.binary_cross_entropy_with_logits(x, t)))

    easy_asl, easy_bce = pair(0.1, 0.0)  # a negative the model already scores low
    hard_asl, hard_bce = pair(0.9, 0.0)  # a negative scored high: a real mistake
    pos_asl, pos_bce = pair(0.3, 1.0)
    assert easy_asl < 1e-3 * easy_bce
    assert hard_asl > 0.3 * hard_bce
    assert math.isclose(pos_asl, pos_bce, rel_tol=1e-4)  # gamma_pos = 0: positives untouched
    assert pair(0.04, 0.0)[0] == 0.0  # below the clip margin a negative costs nothing
    assert MultiLabelTask(["a"], loss="asl").loss(_logit(torch.tensor([[0.1]])),
                                                  {"targets": torch.zeros(1, 1)})["loss"] < 1e-3 * easy_bce


# ---------------------------------------------------------------------------------------
# Metrics and thresholds
# ---------------------------------------------------------------------------------------
def _random_scores(n: int = 300, k: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < rng.uniform(0.1, 0.5, k)).astype(np.float32)
    p = 1 / (1 + np.exp(-(rng.normal(0, 1.5, (n, k)) + 1.5 * (2 * y - 1))))  # informative, noisy
    return torch.from_numpy(p.astype(np.float32)), torch.from_numpy(y)


def _metrics(p: torch.Tensor, y: torch.Tensor, thresholds=None, tune=False) -> dict:
    m = MultiLabelMetrics([f"c{i}" for i in range(p.shape[1])], thresholds, tune=tune)
    for i in range(0, len(p), 64):  # several batches, as in evaluation
        m.update(_logit(p[i:i + 64].double()).float(), {"targets": y[i:i + 64]})
    return m.compute()


def test_metrics_match_sklearn():
    from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score

    p, y = _random_scores()
    r = _metrics(p, y)
    yn, pn = y.numpy().astype(int), p.numpy()
    assert r["map"] == pytest.approx(average_precision_score(yn, pn, average="macro"), abs=1e-5)
    hard = (pn >= 0.5).astype(int)
    assert r["micro_f1"] == pytest.approx(f1_score(yn, hard, average="micro"), abs=1e-6)
    assert r["macro_f1"] == pytest.approx(f1_score(yn, hard, average="macro"), abs=1e-6)
    aps = average_precision_score(yn, pn, average=None)
    for i, (name, c) in enumerate(r["per_class"].items()):
        assert c["ap"] == pytest.approx(aps[i], abs=1e-5)
        assert c["precision"] == pytest.approx(precision_score(yn[:, i], hard[:, i]), abs=1e-6)
        assert c["recall"] == pytest.approx(recall_score(yn[:, i], hard[:, i]), abs=1e-6)
        assert c["support"] == int(yn[:, i].sum()) and c["threshold"] == 0.5
    assert r["loss"] == pytest.approx(float(F.binary_cross_entropy(p.double(), y.double())), abs=1e-4)
    # per-class thresholds are applied class by class
    thr = [0.2, 0.35, 0.5, 0.65, 0.8]
    r = _metrics(p, y, thr)
    hard = (pn >= np.array(thr)).astype(int)
    assert r["micro_f1"] == pytest.approx(f1_score(yn, hard, average="micro"), abs=1e-6)
    assert r["macro_f1"] == pytest.approx(f1_score(yn, hard, average="macro"), abs=1e-6)


def test_map_skips_classes_without_positives():
    p, y = _random_scores(k=3)
    y[:, 2] = 0
    r = _metrics(p, y)
    assert r["per_class"]["c2"]["ap"] is None
    assert r["map"] == pytest.approx((r["per_class"]["c0"]["ap"] + r["per_class"]["c1"]["ap"]) / 2)


def test_tuned_thresholds_beat_one_half_on_skewed_scores():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(1)
    y = (rng.random((400, 2)) < 0.2).astype(np.float32)
    y[:, 1] = 0  # a class with no positives keeps 0.5
    # an under-confident model: positives score 0.15-0.45, negatives 0-0.25
    p = np.where(y > 0, rng.uniform(0.15, 0.45, y.shape), rng.uniform(0.0, 0.25, y.shape))
    p, y = torch.from_numpy(p.astype(np.float32)), torch.from_numpy(y)
    thr = tune_thresholds(p, y)
    assert 0.15 < thr[0] < 0.3 and thr[1] == 0.5
    f1_half = f1_score(y[:, 0].numpy(), p[:, 0].numpy() >= 0.5)
    f1_tuned = f1_score(y[:, 0].numpy(), p[:, 0].numpy() >= thr[0])
    assert f1_half == 0.0 and f1_tuned > 0.7
    best = max(f1_score(y[:, 0].numpy(), p[:, 0].numpy() >= t) for t in np.arange(0.01, 1, 0.01))
    assert f1_tuned == pytest.approx(best)  # the best of the grid
    r = _metrics(p, y, tune=True)  # what training does on val
    assert r["thresholds"] == thr and r["per_class"]["c0"]["f1"] == pytest.approx(f1_tuned)
    # perfectly separated: the threshold sits inside the gap, not at its edge
    sep = tune_thresholds(torch.tensor([[0.9], [0.8], [0.2], [0.1]]), torch.tensor([[1.], [1.], [0.], [0.]]))
    assert 0.4 <= sep[0] <= 0.6


def test_decode_uses_per_class_thresholds():
    task = MultiLabelTask(["cat", "dog", "fox"], thresholds=[0.5, 0.2, 0.9])
    probs = torch.tensor([[0.6, 0.3, 0.8], [0.1, 0.1, 0.95], [0.4, 0.1, 0.5]])
    preds = task.decode(_logit(probs), ["a.png", "b.png", "c.png"])
    assert [p.labels for p in preds] == [["cat", "dog"], ["fox"], []]
    assert preds[0].scores == pytest.approx({"cat": 0.6, "dog": 0.3, "fox": 0.8})
    assert preds[1].to_dict()["path"] == "b.png" and set(preds[1].to_dict()) == {"path", "labels", "scores"}
    # labels come highest score first
    assert task.decode(_logit(torch.tensor([[0.6, 0.95, 0.1]])))[0].labels == ["dog", "cat"]


# ---------------------------------------------------------------------------------------
# Data: CSV and shapes
# ---------------------------------------------------------------------------------------
def _png(path, value: int = 128, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def test_csv_reader_relative_paths_labels_and_round_trip(tmp_path, monkeypatch):
    root = tmp_path / "data"
    for name in ("a.png", "b.png", "c.png"):
        _png(root / "img" / name)
    (root / "train.csv").write_text("path,labels\nimg/a.png, dog ; cat;dog\n\nimg/b.png,\nimg/c.png\n")
    monkeypatch.chdir(tmp_path)  # paths are relative to the CSV, not to the working folder
    rows = read_multilabel_csv(root / "train.csv")
    assert rows == [LabeledImage(str(root / "img" / "a.png"), ("cat", "dog")),
                    LabeledImage(str(root / "img" / "b.png"), ()),
                    LabeledImage(str(root / "img" / "c.png"), ())]
    write_multilabel_csv(root / "copy.csv", rows)
    assert (root / "copy.csv").read_text().splitlines()[:2] == ["path,labels", "img/a.png,cat;dog"]
    assert read_multilabel_csv(root / "copy.csv") == rows
    # no header works too
    (root / "nohead.csv").write_text("img/b.png,cat\n")
    assert read_multilabel_csv(root / "nohead.csv")[0].labels == ("cat",)


@pytest.mark.parametrize("text, message", [
    ("path,labels\nimg/a.png,cat\n,dog\n", "row 3 of '{csv}' has no image path"),
    ("img/a.png,cat\nimg/missing.png,dog\n", "row 2 of '{csv}': image '{root}/img/missing.png' does not exist"),
    ("img/a.png,cat,dog\n", "row 1 of '{csv}' has 3 columns"),
    ("path,labels\n\n", "CSV file '{csv}' lists no images"),
])
def test_csv_reader_errors(tmp_path, text, message):
    _png(tmp_path / "img" / "a.png")
    csv = tmp_path / "bad.csv"
    csv.write_text(text)
    with pytest.raises(DataError) as e:
        read_multilabel_csv(csv)
    assert str(e.value).startswith(message.format(csv=csv, root=tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        read_multilabel_csv(tmp_path / "nope.csv")


def test_load_csv_data_splits_classes_and_targets(tmp_path):
    labels = ["cat", "dog;cat", "", "fox", "dog", "cat;fox", "dog", "cat"] * 3
    lines = ["path,labels"]
    for i, lab in enumerate(labels):
        _png(tmp_path / "img" / f"{i}.png", value=i * 10)
        lines.append(f"img/{i}.png,{lab}")
    (tmp_path / "all.csv").write_text("\n".join(lines) + "\n")
    d = load_multilabel_data(str(tmp_path / "all.csv"), seed=3, val_fraction=0.25)
    assert d.classes == ["cat", "dog", "fox"] and set(d.splits) == {"train", "val"}
    tr, va = d.split("train"), d.split("val")
    assert len(va) == 6 and len(tr) == 18 and not set(tr.paths) & set(va.paths)
    assert load_multilabel_data(str(tmp_path / "all.csv"), seed=3, val_fraction=0.25).split("val").paths == va.paths
    assert load_multilabel_data(str(tmp_path / "all.csv"), seed=4, val_fraction=0.25).split("val").paths != va.paths
    img, target = tr[tr.paths.index(str(tmp_path / "img" / "1.png"))]
    assert img.dtype == torch.uint8 and img.shape == (3, 16, 16)
    assert target.tolist() == [1.0, 1.0, 0.0]  # "dog;cat" in the class order cat, dog, fox
    # a folder with train.csv / val.csv / test.csv
    folder = tmp_path / "folder"
    for split, rows in (("train", ["img/0.png,cat", "img/1.png,dog"]), ("val", ["img/2.png,dog"]),
                        ("test", ["img/3.png,"])):
        (folder / f"{split}.csv").parent.mkdir(exist_ok=True)
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
        for r in rows:
            _png(folder / r.split(",")[0])
    d = load_multilabel_data(str(folder))
    assert d.classes == ["cat", "dog"] and [len(d.split(s)) for s in ("train", "val", "test")] == [2, 1, 1]
    assert d.split("test")[0][1].tolist() == [0.0, 0.0]  # no labels is a valid target
    with pytest.raises(DataError, match=r"label\(s\) \['cat'\] that are not among the model's classes"):
        load_multilabel_data(str(folder), classes=["dog", "emu"])
    with pytest.raises(DataError, match="has no train.csv"):
        load_multilabel_data(str(tmp_path / "img"))
    with pytest.raises(DataError, match="did you mean 'shapes'"):
        load_multilabel_data("shape")


def test_shapes_multilabel_targets_are_the_shapes_in_the_scene():
    ds = ShapesMultiLabel("val", size=40)
    counts = []
    for i in range(40):
        img, target = ds[i]
        assert img.dtype == torch.uint8 and img.shape == (3, 64, 64)
        assert target.dtype == torch.float32 and target.shape == (len(SHAPE_CLASSES),)
        scene = ds.scene(i)
        assert np.array_equal(scene.image.transpose(2, 0, 1), img.numpy())
        visible = {o.cls for o, m in zip(scene.objects, scene.masks) if m.any()}
        assert set(np.flatnonzero(target.numpy()).tolist()) == visible and visible
        counts.append(len(scene.objects))
    assert np.mean(counts) > 1.5 and max(counts) == multilabel_params().max_objects
    again = ShapesMultiLabel("val", size=40, cache=False)
    assert all(torch.equal(ds[i][0], again[i][0]) for i in (0, 7, 39))  # deterministic by seed
    assert not torch.equal(ShapesMultiLabel("train", size=1)[0][0], ds[0][0])  # splits differ


def test_cli_samples_write_the_split_as_a_csv_dataset(cli, tmp_path):
    out = tmp_path / "samples"
    r = cli("multilabel", "samples", "--data", "shapes", "--split", "val", "--count", "6", "--out", out)
    assert r.code == 0, r.err
    rows = read_multilabel_csv(out / "labels.csv")
    ds = ShapesMultiLabel("val", size=6)
    assert len(rows) == 6
    for i, row in enumerate(rows):
        img, target = ds[i]
        assert row.labels == tuple(sorted(SHAPE_CLASSES[k] for k in np.flatnonzero(target.numpy())))
        assert np.array_equal(np.asarray(Image.open(row.path)), img.permute(1, 2, 0).numpy())  # lossless


def test_collate_stacks_multi_hot_and_lists_skipped():
    items = [(torch.zeros(3, 8, 8, dtype=torch.uint8), torch.tensor([1.0, 0.0])), Skipped("bad.png", "corrupt"),
             (torch.ones(3, 8, 8, dtype=torch.uint8), torch.tensor([0.0, 1.0]))]
    b = collate_multilabel(items)
    assert b["images"].shape == (2, 3, 8, 8) and b["targets"].dtype == torch.float32
    assert b["targets"].tolist() == [[1.0, 0.0], [0.0, 1.0]] and b["skipped"] == [("bad.png", "corrupt")]


# ---------------------------------------------------------------------------------------
# Command line end to end
# ---------------------------------------------------------------------------------------
def test_cli_csv_train_val_predict_load(cli, tmp_path):
    import cnnkit

    data = tmp_path / "data"
    make_colour_csv(data, 160, 0, "train.csv")
    make_colour_csv(data, 60, 1, "val.csv")
    test_rows = make_colour_csv(data, 30, 2, "test.csv")
    run = tmp_path / "run"
    r = cli("multilabel", "train", "--data", data, "--imgsz", "24", "--epochs", "6", "--batch", "16",
            "--lr", "0.005", "--out", run)
    assert r.code == 0, r.err
    res = json.loads((run / "results.json").read_text())
    assert {"map", "micro_f1", "macro_f1", "per_class", "test", "best_epoch"} <= set(res)
    assert set(res["per_class"]) == set(COLOURS)
    assert set(res["per_class"]["red"]) == {"ap", "precision", "recall", "f1", "support", "threshold"}
    assert res["map"] > 0.9 and res["test"]["map"] > 0.85, (res["map"], res["test"]["map"])  # chance ~0.4
    assert res["test"]["micro_f1"] > 0.8
    card = json.loads((run / "weights" / "best.json").read_text())
    thresholds = card["thresholds"]["per_class"]
    assert card["task"] == "multilabel" and set(thresholds) == set(COLOURS)
    assert [thresholds[c] for c in card["classes"]] == [res["per_class"][c]["threshold"] for c in card["classes"]]
    assert (run / "plots" / "results.png").is_file() and (run / "plots" / "val_predictions.png").is_file()
    # val at the card's thresholds reproduces the training run's numbers
    r = cli("multilabel", "val", "--weights", run, "--data", data, "--split", "test", "--json", tmp_path / "v.json")
    assert r.code == 0, r.err
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["split"] == "test" and v["num_images"] == 30
    assert v["map"] == pytest.approx(res["test"]["map"]) and v["micro_f1"] == pytest.approx(res["test"]["micro_f1"])
    # predict a folder: JSON with labels and a score per class
    src = tmp_path / "src"
    src.mkdir()
    for p, _ in test_rows:
        (src / p.split("/")[-1]).write_bytes(open(p, "rb").read())
    r = cli("multilabel", "predict", "--weights", run / "weights" / "best.safetensors", "--source", src,
            "--json", tmp_path / "p.json")
    assert r.code == 0, r.err
    preds = {p["path"].split("/")[-1]: p for p in json.loads((tmp_path / "p.json").read_text())}
    assert len(preds) == 30 and set(next(iter(preds.values()))) == {"path", "labels", "scores"}
    truth = {p.split("/")[-1]: set(labels) for p, labels in test_rows}
    exact = sum(set(p["labels"]) == truth[k] for k, p in preds.items())
    assert exact >= 20, exact
    assert all(set(p["scores"]) == set(COLOURS) for p in preds.values())
    # the Python API: load -> predict
    model = cnnkit.load(run)
    out = model.predict([p for p, _ in test_rows[:5]])
    assert [set(o.labels) for o in out] == [set(preds[p.split("/")[-1]]["labels"]) for p, _ in test_rows[:5]]
    assert model.pipeline.thresholds == [thresholds[c] for c in model.classes]


def test_cli_bad_input_is_one_sentence(cli, tmp_path):
    from cnnkit.engine.checkpoint import save_weights

    _png(tmp_path / "img" / "a.png")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,labels\nimg/a.png,cat\n,dog\n")
    r = cli("multilabel", "train", "--data", bad, "--epochs", "1", "--out", tmp_path / "run")
    assert r.code == 2 and r.err == f"Error: row 3 of '{bad}' has no image path\n"
    r = cli("multilabel", "train", "--data", tmp_path / "missing.csv", "--out", tmp_path / "run")
    assert r.code == 2 and r.err == f"Error: data path '{tmp_path / 'missing.csv'}' does not exist\n"
    r = cli("multilabel", "train", "--loss", "focal")
    assert r.code == 2 and "Invalid value for '--loss'" in r.err and "'bce', 'asl'" in r.err
    save_weights(tmp_path / "w" / "best.safetensors", {"x": torch.zeros(1)},
                 {"task": "classify", "arch": "smallcnn", "classes": ["a"], "in_chans": 3})
    r = cli("multilabel", "val", "--weights", tmp_path / "w", "--data", "shapes")
    assert r.code == 2 and r.err.startswith("Error: weights '") and "not multilabel" in r.err
    assert r.err.count("\n") == 1 and "Traceback" not in r.err
