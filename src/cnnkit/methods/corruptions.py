"""Image corruptions as batched tensor kernels: the 15 of ImageNet-C, occlusion and illumination.

Every kernel takes images ``(B, C, H, W)`` with values in [0, 1] (``C`` 1 or 3), a severity
from 1 to 5 and a ``torch.Generator``, and returns corrupted images of the same shape on the
same device. The 15 corruptions of ImageNet-C (Hendrycks & Dietterich, 2019) follow the
size-agnostic version of the ``imagecorruptions`` package (Michaelis et al., 2019), parameter
for parameter: the same severity constants, kernels, borders and formulas, with NumPy, SciPy,
scikit-image, OpenCV and Pillow calls replaced by their torch equivalents so that a batch
runs in one pass on the model's device. That package is the reference the tests compare
against (``tests/test_robustness.py``); it is not used here because it corrupts one image at a
time on the CPU (glass blur alone takes seconds per image) and no longer imports on today's
NumPy, SciPy and scikit-image.

Where a kernel cannot be the reference's exactly:

- **glass blur** swaps each pixel with a random neighbour in one sequential pass over the
  image (an order-dependent loop, the reason ImageNet-C's glass blur is so slow). Here the
  local shuffle is a jittered sort: each row's pixels are sorted by their column plus uniform
  jitter, then each column's by their row plus jitter. Like the reference it permutes pixels
  locally (the histogram is kept); the jitter width per severity (``GLASS_JITTER``) was fitted
  so that the mean change matches the reference's (within 5% at every severity, tested).
- the random draws (noise, angles, crops, fractals) come from torch's generator, so the same
  image gets other noise than under NumPy's; the tests compare those corruptions by the size
  of the change they make, and the deterministic ones pixel for pixel.

Beyond ImageNet-C (the kernels live in :mod:`cnnkit.methods.corruptions_extra`):

- ``occlusion``: one grey rectangle per object covering 10, 25, 40, 55 or 70% of its box
  (the whole image when no boxes are given), at a random place and aspect ratio;
- ``gamma``: under-exposure, ``x ** gamma`` with gamma 1.5 to 3.5;
- ``shadow``: a random straight-edged shadow over part of the image, with a soft edge, that
  keeps 70% down to 20% of the light;
- ``colour_temperature``: white balance off toward a warm (2,000-4,500 K) or cold
  (8,000-20,000 K) light, each image drawn at random (a no-op on grey images).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cnnkit.methods.corruptions_extra import OCCLUDED, colour_temperature, gamma, occlusion, shadow

NOISE = ("gaussian_noise", "shot_noise", "impulse_noise")
BLUR = ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur")
WEATHER = ("snow", "frost", "fog")
DIGITAL = ("brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression")
IMAGENET_C = NOISE + BLUR + WEATHER + DIGITAL
ILLUMINATION = ("gamma", "shadow", "colour_temperature")
EXTRA = ("occlusion", *ILLUMINATION)
CORRUPTIONS = IMAGENET_C + EXTRA
GROUPS = {"noise": NOISE, "blur": BLUR, "weather": WEATHER, "digital": DIGITAL, "imagenet-c": IMAGENET_C,
          "illumination": ILLUMINATION, "occlusion": ("occlusion",), "all": CORRUPTIONS}


def corrupt(x: torch.Tensor, name: str, severity: int, generator: torch.Generator,
            boxes: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``x`` (``(B, C, H, W)`` in [0, 1]) with corruption ``name`` at ``severity`` (1-5; 0
    leaves the images as they are).

    ``boxes``: per image, the objects' ``(N, 4)`` xyxy boxes in pixels, for ``occlusion``
    (other corruptions ignore them)."""
    if name not in KERNELS:
        raise ValueError(f"unknown corruption '{name}'; known: {', '.join(CORRUPTIONS)}")
    if not 0 <= severity <= 5:
        raise ValueError(f"severity must be 0 to 5, got {severity}")
    x = x.float()
    if severity == 0:
        return x.clone()
    if name == "occlusion":
        return occlusion(x, severity, generator, boxes)
    return KERNELS[name](x, severity, generator).clamp_(0, 1)


# ---- helpers ---------------------------------------------------------------------------------


def _rand(shape, g: torch.Generator, device, kind: str = "uniform", dtype=torch.float32) -> torch.Tensor:
    """Random numbers from the CPU generator ``g`` (so a device does not change the draws)."""
    t = torch.rand(shape, generator=g, dtype=dtype) if kind == "uniform" else torch.randn(shape, generator=g, dtype=dtype)
    return t.to(device)


def _pad_index(n: int, r: int, mode: str) -> torch.Tensor:
    """Indices of a 1-D signal of length ``n`` padded by ``r`` each side, in NumPy's ``mode``
    ('reflect': OpenCV's BORDER_REFLECT_101; 'symmetric': SciPy's 'reflect'; 'edge': SciPy's
    'nearest'), for any ``r`` (long kernels on small images reflect several times)."""
    return torch.from_numpy(np.pad(np.arange(n), r, mode=mode))


def _filter_1d(x: torch.Tensor, k: torch.Tensor, dim: int, mode: str) -> torch.Tensor:
    """``x`` correlated with the odd 1-D kernel ``k`` along ``dim`` (-1 or -2), borders by ``mode``."""
    r = (len(k) - 1) // 2
    if r == 0:
        return x * k[0]
    idx = _pad_index(x.shape[dim], r, mode).to(x.device)
    xp = x.index_select(dim, idx)
    b, c, h, w = xp.shape
    k = k.to(x.device, x.dtype)
    if dim == -1:
        return F.conv2d(xp.reshape(b * c, 1, h, w), k.view(1, 1, 1, -1)).view(b, c, h, -1)
    return F.conv2d(xp.reshape(b * c, 1, h, w), k.view(1, 1, -1, 1)).view(b, c, -1, w)


def _gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """SciPy's ``gaussian_filter`` kernel: radius ``int(truncate * sigma + 0.5)``."""
    r = int(truncate * sigma + 0.5)
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return torch.from_numpy(k / k.sum())


def _gaussian(x: torch.Tensor, sigma: float | tuple[float, float], mode: str = "edge", truncate: float = 4.0):
    """scikit-image's ``filters.gaussian`` (SciPy's ``gaussian_filter``; 'edge' is its default
    'nearest' border) over the last two dims, separably."""
    sy, sx = (sigma, sigma) if isinstance(sigma, (int, float)) else sigma
    return _filter_1d(_filter_1d(x, _gaussian_kernel(sy, truncate), -2, mode), _gaussian_kernel(sx, truncate), -1, mode)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma ``(B, 1, H, W)`` (OpenCV's RGB2GRAY), or the image itself when grey."""
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _clipped_zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """The reference's ``clipped_zoom``: the centre ``ceil(H / factor)`` crop zoomed by
    ``factor`` with SciPy's order-1 ``zoom`` (corner-aligned bilinear, output
    ``round(size * factor)``), not yet cut back to ``H x W``."""
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top:top + ch, left:left + cw]
    size = (round(ch * factor), round(cw * factor))
    return F.interpolate(crop, size=size, mode="bilinear", align_corners=True)


def _motion(x: torch.Tensor, radius: int, sigma: float, angles: torch.Tensor) -> torch.Tensor:
    """The reference's ``_motion_blur``: a one-sided Gaussian (width ``2 * radius + 1``) of
    copies shifted along each image's angle (degrees), edges repeated."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    width = 2 * radius + 1
    k = np.exp(-np.arange(width) ** 2 / (2 * sigma ** 2)) / (math.sqrt(2 * math.pi) * sigma)
    k = k / k.sum()
    rad = torch.deg2rad(angles.double().cpu())
    sin, cos = torch.sin(rad), torch.cos(rad)
    out = torch.zeros_like(x)
    rows = torch.arange(h)
    cols = torch.arange(w)
    alive = torch.ones(b, dtype=torch.bool)
    for i in range(width):
        # the reference's point is (width sin, width cos) and its hypot width: shifts of i sin, i cos
        dy = -torch.ceil(i * sin - 0.5).long()
        dx = -torch.ceil(i * cos - 0.5).long()
        alive &= (dy.abs() < h) & (dx.abs() < w)  # the reference stops once the motion leaves the image
        if not alive.any():
            break
        ys = (rows.view(1, h) - dy.view(b, 1)).clamp(0, h - 1)  # shift(): edge rows repeated
        xs = (cols.view(1, w) - dx.view(b, 1)).clamp(0, w - 1)
        idx = (ys.view(b, h, 1) * w + xs.view(b, 1, w)).view(b, 1, h * w).to(x.device)
        shifted = flat.gather(2, idx.expand(b, c, h * w)).view(b, c, h, w)
        weight = torch.where(alive, torch.tensor(float(k[i])), torch.tensor(0.0)).to(x.device, x.dtype)
        out += weight.view(b, 1, 1, 1) * shifted
    return out


# ---- noise -------------------------------------------------------------------------------------


def gaussian_noise(x, s, g):
    c = [.08, .12, 0.18, 0.26, 0.38][s - 1]
    return x + c * _rand(x.shape, g, x.device, "normal")


def shot_noise(x, s, g):
    c = [60, 25, 12, 5, 3][s - 1]
    return torch.poisson((x * c).cpu(), generator=g).to(x.device) / c


def impulse_noise(x, s, g):
    """scikit-image's salt and pepper: each value flips with probability ``amount``, to 1 or 0
    with even odds."""
    c = [.03, .06, .09, 0.17, 0.27][s - 1]
    u = _rand(x.shape, g, x.device)
    return torch.where(u < c / 2, 1.0, torch.where(u < c, 0.0, x))


# ---- blur --------------------------------------------------------------------------------------


@cache
def _disk(radius: int, alias_blur: float) -> torch.Tensor:
    """The reference's ``disk``: an aliased disk (17 px wide up to radius 8), normalized, then
    OpenCV's GaussianBlur (3x3, or 5x5 past radius 8; borders reflect-101)."""
    L = np.arange(-8, 9) if radius <= 8 else np.arange(-radius, radius + 1)
    ksize = 3 if radius <= 8 else 5
    X, Y = np.meshgrid(L, L)
    d = ((X ** 2 + Y ** 2) <= radius ** 2).astype(np.float64)
    d /= d.sum()
    t = np.arange(ksize) - (ksize - 1) / 2
    gk = np.exp(-t ** 2 / (2 * alias_blur ** 2))
    gk = torch.from_numpy(gk / gk.sum())
    out = _filter_1d(_filter_1d(torch.from_numpy(d)[None, None], gk, -2, "reflect"), gk, -1, "reflect")
    return out[0, 0]


def defocus_blur(x, s, g):
    """OpenCV's ``filter2D`` with the disk kernel (borders reflect-101), as a product of
    Fourier transforms over the padded image (a 21 x 21 depthwise convolution is slow on CPU;
    the padding makes the circular convolution's wrap-around fall outside the kept pixels)."""
    radius, alias = [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)][s - 1]
    k = _disk(radius, alias)
    r = (k.shape[0] - 1) // 2
    h, w = x.shape[-2:]
    xp = x.index_select(-2, _pad_index(h, r, "reflect").to(x.device)).index_select(-1, _pad_index(w, r, "reflect").to(x.device))
    size = xp.shape[-2:]
    kf = torch.fft.rfft2(k.flip(0, 1).to(x.device, torch.float32), s=size)
    out = torch.fft.irfft2(torch.fft.rfft2(xp, s=size) * kf, s=size)
    return out[..., 2 * r:, 2 * r:]


GLASS_JITTER = [2.1, 2.7, 3.6, 3.9, 4.6]  # px per severity, fitted to the reference's mean change (see above)


def glass_blur(x, s, g):
    sigma, _, iterations = [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)][s - 1]
    x = torch.floor(_gaussian(x, sigma) * 255) / 255  # the reference rounds down to uint8 here
    b, c, h, w = x.shape
    for _ in range(iterations):
        for dim in (-1, -2):  # rows, then columns
            n = x.shape[dim]
            pos = torch.arange(n, device=x.device, dtype=torch.float32)
            shape = (b, 1, h, w)
            key = (pos.view(1, 1, 1, n) if dim == -1 else pos.view(1, 1, n, 1)) + \
                (2 * _rand(shape, g, x.device) - 1) * GLASS_JITTER[s - 1]
            order = key.argsort(dim=dim).expand(b, c, h, w)
            x = x.gather(dim, order)
    return _gaussian(x, sigma)


def motion_blur(x, s, g):
    radius, sigma = [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)][s - 1]
    angles = torch.rand(len(x), generator=g, dtype=torch.float64) * 90 - 45
    return _motion(x, radius, sigma, angles)


def zoom_blur(x, s, g):
    factors = [np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01), np.arange(1, 1.21, 0.02),
               np.arange(1, 1.26, 0.02), np.arange(1, 1.31, 0.03)][s - 1]
    h, w = x.shape[-2:]
    out = x.clone()
    for z in factors:
        out += _clipped_zoom(x, float(z))[..., :h, :w]
    return out / (len(factors) + 1)


# ---- weather -----------------------------------------------------------------------------------


def _plasma(b: int, size: int, decay: float, g: torch.Generator) -> torch.Tensor:
    """The reference's ``plasma_fractal`` (diamond-square), ``b`` maps ``(b, size, size)`` in [0, 1]."""
    m = torch.zeros(b, size, size, dtype=torch.float64)
    step, wibble = size, 100.0

    def wibbled(a):
        return a / 4 + wibble * (torch.rand(a.shape, generator=g, dtype=torch.float64) * 2 * wibble - wibble)

    while step >= 2:
        half = step // 2
        corner = m[:, 0:size:step, 0:size:step]
        sq = corner + corner.roll(-1, 1)
        sq = sq + sq.roll(-1, 2)
        m[:, half:size:step, half:size:step] = wibbled(sq)
        dr = m[:, half:size:step, half:size:step]
        ul = m[:, 0:size:step, 0:size:step]
        lt = dr + dr.roll(1, 1) + ul + ul.roll(-1, 2)
        m[:, 0:size:step, half:size:step] = wibbled(lt)
        tt = dr + dr.roll(1, 2) + ul + ul.roll(-1, 1)
        m[:, half:size:step, 0:size:step] = wibbled(tt)
        step //= 2
        wibble /= decay
    m = m - m.amin((1, 2), keepdim=True)
    return m / m.amax((1, 2), keepdim=True)


def fog(x, s, g):
    a, decay = [(1.5, 2), (2., 2), (2.5, 1.7), (2.5, 1.5), (3., 1.4)][s - 1]
    b, _c, h, w = x.shape
    size = 1 << (max(h, w) - 1).bit_length()
    top = x.amax((1, 2, 3), keepdim=True)
    plasma = _plasma(b, size, decay, g)[:, None, :h, :w].to(x.device, x.dtype)
    return (x + a * plasma) * top / (top + a)


@cache
def _frost_pictures() -> tuple[torch.Tensor, ...]:
    """ImageNet-C's five frost pictures (RGB, float in [0, 255], ``(3, H, W)``)."""
    from PIL import Image

    folder = Path(__file__).with_name("frost")
    return tuple(torch.from_numpy(np.asarray(Image.open(folder / f"frost{i}.jpg").convert("RGB"), np.float32).copy())
                 .permute(2, 0, 1) for i in range(1, 6))


@cache
def _frost_scaled(i: int, h: int, w: int) -> torch.Tensor:
    """Frost picture ``i`` scaled as the reference does for an ``h x w`` image: up to cover
    it if smaller, then by 1.1 (bicubic, as OpenCV's INTER_CUBIC)."""
    f = _frost_pictures()[i]
    fh, fw = f.shape[-2:]
    scale = max(1.0, h / fh, w / fw) * 1.1
    size = (math.ceil(fh * scale), math.ceil(fw * scale))
    return F.interpolate(f[None], size=size, mode="bicubic", align_corners=False)[0].clamp(0, 255)


def frost(x, s, g):
    a, b_ = [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)][s - 1]
    n, c, h, w = x.shape
    layers = []
    for _ in range(n):
        i = int(torch.randint(5, (1,), generator=g))
        f = _frost_scaled(i, h, w)
        top = int(torch.randint(f.shape[1] - h, (1,), generator=g))
        left = int(torch.randint(f.shape[2] - w, (1,), generator=g))
        crop = f[:, top:top + h, left:left + w]
        if c == 1:  # the reference weighs the picture's BGR channels with RGB weights here; kept
            crop = (0.2989 * crop[2] + 0.5870 * crop[1] + 0.1140 * crop[0])[None]
        layers.append(crop)
    return a * x + b_ * torch.stack(layers).to(x.device, x.dtype) / 255


def snow(x, s, g):
    loc, scale, zoom, cut, radius, sigma, blend = [
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)][s - 1]
    b, _c, h, w = x.shape
    layer = loc + scale * _rand((b, 1, h, w), g, x.device, "normal")
    layer = _clipped_zoom(layer, zoom)
    layer = torch.where(layer < cut, 0.0, layer).clamp(0, 1)
    angles = torch.rand(b, generator=g, dtype=torch.float64) * 90 - 135
    layer = _motion(layer, radius, sigma, angles)
    layer = (torch.round(layer * 255) / 255)[..., :h, :w]
    x = blend * x + (1 - blend) * torch.maximum(x, _gray(x) * 1.5 + 0.5)
    return x + layer + layer.flip(-1, -2)


# ---- digital -----------------------------------------------------------------------------------


def brightness(x, s, g):
    """V of HSV raised by ``c``: hue and saturation kept means every channel scales by
    ``V' / V`` (a black pixel, saturation 0, becomes grey ``V'``); grey images add ``c``."""
    c = [.1, .2, .3, .4, .5][s - 1]
    if x.shape[1] == 1:
        return x + c
    v = x.amax(1, keepdim=True)
    v2 = (v + c).clamp(0, 1)
    return torch.where(v > 0, x * v2 / v.clamp_min(1e-12), v2)


def contrast(x, s, g):
    c = [0.4, .3, .2, .1, .05][s - 1]
    m = x.mean((2, 3), keepdim=True)
    return (x - m) * c + m


def elastic_transform(x, s, g):
    """Displacements: uniform noise of ``0.005 H`` smoothed by a Gaussian of 1% of the size
    (SciPy 'reflect' borders, truncated at 3 sigma) times alpha; bilinear resampling with
    half-sample-symmetric borders (SciPy's ``map_coordinates(order=1, mode='reflect')``)."""
    b, _c, h, w = x.shape
    alpha = [250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12][s - 1]
    m = h * 0.005
    field = (2 * _rand((b, 2, h, w), g, x.device, dtype=torch.float64) - 1) * m
    field = _gaussian(field, (h * 0.01, w * 0.01), "symmetric", truncate=3) * alpha
    dx, dy = field[:, 0].float(), field[:, 1].float()
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=torch.float32),
                            torch.arange(w, device=x.device, dtype=torch.float32), indexing="ij")
    gx = (xs + dx + 0.5) / w * 2 - 1
    gy = (ys + dy + 0.5) / h * 2 - 1
    return F.grid_sample(x, torch.stack([gx, gy], -1), mode="bilinear", padding_mode="reflection", align_corners=False)


def _box_weights(n: int, m: int) -> torch.Tensor:
    """Pillow's BOX resampling from ``n`` to ``m`` pixels as an ``(m, n)`` matrix: output ``j``
    averages the inputs whose centres fall in ``(j s, (j + 1) s]``, ``s = n / m``."""
    s = n / m
    centres = np.arange(n) + 0.5
    j = np.arange(m)[:, None]
    wts = ((centres > j * s) & (centres <= (j + 1) * s)).astype(np.float64)
    return torch.from_numpy(wts / wts.sum(1, keepdims=True))


def pixelate(x, s, g):
    c = [0.6, 0.5, 0.4, 0.3, 0.25][s - 1]
    h, w = x.shape[-2:]
    sh, sw = int(h * c), int(w * c)
    wy, wx = _box_weights(h, sh).to(x.device, x.dtype), _box_weights(w, sw).to(x.device, x.dtype)
    small = wy @ x @ wx.T
    return small.index_select(-2, _nearest(sh, h).to(x.device)).index_select(-1, _nearest(sw, w).to(x.device))


def _nearest(n: int, m: int) -> torch.Tensor:
    """Pillow's NEAREST resampling from ``n`` to ``m`` pixels: output ``j`` takes the input
    under its centre, ``(j + 0.5) n / m``, accumulated step by step as Pillow's affine loop
    does (its rounding decides ties, e.g. 32 -> 80)."""
    step = n / m
    return torch.from_numpy(np.floor(np.cumsum(np.r_[step * 0.5, np.full(m - 1, step)])).astype(np.int64))


def jpeg_compression(x, s, g):
    """Encoded and decoded by libjpeg at quality 25 down to 7 (torchvision.io, as Pillow does);
    a grey image goes through RGB and back to luma, as the reference's Pillow path does."""
    from torchvision.io import decode_jpeg, encode_jpeg

    q = [25, 18, 15, 10, 7][s - 1]
    grey = x.shape[1] == 1
    u8 = (x.expand(-1, 3, -1, -1) if grey else x).mul(255).round().clamp(0, 255).to(torch.uint8).cpu()
    out = torch.stack(decode_jpeg(encode_jpeg(list(u8), quality=q))).to(x.device, torch.float32) / 255
    return _gray(out) if grey else out


KERNELS: dict[str, Callable] = {**{n: globals()[n] for n in IMAGENET_C}, "occlusion": occlusion, "gamma": gamma,
                                 "shadow": shadow, "colour_temperature": colour_temperature}
__all__ = ["CORRUPTIONS", "GROUPS", "IMAGENET_C", "KERNELS", "OCCLUDED", "corrupt"]
