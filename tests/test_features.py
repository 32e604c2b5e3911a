"""Feature extraction and visualization: named stages, hooks, pooling, .npy output, PNGs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.methods import features as F
from cnnkit.models import create_model

SMALL_LAYERS = ["stem", "stages.0", "stages.1", "stages.2", "stages.3", "pre_logits", "logits"]
RESNET_LAYERS = ["act1", "layer1", "layer2", "layer3", "layer4", "pre_logits", "logits"]


def _save_untrained(out: Path, arch: str, in_chans: int, imgsz: int, classes=("a", "b", "c")) -> Path:
    """An untrained model saved as a cnnkit run folder (weights + model card)."""
    from cnnkit.data.transforms import Preprocess
    from cnnkit.engine.checkpoint import save_weights

    torch.manual_seed(0)
    model = create_model(arch, len(classes), in_chans)
    pre = Preprocess(imgsz, (0.5,) * in_chans, (0.25,) * in_chans, in_chans)
    card = {"task": "classify", "arch": arch, "model_kwargs": {}, "classes": list(classes),
            "num_classes": len(classes), "in_chans": in_chans, "imgsz": [imgsz, imgsz],
            "preprocess": pre.to_dict()}
    save_weights(out / "weights" / "best.safetensors", model.state_dict(), card)
    return out


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    return _save_untrained(tmp_path_factory.mktemp("small"), "smallcnn", 1, 16)


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory) -> Path:
    return _save_untrained(tmp_path_factory.mktemp("r18"), "resnet18", 3, 32)


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    """Five real digits as PNGs, two in a subfolder, plus a corrupt file (skipped in folders)."""
    from cnnkit.data.digits import digits_arrays

    root = tmp_path_factory.mktemp("samples")
    (root / "sub").mkdir()
    images, labels = digits_arrays("test")
    for i in range(5):
        folder = root / "sub" if i >= 3 else root
        Image.fromarray(images[i]).resize((32, 32), Image.NEAREST).save(folder / f"d{i}_{labels[i]}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    return root


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from more threads, and on a busy 2-core machine they spin."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_BUILT: list = []


def _models():
    """Fresh copies of an untrained smallcnn (1 channel) and resnet18 (RGB) with inputs."""
    if not _BUILT:
        torch.manual_seed(0)
        _BUILT.extend([create_model("smallcnn", 10, 1).eval(), create_model("resnet18", 10, 3).eval()])
    small, resnet = (copy.deepcopy(m) for m in _BUILT)
    gen = torch.Generator().manual_seed(1)
    return [(small, torch.randn(5, 1, 16, 16, generator=gen)),
            (resnet, torch.randn(5, 3, 32, 32, generator=gen))]


# ---- layers and extraction ---------------------------------------------------------------
def test_list_layers_smallcnn_and_resnet18():
    (small, _), (resnet, _) = _models()
    assert F.list_layers(small) == SMALL_LAYERS
    assert F.list_layers(resnet) == RESNET_LAYERS
    assert F.resolve_layer(resnet, "layer3.1.conv2") == "layer3.1.conv2"  # any module name


def test_extract_shapes_for_every_stage():
    (small, xs), (resnet, xr) = _models()
    expected = {"stem": (32, 16, 16), "stages.0": (32, 16, 16), "stages.1": (64, 8, 8),
                "stages.2": (128, 4, 4), "stages.3": (128, 4, 4)}  # pooling stops at 4 px
    for name, (c, h, w) in expected.items():
        maps = F.extract(small, xs, name, pooled=False, batch=2)
        assert maps.shape == (5, c, h, w) and maps.dtype == torch.float32
        pooled = F.extract(small, xs, name, pooled=True, batch=3)
        assert pooled.shape == (5, c)
        torch.testing.assert_close(pooled, maps.mean((2, 3)))
    for info in resnet.feature_info:  # act1 /2 ... layer4 /32
        side = 32 // info["reduction"]
        maps = F.extract(resnet, xr, info["module"], pooled=False)
        assert maps.shape == (5, info["num_chs"], side, side), info
    assert F.extract(resnet, xr, "pre_logits", pooled=False).shape == (5, 512)
    assert F.extract(small, xs, "logits").shape == (5, 10)
    assert F.layer_shapes(small, (1, 16, 16))["stages.1"] == (64, 8, 8)
    assert F.layer_shapes(resnet, (3, 32, 32))["pre_logits"] == (512,)


def test_pre_logits_and_logits_are_the_models_own():
    for model, x in _models():
        with torch.no_grad():
            feats = model.forward_features(x)
            emb = model.forward_head(feats, pre_logits=True)
            logits = model(x)
        torch.testing.assert_close(F.extract(model, x, "pre_logits", batch=2), emb)
        torch.testing.assert_close(F.extract(model, x, "logits", batch=4), logits)


def test_hook_output_equals_manual_forward():
    (small, xs), (resnet, xr) = _models()
    with torch.no_grad():
        s1 = small.stages[1](small.stages[0](small.stem(xs)))
        r2 = resnet.layer2(resnet.layer1(resnet.maxpool(resnet.act1(resnet.bn1(resnet.conv1(xr))))))
        # a BatchNorm followed by an in-place ReLU: the hook must keep the pre-ReLU values
        bn = small.stages[1][1][1](small.stages[1][1][0](small.stages[1][0](
            small.stages[0](small.stem(xs)))))
    torch.testing.assert_close(F.extract(small, xs, "stages.1", pooled=False), s1)
    torch.testing.assert_close(F.extract(resnet, xr, "layer2", pooled=False), r2)
    assert (bn < 0).any()
    got = F.capture(small, xs, ["stages.1.1.1", "stages.3", "logits"])  # the pass runs to the end
    torch.testing.assert_close(got["stages.1.1.1"], bn)


def test_hooks_are_removed_and_mode_restored():
    (small, xs), _ = _models()
    eval_out = F.extract(small, xs, "stages.2")
    small.train()
    for _ in range(3):
        torch.testing.assert_close(F.extract(small, xs, "stages.2"), eval_out)  # ran in eval mode
    assert small.training  # the caller's mode is back
    assert all(not m._forward_hooks for m in small.modules())
    with pytest.raises(Exception):
        F.extract(small, xs, "nope")
    assert all(not m._forward_hooks for m in small.modules())


def test_unknown_layer_error_names_the_closest_stage():
    from cnnkit.errors import ModelError

    (small, xs), (resnet, _) = _models()
    with pytest.raises(ModelError, match=r"unknown layer 'stage.3' in smallcnn; did you mean 'stages.3'\?"):
        F.extract(small, xs, "stage.3")
    with pytest.raises(ModelError, match=r"did you mean 'layer4'\? the stages are act1, layer1"):
        F.resolve_layer(resnet, "layer5")
    with pytest.raises(ModelError, match="unknown layer ''"):
        F.resolve_layer(small, "")  # the root module is not a layer


# ---- API and CLI ---------------------------------------------------------------------------
def _one_line_error(r) -> str:
    assert r.code == 2, (r.code, r.out, r.err)
    assert "Traceback" not in r.out + r.err
    lines = [ln for ln in r.err.strip().splitlines() if ln]
    assert len(lines) == 1, r.err
    return lines[0]


def test_cli_layer_list(cli, small_run, resnet_run):
    r = cli("classify", "features", "--weights", small_run, "--layer", "list")
    assert r.code == 0, r.err
    assert "for a 1×16×16 input" in r.out
    rows = {ln.split()[0]: ln.split()[1] for ln in r.out.splitlines() if ln.startswith("  ")}
    assert list(rows) == SMALL_LAYERS
    assert rows["stages.1"] == "64×8×8" and rows["pre_logits"] == "128" and rows["logits"] == "3"
    r = cli("classify", "features", "--weights", resnet_run, "--layer", "list")
    assert r.code == 0 and "layer4      512×1×1" in r.out and "act1        64×16×16" in r.out


def test_cli_features_writes_rows_in_paths_order(cli, small_run, samples, tmp_path):
    from cnnkit.methods.inspect import features, load, raw_transform

    out = tmp_path / "x.npy"
    r = cli("classify", "features", "--weights", small_run, "--source", samples, "--layer", "stages.2",
            "--out", out, "--batch", "2", "--device", "cpu")
    assert r.code == 0, r.err
    assert "(5, 128)" in r.out and str(out) in r.out and "broken.png" in r.out  # skipped, reported
    arr = np.load(out)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert arr.shape == (5, 128) and meta["shape"] == [5, 128] and meta["layer"] == "stages.2"
    assert meta["paths"] == sorted(meta["paths"]) and len(meta["paths"]) == 5
    assert [s["path"] for s in meta["skipped"]] == [str(samples / "broken.png")]
    model = load(small_run)
    for row, path in zip(arr, meta["paths"]):  # each row is the features of its listed image
        one = F.extract(model.model, raw_transform(model)(path)[None], "stages.2").numpy()[0]
        np.testing.assert_allclose(row, one, rtol=1e-4, atol=1e-5)
    maps = features(small_run, samples / "d0_6.png", "stages.1", pooled=False, verbose=False)
    assert maps.shape == (1, 64, 8, 8)
    np.testing.assert_allclose(features(small_run, samples / "d0_6.png", "stages.2", verbose=False)[0],
                               arr[0], rtol=1e-4, atol=1e-5)


def test_cli_feature_errors(cli, small_run, samples, tmp_path):
    err = _one_line_error(cli("classify", "features", "--weights", small_run, "--source", samples,
                              "--layer", "stage.3"))
    assert err.startswith("Error: unknown layer 'stage.3' in smallcnn; did you mean 'stages.3'?")
    err = _one_line_error(cli("classify", "features", "--weights", small_run, "--source", samples,
                              "--layer", "stages.3", "--out", tmp_path / "x.csv"))
    assert err == f"Error: --out must be a .npy file, got '{tmp_path / 'x.csv'}'"
    assert not (tmp_path / "x.csv").exists()
    err = _one_line_error(cli("classify", "features", "--weights", small_run, "--layer", "stages.3"))
    assert "--source" in err
    err = _one_line_error(cli("classify", "visualize", "--weights", small_run, "--what", "featuremaps"))
    assert err == "Error: --what featuremaps needs --source (an image file or a folder)"
    err = _one_line_error(cli("classify", "visualize", "--weights", small_run, "--what", "featuremaps",
                              "--source", samples, "--layer", "pre_logits", "--out", tmp_path / "v"))
    assert err.startswith("Error: layer 'pre_logits' gives a vector, not a feature map")


def test_visualize_filters_and_featuremaps(cli, small_run, resnet_run, samples, tmp_path):
    from cnnkit.methods.inspect import visualize

    r = cli("classify", "visualize", "--weights", resnet_run, "--what", "filters", "--out", tmp_path / "v")
    assert r.code == 0, r.err
    png = Image.open(tmp_path / "v" / "filters.png").convert("RGB")
    px = np.asarray(png).astype(int)
    assert png.width > 300 and (np.abs(px[..., 0] - px[..., 1]) > 40).mean() > 0.05  # RGB filters in colour
    [gray] = visualize(small_run, "filters", out_dir=tmp_path / "g", verbose=False)
    px = np.asarray(Image.open(gray).convert("RGB")).astype(int)
    assert (px[..., 0] == px[..., 1]).all() and px.std() > 30  # one-channel filters in grey, not blank

    r = cli("classify", "visualize", "--weights", small_run, "--what", "featuremaps", "--source",
            samples / "sub", "--topk", "4", "--out", tmp_path / "fm")
    assert r.code == 0, r.err
    names = sorted(p.name for p in (tmp_path / "fm").glob("*.png"))
    assert names == ["featuremaps_d3_8.png", "featuremaps_d4_9.png"]  # one per image of the folder
    one = Image.open(tmp_path / "fm" / names[0])
    assert one.width > 400 and one.height > 500  # 4 + 1 columns, input row + 5 stage rows
    paths = visualize(resnet_run, "featuremaps", samples / "d0_6.png", tmp_path / "fm2",
                      layers=["layer1", "layer3"], topk=4, verbose=False)
    assert [p.name for p in paths] == ["featuremaps_d0_6.png"] and paths[0].stat().st_size > 5000
    assert Image.open(paths[0]).height < one.height  # two stage rows, not five


def test_top_channels_and_filter_normalization():
    fmap = torch.zeros(5, 3, 3)
    fmap[3] += 2.0
    fmap[1] += 1.0
    fmap[4, 0, 0] = 0.5
    assert F.top_channels(fmap, 3) == [3, 1, 4]
    w = torch.randn(4, 3, 5, 5) * 7 + 3
    w[2] = 1.0  # a constant filter becomes mid grey, not NaN
    imgs = F.filter_images(w)
    assert imgs[0].shape == (5, 5, 3) and imgs[0].min() == 0 and imgs[0].max() == 1
    assert np.all(imgs[2] == 0.5)
    gray = F.filter_images(torch.randn(2, 1, 3, 3))
    assert gray[0].shape == (3, 3) and gray[0].min() == 0 and gray[0].max() == 1
