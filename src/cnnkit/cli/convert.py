"""``cnnkit convert``: one detection dataset format into another (a reader plus a writer)."""

from __future__ import annotations

import click
from click.core import ParameterSource

from cnnkit.errors import CnnkitError

# The same help and default-display settings as ``cnnkit.cli.main`` (not imported from there: main
# imports this module while it is itself being imported).
CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 110}
SHAPES_OPTIONS = ("imgsz", "sizes", "seed", "classes", "max_objects", "masks")


@click.command(context_settings=CONTEXT)
@click.argument("src")
@click.option("--to", "to_fmt", type=click.Choice(["yolo", "coco", "masks", "nifti"]), required=True,
              help="format to write: yolo (data.yaml, images/, labels/), coco (coco.yaml, images/, "
                   "annotations/*.json), masks (SRC shapes: segmentation scenes as data.yaml, images/ and "
                   "masks/ of class ids, for `cnnkit segment`) or nifti (SRC phantoms: 3-D volumes as "
                   "<split>/images and <split>/labels .nii.gz, for `cnnkit medical`)")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder to write (new or empty)")
@click.option("--from", "from_fmt", type=click.Choice(["auto", "yolo", "coco", "voc"]), default="auto",
              help="format of SRC; auto: a folder with Annotations/ is VOC, a .json is COCO, a YAML whose "
                   "splits name annotations is COCO, another YAML is YOLO")
@click.option("--overwrite", is_flag=True,
              help="write into a non-empty --out, replacing the images/, labels/ or annotations/ and the "
                   "dataset YAML there")
@click.option("--imgsz", type=int, default=None, help="shapes only: image side [default: 320; masks 128]")
@click.option("--sizes", default=None,
              help="shapes only: images per split, e.g. train=200,val=50 (only the splits named are "
                   "written) [default: train=400,val=100,test=100]")
@click.option("--seed", type=int, default=0, help="shapes only: dataset seed")
@click.option("--classes", type=int, default=None, help="shapes only: use the first N of the 8 shape classes "
              "[default: 8; masks 4]")
@click.option("--max-objects", type=int, default=None, help="shapes only: at most this many objects per image "
              "[default: 6; masks 4]")
@click.option("--masks", is_flag=True, help="shapes only, --to yolo/coco: write each object's visible mask as "
              "polygons (exact along pixel edges; YOLO segment lines, COCO segmentation) for `cnnkit instance`")
@click.pass_context
def convert(ctx: click.Context, src: str, to_fmt: str, out: str, from_fmt: str, overwrite: bool,
            imgsz: int | None, sizes: str | None, seed: int, classes: int | None, max_objects: int | None,
            masks: bool) -> None:
    """Convert the detection dataset SRC to YOLO or COCO (or write shapes segmentation masks).

    SRC is a YOLO data.yaml, a COCO .json file, a COCO YAML (per split: images, annotations), a
    Pascal VOC folder, or `shapes` (the built-in generated scenes, shaped by the shapes-only
    options). Prints the images and boxes per split, each problem found in the labels once, and
    the dataset file written.

    \b
    Examples:
      cnnkit convert shapes --to yolo --out shapes-yolo --sizes train=200,val=50 --classes 3
      cnnkit convert shapes --to coco --masks --out shapes-inst --sizes train=200,val=50
      cnnkit convert VOCdevkit/VOC2012 --to coco --out voc-coco
      cnnkit convert coco/annotations/instances_val2017.json --to yolo --out coco-yolo
      cnnkit convert shapes --to masks --out shapes-seg --sizes train=100,val=20
      cnnkit convert phantoms --to nifti --out phantoms-nii --sizes val=4
    """
    from cnnkit.data.formats import read_detection, write_detection

    given = [f"--{n.replace('_', '-')}" for n in SHAPES_OPTIONS
             if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE]
    if to_fmt == "nifti":
        if src != "phantoms":
            raise CnnkitError("--to nifti writes the built-in 3-D phantoms; SRC must be 'phantoms'")
        from cnnkit.data.volumes import PHANTOM_SIZES, phantoms, write_nifti_folders

        data = phantoms(_counts(None, sizes, 1, PHANTOM_SIZES), seed=seed)
        for split, records in data.splits.items():
            click.echo(f"  {split:<5} {len(records):>7} volumes")
        click.echo(f"wrote {write_nifti_folders(data, out)}")
        return
    if masks and to_fmt not in ("yolo", "coco"):
        raise CnnkitError("--masks applies to --to yolo or --to coco (instance polygons)")
    if to_fmt == "masks":
        if src != "shapes":
            raise CnnkitError("--to masks writes the built-in shapes segmentation scenes; SRC must be 'shapes'")
        _write_masks(out, overwrite, imgsz, sizes, seed, 4 if classes is None else classes,
                     4 if max_objects is None else max_objects)
        return
    classes = 8 if classes is None else classes
    max_objects = 6 if max_objects is None else max_objects
    if src == "shapes":
        if from_fmt != "auto":
            raise CnnkitError(f"--from {from_fmt} does not apply to shapes (the built-in generated scenes)")
        data = _shapes(imgsz, sizes, seed, classes, max_objects, masks)
    else:
        if given:
            raise CnnkitError(f"{', '.join(given)} apply only to the built-in `shapes` data, not to '{src}'")
        data = read_detection(src, from_fmt)
    click.echo(f"{data.name}: {len(data.names)} classes ({_short(data.names)})")
    for split, records in data.splits.items():
        boxes = sum(len(r.boxes) for r in records)
        click.echo(f"  {split:<5} {len(records):>7} images {boxes:>8} boxes")
    for w in data.warnings:
        click.echo(f"warning: {w}")
    path = write_detection(data, out, to_fmt, overwrite=overwrite)
    click.echo(f"wrote {path}")


def _counts(imgsz: int | None, sizes: str | None, max_objects: int, default: dict[str, int]) -> dict[str, int]:
    """Images per split from ``--sizes`` (checked with the other shapes options)."""
    if imgsz is not None and not 32 <= imgsz <= 4096:
        raise CnnkitError(f"--imgsz must be between 32 and 4096, got {imgsz}")
    if max_objects < 1:
        raise CnnkitError(f"--max-objects must be at least 1, got {max_objects}")
    counts = dict(default)
    if sizes:
        counts = {}
        for item in sizes.split(","):
            name, _, n = item.strip().partition("=")
            if name not in default or not n.strip().isdigit() or int(n) < 1:
                raise CnnkitError(f"--sizes takes split=count pairs with splits {', '.join(default)} and "
                                  f"counts >= 1, e.g. train=200,val=50; got '{sizes}'")
            counts[name] = int(n)
    return counts


def _write_masks(out: str, overwrite: bool, imgsz: int | None, sizes: str | None, seed: int, classes: int,
                 max_objects: int) -> None:
    from cnnkit.data.segmentation import SHAPES_SEG_SIZES, shapes_segmentation, write_mask_folders

    counts = _counts(imgsz, sizes, max_objects, SHAPES_SEG_SIZES)
    data = shapes_segmentation(imgsz, counts, seed=seed, num_classes=classes, max_objects=max_objects)
    click.echo(f"shapes segmentation: {len(data.names)} classes ({_short(data.names)})")
    for split, records in data.splits.items():
        click.echo(f"  {split:<5} {len(records):>7} images")
    click.echo(f"wrote {write_mask_folders(data, out, overwrite)}")


def _shapes(imgsz: int | None, sizes: str | None, seed: int, classes: int, max_objects: int, masks: bool = False):
    from cnnkit.data.detection import SHAPES_DET_SIZES, shapes_detection

    counts = _counts(imgsz, sizes, max_objects, SHAPES_DET_SIZES)
    data = shapes_detection(imgsz, {s: counts.get(s, 0) for s in SHAPES_DET_SIZES}, seed=seed,
                            num_classes=classes, max_objects=max_objects, masks=masks)
    data.splits = {s: r for s, r in data.splits.items() if s in counts}
    return data


def _short(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
