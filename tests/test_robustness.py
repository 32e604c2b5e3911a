"""Corruptions (the 15 of ImageNet-C, occlusion, illumination) against the imagecorruptions
reference, and `cnnkit TASK robustness` for every 2-D task."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from reference_corruptions import load as load_reference

from cnnkit.methods.corruptions import CORRUPTIONS, IMAGENET_C, OCCLUDED, corrupt

REFERENCE = load_reference()
needs_reference = pytest.mark.skipif(REFERENCE is None, reason="imagecorruptions is not installed (make install "
                                                                "installs it; it needs the package registry)")
# computed without random draws: the same pixels as the reference
EXACT = ("defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression")


def _photos(n: int = 8, size: tuple[int, int] = (64, 80)) -> np.ndarray:
    """``n`` crops of scikit-image's photographs (uint8, ``(n, H, W, 3)``)."""
    import skimage.data

    rng = np.random.default_rng(0)
    base = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    h, w = size
    out = []
    for i in range(n):
        b = base[i % len(base)]
        y, x = rng.integers(0, b.shape[0] - 2 * h), rng.integers(0, b.shape[1] - 2 * w)
        out.append(b[y:y + 2 * h:2, x:x + 2 * w:2])
    return np.stack(out)


def _ours(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return corrupt(x, name, severity, torch.Generator().manual_seed(seed)).permute(0, 2, 3, 1).numpy()


def _reference(images: np.ndarray, name: str, severity: int) -> np.ndarray:
    from PIL import Image

    f = getattr(REFERENCE, name)
    out = [np.asarray(f(Image.fromarray(im) if name in ("pixelate", "jpeg_compression") else im, severity),
                      np.float64) / 255 for im in images]
    return np.stack(out)


@needs_reference
@pytest.mark.parametrize("name", EXACT)
def test_deterministic_corruptions_match_imagecorruptions_pixel_for_pixel(name):
    """Photographs of two sizes (one not square): within one uint8 step of the reference at
    every severity (Pillow rounds its box filter to uint8; the rest agree to float noise)."""
    for size in ((64, 80), (48, 48)):
        images = _photos(4, size)
        for s in range(1, 6):
            diff = np.abs(_ours(images, name, s) - _reference(images, name, s)).max()
            assert diff <= 1.01 / 255, (name, size, s, diff)


@needs_reference
@pytest.mark.parametrize("name", sorted(set(IMAGENET_C) - set(EXACT)))
def test_random_corruptions_change_images_as_much_as_imagecorruptions(name):
    """Corruptions drawn at random (noise, glass, motion, snow, frost, fog, elastic) cannot
    match pixel for pixel; at every severity the mean absolute change they make to 16
    photographs is within 10% of the reference's (a wrong constant or kernel is off by far
    more: severities differ by 10-50%)."""
    images = _photos(16)
    clean = images / 255
    draws = 4 if name == "frost" else 1  # one of five pictures and a crop per image: more draws to average
    for s in range(1, 6):
        np.random.seed(s)
        ref = np.mean([np.abs(_reference(images, name, s) - clean).mean() for _ in range(draws)])
        ours = np.mean([np.abs(_ours(images, name, s, seed) - clean).mean() for seed in range(2 * draws)])
        assert abs(ours / ref - 1) < 0.10, (name, s, ours, ref)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_each_corruption_is_the_identity_at_severity_0_and_changes_images_at_5(name):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 40, 56, generator=g)
    assert torch.equal(corrupt(x, name, 0, g), x)
    y = corrupt(x, name, 5, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().mean() > 0.01, name
    again = corrupt(x, name, 5, torch.Generator().manual_seed(1))
    assert torch.equal(y, again)  # seeded: the same images for every model
    grey = corrupt(x[:, :1], name, 5, torch.Generator().manual_seed(1))
    assert grey.shape == x[:, :1].shape


def test_severity_grows_the_change():
    """Mean change rises with severity for every ImageNet-C corruption and the extras but
    snow and frost (whose constants trade the layer's weight against the image's)."""
    images = torch.from_numpy(_photos(8)).permute(0, 3, 1, 2).float() / 255
    for name in CORRUPTIONS:
        if name in ("snow", "frost", "colour_temperature"):
            continue
        change = [float((corrupt(images, name, s, torch.Generator().manual_seed(0)) - images).abs().mean())
                  for s in (1, 3, 5)]
        assert change[0] < change[1] < change[2], (name, change)


def test_occlusion_covers_its_share_of_each_box():
    x = torch.zeros(1, 3, 100, 120)
    boxes = [torch.tensor([[10.0, 20.0, 70.0, 80.0]])]
    for s, share in enumerate(OCCLUDED, 1):
        y = corrupt(x, "occlusion", s, torch.Generator().manual_seed(s), boxes)
        grey = (y[0, 0] == 0.5)
        assert grey[20:80, 10:70].sum() == grey.sum()  # inside the box
        assert abs(float(grey.sum()) / 3600 - share) < 0.04, (s, float(grey.sum()) / 3600)
    whole = corrupt(x, "occlusion", 3, torch.Generator().manual_seed(0))
    assert abs(float((whole[0, 0] == 0.5).float().mean()) - OCCLUDED[2]) < 0.04


class _Recorder:
    """A backend that keeps every input it is given and runs ``inner``."""

    def __init__(self, inner):
        self.inner, self.name, self.seen = inner, "recorder", []
        self.device = getattr(inner, "device", torch.device("cpu"))

    def __call__(self, x, *rest):
        self.seen.append(x.detach().cpu().clone())
        return self.inner(x, *rest)


def _occluded_inputs(spec, model, records, options) -> tuple[torch.Tensor, torch.Tensor]:
    """The core's inputs of a val pass over ``records``, clean (severity 0) and under occlusion
    at severity 5, as robustness runs them."""
    from cnnkit.methods.robustness import CorruptionBackend

    inner, passes = model.backend, []
    try:
        for severity in (0, 5):
            recorder = _Recorder(inner)
            model.backend = CorruptionBackend(recorder, 3, "occlusion", severity, 0)
            spec.val_metrics(model, records, options)
            passes.append(torch.cat(recorder.seen))
    finally:
        model.backend = inner
    return passes[0], passes[1]


def _assert_inside(clean: torch.Tensor, occluded: torch.Tensor, boxes: list[torch.Tensor]) -> None:
    """Every occluded pixel lies inside one of its image's boxes (a pixel of margin for the
    boxes' rounding), and every box is partly covered."""
    changed = (occluded != clean).any(1)  # (B, H, W)
    assert len(changed) == len(boxes)
    for i, (c, bs) in enumerate(zip(changed, boxes)):
        inside = torch.zeros_like(c)
        for x1, y1, x2, y2 in bs.tolist():
            inside[max(0, int(y1) - 1):int(y2) + 2, max(0, int(x1) - 1):int(x2) + 2] = True
            box = c[int(y1):int(y2) + 1, int(x1):int(x2) + 1]
            assert box.any(), (i, bs)  # the object was occluded
        assert c.any() and not (c & ~inside).any(), f"image {i}: occlusion outside the objects' boxes"
        assert c.float().mean() < 0.7  # not the whole image


def test_corruption_backend_passes_the_objects_of_one_call():
    """Occlusion covers the boxes told before a call; the next call, told nothing, covers the
    whole image (the boxes were that batch's), as does a call whose boxes do not match."""
    from cnnkit.methods.robustness import CorruptionBackend

    x = torch.zeros(2, 3, 40, 40)
    rec = _Recorder(lambda t: (t,))
    backend = CorruptionBackend(rec, 3, "occlusion", 5, 0)
    backend.objects = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[20.0, 20.0, 40.0, 30.0]])]
    backend(x)
    assert backend.objects is None
    grey = rec.seen[0][:, 0] == 0.5
    assert grey[0, :10, :10].sum() == grey[0].sum() > 0 and grey[1, 20:30, 20:40].sum() == grey[1].sum() > 0
    backend(x)
    assert abs(float((rec.seen[1][:, 0] == 0.5).float().mean()) - OCCLUDED[4]) < 0.05
    backend.objects = [torch.tensor([[0.0, 0.0, 10.0, 10.0]])]  # one image's boxes for a batch of two
    backend(x)
    assert abs(float((rec.seen[2][:, 0] == 0.5).float().mean()) - OCCLUDED[4]) < 0.05


def test_occlusion_covers_each_object_for_detectors_segmenters_and_shapes_classifiers(fitted_detector, seg_run,
                                                                                      seg_data):
    """Through each task's own val loop, the occluding patches fall inside the objects (the
    detector's letterboxed ground-truth boxes, the segmenter's connected class regions, the
    shapes classifier's shape), not anywhere in the image."""
    import cnnkit
    from cnnkit.core.card import InputSpec, ModelCard
    from cnnkit.data.detection import DetectionDataset
    from cnnkit.data.shapes_classification import SHAPE_CLASSES, ShapesClassification
    from cnnkit.runtime.backend import TorchBackend
    from cnnkit.runtime.pipeline import Predictor, pipeline_for
    from cnnkit.tasks import spec
    from cnnkit.tasks.segment.spec import object_boxes

    CLASSIFY, DETECT, SEGMENT = spec("classify"), spec("detect"), spec("segment")
    run, data = fitted_detector
    det = cnnkit.load(run)
    records = DETECT.val_records(det, str(data), "val", False)[:4]
    clean, occluded = _occluded_inputs(DETECT, det, records, {"batch": 4, "workers": 0, "conf": 0.001,
                                                              "save_json": None})
    ds = DetectionDataset(records, det.pipeline.size)
    _assert_inside(clean, occluded, [ds[i][1]["boxes"] for i in range(len(records))])

    seg = cnnkit.load(seg_run)
    records = SEGMENT.val_records(seg, str(seg_data), "val", False)[:4]
    clean, occluded = _occluded_inputs(SEGMENT, seg, records, {})
    _assert_inside(clean, occluded, [object_boxes(r.load_mask()) for r in records])  # 64 px, as trained

    card = ModelCard("classify", "smallcnn", list(SHAPE_CLASSES), InputSpec(64, 64, 3, mean=(0.5,) * 3, std=(0.25,) * 3),
                     model_kwargs={"width": 8, "drop_rate": 0.0})
    pipe = pipeline_for(card)
    torch.manual_seed(0)
    clf = Predictor(card, pipe, TorchBackend(pipe.core(pipe.build()), torch.device("cpu")))
    shapes = torch.utils.data.Subset(ShapesClassification("val", size=6), range(4))
    clean, occluded = _occluded_inputs(CLASSIFY, clf, shapes, {"batch": 4, "workers": 0})
    _assert_inside(clean, occluded, [shapes.dataset.object_boxes(i) for i in range(4)])
    mask = shapes.dataset.mask(0)
    ys, xs = np.nonzero(mask)
    assert shapes.dataset.object_boxes(0).tolist() == [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]


def test_brightness_keeps_hue_and_saturation():
    """Raising HSV's V keeps H and S: every channel scales by the same factor."""
    import colorsys

    x = torch.tensor([[[[0.2]], [[0.4]], [[0.1]]]])
    y = corrupt(x, "brightness", 3, torch.Generator())
    h0, s0, _v0 = colorsys.rgb_to_hsv(*x.flatten().tolist())
    h1, s1, v1 = colorsys.rgb_to_hsv(*y.flatten().tolist())
    assert abs(h0 - h1) < 1e-6 and abs(s0 - s1) < 1e-6 and abs(v1 - 0.7) < 1e-6


# ---- cnnkit TASK robustness ----------------------------------------------------------------------


def test_classify_robustness_reports_drops_and_the_corruption_error(cli, digits_run, tmp_path):
    """Heavy noise lowers digits' top-1 and brightness at severity 1 barely does; the model
    as its own baseline has CE and relative CE of exactly 100%; the heat map and examples
    are written; --json holds the table."""
    out = tmp_path / "rob"
    r = cli("classify", "robustness", "--weights", digits_run, "--data", "digits", "--corruptions",
            "gaussian_noise,brightness,occlusion", "--severities", "1,5", "--baseline", digits_run, "--limit", "200",
            "--out", out, "--json", tmp_path / "r.json")
    assert r.code == 0, r.err
    res = json.loads((tmp_path / "r.json").read_text())
    noise = res["corruptions"]["gaussian_noise"]
    assert res["clean"] > 0.85 and noise[1] < res["clean"] - 0.2 and noise[1] < noise[0], res
    assert res["corruptions"]["brightness"][0] > res["clean"] - 0.1
    assert res["mce"] == 1.0 and res["relative_mce"] == 1.0
    assert res["errors"]["occlusion"]["ce"] == 1.0 and res["baseline"]["corruptions"] == res["corruptions"]
    assert (out / "robustness.png").is_file() and (out / "corruptions.png").is_file()
    assert "mCE 100.0%" in r.out and "gaussian noise" in r.out


def test_robustness_on_onnx_runtime_sees_the_same_corrupted_images(cli, digits_run, tmp_path):
    """The exported model under the same corruptions gives the torch model's numbers (the
    corruption is seeded per corruption and severity, whatever the backend)."""
    import cnnkit

    onnx = cnnkit.export(digits_run, "onnx", out=str(tmp_path / "d.onnx"), verbose=False)["file"]
    common = {"corruptions": "shot_noise,motion_blur", "severities": "3", "limit": 120, "verbose": False}
    torch_r = cnnkit.robustness("classify", digits_run, "digits", out=str(tmp_path / "t"), **common)
    onnx_r = cnnkit.robustness("classify", onnx, "digits", out=str(tmp_path / "o"), **common)
    for name in ("shot_noise", "motion_blur"):
        assert abs(torch_r["corruptions"][name][0] - onnx_r["corruptions"][name][0]) <= 1 / 120 + 1e-9


def test_detector_and_segmenter_robustness_run_through_their_own_metrics(fitted_detector, seg_run, seg_data,
                                                                         tmp_path):
    """A fitted detector's mAP falls under heavy defocus blur and a segmenter's mIoU under
    impulse noise; each through its task's val loop."""
    import cnnkit

    run, data = fitted_detector
    det = cnnkit.robustness("detect", run, str(data), corruptions="defocus_blur", severities="5", split="val",
                            out=str(tmp_path / "d"), verbose=False)
    assert det["metric"] == "map50_95" and det["clean"] > 0.2
    assert det["corruptions"]["defocus_blur"][0] < det["clean"] - 0.1, det
    seg = cnnkit.robustness("segment", seg_run, str(seg_data), corruptions="impulse_noise,contrast",
                            severities="5", out=str(tmp_path / "s"), verbose=False)
    assert seg["metric"] == "miou" and seg["corruptions"]["impulse_noise"][0] != seg["clean"]


def test_robustness_errors_are_one_sentence(cli, digits_run, tmp_path):
    cases = [
        (["--corruptions", "rain"], "not a corruption or group"),
        (["--severities", "0-7"], "--severities takes severities 1 to 5"),
        (["--severities", "x"], "--severities takes severities 1 to 5"),
    ]
    for extra, words in cases:
        r = cli("classify", "robustness", "--weights", digits_run, "--data", "digits", "--out", tmp_path, *extra)
        assert r.code == 2 and words in r.err and "Traceback" not in r.err, (extra, r.err)
        assert len(r.err.strip().splitlines()) == 1, r.err
