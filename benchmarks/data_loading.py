"""cnnkit's training data loader versus torchvision ImageFolder + v2 transforms, same pipeline.

    python benchmarks/data_loading.py [--images 600] [--size 128] [--imgsz 112] [--batch 32]
                                      [--workers 0 2] [--repeats 3]

Writes an ImageFolder tree of JPEG and PNG images (procedural shapes scenes, 8 classes) to a
temporary folder and times full epochs of

* ours: ``scan_image_folder`` + ``TransformedDataset`` + ``make_loader`` with
  ``Preprocess.train_transform(parse_aug(AUG))`` (decoding through ``cnnkit.data.decode``);
* theirs: ``torchvision.datasets.ImageFolder`` (PIL loader) + ``v2.Compose`` of the identical
  pipeline written with plain torchvision transforms (PILToTensor, Resize, RandomAffine,
  RandomHorizontalFlip, ColorJitter, RandomErasing, ToDtype, Normalize) and the default collate;

with the same batch size, shuffling and worker count, and one torch thread in the main process
(``--threads``; the workers use one each). Runs alternate which goes first; the
medians of images/s and their ratio (ours / theirs, higher is better) are reported.

The augmentation stage alone is then compared on decoded images: per-image v2 transforms on the
CPU versus :class:`cnnkit.data.batch_aug.BatchAugment` on whole batches, on the CPU and, when a
CUDA GPU is available, on the GPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from _common import save
from cnnkit.data.batch_aug import BatchAugment
from cnnkit.data.classification import TransformedDataset, make_loader
from cnnkit.data.imagefolder import scan_image_folder
from cnnkit.data.shapes import SHAPE_CLASSES, classification_params, sample_scene
from cnnkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess, parse_aug

AUG = "flip,rotate=15,scale=0.8:1.2,jitter=0.4,erase=0.25"


def torchvision_augs() -> list[v2.Transform]:
    """``AUG`` written with plain torchvision v2 transforms, in parse_aug's order."""
    return [v2.RandomAffine(degrees=15.0, scale=(0.8, 1.2)), v2.RandomHorizontalFlip(0.5),
            v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1),
            v2.RandomErasing(p=0.25, value=0)]


def write_tree(root: Path, images: int, size: int) -> Path:
    """root/train/<class>/NNNN.{jpg,png} (+ one image per class in root/val)."""
    params = classification_params(size)
    for split, n in (("train", images), ("val", len(SHAPE_CLASSES))):
        for i in range(n):
            label = i % len(SHAPE_CLASSES)
            scene = sample_scene(params, np.random.default_rng([7, i, split == "val"]), classes=[label])
            d = root / split / SHAPE_CLASSES[label]
            d.mkdir(parents=True, exist_ok=True)
            im = Image.fromarray(scene.image)
            if i % 2:
                im.save(d / f"{i:04d}.jpg", quality=90)
            else:
                im.save(d / f"{i:04d}.png")
    return root


def ours_loader(root: Path, imgsz: int, batch: int, workers: int) -> DataLoader:
    train = scan_image_folder(root)["train"]
    pre = Preprocess(imgsz, IMAGENET_MEAN, IMAGENET_STD, train.channels)
    ds = TransformedDataset(train, pre.train_transform(parse_aug(AUG, imgsz)))
    return make_loader(ds, batch, True, workers, generator=torch.Generator().manual_seed(0))


def theirs_loader(root: Path, imgsz: int, batch: int, workers: int) -> DataLoader:
    tf = v2.Compose([v2.PILToTensor(), v2.Resize((imgsz, imgsz), antialias=True), *torchvision_augs(),
                     v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))])
    ds = datasets.ImageFolder(str(root / "train"), transform=tf)
    return DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                      generator=torch.Generator().manual_seed(0))


def epoch_rate(make) -> float:
    """Images per second over one full epoch, worker start-up included (as in training)."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    dl = make()
    n = 0
    for batch in dl:
        images = batch["images"] if isinstance(batch, dict) else batch[0]
        n += len(images)
    return n / (time.perf_counter() - t0)


def loader_comparison(root: Path, args) -> list[dict]:
    rows = []
    for workers in args.workers:
        ours, theirs = [], []
        for r in range(args.repeats):
            runs = [("ours", ours_loader), ("theirs", theirs_loader)]
            for name, make in runs if r % 2 == 0 else runs[::-1]:
                rate = epoch_rate(lambda m=make: m(root, args.imgsz, args.batch, workers))
                (ours if name == "ours" else theirs).append(rate)
        row = {"workers": workers, "ours_img_s": round(statistics.median(ours), 1),
               "torchvision_img_s": round(statistics.median(theirs), 1),
               "ratio": round(statistics.median(ours) / statistics.median(theirs), 3),
               "ours_runs": [round(x, 1) for x in ours], "torchvision_runs": [round(x, 1) for x in theirs]}
        print(f"workers={workers}: cnnkit {row['ours_img_s']:.0f} img/s, torchvision ImageFolder "
              f"{row['torchvision_img_s']:.0f} img/s, ratio {row['ratio']:.2f}")
        rows.append(row)
    return rows


def augmentation_comparison(root: Path, args) -> dict:
    """Augmentation stage only, on decoded and resized uint8 images held in memory."""
    train = scan_image_folder(root)["train"]
    resize = v2.Resize((args.imgsz, args.imgsz), antialias=True)
    images = [resize(train[i][0]) for i in range(len(train))]
    per_image = v2.Compose([*parse_aug(AUG, args.imgsz), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))])
    batch_aug = BatchAugment.from_spec(AUG, IMAGENET_MEAN, IMAGENET_STD)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    chunks = [torch.stack(images[i:i + args.batch]) for i in range(0, len(images), args.batch)]

    def cpu_per_image() -> float:
        t0 = time.perf_counter()
        for c in chunks:
            torch.stack([per_image(x) for x in c])
        return len(images) / (time.perf_counter() - t0)

    def batched(device: str) -> float:
        m, s = mean.to(device), std.to(device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for c in chunks:
            x = (c.to(device, non_blocking=True).float() / 255 - m) / s
            batch_aug({"images": x})
        sync()
        return len(images) / (time.perf_counter() - t0)

    paths = {"cpu_per_image_v2": cpu_per_image, "cpu_batch_augment": lambda: batched("cpu")}
    if torch.cuda.is_available():
        batched("cuda")  # warm-up: CUDA context and kernels
        paths["gpu_batch_augment"] = lambda: batched("cuda")
    else:
        print("no CUDA GPU: the GPU BatchAugment comparison was skipped")
    rates: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            rates[name].append(fn())
    out = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    base = out["cpu_per_image_v2"]
    for k, v in out.items():
        print(f"augmentation only, {k}: {v:.0f} img/s ({v / base:.2f}x per-image CPU)")
    return {"img_s": out, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--size", type=int, default=128, help="stored image size (pixels)")
    ap.add_argument("--imgsz", type=int, default=112, help="training input size (pixels)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in the main process (loader workers always use 1); 1 keeps "
                         "timings stable on a shared machine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_tree(Path(tmp), args.images, args.size)
        loaders = loader_comparison(root, args)
        aug = augmentation_comparison(root, args)
    save("data_loading", {"command": "python benchmarks/data_loading.py", "aug": AUG,
                          "images": args.images, "stored_size": args.size, "imgsz": args.imgsz,
                          "batch": args.batch, "repeats": args.repeats, "threads": args.threads,
                          "peer": "torchvision.datasets.ImageFolder + v2 transforms, same pipeline",
                          "loaders": loaders, "augmentation_stage": aug})


if __name__ == "__main__":
    main()
