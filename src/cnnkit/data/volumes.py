"""3-D volumes for medical segmentation: procedural phantoms and NIfTI files.

A dataset is a :class:`VolumeData`: class names (label value = index, ``background``
first) and per split a list of :class:`VolRecord` (an image volume and its label volume, as
NIfTI files or arrays). Volumes are ``(D, H, W)``; images are single-channel floats.

Built-in ``phantoms`` imitate MR/CT scans: an ellipsoidal "organ" with one or two
"lesions" inside it, each a smooth blob with its own mean intensity, on a background with
Gaussian noise and a smooth multiplicative intensity inhomogeneity (a bias field, as MR
coils produce), deterministic in the seed.

User data is a YAML naming NIfTI folders per split (paths relative to the YAML)::

    train: {images: imagesTr, labels: labelsTr}
    val: {images: imagesVal, labels: labelsVal}
    names: [background, liver, tumour]

Every ``images/X.nii.gz`` needs ``labels/X.nii.gz`` of the same shape (the Medical
Segmentation Decathlon layout). For classification a split names one folder with a
subfolder of volumes per class (``train: train`` with ``train/normal/*.nii.gz``,
``train/abnormal/*.nii.gz``); ``names`` then lists the classes (default: the subfolders of
the first split, sorted). Images are normalized per volume (zero mean, unit std over the
volume) when read.

For classification the built-in phantoms come in two classes, ``no lesion`` and ``lesion``:
half of them are drawn without lesions (:func:`phantom_classes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cnnkit.errors import DataError

PHANTOM_NAMES = ["background", "organ", "lesion"]
PHANTOM_SIZES = {"train": 64, "val": 16, "test": 16}
PHANTOM_SIZE = 32
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class VolRecord:
    """One volume and its labels: files (``path``, ``label_path``) or arrays (``image`` float32
    (D, H, W), ``label`` uint8 (D, H, W)); ``affine`` (4x4) places voxels in the scanner's space."""

    path: str | None = None
    label_path: str | None = None
    image: np.ndarray | None = None
    label: np.ndarray | None = None
    affine: np.ndarray | None = None
    index: int = 0
    target: int | None = None  # class index of the whole volume (classification)

    @property
    def name(self) -> str:
        return self.path or f"<volume {self.index}>"

    def load_image(self) -> np.ndarray:
        """float32 (D, H, W), normalized to zero mean and unit std."""
        v = self.image if self.image is not None else read_nifti(self.path)[0]
        v = np.asarray(v, np.float32)
        return (v - v.mean()) / max(float(v.std()), 1e-6)

    def load_label(self) -> np.ndarray:
        """uint8 (D, H, W) class ids."""
        if self.label is not None:
            return np.asarray(self.label, np.uint8)
        lab = read_nifti(self.label_path)[0]
        if lab.min() < 0 or lab.max() > 255 or not np.allclose(lab, np.round(lab)):
            raise DataError(f"label volume '{self.label_path}' must hold whole class ids 0..255")
        return lab.astype(np.uint8)


@dataclass
class VolumeData:
    name: str
    names: list[str]
    splits: dict[str, list[VolRecord]]

    def split(self, name: str) -> list[VolRecord]:
        if name not in self.splits:
            raise DataError(f"dataset '{self.name}' has no '{name}' split (it has {', '.join(self.splits)})")
        return self.splits[name]


def read_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(volume (D, H, W) float32, affine (4, 4))`` of a 3-D NIfTI file (nibabel).

    NIfTI stores voxels as (i, j, k) with k the slice axis (axial in most scans); the array is
    returned as (k, j, i), so axis 0 runs across slices and the 2-D models (``unet2d``,
    ``densenet2d``) see one acquired slice at a time. ``affine`` is the file's, for (i, j, k);
    :func:`write_nifti` turns the array back, so label volumes overlay their scans.

    Raises:
        DataError: the file is missing, unreadable, or not 3-D (a 4-D file with one volume is
            accepted).
    """
    import nibabel as nib

    p = Path(path)
    if not p.is_file():
        raise DataError(f"NIfTI file '{p}' does not exist")
    try:
        img = nib.load(str(p))
        arr = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # noqa: BLE001 - nibabel raises many types for a damaged file
        raise DataError(f"'{p}' cannot be read as NIfTI ({e.__class__.__name__})") from None
    return _volume(arr, str(p)), np.asarray(img.affine, np.float64)


def _volume(arr: np.ndarray, name: str) -> np.ndarray:
    """A NIfTI array (i, j, k) as a contiguous (k, j, i) volume; a 4-D array of one volume is
    taken as 3-D."""
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise DataError(f"'{name}' has {arr.ndim} dimensions (shape {tuple(arr.shape)}); a volume must be 3-D")
    return np.ascontiguousarray(arr.transpose(2, 1, 0))


GZIP_MAGIC = b"\x1f\x8b"
NIFTI2_HEADER = 540  # bytes; a NIfTI-1 header is 348


def read_nifti_bytes(data: bytes, name: str = "<volume>", max_voxels: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_nifti` for the bytes of a ``.nii`` or ``.nii.gz`` file (an upload).

    A volume over ``max_voxels`` is refused from its header, before its voxels are read; a
    gzip stream is inflated header first, then only up to the size its header announces, so a
    small compressed body cannot expand into gigabytes (a zip bomb).

    Raises:
        ImageDecodeError: not NIfTI, damaged, not 3-D, or too large (the reason starts with
            "too large").
    """
    import io
    import zlib

    import nibabel as nib

    from cnnkit.errors import ImageDecodeError

    gz = data[:2] == GZIP_MAGIC
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if gz else None
    try:
        head = inflate.decompress(data, NIFTI2_HEADER) if gz else data[:NIFTI2_HEADER]
    except zlib.error:
        raise ImageDecodeError(name, "not a readable gzip stream") from None
    header = None
    for kind in (nib.Nifti1Header, nib.Nifti2Header):
        try:
            header = kind.from_fileobj(io.BytesIO(head), check=True)
            break
        except Exception:  # noqa: BLE001, S112 - nibabel raises many types for a foreign header
            continue
    if header is None:
        raise ImageDecodeError(name, "not a NIfTI volume (.nii or .nii.gz)")
    shape = tuple(int(n) for n in header.get_data_shape())
    voxels = int(np.prod(shape, dtype=np.int64))
    if max_voxels is not None and voxels > max_voxels:
        raise ImageDecodeError(name, f"too large ({'x'.join(map(str, shape))} voxels, the limit is {max_voxels:,})")
    if len(shape) != 3 and not (len(shape) == 4 and shape[-1] == 1):
        raise ImageDecodeError(name, f"not a 3-D volume (shape {shape})")
    size = int(header.get_data_offset()) + voxels * np.dtype(header.get_data_dtype()).itemsize
    if gz:
        try:
            rest = inflate.decompress(inflate.unconsumed_tail, max(size - len(head), 0) + 1)
        except zlib.error:
            raise ImageDecodeError(name, "not a readable gzip stream") from None
        raw = head + rest
    else:
        raw = data
    if len(raw) < size:
        raise ImageDecodeError(name, f"truncated ({len(raw):,} of {size:,} bytes)")
    try:
        image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        img = image_class.from_bytes(raw[:size])
        volume = _volume(np.asarray(img.dataobj, dtype=np.float32), name)
    except Exception as e:  # noqa: BLE001 - a bad datatype, damaged data
        raise ImageDecodeError(name, f"the NIfTI data cannot be read ({e.__class__.__name__})") from None
    if not np.isfinite(volume).all():
        raise ImageDecodeError(name, "the volume holds NaN or infinite values")
    return volume, np.asarray(img.affine, np.float64)


def nifti_bytes(volume: np.ndarray, affine: np.ndarray | None = None) -> bytes:
    """:func:`write_nifti` into memory: the gzip-compressed ``.nii.gz`` bytes."""
    import gzip

    import nibabel as nib

    v = np.asarray(volume).transpose(2, 1, 0)
    v = v.astype(np.uint8) if v.dtype in (np.uint8, np.int64, np.int32, bool) else v.astype(np.float32)
    raw = nib.Nifti1Image(v, np.eye(4) if affine is None else affine).to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0)


def write_nifti(path: str | Path, volume: np.ndarray, affine: np.ndarray | None = None) -> None:
    """Save a (D, H, W) array as NIfTI (uint8 for labels, float32 otherwise), stored as
    (W, H, D) = (i, j, k) like :func:`read_nifti` expects; ``affine`` is for that order."""
    import nibabel as nib

    v = np.asarray(volume).transpose(2, 1, 0)
    v = v.astype(np.uint8) if v.dtype in (np.uint8, np.int64, np.int32, bool) else v.astype(np.float32)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(v, np.eye(4) if affine is None else affine), str(path))


# ---- phantoms -------------------------------------------------------------------------------
def _ellipsoid(grid, centre, radii, rot) -> np.ndarray:
    """Signed 'radius' field: < 1 inside the rotated ellipsoid."""
    d = (grid - centre[:, None, None, None]).reshape(3, -1)
    d = (rot @ d).reshape(grid.shape)
    return np.sqrt(((d / radii[:, None, None, None]) ** 2).sum(0))


def _rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def phantom(rng: np.random.Generator, size: int = PHANTOM_SIZE, lesions: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: ``(image float32 (S, S, S), label uint8 (S, S, S))`` with an organ (1)
    and one or two lesions (2) inside it (none with ``lesions=False``)."""
    ax = np.arange(size, dtype=np.float32) + 0.5
    grid = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"))
    label = np.zeros((size,) * 3, np.uint8)
    centre = size / 2 + rng.uniform(-0.12, 0.12, 3) * size
    radii = rng.uniform(0.22, 0.38, 3) * size
    organ = _ellipsoid(grid, centre, radii, _rotation(rng)) < 1
    label[organ] = 1
    for _ in range(int(rng.integers(1, 3)) if lesions else 0):
        r = rng.uniform(0.08, 0.14, 3) * size
        c = centre + rng.uniform(-0.5, 0.5, 3) * np.maximum(radii - r, 0)
        label[(_ellipsoid(grid, c, r, _rotation(rng)) < 1) & organ] = 2
    means = np.array([0.2, 0.55, 0.85]) + rng.uniform(-0.05, 0.05, 3)
    img = means[label].astype(np.float32)
    img += rng.normal(0, 0.1, img.shape).astype(np.float32)  # thermal noise
    g = (grid / size - 0.5).reshape(3, -1)
    coef = rng.uniform(-0.4, 0.4, 3)
    bias = 1 + (coef @ g).reshape(img.shape) + rng.uniform(-0.3, 0.3) * ((g ** 2).sum(0).reshape(img.shape) - 0.25)
    return (img * bias.astype(np.float32)).astype(np.float32), label


def phantoms(sizes: dict[str, int] | None = None, seed: int = 0, size: int = PHANTOM_SIZE) -> VolumeData:
    """The built-in ``phantoms`` dataset (train 64 / val 16 / test 16 volumes of 32^3)."""
    from cnnkit.data.shapes import _SPLITS

    sizes = dict(PHANTOM_SIZES) if sizes is None else dict(sizes)
    splits = {}
    for sp, n in sizes.items():
        recs = []
        for i in range(n):
            img, lab = phantom(np.random.default_rng([seed, _SPLITS[sp], i, 0x3D]), size)
            recs.append(VolRecord(image=img, label=lab, index=i))
        splits[sp] = recs
    return VolumeData("phantoms", list(PHANTOM_NAMES), splits)


CLASS_NAMES = ["no lesion", "lesion"]


def phantom_classes(sizes: dict[str, int] | None = None, seed: int = 0, size: int = PHANTOM_SIZE) -> VolumeData:
    """Phantoms for classification: each volume is drawn with lesions or, with probability
    1/2, without; ``target`` is 1 when the label volume holds any lesion voxel."""
    from cnnkit.data.shapes import _SPLITS

    sizes = dict(PHANTOM_SIZES) if sizes is None else dict(sizes)
    splits = {}
    for sp, n in sizes.items():
        recs = []
        for i in range(n):
            rng = np.random.default_rng([seed, _SPLITS[sp], i, 0xC1A5])
            img, lab = phantom(rng, size, lesions=bool(rng.random() < 0.5))
            recs.append(VolRecord(image=img, label=lab, index=i, target=int((lab == 2).any())))
        splits[sp] = recs
    return VolumeData("phantoms", list(CLASS_NAMES), splits)


def read_nifti_class_folders(path: str | Path) -> VolumeData:
    """A YAML naming one folder per split, each with a subfolder of NIfTI volumes per class.

    Raises:
        DataError: no such file, a split folder missing, no class subfolders, a class with no
            volumes, or a subfolder not in ``names``.
    """
    p, spec = _read_spec(path)
    root = p.resolve().parent
    names = spec.get("names")
    splits: dict[str, list[VolRecord]] = {}
    for sp in ("train", "val", "test"):
        entry = spec.get(sp)
        if not entry:
            continue
        if not isinstance(entry, str):
            raise DataError(f"the {sp} entry of '{p}' must name a folder with one subfolder of volumes per class")
        folder = root / entry
        if not folder.is_dir():
            raise DataError(f"the {sp} folder '{folder}' named in '{p}' does not exist")
        subs = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not subs:
            raise DataError(f"the {sp} folder '{folder}' has no class subfolders")
        if not isinstance(names, list):
            names = subs
        recs = []
        for d in subs:
            if d not in names:
                raise DataError(f"class folder '{folder / d}' is not one of the names in '{p}' ({', '.join(names)})")
            files = sorted(f for f in (folder / d).iterdir() if f.name.endswith(NIFTI_SUFFIXES))
            if not files:
                raise DataError(f"class folder '{folder / d}' has no .nii or .nii.gz files")
            recs += [VolRecord(path=str(f), index=len(recs) + j, target=names.index(d)) for j, f in enumerate(files)]
        splits[sp] = recs
    if "train" not in splits and "val" not in splits:
        raise DataError(f"'{p}' names no train or val split")
    if len(names) < 2:
        raise DataError(f"'{p}' needs at least two classes, found {len(names)}")
    return VolumeData(str(p), [str(n) for n in names], splits)


def _read_spec(path: str | Path) -> tuple[Path, dict]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise DataError(f"'{p}' does not exist; give 'phantoms' or a YAML naming NIfTI folders per split")
    try:
        spec = yaml.safe_load(p.read_text(encoding="utf-8-sig")) or {}
    except yaml.YAMLError as e:
        raise DataError(f"'{p}' is not valid YAML ({e.__class__.__name__})") from None
    if not isinstance(spec, dict):
        raise DataError(f"'{p}' must be a mapping of splits (train, val, test) and names")
    return p, spec


def read_nifti_folders(path: str | Path) -> VolumeData:
    """A YAML naming ``images`` and ``labels`` NIfTI folders per split, and the class names.

    Raises:
        DataError: no such file, no names, a folder missing or empty, or an image without its
            label file.
    """
    p, spec = _read_spec(path)
    names = spec.get("names")
    if not isinstance(names, list) or len(names) < 2:
        raise DataError(f"'{p}' must list at least two class names under 'names' (background first)")
    root = p.resolve().parent
    splits: dict[str, list[VolRecord]] = {}
    for sp in ("train", "val", "test"):
        entry = spec.get(sp)
        if not entry:
            continue
        if not isinstance(entry, dict) or "images" not in entry or "labels" not in entry:
            raise DataError(f"the {sp} entry of '{p}' must name 'images' and 'labels' folders")
        img_dir, lab_dir = root / str(entry["images"]), root / str(entry["labels"])
        for d in (img_dir, lab_dir):
            if not d.is_dir():
                raise DataError(f"the {sp} folder '{d}' named in '{p}' does not exist")
        files = sorted(f for f in img_dir.iterdir() if f.name.endswith(NIFTI_SUFFIXES) and not f.name.startswith("."))
        if not files:
            raise DataError(f"the {sp} folder '{img_dir}' has no .nii or .nii.gz files")
        recs = []
        for i, f in enumerate(files):
            lab = lab_dir / f.name
            if not lab.is_file():
                raise DataError(f"volume '{f}' has no label file '{lab}'")
            recs.append(VolRecord(path=str(f), label_path=str(lab), index=i))
        splits[sp] = recs
    if "train" not in splits and "val" not in splits:
        raise DataError(f"'{p}' names no train or val split")
    return VolumeData(str(p), [str(n) for n in names], splits)


def write_nifti_folders(data: VolumeData, out: str | Path) -> Path:
    """Write ``data`` in the Decathlon layout (``<split>/images``, ``<split>/labels``, a YAML)."""
    import yaml

    root = Path(out)
    spec: dict = {}
    for sp, recs in data.splits.items():
        for r in recs:
            stem = Path(r.path).name if r.path else f"vol{r.index:04d}.nii.gz"
            img = r.image if r.image is not None else read_nifti(r.path)[0]
            write_nifti(root / sp / "images" / stem, img, r.affine)
            write_nifti(root / sp / "labels" / stem, r.load_label(), r.affine)
        spec[sp] = {"images": f"{sp}/images", "labels": f"{sp}/labels"}
    spec["names"] = list(data.names)
    (root / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return root / "data.yaml"


def load_volume_data(spec: str, seed: int = 0, classify: bool = False) -> VolumeData:
    """Resolve ``--data``: ``phantoms`` or a NIfTI YAML (label folders, or with ``classify``
    class subfolders)."""
    if spec == "phantoms":
        return phantom_classes(seed=seed) if classify else phantoms(seed=seed)
    return read_nifti_class_folders(spec) if classify else read_nifti_folders(spec)


class VolumeDataset(Dataset):
    """Records -> ``(float32 (1, D, H, W), int64 (D, H, W))``; with ``patch`` a random (train)
    or centred cube of that side is cut (volumes smaller than it are padded with image 0 and
    background), and with ``train`` random flips along each axis and a small intensity
    scale and shift.

    Labels are checked: a shape that differs from the image's, or a class id beyond
    ``num_classes``, raises :class:`~cnnkit.errors.DataError`.
    """

    def __init__(self, records: list[VolRecord], num_classes: int, patch: int | None = None, train: bool = False,
                 classify: bool = False):
        self.records, self.k, self.patch, self.train, self.classify = records, num_classes, patch, train, classify

    def __len__(self) -> int:
        return len(self.records)

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rec = self.records[i]
        img, lab = rec.load_image(), rec.load_label()
        if img.shape != lab.shape:
            raise DataError(f"label volume '{rec.label_path or rec.name}' has shape {lab.shape} but its image has "
                            f"{img.shape}; they must match voxel for voxel")
        bad = lab[lab >= self.k]
        if bad.size:
            raise DataError(f"label volume '{rec.label_path or rec.name}' has class id {int(bad.max())}, beyond the "
                            f"{self.k} classes listed")
        return torch.from_numpy(img)[None], torch.from_numpy(lab.astype(np.int64))

    def load_resized(self, i: int) -> torch.Tensor:
        """Classification: the image volume (1, S, S, S) resized (trilinear) to ``patch``."""
        img = torch.from_numpy(self.records[i].load_image())[None]
        s = self.patch
        if s and tuple(img.shape[1:]) != (s, s, s):
            img = torch.nn.functional.interpolate(img[None], size=(s, s, s), mode="trilinear", align_corners=False)[0]
        return img

    def __getitem__(self, i: int):
        if self.classify:
            img = self.load_resized(i)
            if self.train:
                img = _augment(img)
            return img.contiguous(), int(self.records[i].target)
        img, lab = self.load(i)
        if self.patch:
            s = self.patch
            pads = [max(0, s - n) for n in lab.shape]
            if any(pads):
                pad = (0, pads[2], 0, pads[1], 0, pads[0])
                img = torch.nn.functional.pad(img, pad)
                lab = torch.nn.functional.pad(lab, pad, value=0)
            starts = [int(torch.randint(n - s + 1, (1,))) if self.train else (n - s) // 2 for n in lab.shape]
            sl = tuple(slice(a, a + s) for a in starts)
            img, lab = img[(slice(None), *sl)], lab[sl]
        if self.train:
            img, lab = _augment(img, lab)
        return img.contiguous(), lab.contiguous()


def _augment(img: torch.Tensor, lab: torch.Tensor | None = None):
    """Random flips along each axis and a small intensity scale and shift."""
    for ax in range(3):
        if torch.rand(1) < 0.5:
            img = img.flip(ax + 1)
            lab = lab.flip(ax) if lab is not None else None
    img = img * float(torch.empty(1).uniform_(0.9, 1.1)) + float(torch.empty(1).uniform_(-0.1, 0.1))
    return img if lab is None else (img, lab)


def collate_volumes(items: list) -> dict:
    """``images`` (B, 1, D, H, W) with ``masks`` (B, D, H, W) label volumes, or ``targets`` (B,)
    class indices for classification."""
    xs = torch.stack([x for x, _ in items])
    if isinstance(items[0][1], int):
        return {"images": xs, "targets": torch.tensor([y for _, y in items], dtype=torch.int64)}
    return {"images": xs, "masks": torch.stack([y for _, y in items])}
