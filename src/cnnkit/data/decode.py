"""Image decoding shared by training, prediction and serving: one function, :func:`read_image`.

Every path into a model goes through here, so an image is decoded the same way at train time
and at predict time: EXIF orientation applied, converted to the model's channel count, 16-bit
and palette images handled, Pillow's decompression-bomb guard left on.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cnnkit.errors import DataError, ImageDecodeError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

_ORIENTATION = 0x0112  # the EXIF orientation tag
ImageLike = Union[str, os.PathLike, bytes, Image.Image, np.ndarray, torch.Tensor]


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has an image extension that cnnkit reads."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def read_image(src: ImageLike, channels: int | None = 3, name: str | None = None,
               max_pixels: int | None = None) -> torch.Tensor:
    """Decode an image into a ``uint8`` tensor.

    Args:
        src: a file path, encoded bytes, a PIL image, a NumPy array (HxW or HxWxC, uint8 or
            float in [0, 1]) or a tensor (CxHxW uint8, or float in [0, 1]).
        channels: 1 (grayscale) or 3 (RGB) to convert to; None keeps 1 for grayscale
            sources and 3 otherwise.
        name: how to name the image in error messages (defaults to the path or "<bytes>").
        max_pixels: refuse encoded images with more pixels than this, from their header,
            before any pixel is decoded (the server's guard; Pillow's own bomb guard stays on).

    Returns:
        Tensor of shape ``(C, H, W)`` and dtype ``uint8``; decoded files and PIL images come
        with channels-last strides (as from torchvision's ``pil_to_tensor``), so call
        ``.contiguous()`` before ``.view()``.

    Raises:
        ImageDecodeError: the file is missing, not an image, corrupt, truncated or larger
            than Pillow's decompression-bomb limit.

    Examples:
        >>> read_image(np.zeros((8, 8), np.uint8), channels=3).shape
        torch.Size([3, 8, 8])
    """
    if isinstance(src, torch.Tensor):
        return _from_tensor(src, channels)
    if isinstance(src, np.ndarray):
        return _from_tensor(torch.from_numpy(_hwc(src)).permute(2, 0, 1), channels)
    if isinstance(src, Image.Image):
        return _pil_to_tensor(_convert(_upright(src), channels))
    if isinstance(src, (bytes, bytearray)):
        label = name or "<bytes>"
        return _decode(lambda: Image.open(io.BytesIO(src)), label, channels, max_pixels)
    path = Path(src)
    label = name or str(src)
    if not path.exists():
        raise ImageDecodeError(label, "the file does not exist")
    if path.is_dir():
        raise ImageDecodeError(label, "it is a folder, not an image file")
    return _decode(lambda: Image.open(path), label, channels, max_pixels)


def _decode(opener, label: str, channels: int | None, max_pixels: int | None = None) -> torch.Tensor:
    try:
        with opener() as im:
            if max_pixels and im.width * im.height > max_pixels:
                raise ImageDecodeError(label, f"too large ({im.width} x {im.height} pixels; the limit is "
                                              f"{max_pixels:,} pixels)")
            im.load()  # raises on truncated data
            im = _upright(im)
            return _pil_to_tensor(_convert(im, channels))
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(label, f"too large ({e.args[0].split('(')[0].strip().rstrip(',')}); "
                                      "Pillow's decompression-bomb guard refused it") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(label, "not an image file Pillow can identify") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(label, f"corrupt or truncated ({str(e).strip() or type(e).__name__})") from None


def _upright(im: Image.Image) -> Image.Image:
    """``im`` turned by its EXIF orientation; ``im`` itself when it needs no turn.

    ``ImageOps.exif_transpose`` returns a copy of the pixels even then; skipping that copy (and
    the one ``convert`` makes to the mode an image already has) took decoding a 128 px image
    from about 1.28 to 1.12 ms, level with torchvision's PIL loader (profiling
    benchmarks/data_loading.py).
    """
    if im.getexif().get(_ORIENTATION, 1) in (1, None):
        return im
    return ImageOps.exif_transpose(im)


def _convert(im: Image.Image, channels: int | None) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / max(hi, 1.0) * 255.0, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        im = Image.fromarray(((arr - lo) * scale).astype(np.uint8), "L")
    if channels is None:
        channels = 1 if im.mode in ("1", "L", "LA") else 3
    if channels == 1:
        return im if im.mode == "L" else im.convert("L")
    if channels == 3:
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
            return Image.alpha_composite(bg, im).convert("RGB")
        return im if im.mode == "RGB" else im.convert("RGB")
    raise ValueError(f"channels must be 1 or 3, got {channels}")


def _pil_to_tensor(im: Image.Image) -> torch.Tensor:
    # One copy out of Pillow and a (C, H, W) view with channels-last strides, as torchvision's
    # pil_to_tensor: no transposing copy, and uint8 resizing takes its fast channels-last path
    # (measured when profiling benchmarks/data_loading.py: decode + resize of a 500 px RGB image
    # in about half the time of a contiguous (C, H, W) copy).
    return torch.from_numpy(_hwc(np.array(im, dtype=np.uint8))).permute(2, 0, 1)


def _hwc(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        return arr[:, :, None]
    if arr.ndim == 3:
        return arr
    raise ValueError(f"expected an HxW or HxWxC array, got shape {tuple(arr.shape)}")


def _from_tensor(t: torch.Tensor, channels: int | None) -> torch.Tensor:
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3:
        raise ValueError(f"expected a CxHxW image tensor, got shape {tuple(t.shape)}")
    if t.dtype != torch.uint8:
        t = (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
    c = t.shape[0]
    if c == 4:
        t, c = t[:3], 3
    if channels is None or channels == c:
        return t.contiguous()
    if channels == 3 and c == 1:
        return t.expand(3, -1, -1).contiguous()
    if channels == 1 and c == 3:
        # ITU-R 601-2 luma, as Pillow's convert("L")
        w = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        return (t.float() * w).sum(0, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert a {c}-channel image to {channels} channels")


def list_sources(source: str | Path) -> list[Path]:
    """Image files of a file or folder source (folders are searched recursively)."""
    p = Path(source)
    if not p.exists():
        raise DataError(f"source '{p}' does not exist")
    if p.is_file():
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f) and not f.name.startswith("."))
    if not files:
        raise DataError(f"no images found in folder '{p}'")
    return files
