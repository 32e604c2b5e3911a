"""Volumetric medical segmentation: phantoms, NIfTI files, Dice and HD95, V-Net / 3-D U-Net,
learning, and the `cnnkit medical` CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cnnkit.data.volumes import (
    VolRecord,
    VolumeDataset,
    phantom,
    phantoms,
    read_nifti,
    read_nifti_folders,
    write_nifti,
    write_nifti_folders,
)
from cnnkit.errors import DataError
from cnnkit.models.volumetric import build_volume_model
from cnnkit.tasks.medical.task import MedicalTask, VolumeMetrics


def test_phantoms_are_seeded_and_hold_every_class():
    a, b = phantom(np.random.default_rng(3)), phantom(np.random.default_rng(3))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    img, lab = a
    assert img.shape == lab.shape == (32, 32, 32) and set(np.unique(lab)) == {0, 1, 2}
    # lesions are brighter than the organ, the organ brighter than the background (before noise)
    assert img[lab == 2].mean() > img[lab == 1].mean() > img[lab == 0].mean()


def test_nifti_round_trip_and_bad_files(tmp_path):
    vol = np.random.default_rng(0).normal(size=(8, 9, 10)).astype(np.float32)
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    write_nifti(tmp_path / "v.nii.gz", vol, aff)
    back, a2 = read_nifti(tmp_path / "v.nii.gz")
    assert np.allclose(back, vol) and np.allclose(a2, aff)
    import nibabel as nib

    # a scan stored (i, j, k) with k the slice axis reads as (k, j, i): axis 0 runs across slices
    ijk = np.random.default_rng(1).normal(size=(6, 7, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(ijk, np.eye(4)), str(tmp_path / "ijk.nii.gz"))
    kji, _ = read_nifti(tmp_path / "ijk.nii.gz")
    assert kji.shape == (3, 7, 6) and kji[2, 5, 4] == ijk[4, 5, 2]
    write_nifti(tmp_path / "again.nii.gz", kji)
    assert np.array_equal(np.asarray(nib.load(str(tmp_path / "again.nii.gz")).dataobj), ijk)

    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), str(tmp_path / "t.nii.gz"))
    with pytest.raises(DataError, match="4 dimensions"):
        read_nifti(tmp_path / "t.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), str(tmp_path / "s.nii.gz"))
    with pytest.raises(DataError, match="2 dimensions"):
        read_nifti(tmp_path / "s.nii.gz")
    (tmp_path / "x.nii.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot be read as NIfTI"):
        read_nifti(tmp_path / "x.nii.gz")


def test_labels_are_checked_against_image_and_classes():
    img = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(DataError, match="must match voxel for voxel"):
        VolumeDataset([VolRecord(image=img, label=np.zeros((8, 8, 7), np.uint8))], 3)[0]
    with pytest.raises(DataError, match="beyond the 3 classes"):
        VolumeDataset([VolRecord(image=img, label=np.full((8, 8, 8), 5, np.uint8))], 3)[0]


def test_patches_and_padding():
    img, lab = np.ones((10, 40, 40), np.float32), np.ones((10, 40, 40), np.uint8)
    x, y = VolumeDataset([VolRecord(image=img, label=lab)], 2, patch=16, train=True)[0]
    assert x.shape == (1, 16, 16, 16) and y.shape == (16, 16, 16)
    assert (y.sum(dim=(1, 2)) > 0).sum() == 10  # 10 real slices, the padded rest is background


def test_dice_and_hd95_by_hand():
    lab = torch.zeros(1, 20, 20, 20, dtype=torch.long)
    lab[0, 5:15, 5:15, 5:15] = 1
    pred = torch.zeros_like(lab)
    pred[0, 5:15, 5:15, 7:17] = 1  # the same cube moved 2 voxels along one axis
    m = VolumeMetrics(["background", "organ"])
    m.add_predictions(pred, lab)
    out = m.compute()
    assert out["per_class_dice"]["organ"] == pytest.approx(2 * 800 / 2000, abs=1e-6)
    # every surface voxel of the moved faces is 2 voxels from the other cube, the rest 0 -> 95th percentile 2
    assert out["per_class_hd95"]["organ"] == pytest.approx(2.0, abs=1e-6)
    assert out["hd95_undefined"] == {"organ": 0}


def test_empty_truth_counts_false_positives_and_missed_objects():
    lab = torch.zeros(3, 12, 12, 12, dtype=torch.long)
    lab[0, 2:6, 2:6, 2:6] = 1  # volume 0: a lesion the prediction misses
    pred = torch.zeros_like(lab)
    pred[1, 3:5, 3:5, 3:5] = 1  # volume 1: a false positive on a lesion-free volume; volume 2: both empty
    m = VolumeMetrics(["background", "lesion"])
    m.add_predictions(pred, lab)
    out = m.compute()
    assert out["per_class_dice"]["lesion"] == pytest.approx(1 / 3)  # 0 (missed), 0 (false positive), 1 (agree)
    assert out["hd95_undefined"] == {"lesion": 2} and out["per_class_hd95"]["lesion"] is None


@pytest.mark.parametrize("arch", ["vnet", "unet3d", "unet2d"])
def test_volume_models_shapes_and_gradients(arch):
    m = build_volume_model(arch, 3)
    x = torch.randn(1, 1, 32, 32, 32)
    y = m(x)
    assert y.shape == (1, 3, 32, 32, 32)
    MedicalTask(["a", "b", "c"]).loss(y, {"masks": torch.randint(0, 3, (1, 32, 32, 32))})["loss"].backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_slice_wise_models_apply_the_2d_net_to_every_slice():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 3, 32, 32)
    seg = build_volume_model("unet2d", 3).eval()
    cls = build_volume_model("densenet2d", 2).eval()
    with torch.no_grad():
        y = seg(x)
        assert y.shape == (2, 3, 3, 32, 32)
        assert torch.allclose(y[1, :, 2], seg.net(x[1:2, :, 2])[0], atol=1e-5)
        v = cls(x)
        per_slice = cls.net(x[0].transpose(0, 1)).log_softmax(1)  # (3 slices, 2)
        assert v.shape == (2, 2) and torch.allclose(v[0], per_slice.mean(0), atol=1e-5)
        assert build_volume_model("densenet3d", 2).eval()(torch.randn(2, 1, 32, 32, 32)).shape == (2, 2)


def test_phantom_classes_follow_the_lesion_voxels():
    from cnnkit.data.volumes import phantom_classes

    data = phantom_classes({"train": 12, "val": 6})
    assert data.names == ["no lesion", "lesion"]
    for recs in data.splits.values():
        assert [r.target for r in recs] == [int((r.label == 2).any()) for r in recs]
    assert 0 < sum(r.target for r in data.split("train")) < 12
    assert all((r.label == 2).any() for r in phantoms({"val": 6}).split("val"))  # segmentation data unchanged
    ds = VolumeDataset(data.split("val"), 2, patch=16, classify=True)
    x, t = ds[0]
    assert x.shape == (1, 16, 16, 16) and t == data.split("val")[0].target


def test_class_folders_are_read_and_checked(tmp_path):
    from cnnkit.data.volumes import read_nifti_class_folders

    for split, cls, n in (("train", "normal", 2), ("train", "tumour", 1), ("val", "tumour", 1)):
        for i in range(n):
            write_nifti(tmp_path / split / cls / f"{i}.nii.gz", np.zeros((4, 4, 4), np.float32))
    (tmp_path / "d.yaml").write_text("train: train\nval: val\n")
    data = read_nifti_class_folders(tmp_path / "d.yaml")
    assert data.names == ["normal", "tumour"] and [r.target for r in data.split("train")] == [0, 0, 1]
    assert [r.target for r in data.split("val")] == [1]
    (tmp_path / "e.yaml").write_text("train: train\nnames: [normal]\n")
    with pytest.raises(DataError, match="is not one of the names"):
        read_nifti_class_folders(tmp_path / "e.yaml")
    (tmp_path / "train" / "cyst").mkdir()
    with pytest.raises(DataError, match="has no .nii"):
        read_nifti_class_folders(tmp_path / "d.yaml")
    (tmp_path / "f.yaml").write_text("train: {images: a, labels: b}\n")
    with pytest.raises(DataError, match="one subfolder of volumes per class"):
        read_nifti_class_folders(tmp_path / "f.yaml")


@pytest.mark.slow
def test_unet3d_learns_phantoms():
    """Loss, targets and decoding agree: a 3-D U-Net fits 6 phantoms to foreground Dice > 0.8."""
    torch.manual_seed(0)
    data = phantoms({"train": 6})
    ds = VolumeDataset(data.split("train"), 3)
    task = MedicalTask(data.names)
    batch = task.collate([ds[i] for i in range(6)])
    model = build_volume_model("unet3d", 3)
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    for _ in range(80):
        model.train()
        loss = task.loss(model(batch["images"]), batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    state = task.metrics()
    with torch.no_grad():
        state.update(model(batch["images"]), batch)
    assert state.compute()["dice"] > 0.8


def test_medical_cli(medical_run, tmp_path, cli):
    res = json.loads((medical_run / "results.json").read_text())
    assert {"dice", "per_class_dice", "hd95", "per_class_hd95"} <= set(res)
    data = phantoms({"val": 2, "test": 1})
    yaml_path = write_nifti_folders(data, tmp_path / "nii")
    assert read_nifti_folders(yaml_path).names == ["background", "organ", "lesion"]
    r = cli("medical", "val", "--weights", medical_run, "--data", yaml_path, "--json", tmp_path / "m.json")
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "m.json").read_text())["num_volumes"] == 2
    # a volume of another size goes through the sliding window and keeps its size and affine
    vol = np.random.default_rng(0).normal(size=(20, 45, 37)).astype(np.float32)
    write_nifti(tmp_path / "in" / "odd.nii.gz", vol, np.diag([1.5, 1.5, 2.0, 1.0]))
    r = cli("medical", "predict", "--weights", medical_run, "--source", tmp_path / "in", "--save-dir", tmp_path / "out",
            "--json", tmp_path / "p.json")
    assert r.code == 0, r.err
    lab, aff = read_nifti(tmp_path / "out" / "odd.nii.gz")
    assert lab.shape == (20, 45, 37) and np.allclose(aff, np.diag([1.5, 1.5, 2.0, 1.0])) and lab.max() <= 2
    r = cli("medical", "predict", "--weights", medical_run, "--source", tmp_path / "in", "--save-dir", tmp_path / "in")
    assert r.code == 2 and "would overwrite the input" in r.err and r.err.count("\n") == 1
    assert np.array_equal(read_nifti(tmp_path / "in" / "odd.nii.gz")[0], vol)  # the scan is untouched
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), str(tmp_path / "flat.nii.gz"))
    r = cli("medical", "predict", "--weights", medical_run, "--source", tmp_path / "flat.nii.gz")
    assert r.code == 2 and "2 dimensions" in r.err and r.err.count("\n") == 1


def test_medical_classifier_cli(tmp_path, cli, monkeypatch):
    import cnnkit.data.volumes as dv

    monkeypatch.setattr(dv, "PHANTOM_SIZES", {"train": 4, "val": 4})
    r = cli("medical", "train", "--model", "densenet3d", "--epochs", "1", "--batch", "2", "--out", tmp_path / "run")
    assert r.code == 0, r.err
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {"top1", "balanced_accuracy", "macro_f1", "auroc", "confusion_matrix"} <= set(res)
    vol = np.random.default_rng(0).normal(size=(20, 45, 37)).astype(np.float32)  # any size: resized to 32^3
    write_nifti(tmp_path / "in" / "odd.nii.gz", vol)
    r = cli("medical", "predict", "--weights", tmp_path / "run", "--source", tmp_path / "in", "--json",
            tmp_path / "p.json")
    assert r.code == 0, r.err
    (row,) = json.loads((tmp_path / "p.json").read_text())
    assert row["label"] in ("no lesion", "lesion") and sum(row["probs"].values()) == pytest.approx(1, abs=1e-4)
    r = cli("medical", "train", "--model", "densenet2d", "--loss", "dice", "--out", tmp_path / "x")
    assert r.code == 2 and "--loss applies to segmenters" in r.err
    r = cli("medical", "train", "--model", "densenet3d", "--patch", "16", "--out", tmp_path / "x")
    assert r.code == 2 and "--patch must be at least 32" in r.err
