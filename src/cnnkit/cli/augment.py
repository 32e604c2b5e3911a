"""``cnnkit augment preview``: see what an augmentation spec does to a dataset's images."""

from __future__ import annotations

from pathlib import Path

import click

from cnnkit.errors import CnnkitError

# The same help and default-display settings as the other groups of ``cnnkit.cli.main`` (not
# imported from there: main imports this module while it is itself being imported).
CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 110}


@click.group(context_settings=CONTEXT)
def augment() -> None:
    """Data augmentation: preview a --aug spec on a dataset."""


@augment.command("preview", context_settings=CONTEXT)
@click.option("--data", required=True, help="dataset: digits, shapes, or an ImageFolder path")
@click.option("--aug", default=None,
              help="augmentations, as for `cnnkit classify train --aug` (e.g. flip,rotate=15,"
                   "scale=0.8:1.2,jitter=0.4,erase=0.25); default: the dataset's training default")
@click.option("--n", "n", type=int, default=16, help="how many augmented samples to draw")
@click.option("--imgsz", type=int, default=None, help="image size; default: the dataset's")
@click.option("--seed", type=int, default=0, help="random seed (which images, which augmentations)")
@click.option("--mixup", type=float, default=0.0, help="also mix each row of samples with MixUp(alpha)")
@click.option("--cutmix", type=float, default=0.0,
              help="also mix each row with CutMix(alpha); with --mixup too, each row uses one at random")
@click.option("--out", type=click.Path(dir_okay=False), default="aug_preview.png", help="PNG file to write")
def preview_cmd(data, aug, n, imgsz, seed, mixup, cutmix, out) -> None:
    """Write a grid of augmented training samples: originals on top, augmented copies below."""
    path, spec = preview(data, aug, n=n, imgsz=imgsz, seed=seed, mixup=mixup, cutmix=cutmix, out=out)
    click.echo(f"wrote {path} ({n} augmented samples of '{data}' with --aug {spec or 'none'})")


def preview(data: str, aug: str | None, n: int = 16, imgsz: int | None = None, seed: int = 0,
            mixup: float = 0.0, cutmix: float = 0.0, out: str | Path = "aug_preview.png") -> tuple[Path, str]:
    """Draw ``n`` augmented training samples of ``data`` into a PNG grid.

    The top row shows up to 8 training images (resized); each row below shows a new random
    augmentation of each of them, mixed across the row when ``mixup``/``cutmix`` are given.

    Returns:
        The PNG path and the augmentation spec used.

    Raises:
        CnnkitError: bad data, spec or numbers.
    """
    import torch
    from torchvision.transforms import v2

    from cnnkit.data.classification import load_classification_data
    from cnnkit.data.transforms import parse_aug

    if not 1 <= n <= 256:
        raise CnnkitError(f"--n must be between 1 and 256, got {n}")
    if imgsz is not None and not 8 <= imgsz <= 1024:
        raise CnnkitError(f"--imgsz must be between 8 and 1024, got {imgsz}")
    if mixup < 0 or cutmix < 0:
        raise CnnkitError(f"--mixup and --cutmix need an alpha >= 0, got {mixup:g} and {cutmix:g}")
    out = Path(out)
    if out.is_dir():
        raise CnnkitError(f"--out '{out}' is a folder; give a file name such as {out / 'aug.png'}")
    ds = load_classification_data(data, seed=seed)
    from types import SimpleNamespace

    from cnnkit.tasks.classify.spec import default_aug, folder_defaults

    chosen = SimpleNamespace(imgsz=imgsz, aug=aug, batch_aug=None, model="smallcnn", seed=seed)
    folder_defaults(chosen, ds)  # a user's folder: the size and augmentation training would choose
    spec = chosen.aug if chosen.aug is not None else default_aug(ds)
    size = chosen.imgsz or ds.default_imgsz
    augs = parse_aug(spec, size)
    resize = v2.Resize((size, size), antialias=True)
    train = ds.split("train")
    cols = min(8, n)
    torch.manual_seed(seed)
    picks = torch.randperm(len(train))[:cols].tolist()
    originals, labels = [], []
    for i in picks:
        img, label = train[i]
        originals.append(resize(img))
        labels.append(label)
    cols = len(originals)
    pipeline = v2.Compose(augs) if augs else v2.Identity()
    mix = _mix(mixup, cutmix, len(ds.classes))
    rows = [(originals, [ds.classes[y] for y in labels])]
    for start in range(0, n, cols):
        row = [pipeline(originals[c]) for c in range(min(cols, n - start))]
        row_labels = labels[: len(row)]
        if mix is not None and len(row) > 1:
            x = torch.stack(row).float() / 255
            x, soft = mix(x, torch.tensor(row_labels))
            row = [(xi * 255).round().to(torch.uint8) for xi in x]
            rows.append((row, [_mixed_title(s, ds.classes) for s in soft]))
        else:
            rows.append((row, [ds.classes[y] for y in row_labels]))
    mixing = " + ".join(f"{k} {v:g}" for k, v in (("mixup", mixup), ("cutmix", cutmix)) if v > 0)
    heading = f"{ds.name} · {size}px · --aug {spec or 'none'}" + (f" · {mixing}" if mixing else "")
    _draw(rows, heading, out)
    return out, spec


def _draw(rows: list, heading: str, path: Path) -> None:
    """One row of originals, then rows of augmented images, each cell titled with its label."""
    import numpy as np

    from cnnkit.utils.plotting import _plt, _save

    plt = _plt()
    cols = max(len(images) for images, _ in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.5 * cols, 1.65 * len(rows) + 0.3),
                             squeeze=False)
    for r, (images, titles) in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(images):
                ax.axis("off")
                continue
            x = images[c]
            arr = x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()
            ax.imshow(np.ascontiguousarray(arr), cmap="gray" if arr.ndim == 2 else None, vmin=0,
                      vmax=255, interpolation="nearest")
            ax.set_title(titles[c], fontsize=7)
            for side in ax.spines.values():
                side.set_color("tab:blue" if r == 0 else "0.6")
                side.set_linewidth(2 if r == 0 else 0.5)
        axes[r][0].set_ylabel("original" if r == 0 else f"augmented {r}", fontsize=8,
                              color="tab:blue" if r == 0 else "black")
    fig.suptitle(heading, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _mix(mixup: float, cutmix: float, num_classes: int):
    from torchvision.transforms import v2

    mixes = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + \
            ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def _mixed_title(soft, classes: list[str]) -> str:
    weights, idx = soft.topk(min(2, len(classes)))
    parts = [f"{classes[int(i)]} {float(w):.2f}" for w, i in zip(weights, idx) if float(w) >= 0.005]
    return " + ".join(parts)
