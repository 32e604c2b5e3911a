"""Semantic segmentation: losses, metrics (parity with torchmetrics), mask files, networks,
learning, sliding-window inference, CLI end to end and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.data.segmentation import (
    SegmentationDataset,
    SegRecord,
    collate_segmentation,
    read_mask,
    read_mask_folders,
    shapes_segmentation,
    write_mask,
)
from cnnkit.errors import DataError
from cnnkit.models.segmentation import build_segmenter
from cnnkit.tasks.segment.task import SegmentTask, focal_loss, metrics_from_confusion, soft_dice_loss


# ---- losses --------------------------------------------------------------------------------
def test_soft_dice_matches_its_formula_and_skips_ignored_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 5)
    target = torch.randint(0, 3, (2, 5, 5))
    p = logits.softmax(1)
    g = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    inter, denom = (p * g).sum((0, 2, 3)), p.sum((0, 2, 3)) + g.sum((0, 2, 3))
    expected = 1 - ((2 * inter + 1) / (denom + 1)).mean()
    assert torch.allclose(soft_dice_loss(logits, target), expected, atol=1e-6)
    # ignored pixels: whatever the logits say there, the loss does not move
    target2 = target.clone()
    target2[:, :2] = 255
    other = logits.clone()
    other[:, :, :2] = torch.randn(2, 3, 2, 5) * 10
    assert torch.allclose(soft_dice_loss(logits, target2), soft_dice_loss(other, target2), atol=1e-6)
    assert torch.allclose(focal_loss(logits, target2), focal_loss(other, target2), atol=1e-6)
    # a confident right answer scores near zero
    perfect = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50
    assert soft_dice_loss(perfect, target) < 0.02


def test_focal_with_gamma_zero_is_cross_entropy():
    torch.manual_seed(1)
    logits, target = torch.randn(2, 4, 6, 6), torch.randint(0, 4, (2, 6, 6))
    target[0, 0] = 255
    ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(focal_loss(logits, target, gamma=0.0), ce, atol=1e-6)


def test_task_loss_combines_parts_and_uses_class_weights():
    torch.manual_seed(2)
    logits, target = torch.randn(2, 3, 8, 8, requires_grad=True), torch.randint(0, 3, (2, 8, 8))
    out = SegmentTask(["bg", "a", "b"], "ce+dice").loss(logits, {"masks": target})
    assert torch.allclose(out["loss"], out["ce"] + out["dice"])
    out["loss"].backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    w = torch.tensor([0.1, 1.0, 5.0])
    weighted = SegmentTask(["bg", "a", "b"], "ce", w).loss(logits, {"masks": target})["loss"]
    ref = torch.nn.functional.cross_entropy(logits, target, weight=w)
    assert torch.allclose(weighted, ref)


# ---- metrics -------------------------------------------------------------------------------
def test_metrics_equal_torchmetrics():
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassF1Score,
        MulticlassJaccardIndex,
    )

    torch.manual_seed(3)
    k = 4
    target = torch.randint(0, k, (3, 32, 32))
    target[:, :4] = 255
    pred = torch.where(torch.rand(3, 32, 32) < 0.7, target.clamp(max=k - 1), torch.randint(0, k, (3, 32, 32)))
    task = SegmentTask([f"c{i}" for i in range(k)])
    state = task.metrics()
    state.update(torch.nn.functional.one_hot(pred, k).permute(0, 3, 1, 2).float(), {"masks": target})
    m = state.compute()
    iou = MulticlassJaccardIndex(k, average=None, ignore_index=255)(pred, target)
    f1 = MulticlassF1Score(k, average=None, ignore_index=255, multidim_average="global")(pred, target)
    acc = MulticlassAccuracy(k, average="micro", ignore_index=255)(pred, target)
    assert np.allclose([m["per_class_iou"][f"c{i}"] for i in range(k)], iou.numpy(), atol=1e-6)
    assert m["miou"] == pytest.approx(float(iou.mean()), abs=1e-6)
    assert np.allclose([m["per_class_dice"][f"c{i}"] for i in range(k)], f1.numpy(), atol=1e-6)
    assert m["pixel_acc"] == pytest.approx(float(acc), abs=1e-6)


def test_absent_class_is_none_and_left_out_of_the_mean():
    cm = torch.tensor([[5.0, 1, 0], [2, 4, 0], [0, 0, 0]])
    m = metrics_from_confusion(cm, ["bg", "a", "never"])
    assert m["per_class_iou"]["never"] is None
    assert m["miou"] == pytest.approx((5 / 8 + 4 / 7) / 2)
    assert m["pixel_acc"] == pytest.approx(9 / 12)


# ---- mask files and datasets ---------------------------------------------------------------
def test_palette_masks_read_as_class_ids(tmp_path):
    ids = np.array([[0, 1, 2], [255, 2, 1]], np.uint8)
    write_mask(tmp_path / "p.png", ids)  # a VOC-style palette PNG
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert np.array_equal(read_mask(tmp_path / "p.png"), ids)
    write_mask(tmp_path / "l.png", ids, palette=False)
    assert np.array_equal(read_mask(tmp_path / "l.png"), ids)


@pytest.mark.parametrize("make,match", [
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: Image.new("RGB", (4, 4)).save(p), "colour image"),
    (lambda p: p.write_bytes(b"not a png at all"), "cannot be read"),
])
def test_bad_mask_files_raise_one_sentence(tmp_path, make, match):
    p = tmp_path / "m.png"
    make(p)
    with pytest.raises(DataError, match=match):
        read_mask(p)


def test_mask_size_and_class_ids_are_checked():
    img = np.zeros((8, 8, 3), np.uint8)
    ds = SegmentationDataset([SegRecord(image=img, mask=np.zeros((8, 6), np.uint8))], 8, 3)
    with pytest.raises(DataError, match="must match its image"):
        ds[0]
    ds = SegmentationDataset([SegRecord(image=img, mask=np.full((8, 8), 7, np.uint8))], 8, 3)
    with pytest.raises(DataError, match="beyond the 3 classes"):
        ds[0]
    ok = np.full((8, 8), 255, np.uint8)  # ignore is allowed
    _, (m, _) = SegmentationDataset([SegRecord(image=img, mask=ok)], 8, 3)[0]
    assert m.unique().tolist() == [255]


def test_crop_mode_pads_with_ignore_and_keeps_resolution():
    img = np.random.default_rng(0).integers(0, 255, (40, 100, 3), dtype=np.uint8)
    mask = np.ones((40, 100), np.uint8)
    x, (m, meta) = SegmentationDataset([SegRecord(image=img, mask=mask)], 64, 2, mode="crop")[0]
    assert x.shape == (3, 64, 64) and m.shape == (64, 64)
    assert (m[40:] == 255).all() and (m[:40] == 1).all()  # padded rows are ignored, no rescaling
    assert meta["orig_size"] == (40, 100)


def test_mask_folders_round_trip(seg_data):
    data = read_mask_folders(seg_data)
    again = shapes_segmentation(64, {"train": 24, "val": 8}, num_classes=2, max_objects=2)
    assert data.names == again.names == ["background", "circle", "ring"]
    for a, b in zip(data.split("val"), again.split("val")):
        assert np.array_equal(a.load_mask().numpy(), b.mask)


def test_dotted_file_names_find_their_own_masks(tmp_path):
    for name, value in (("scan.001", 1), ("scan.002", 2)):
        for sub in ("images", "masks"):
            (tmp_path / sub / "train").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "train" / f"{name}.jpg")
        write_mask(tmp_path / "masks" / "train" / f"{name}.png", np.full((8, 8), value, np.uint8))
    (tmp_path / "d.yaml").write_text("train: images/train\nnames: [background, a, b]\n")
    recs = read_mask_folders(tmp_path / "d.yaml").split("train")
    assert [int(r.load_mask().max()) for r in recs] == [1, 2]


def test_mask_folder_yaml_errors(tmp_path, seg_data):
    with pytest.raises(DataError, match="does not exist"):
        read_mask_folders(tmp_path / "nope.yaml")
    (tmp_path / "a.yaml").write_text("train: images/train\nval: images/val\n")
    with pytest.raises(DataError, match="class names"):
        read_mask_folders(tmp_path / "a.yaml")
    root = seg_data.parent
    victim = min((root / "masks" / "val").iterdir())
    saved = victim.read_bytes()
    victim.unlink()
    try:
        with pytest.raises(DataError, match="has no mask"):
            read_mask_folders(seg_data)
    finally:
        victim.write_bytes(saved)


# ---- networks ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,encoder", [("unet", "smallcnn"), ("unet", "resnet18"), ("fcn", "resnet18"),
                                          ("deeplabv3", "resnet18"), ("unet", "mobilenet_v3_small"),
                                          ("fcn", "smallcnn")])
def test_networks_give_full_size_scores_and_gradients(arch, encoder):
    m = build_segmenter(arch, 3, 3, encoder)
    x = torch.rand(2, 3, 64, 96)
    y = m(x)
    assert y.shape == (2, 3, 64, 96)
    y.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.encoder.parameters())


def test_unet_decoder_starts_where_smp_starts_it():
    """The U-Net's decoder convolutions are Kaiming-uniform for ReLU (std sqrt(2 / fan_in)),
    its score head Xavier-uniform, as in segmentation_models_pytorch; PyTorch's default would
    be sqrt(6) times narrower. The encoder keeps its own (timm's) initialization."""
    import math

    torch.manual_seed(0)
    m = build_segmenter("unet", 5, 3, "resnet18")
    convs = [c for c in m.blocks.modules() if isinstance(c, torch.nn.Conv2d)]
    assert len(convs) == 10
    for c in convs:
        fan_in = c.weight[0].numel()
        assert abs(float(c.weight.std()) / math.sqrt(2 / fan_in) - 1) < 0.05
    w = m.head.weight
    fan_in, fan_out = w[0].numel(), w.shape[0] * w[0, 0].numel()
    assert abs(float(w.std()) / math.sqrt(2 / (fan_in + fan_out)) - 1) < 0.1
    assert not m.head.bias.any()
    stem = m.encoder.features.body.conv1.weight  # timm's ResNet: Kaiming-normal, fan_out
    fan_out = stem.shape[0] * stem[0, 0].numel()
    assert abs(float(stem.std()) / math.sqrt(2 / fan_out) - 1) < 0.1


def test_unknown_model_suggests():
    from cnnkit.errors import ModelError

    with pytest.raises(ModelError, match="did you mean 'unet'"):
        build_segmenter("unte", 3)


@pytest.mark.slow
def test_unet_learns_a_few_scenes():
    """Targets, loss and decoding agree: a small U-Net fits 8 scenes to mIoU > 0.8."""
    torch.manual_seed(0)
    data = shapes_segmentation(64, {"train": 8}, num_classes=2, max_objects=2)
    ds = SegmentationDataset(data.split("train"), 64, 3)
    task = SegmentTask(data.names)
    batch = task.to_device(collate_segmentation([ds[i] for i in range(8)]), torch.device("cpu"))
    model = build_segmenter("unet", 3, 3, "smallcnn")
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    for _ in range(120):
        model.train()
        loss = task.loss(model(batch["images"]), batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    state = task.metrics()
    with torch.no_grad():
        state.update(model(batch["images"]), batch)
    assert state.compute()["miou"] > 0.8


# ---- CLI and API ---------------------------------------------------------------------------
def test_train_writes_run_and_metrics(seg_run):
    res = json.loads((seg_run / "results.json").read_text())
    assert {"miou", "dice", "pixel_acc", "per_class_iou", "best_epoch"} <= set(res)
    assert set(res["per_class_iou"]) == {"background", "circle", "ring"}
    card = json.loads((seg_run / "weights" / "best.json").read_text())
    assert card["task"] == "segment" and card["classes"] == ["background", "circle", "ring"]
    assert (seg_run / "plots" / "val_predictions.png").is_file()
    import csv

    rows = list(csv.DictReader((seg_run / "metrics.csv").open()))
    assert len(rows) == 2 and all(0 < float(r["val_loss"]) < 10 for r in rows)  # CE + Dice on val


def test_val_and_predict_cli(seg_run, seg_data, tmp_path, cli):
    res = cli("segment", "val", "--weights", seg_run, "--data", seg_data, "--json", tmp_path / "m.json")
    assert res.code == 0, res.err
    m = json.loads((tmp_path / "m.json").read_text())
    trained = json.loads((seg_run / "results.json").read_text())
    assert m["miou"] == pytest.approx(trained["miou"], abs=1e-6)  # same weights, same data, same numbers
    src = seg_data.parent / "images" / "val"
    res = cli("segment", "predict", "--weights", seg_run, "--source", src, "--save-dir", tmp_path / "out",
              "--json", tmp_path / "p.json")
    assert res.code == 0, res.err
    assert "ms inference" in res.out
    rows = json.loads((tmp_path / "p.json").read_text())
    assert len(rows) == 8 and {"path", "width", "height", "classes", "mask"} <= set(rows[0])
    mask = read_mask(rows[0]["mask"])
    assert mask.shape == (rows[0]["height"], rows[0]["width"]) and mask.max() <= 2
    assert (tmp_path / "out" / (src.glob("*.png").__next__().stem + "_overlay.png")).is_file()


def test_val_skips_and_reports_an_unreadable_image(seg_run, seg_data, tmp_path, cli):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(seg_data.parent, bad)
    victim = min((bad / "images" / "val").iterdir())
    victim.write_bytes(b"not an image")
    res = cli("segment", "val", "--weights", seg_run, "--data", bad / "data.yaml", "--json", tmp_path / "m.json")
    assert res.code == 0, res.err
    assert "skipped" in res.out
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["num_images"] == 7 and m["skipped_images"][0]["path"].endswith(victim.name)


def test_python_api_returns_masks(seg_run, seg_data):
    import cnnkit

    model = cnnkit.load(seg_run)
    img = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    (r,) = model.predict(img)
    assert r.mask.shape == (50, 70) and r.mask.dtype == torch.uint8
    # one window that covers the image gives the same scores as the plain forward pass
    x = torch.from_numpy(np.ascontiguousarray(img[:64, :64].transpose(2, 0, 1))).clone()
    x = torch.nn.functional.pad(x, (0, 0, 0, 14))[:, :64, :64]
    from cnnkit.tasks.segment.spec import scores

    tiled, plain = cnnkit.load(seg_run, tile=True), cnnkit.load(seg_run, tile=False)
    assert torch.allclose(scores(tiled, x), scores(plain, x), atol=1e-4)
    # a large image is tiled at full resolution and comes back at its own size
    big = torch.randint(0, 255, (3, 150, 230), dtype=torch.uint8)
    assert scores(tiled, big).shape == (3, 150, 230)


def test_scenes_sets_the_train_split_only():
    from cnnkit.tasks.segment.spec import load_data as _data

    data = _data("shapes", 0, 32, classes=2, max_objects=2, scenes=3)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 3, "val": 150, "test": 150}
    # val and test scenes are seeded per index, so more training scenes never change them
    plain = shapes_segmentation(32, {"train": 5, "val": 2}, num_classes=2, max_objects=2)
    for a, b in zip(data.splits["val"][:2], plain.splits["val"], strict=True):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    for a, b in zip(data.splits["train"], plain.splits["train"][:3], strict=True):
        assert np.array_equal(a.mask, b.mask)


def test_bad_input_exits_2_with_one_sentence(seg_data, tmp_path, cli):
    res = cli("segment", "train", "--data", tmp_path / "missing.yaml", "--epochs", "1")
    assert res.code == 2 and res.err.count("\n") == 1
    res = cli("segment", "train", "--imgsz", "100", "--epochs", "1")
    assert res.code == 2 and "multiple of 32" in res.err
    res = cli("segment", "train", "--scenes", "0", "--epochs", "1")
    assert res.code == 2 and "--scenes must be at least 1" in res.err
    # a mask whose size differs from its image stops training with one sentence
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(seg_data.parent, bad)
    victim = min((bad / "masks" / "train").iterdir())
    write_mask(victim, np.zeros((10, 10), np.uint8))
    res = cli("segment", "train", "--data", bad / "data.yaml", "--imgsz", "64", "--epochs", "1", "--out",
              tmp_path / "r")
    assert res.code == 2 and "must match its image" in res.err and res.err.count("\n") == 1
    res = cli("segment", "train", "--data", "shapes", "--aug", "occlude=0.5", "--epochs", "1")
    assert res.code == 2 and "detection" in res.err
