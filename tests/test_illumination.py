"""`--illumination`: lighting normalized inside classifiers, segmenters and fastdet, recorded in
the card, the same at training and inference, exported with the model."""

from __future__ import annotations

import json

import pytest
import torch

from cnnkit.data.illumination import ILLUMINATION, illuminate


def test_standardize_undoes_brightness_and_contrast():
    x = torch.rand(2, 3, 24, 32, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.2
    y = illuminate(x, "standardize")
    assert torch.allclose(illuminate(0.4 * x + 0.1, "standardize"), y, atol=1e-5)
    assert torch.allclose(y.mean((1, 2, 3)), torch.full((2,), 0.5), atol=1e-5)
    assert torch.allclose(y.flatten(1).std(1, unbiased=False), torch.full((2,), 0.25), atol=1e-5)
    assert not torch.allclose(illuminate(x ** 2, "standardize"), y, atol=1e-2)  # not a tone-curve fix


def test_grayworld_undoes_a_colour_cast():
    """A cast (per-channel gains) changes the result only by one overall factor; the channels'
    means come out equal."""
    x = torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(1)) * 0.5
    cast = x * torch.tensor([1.0, 0.7, 0.4]).view(1, 3, 1, 1)
    a, b = illuminate(x, "grayworld"), illuminate(cast, "grayworld")
    ratio = b / a
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), atol=1e-4)
    means = b.mean((2, 3))[0]
    assert torch.allclose(means, means.mean().expand(3), atol=1e-5)


def test_equalize_undoes_a_monotone_tone_curve():
    """On a grey image of eight levels, gamma 2.2 (or any increasing curve) keeps the levels
    apart and in order, so the equalized image is the same; hue is kept on a colour image."""
    g = torch.Generator().manual_seed(2)
    levels = torch.randint(0, 8, (1, 1, 30, 30), generator=g).float() / 7
    grey = levels.expand(1, 3, 30, 30)
    assert torch.allclose(illuminate(grey ** 2.2, "equalize"), illuminate(grey, "equalize"), atol=1e-6)
    colour = torch.rand(1, 3, 16, 16, generator=g) * 0.8 + 0.1
    out = illuminate(colour, "equalize")
    kept = out.amax(1, keepdim=True) < 0.999  # where no channel was clipped at 1
    chroma_out, chroma_in = out / out.sum(1, keepdim=True), colour / colour.sum(1, keepdim=True)
    assert kept.float().mean() > 0.3
    assert torch.allclose(chroma_out[kept.expand_as(out)], chroma_in[kept.expand_as(out)], atol=1e-4)


@pytest.mark.parametrize("mode", ILLUMINATION)
def test_a_single_image_is_a_batch_of_one(mode):
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(illuminate(x[1], mode), illuminate(x, mode)[1])


def test_training_records_it_and_inference_and_export_apply_it(tmp_path, cli):
    """A digits model trained with --illumination standardize: the card says so, the core
    applies it (darkened images get the same answers, which a model without it does not
    promise), val after loading matches training's val, and the ONNX file answers the same;
    equalize (a histogram inside the graph) exports too."""
    import cnnkit
    from cnnkit.data.digits import digits_arrays

    out = tmp_path / "run"
    res = cnnkit.train("classify", data="digits", epochs=1, illumination="standardize", out=str(out), verbose=False)
    card = json.loads((out / "weights" / "best.json").read_text())
    assert card["input"]["illumination"] == "standardize"
    model = cnnkit.load(out)
    images = [a for a in digits_arrays("test")[0][:16]]
    darker = [(a.astype("float32") * 0.5).round().astype("uint8") for a in images]
    scores = torch.tensor([p.score for p in model(images)])
    assert [p.label for p in model(images)] == [p.label for p in model(darker)]
    assert torch.allclose(torch.tensor([p.score for p in model(darker)]), scores, atol=0.02)
    val = cnnkit.val("classify", out, "digits", verbose=False)
    assert abs(val["top1"] - res.metrics["top1"]) < 1e-9
    onnx = cnnkit.export(out, "onnx", out=str(tmp_path / "m.onnx"), verbose=False)
    assert onnx["max_abs_diff"] < 1e-3
    assert [p.label for p in cnnkit.load(onnx["file"])(images)] == [p.label for p in model(images)]
    eq = tmp_path / "eq"
    cnnkit.train("classify", data="digits", epochs=1, illumination="equalize", out=str(eq), verbose=False)
    assert cnnkit.export(eq, "onnx", out=str(tmp_path / "eq.onnx"), verbose=False)["max_abs_diff"] < 1e-3
    r = cli("classify", "train", "--data", "digits", "--illumination", "sunlight", "--out", tmp_path / "bad")
    assert r.code == 2 and "'sunlight' is not one of" in r.err
    from cnnkit.errors import CnnkitError

    with pytest.raises(CnnkitError, match="--illumination must be one of"):
        cnnkit.train("classify", data="digits", illumination="sunlight", out=str(tmp_path / "bad"), verbose=False)


def test_a_segmenter_carries_it_too(seg_data, tmp_path):
    """A U-Net trained with --illumination grayworld: the card says so, a colour cast (each
    channel scaled) leaves its masks as they were, and the ONNX file answers the same."""
    import cnnkit
    from cnnkit.data.decode import read_image

    out = tmp_path / "seg"
    cnnkit.train("segment", data=str(seg_data), imgsz=64, epochs=1, batch=8, encoder="smallcnn",
                 illumination="grayworld", out=str(out), verbose=False)
    card = json.loads((out / "weights" / "best.json").read_text())
    assert card["input"]["illumination"] == "grayworld"
    model = cnnkit.load(out)
    assert model.model.norm.illumination == "grayworld"
    images = [read_image(p, channels=3) for p in sorted((seg_data.parent / "images" / "val").glob("*.png"))[:4]]
    cast = [(im.float() * torch.tensor([0.9, 0.7, 0.5]).view(3, 1, 1)).round().to(torch.uint8) for im in images]
    # what the network gets from the model's own illumination step: the colour cast is gone
    # (a global brightness and the rounding of the cast images to uint8 remain); the masks of
    # a one-epoch model sit too near their decision boundaries to show it
    from cnnkit.data.illumination import illuminate

    def chroma(x, mode):
        y = illuminate(x[None].float() / 255, mode)
        return y / y.mean()

    for im, c in zip(images, cast):  # the mode the loaded model applies
        assert float((chroma(im, model.model.norm.illumination) - chroma(c, model.model.norm.illumination)).abs().mean()) < 0.05
    assert float((chroma(images[0], "none") - chroma(cast[0], "none")).abs().mean()) > 0.1
    onnx = cnnkit.export(out, "onnx", out=str(tmp_path / "seg.onnx"), verbose=False)
    assert onnx["max_abs_diff"] < 1e-3


def test_fastdet_carries_it_and_torchvision_detectors_refuse_it(tiny_yolo, tmp_path, cli):
    """fastdet trained with --illumination standardize: the card and the rebuilt model say so,
    and a darker copy of an image (a global change of brightness, clipped nowhere) gets the
    same detections; Faster R-CNN refuses the option in one sentence."""
    import cnnkit
    from cnnkit.data.decode import read_image

    out = tmp_path / "det"
    cnnkit.train("detect", data=str(tiny_yolo), imgsz=128, epochs=1, batch=8, illumination="standardize",
                 out=str(out), verbose=False)
    assert json.loads((out / "weights" / "best.json").read_text())["input"]["illumination"] == "standardize"
    model = cnnkit.load(out)
    image = read_image(min((tiny_yolo.parent / "images" / "val").glob("*.png")), channels=3)
    darker = (image.float() * 0.6).round().to(torch.uint8)
    a, b = model.raw(model.prepare(image)[0][None]), model.raw(model.prepare(darker)[0][None])
    assert model.model.illumination == "standardize"
    assert torch.allclose(a[0], b[0], atol=0.05), float((a[0] - b[0]).abs().max())
    r = cli("detect", "train", "--data", tiny_yolo, "--model", "fasterrcnn", "--illumination", "grayworld",
            "--out", tmp_path / "frcnn")
    assert r.code == 2 and "--illumination applies to fastdet" in r.err
