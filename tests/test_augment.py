"""Augmentation catalog (parse_aug), box/mask alignment, BatchAugment and `cnnkit augment preview`."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as tF
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from cnnkit.data.batch_aug import BatchAugment, affine_batch, erase_batch
from cnnkit.data.transforms import AUG_NAMES, GEOMETRIC_AUGS, RandomShadow, parse_aug, shadow
from cnnkit.errors import CnnkitError

S = 64
# Every catalog name with a value that makes its effect certain to show.
STRONG = {"none": "none", "flip": "flip=1", "vflip": "vflip=1", "rotate": "rotate=30",
          "scale": "scale=0.6:0.8", "translate": "translate=0.3", "affine": "affine", "crop": "crop=0.2",
          "jitter": "jitter=0.8", "erase": "erase=1", "cutout": "cutout=1", "blur": "blur=3",
          "noise": "noise=0.1", "gamma": "gamma=0.3:0.5", "shadow": "shadow=1",
          "randaugment": "randaugment=3:20", "trivialaugment": "trivialaugment",
          "autoaugment": "autoaugment"}
GEOMETRIC = ["flip=1", "vflip=1", "rotate=30", "scale=0.6:1.4", "translate=0.2", "affine",
             "rotate=20,scale=0.8:1.2,translate=0.1", "crop=0.3", "randaugment=1:15", "trivialaugment",
             "autoaugment"]
_GEO_OPS = {"Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}


def _textured(c: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(40, 200, (c, S, S), dtype=torch.uint8, generator=g)
    img[:, 20:44, 16:40] = 230
    return img


def _apply(spec: str, *inputs, seed: int = 0, geometric_only: bool = False):
    torch.manual_seed(seed)
    out = inputs if len(inputs) > 1 else inputs[0]
    for t in parse_aug(spec, S):
        if geometric_only and hasattr(t, "_policies"):  # AutoAugment: drop its photometric steps
            t._policies = [tuple(op for op in policy if op[0] in _GEO_OPS) for policy in t._policies]
        elif geometric_only and hasattr(t, "_AUGMENTATION_SPACE"):
            t._AUGMENTATION_SPACE = {k: v for k, v in t._AUGMENTATION_SPACE.items() if k in _GEO_OPS}
        out = t(*out) if isinstance(out, tuple) else t(out)
    return out


def test_catalog_is_complete():
    assert set(STRONG) == set(AUG_NAMES)
    covered = {token.split("=")[0] for spec in GEOMETRIC for token in spec.split(",")}
    assert covered >= set(GEOMETRIC_AUGS)
    assert parse_aug("none", S) == [] and parse_aug("", S) == [] and parse_aug(None, S) == []


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", AUG_NAMES)
def test_every_name_runs_on_uint8(name, channels):
    img = _textured(channels)
    changed = False
    for seed in range(4):
        out = _apply(STRONG[name], img, seed=seed)
        assert out.shape == img.shape and out.dtype == torch.uint8
        changed |= not torch.equal(out, img)
    assert changed == (name != "none"), f"{STRONG[name]} did {'nothing' if name != 'none' else 'something'}"


def test_flips_are_exact_and_parse_keeps_order():
    img = _textured(3)
    assert torch.equal(_apply("flip=1", img), img.flip(-1))
    assert torch.equal(_apply("vflip=1", img), img.flip(-2))
    names = [type(t).__name__ for t in parse_aug("noise=0.1,flip,rotate=10,shadow,cutout,gamma", S)]
    assert names == ["RandomAffine", "GaussianNoise", "RandomHorizontalFlip", "RandomShadow", "_Erase",
                     "RandomGamma"]


def _rect_sample(c: int = 3):
    img = torch.full((c, S, S), 30, dtype=torch.uint8)
    img[:, 22:38, 20:42] = 220
    mask = tv_tensors.Mask((img[0] > 100).to(torch.uint8)[None])
    box = tv_tensors.BoundingBoxes([[20.0, 22.0, 42.0, 38.0]], format="XYXY", canvas_size=(S, S))
    return tv_tensors.Image(img), mask, box


def _mask_box(m: torch.Tensor) -> torch.Tensor | None:
    ys, xs = torch.nonzero(m[0], as_tuple=True)
    if not len(xs):
        return None
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()


def _edge_band(m: torch.Tensor, r: int = 1) -> torch.Tensor:
    """Pixels within r of the mask's edge (dilation minus erosion)."""
    x = m.float()[None, None]
    dil = tF.max_pool2d(x, 2 * r + 1, 1, r) > 0
    ero = -tF.max_pool2d(-x, 2 * r + 1, 1, r) > 0
    return (dil & ~ero)[0, 0]


@pytest.mark.parametrize("spec", GEOMETRIC)
def test_box_and_mask_stay_aligned(spec):
    img, mask, box = _rect_sample()
    checked, moved = 0, False
    for seed in range(8):
        # policies: only their geometric ops for the image check (an Invert would swap fg and bg)
        x, m, b = _apply(spec, img, mask, box, seed=seed, geometric_only=True)
        assert isinstance(x, tv_tensors.Image) and isinstance(m, tv_tensors.Mask)
        assert isinstance(b, tv_tensors.BoundingBoxes)
        mb = _mask_box(m)
        if mb is None or mb[0] == 0 or mb[1] == 0 or mb[2] == S or mb[3] == S:
            continue  # clipped by the border: a clamped box may be larger than the visible part
        checked += 1
        moved |= not torch.equal(m, mask)
        assert (mb - b[0]).abs().max() <= 1.5, f"seed {seed}: mask box {mb.tolist()} vs box {b[0].tolist()}"
        foreground = x[0] > 125
        stray = (foreground ^ (m[0] > 0)) & ~_edge_band(m[0] > 0, 1)
        assert not stray.any(), f"seed {seed}: image and mask disagree at {int(stray.sum())} px"
    assert checked >= 4 and moved


@pytest.mark.parametrize("spec", ["randaugment", "autoaugment"])
def test_policies_move_boxes_and_masks_with_all_ops(spec):
    """Full policies (photometric ops included): the box always contains the moved mask."""
    img, mask, box = _rect_sample()
    moved = 0
    for seed in range(8):
        x, m, b = _apply(spec, img, mask, box, seed=seed)
        mb = _mask_box(m)
        moved += not torch.equal(m, mask)
        if mb is not None:
            assert (b[0, :2] <= mb[:2] + 1.5).all() and (b[0, 2:] >= mb[2:] - 1.5).all()
    assert moved >= 2


@pytest.mark.parametrize("spec", ["jitter=0.8", "erase=1", "cutout=1", "blur=3", "noise=0.2", "gamma=0.3:0.5",
                                  "shadow=1"])
def test_photometric_transforms_leave_targets_alone(spec):
    img, mask, box = _rect_sample()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # v2.RandomErasing warns on every mask it passes through
        x, m, b = _apply(spec, img, mask, box, seed=1)
    assert not torch.equal(x, img)
    assert torch.equal(m, mask) and torch.equal(b, box) and type(m) is tv_tensors.Mask


def test_noise_gamma_and_shadow_values():
    grey = torch.full((3, S, S), 128, dtype=torch.uint8)
    diff = _apply("noise=0.1", grey).float() - 128
    assert abs(diff.std().item() - 25.5) < 1.5 and abs(diff.mean().item()) < 1.0
    ramp = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).expand(3, 16, 16).contiguous()
    assert torch.equal(_apply("gamma=2:2", ramp), TF.adjust_gamma(ramp, 2.0))
    torch.manual_seed(0)
    assert not torch.equal(_apply("gamma=0.5:2", ramp, seed=0), _apply("gamma=0.5:2", ramp, seed=1))
    # shadow: never brighter; one side keeps its light, the other loses 30-70 % of it
    for seed in range(5):
        out = _apply("shadow=1", grey, seed=seed).float()
        assert (out <= 128).all()
        assert (out == 128).float().mean() > 0.05 and (out <= 128 * 0.7 + 1).float().mean() > 0.05
        assert out.min() >= 128 * 0.3 - 1
    assert torch.equal(_apply("shadow=0", grey), grey)
    # the kernel: a vertical boundary at x = 0 darkens the right half by exactly `darkness`
    half = shadow(grey, angle=0.0, offset=0.0, darkness=0.5, softness=1e-3)
    assert (half[..., :32] == 128).all() and (half[..., 32:] == 64).all()
    assert shadow(grey.float() / 255, 0.0, 0.0, 0.5, 1e-3).dtype == torch.float32
    assert RandomShadow(p=1.0)(grey[None]).shape == (1, 3, S, S)  # leading batch dims work


@pytest.mark.parametrize("spec, match", [
    ("flp", r"unknown augmentation 'flp' \(did you mean 'flip'\?\); choose from none, flip"),
    ("shadw=0.5", r"did you mean 'shadow'"),
    ("randaugmnt", r"did you mean 'randaugment'"),
    ("gamma=0:1", r"'gamma=0:1' needs 0 < LOW <= HIGH"),
    ("gamma=a:b", r"needs a number or a LOW:HIGH range"),
    ("shadow=2", r"'shadow=2' needs a probability between 0 and 1"),
    ("noise=-1", r"needs a standard deviation >= 0"),
    ("randaugment=x", r"needs N:M"),
    ("randaugment=2:40", r"magnitude M from 0 to 30"),
    ("trivialaugment=3", r"takes no value"),
])
def test_bad_specs_raise_one_clear_error(spec, match):
    with pytest.raises(CnnkitError, match=match):
        parse_aug(spec, S)


# ---------------------------------------------------------------------------------------------
# BatchAugment
# ---------------------------------------------------------------------------------------------
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _normalized(b: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, 24, 32, generator=g)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_batch_flips_are_exact_and_other_keys_kept():
    x = _normalized()
    batch = {"images": x, "targets": torch.arange(6), "skipped": [("a.png", "corrupt")]}
    out = BatchAugment.from_spec("flip=1", MEAN, STD)(batch)
    assert torch.equal(out["images"], x.flip(-1))
    assert out["targets"] is batch["targets"] and out["skipped"] is batch["skipped"]
    assert torch.equal(BatchAugment.from_spec("vflip=1", MEAN, STD)(batch)["images"], x.flip(-2))
    torch.manual_seed(3)
    half = BatchAugment.from_spec("flip=0.5", MEAN, STD)({"images": _normalized(64)})["images"]
    flipped = [torch.equal(h, o.flip(-1)) for h, o in zip(half, _normalized(64))]
    kept = [torch.equal(h, o) for h, o in zip(half, _normalized(64))]
    assert all(f or k for f, k in zip(flipped, kept)) and 15 < sum(flipped) < 49


def test_batch_identity_when_all_ranges_are_zero():
    x = _normalized()
    aug = BatchAugment.from_spec("flip=0,vflip=0,rotate=0,scale=1:1,translate=0,jitter=0,erase=0,noise=0,"
                                 "gamma=1:1", MEAN, STD)
    assert torch.equal(aug({"images": x})["images"], x)
    # the kernels themselves are the identity at neutral parameters
    z = torch.zeros(6)
    assert torch.allclose(affine_batch(x, z, z + 1, z, z), x, atol=1e-5)
    assert torch.equal(erase_batch(x, z.long(), z.long(), z.long(), z.long() + 5), x)


def test_batch_affine_matches_torchvision_per_sample():
    x = torch.rand(4, 3, 20, 28)
    angle = torch.tensor([17.0, -30.0, 90.0, 0.0])
    scale = torch.tensor([1.1, 0.8, 1.0, 1.0])
    tx, ty = torch.tensor([3.0, 0.0, -2.0, 4.0]), torch.tensor([-2.0, 5.0, 0.0, 0.0])
    out = affine_batch(x, angle, scale, tx, ty)
    for i in range(4):
        ref = TF.affine(x[i], angle=float(angle[i]), translate=[float(tx[i]), float(ty[i])],
                        scale=float(scale[i]), shear=[0.0, 0.0], interpolation=TF.InterpolationMode.BILINEAR)
        assert torch.allclose(out[i], ref, atol=1e-4), i


def test_batch_params_differ_per_sample_and_replay_with_seed():
    aug = BatchAugment.from_spec("rotate=15,scale=0.9:1.1,translate=0.1,jitter=0.2,erase=0.5", MEAN, STD)
    x = _normalized(1).expand(8, -1, -1, -1).contiguous()  # 8 copies of one image
    torch.manual_seed(0)
    out = aug({"images": x})["images"]
    assert all(not torch.allclose(out[0], out[i]) for i in range(1, 8))
    torch.manual_seed(0)
    assert torch.equal(aug({"images": x})["images"], out)
    p = aug.sample_params(256, 24, 32, "cpu")
    assert p["angle"].abs().max() <= 15 and p["angle"].std() > 5
    assert p["scale"].min() >= 0.9 and p["scale"].max() <= 1.1
    assert p["tx"].abs().max() <= 0.1 * 32 and p["ty"].abs().max() <= 0.1 * 24
    erased = p["erase_h"] > 0
    assert 0.35 < erased.float().mean() < 0.65
    assert ((p["erase_top"] + p["erase_h"] <= 24) & (p["erase_left"] + p["erase_w"] <= 32)).all()


def test_batch_erase_fills_black_and_rotation_fills_black():
    x = torch.full((2, 3, 16, 16), 0.5)
    xn = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.manual_seed(0)
    out = BatchAugment.from_spec("erase=1", MEAN, STD)({"images": xn})["images"]
    raw = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    for r in raw:
        black = (r.abs() < 1e-5).all(0)
        assert 0.02 * 256 - 8 <= black.sum() <= 0.33 * 256 + 8
        ys, xs = torch.nonzero(black, as_tuple=True)
        assert black.sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)  # one rectangle
    rot = BatchAugment(mean=MEAN, std=STD, degrees=45)
    params = rot.sample_params(2, 16, 16, "cpu")
    params["angle"] = torch.tensor([45.0, -45.0])
    raw = rot.apply(xn, params) * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert raw[:, :, 0, 0].abs().max() < 1e-5 and (raw[:, :, 8, 8] - 0.5).abs().max() < 1e-5


def test_batch_jitter_matches_torchvision_brightness_and_contrast():
    x = torch.rand(3, 3, 12, 12)
    aug = BatchAugment(brightness=0.5, contrast=0.5)  # mean 0, std 1: images already in [0, 1]
    p = aug.sample_params(3, 12, 12, "cpu")
    out = aug.apply(x, p)
    for i in range(3):
        ref = TF.adjust_brightness(x[i], float(p["brightness"][i]))
        ref = TF.adjust_contrast(ref, float(p["contrast"][i]))
        assert torch.allclose(out[i], ref, atol=1e-5)
    assert len(set(p["brightness"].tolist())) == 3


def test_batch_spec_errors():
    with pytest.raises(CnnkitError, match=r"augmentation 'blur' does not run on whole batches"):
        BatchAugment.from_spec("flip,blur=1")
    with pytest.raises(CnnkitError, match=r"unknown augmentation 'rotat' \(did you mean 'rotate'\?\)"):
        BatchAugment.from_spec("rotat=10")
    with pytest.raises(CnnkitError, match=r"needs normalized float images of shape \(B, C, H, W\)"):
        BatchAugment.from_spec("flip")({"images": torch.zeros(2, 3, 8, 8, dtype=torch.uint8)})
    with pytest.raises(CnnkitError, match=r"built for 3 channel\(s\) but the batch has 1"):
        BatchAugment.from_spec("jitter", MEAN, STD)({"images": torch.zeros(2, 1, 8, 8)})
    empty = BatchAugment.from_spec("flip")({"images": torch.zeros(0, 3, 8, 8)})
    assert empty["images"].shape == (0, 3, 8, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batch_augment_on_gpu_matches_cpu_kernels():
    aug = BatchAugment.from_spec("flip,rotate=15,scale=0.8:1.2,jitter=0.4,erase=0.25", MEAN, STD)
    x = _normalized(16)
    params = aug.sample_params(16, 24, 32, "cpu")
    gpu = aug.apply(x.cuda(), {k: v.cuda() for k, v in params.items()})
    assert torch.allclose(gpu.cpu(), aug.apply(x, params), atol=1e-4)
    assert aug({"images": x.cuda()})["images"].device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# cnnkit augment preview
# ---------------------------------------------------------------------------------------------
def test_preview_writes_a_png(cli, tmp_path):
    out = tmp_path / "grid.png"
    r = cli("augment", "preview", "--data", "shapes", "--aug",
            "flip,rotate=15,scale=0.8:1.2,jitter=0.4,erase=0.25", "--n", "8", "--out", out)
    assert r.code == 0, r.err
    assert "wrote" in r.out and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(out) as im:
        w, h = im.size
    assert w > 600 and h > 200  # 8 columns, originals + one augmented row
    r = cli("augment", "preview", "--data", "shapes", "--aug", "none", "--n", "2", "--out", tmp_path / "none.png")
    assert r.code == 0, r.err


def test_preview_with_mixing_and_gray_data(cli, tmp_path):
    out = tmp_path / "mixed.png"
    r = cli("augment", "preview", "--data", "digits", "--aug", "shadow,gamma,noise=0.05", "--n", "6",
            "--mixup", "0.4", "--cutmix", "1.0", "--out", out)
    assert r.code == 0, r.err
    assert out.stat().st_size > 1000


def test_preview_errors_exit_2(cli, tmp_path):
    r = cli("augment", "preview", "--data", "shapes", "--aug", "flip,blurr", "--out", tmp_path / "x.png")
    assert r.code == 2 and "Error: unknown augmentation 'blurr' (did you mean 'blur'?)" in r.err
    r = cli("augment", "preview", "--data", "shapes", "--n", "0", "--out", tmp_path / "x.png")
    assert r.code == 2 and "--n must be between 1 and 256" in r.err
    assert not (tmp_path / "x.png").exists()


def test_shadow_kernel_angle_convention():
    """angle pi/2: the boundary is horizontal and the bottom half is in the shadow."""
    img = torch.full((1, 8, 8), 200, dtype=torch.uint8)
    out = shadow(img, angle=math.pi / 2, offset=0.0, darkness=0.5, softness=1e-3)
    assert (out[0, :4] == 200).all() and (out[0, 4:] == 100).all()
