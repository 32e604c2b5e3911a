"""Explanations (`cnnkit TASK explain`): the maps' formulas, their shape and target dependence,
whether they point at the object on a trained model, every task, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_classifier

from cnnkit.methods import explain as E


@pytest.fixture(scope="module")
def tiny():
    """A freshly initialized smallcnn (width 8, 4 classes, 32 px): pipeline, model, core, input."""
    return tiny_classifier(32, 1)


def _activation(layer, core, x):
    out = {}
    h = layer.register_forward_hook(lambda m, i, o: out.__setitem__("a", o.detach()))
    with torch.no_grad():
        core(x)
    h.remove()
    return out["a"][0]


def _reference(m: torch.Tensor, size) -> torch.Tensor:
    m = m.clamp(min=0)
    m = m - m.min()
    m = m / (1e-7 + m.max())
    m = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    m = m - m.min()
    return m / (1e-7 + m.max())


def test_gradcam_is_cam_before_global_average_pooling(tiny):
    """smallcnn's last stage feeds a global average pool and a linear layer, so Grad-CAM's
    channel weights are the class's linear weights over h*w and the map is CAM (Zhou et al.,
    2016) computed from the weights alone."""
    pipe, model, core, x = tiny
    layer = model.stages[3]
    for cls in range(4):
        got = E.cam("gradcam", E.score_fn(pipe, core, cls), layer, x)[0]
        a = _activation(layer, core, x)
        want = _reference(torch.einsum("c,chw->hw", model.fc.weight[cls].detach(), a) / a[0].numel(), (32, 32))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_gradcam_plus_plus_matches_its_closed_form(tiny):
    """Grad-CAM++'s weights written out in NumPy from the paper's closed form (eq. 19 with an
    exponential score, as pytorch-grad-cam computes them)."""
    pipe, model, core, x = tiny
    layer = model.stages[2]
    a = _activation(layer, core, x)
    xg = x.clone()
    acts = {}
    h = layer.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    logit = core(xg)[0, 1]
    g = torch.autograd.grad(logit, acts["a"])[0][0].numpy()
    h.remove()
    an = a.numpy()
    g2, g3 = g ** 2, g ** 3
    alpha = g2 / (2 * g2 + an.sum((1, 2))[:, None, None] * g3 + 1e-6)
    alpha = np.where(g != 0, alpha, 0)
    w = (np.maximum(g, 0) * alpha).sum((1, 2))
    want = _reference(torch.from_numpy((w[:, None, None] * an).sum(0)), (32, 32))
    got = E.cam("gradcam++", E.score_fn(pipe, core, 1), layer, x)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", E.METHODS)
def test_every_method_gives_an_input_sized_map_that_follows_the_target(tiny, method):
    pipe, model, core, x = tiny
    layer = model.stages[3]
    maps = [E.explain_one(method, pipe, core, layer, x[0], cls) for cls in (0, 3)]
    for m in maps:
        assert m.shape == (32, 32)
        assert torch.isfinite(m).all() and m.min() >= 0 and m.max() <= 1 + 1e-6
        assert m.max() > 0.99  # scaled to [0, 1]
    if method == "eigencam":  # the principal component of the activations: the same for every target
        torch.testing.assert_close(maps[0], maps[1])
    else:
        assert (maps[0] - maps[1]).abs().max() > 1e-3


def test_faithfulness_scores_by_hand():
    m = np.zeros((4, 4), np.float32)
    m[0, 0], m[3, 3] = 3.0, 1.0
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    assert E.energy_in_mask(m, mask) == pytest.approx(0.75)
    assert E.pointing_hit(m, mask) and not E.pointing_hit(m, ~mask)
    x = torch.ones(1, 2, 2)
    # the probability is the mean pixel: deleting the top pixel first in 4 steps gives 1, .75, .5, .25, 0
    d, i = E.deletion_insertion(lambda b: b.flatten(1).mean(1), x, torch.tensor([[4.0, 3], [2, 1]]), steps=4)
    assert d == pytest.approx(0.5)
    assert 0 < i <= 1


@pytest.fixture(scope="session")
def shapes_classifier(tmp_path_factory):
    """smallcnn trained 4 epochs on the built-in shapes (64 px)."""
    import cnnkit

    out = tmp_path_factory.mktemp("explain") / "shapes"
    cnnkit.train("classify", data="shapes", epochs=4, out=str(out), verbose=False)
    return out


def test_gradcam_points_at_the_shape_on_a_trained_classifier(shapes_classifier, tmp_path, cli):
    """Acceptance: energy inside the shape's pixels above a random map's, on shapes' val split."""
    js = tmp_path / "explain.json"
    r = cli("classify", "explain", "--weights", str(shapes_classifier), "--data", "shapes", "--limit", "24",
            "--method", "gradcam,occlusion", "--eval", "--out", str(tmp_path / "maps"), "--json", str(js))
    assert r.code == 0, r.err
    assert "energy in mask" in r.out.replace("\n", " ") or "energy" in r.out
    s = json.loads(js.read_text())["summary"]
    assert s["gradcam"]["maps"] == 24
    assert s["gradcam"]["energy_in_mask"] > s["random"]["energy_in_mask"] + 0.05
    assert s["gradcam"]["pointing"] > s["random"]["pointing"]
    assert s["occlusion"]["energy_in_mask"] > s["random"]["energy_in_mask"]
    npy = np.load(tmp_path / "maps" / "val_0000.gradcam.npy")
    assert npy.shape == (64, 64) and npy.max() <= 1 + 1e-6
    from PIL import Image

    assert Image.open(tmp_path / "maps" / "val_0000.gradcam.png").size == (64, 64)


def test_explain_classifier_source_and_target(digits_run, tmp_path, cli):
    """--source images at their own size; --target by name changes the map."""
    from PIL import Image

    import cnnkit
    from cnnkit.data.digits import DigitsDataset

    img = tmp_path / "in" / "d.png"
    img.parent.mkdir()
    digit = DigitsDataset("val")[0][0][0].numpy()  # 8 x 8, stretched to 20 x 28 to test the size
    Image.fromarray(digit).resize((28, 20), Image.BILINEAR).save(img)
    top2 = cnnkit.load(digits_run)(img)[0].to_dict()["topk"][:2]  # evidence for both (Grad-CAM keeps positive)
    maps = []
    for target in (top2[0][0], top2[1][0]):
        out = tmp_path / f"out{target}"
        r = cli("classify", "explain", "--weights", str(digits_run), "--source", str(img.parent), "--target", target,
                "--method", "gradcam", "--out", str(out))
        assert r.code == 0, r.err
        maps.append(np.load(out / "d.gradcam.npy"))
    assert maps[0].shape == (20, 28)
    assert maps[0].max() > 0.5 and np.abs(maps[0] - maps[1]).max() > 1e-3


def test_gradcam_points_at_detected_objects(fitted_detector, tmp_path):
    """Each ground-truth object's matching detection is explained on the neck level of its
    stride; Grad-CAM's energy falls inside the box far more than a random map's."""
    import cnnkit

    run, data = fitted_detector
    det = cnnkit.explain("detect", run, data=str(data), limit=10, method="gradcam,saliency", eval=True,
                         out=str(tmp_path / "det"), verbose=False)
    s = det["summary"]
    assert s["gradcam"]["maps"] >= 10 and set(det["layer"].split(", ")) <= {"td3", "bu4", "bu5"}
    assert s["gradcam"]["energy_in_mask"] > 2 * s["random"]["energy_in_mask"]
    assert s["gradcam"]["pointing"] > s["random"]["pointing"] + 0.3
    assert s["saliency"]["energy_in_mask"] > 2 * s["random"]["energy_in_mask"]
    assert s["gradcam"]["deletion_auc"] < s["random"]["deletion_auc"]


def test_explain_segmenter_and_multilabel(seg_run, seg_data, multilabel_run, tmp_path):
    """Every image task explains through the same command; segmenters are scored against their
    masks."""
    import cnnkit

    seg = cnnkit.explain("segment", seg_run, data=str(seg_data), limit=4, method="gradcam,ig", eval=True,
                         out=str(tmp_path / "seg"), verbose=False)
    assert seg["summary"]["gradcam"]["maps"] >= 4 and "energy_in_mask" in seg["summary"]["ig"]
    first = next(r for r in seg["rows"] if r.get("png"))
    assert np.load(first["png"][:-4] + ".npy").shape == (64, 64)
    ml = cnnkit.explain("multilabel", multilabel_run, data=str(multilabel_run.parent / "data"), limit=3,
                        method="eigencam", out=str(tmp_path / "ml"), verbose=False)
    assert len([r for r in ml["rows"] if r.get("png")]) == 3


def test_explain_detection_by_index(fitted_detector, tiny_yolo, tmp_path, cli):
    """A detection's map at the image's size, a different map per detection; an index beyond
    the detections is one sentence, exit 2."""
    from PIL import Image

    import cnnkit

    run, _ = fitted_detector
    src = min((tiny_yolo.parent / "images" / "train").glob("*.png"))
    n = len(cnnkit.load(run)(src, conf=0.25)[0].to_dict()["detections"])
    assert n >= 1
    r = cli("detect", "explain", "--weights", str(run), "--source", str(src), "--target", str(n),
            "--out", str(tmp_path / "d"))
    assert r.code == 2 and "--target" in r.err and "Traceback" not in r.err
    r = cli("detect", "explain", "--weights", str(run), "--source", str(src), "--out", str(tmp_path / "d"))
    assert r.code == 0, r.err
    m = np.load(tmp_path / "d" / f"{src.stem}.gradcam.npy")
    assert m.shape[::-1] == Image.open(src).size and m.max() > 0.5


@pytest.mark.parametrize("args, words", [
    (["--method", "lime"], "--method must be one of"),
    (["--layer", "stages.9"], "is not a layer of this model"),
    (["--target", "zebra"], "is not a class of this model"),
    (["--eval"], "give --source"),
])
def test_explain_bad_input(digits_run, tmp_path, cli, args, words):
    from PIL import Image

    img = tmp_path / "d.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(img)
    src = [] if args == ["--eval"] else ["--source", str(img)]
    r = cli("classify", "explain", "--weights", str(digits_run), *src, *args, "--out", str(tmp_path / "o"))
    assert r.code == 2, r.out + r.err
    assert words in r.err and "Traceback" not in r.err
    if "layer" in args:
        assert "stages.3" in r.err  # the valid names are listed


def test_pixel_methods_alone_need_no_layer(digits_run, tmp_path):
    """Only saliency and integrated gradients: no CAM layer is resolved or reported."""
    import cnnkit

    r = cnnkit.explain("classify", digits_run, str(_digit_png(tmp_path)),
                       method="saliency,ig", out=str(tmp_path / "o"), verbose=False)
    assert r["layer"] is None and len([row for row in r["rows"] if row.get("png")]) == 2


def _digit_png(tmp_path):
    from PIL import Image

    from cnnkit.data.digits import DigitsDataset

    path = tmp_path / "digit.png"
    Image.fromarray(DigitsDataset("val")[0][0][0].numpy()).save(path)
    return path


def test_explain_refuses_an_exported_model(digits_run, tmp_path, cli):
    import cnnkit

    onnx = cnnkit.export(digits_run, "onnx", out=str(tmp_path / "m.onnx"), verbose=False)["file"]
    r = cli("classify", "explain", "--weights", onnx, "--source", str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.code == 2 and "needs the PyTorch model" in r.err


# ---- volumes (cnnkit medical explain) ---------------------------------------------------------
def test_gradcam_on_a_volume_is_the_3d_formula():
    """On a 3-D network, Grad-CAM is the ReLU of the activations weighted by their mean
    gradients, min-max scaled, resized trilinearly to the volume and scaled again."""
    torch.manual_seed(0)
    stem = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(4, 5, 3, stride=2, padding=1))
    w = torch.randn(5)
    x = torch.randn(1, 1, 8, 8, 8)

    def f(v):
        return stem(v).mean((2, 3, 4)) @ w

    m = E.cam("gradcam", f, stem[2], x)[0]
    with torch.no_grad():
        a = stem(x)[0]
    ref = (w.view(5, 1, 1, 1) / a[0].numel() * a).sum(0).clamp(min=0)  # d score / d a = w / N at every voxel
    ref = (ref - ref.min()) / (1e-7 + (ref - ref.min()).max())
    ref = F.interpolate(ref[None, None], size=(8, 8, 8), mode="trilinear", align_corners=False)[0, 0]
    ref = (ref - ref.min()) / (1e-7 + (ref - ref.min()).max())
    assert m.shape == (8, 8, 8)
    torch.testing.assert_close(m, ref, atol=1e-5, rtol=1e-4)


def test_deletion_on_a_volume_by_hand():
    x = torch.ones(1, 2, 2, 2)
    ranks = torch.arange(8.0, 0, -1).view(2, 2, 2)  # the top voxel first
    # the probability is the mean voxel: 2 voxels deleted per step gives 1, .75, .5, .25, 0
    d, i = E.deletion_insertion(lambda b: b.flatten(1).mean(1), x, ranks, steps=4)
    assert d == pytest.approx(0.5)
    assert i == pytest.approx(1.0)  # inserted onto a blurred copy of a constant volume: the constant
    v = torch.rand(2, 9, 9, 9)
    blurred = E._blur(v)
    assert blurred.shape == v.shape and blurred.std() < 0.5 * v.std()
    torch.testing.assert_close(blurred.mean(), v.mean(), atol=0.02, rtol=0)


def test_medical_explain_segmenter_and_classifier(medical_run, medical_classifier_run, tmp_path, cli):
    """Maps over whole volumes for a 3-D segmenter (against the label volume's classes) and a
    3-D classifier (a NIfTI file, two targets), with the three orthogonal slices drawn."""
    from PIL import Image

    from cnnkit.data.volumes import phantoms, write_nifti

    js = tmp_path / "seg.json"
    r = cli("medical", "explain", "--weights", str(medical_run), "--data", "phantoms", "--limit", "1", "--method",
            "gradcam,saliency", "--eval", "--out", str(tmp_path / "seg"), "--json", str(js))
    assert r.code == 0, r.err
    rows = json.loads(js.read_text())["rows"]
    scored = [row for row in rows if row["method"] == "gradcam"]
    assert scored and all("energy_in_mask" in row and 0 <= row["deletion_auc"] <= 1 for row in scored)
    side = 32  # the phantoms' side
    m = np.load(tmp_path / "seg" / "val_0000_t0.gradcam.npy")
    assert m.shape == (side,) * 3 and 0 <= m.min() and m.max() <= 1 + 1e-6 and m.max() > 0.99
    assert Image.open(tmp_path / "seg" / "val_0000_t0.gradcam.png").size == (3 * side + 8, side)

    vol = phantoms({"test": 1}).split("test")[0]
    nii = tmp_path / "case.nii.gz"
    write_nifti(nii, vol.image, np.eye(4))
    maps = []
    for target in ("0", "1"):
        r = cli("medical", "explain", "--weights", str(medical_classifier_run), "--source", str(nii), "--target",
                target, "--out", str(tmp_path / f"cls{target}"))
        assert r.code == 0, r.err
        maps.append(np.load(tmp_path / f"cls{target}" / "case.nii.gradcam.npy"))
    assert maps[0].shape == vol.image.shape and np.abs(maps[0] - maps[1]).max() > 1e-3
