"""Shared fixtures: small generated image folders and a CLI runner that captures output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("MPLBACKEND", "Agg")


def _share_the_cores() -> None:
    """Under pytest-xdist (`make test` runs two workers), each worker gets its share of the cores.

    Two workers that each start torch's default of one thread per core oversubscribe the machine,
    and spinning OpenMP threads then make both several times slower. The variable also reaches the
    subprocesses a test starts (the README's entry point, `cnnkit serve`).
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
        import torch

        torch.set_num_threads(int(threads))


_share_the_cores()

# Under pytest-xdist (`make test`: `--dist loadfile --no-loadscope-reorder`) every test file is
# one unit of work run on one worker (its session and module fixtures built once). Files are handed
# out in this order, longest first, so that no long one starts last; each worker starts with two
# (xdist hands out the first, second, third and fourth in turn): the third, behind the README's long
# first part on the first worker, is short. (Not `--dist loadgroup`: pytest 9.2 ignores the group
# suffix pytest-xdist 3.8 writes into node ids, so groups were split across workers.)
_FIRST = ("test_readme.py", "test_readme_shapes.py", "test_anchors.py", "test_detect.py", "test_explain.py",
          "test_readme_tasks.py", "test_instance.py", "test_techniques_acceptance.py", "test_quantize.py",
          "test_attack.py", "test_distill.py")


def pytest_collection_modifyitems(config, items):
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        rank = {name: i for i, name in enumerate(_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order kept


@pytest.fixture(scope="module")
def readme_dir(tmp_path_factory) -> Path:
    """One folder per README test file, whose commands build on each other in order."""
    return tmp_path_factory.mktemp("readme")


def built_once(tmp_path_factory, name: str, build):
    """``build(folder)`` once for the whole session, also under pytest-xdist: the first worker to
    ask builds it under a file lock in the folder the workers share, and the others reuse what it
    wrote (pytest-xdist's recipe for session fixtures), so a shared model trains once rather than
    once per worker. ``build`` returns a path, or a tuple of paths, inside ``folder``."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    import json
    import shutil

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent  # this session's, shared by its workers
    folder, done = root / "shared" / name, root / "shared" / f"{name}.json"
    folder.parent.mkdir(exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            result = build(folder)
            done.write_text(json.dumps([str(p) for p in result] if isinstance(result, tuple) else str(result)))
        got = json.loads(done.read_text())
    return tuple(Path(p) for p in got) if isinstance(got, list) else Path(got)


CLASSES = ("checker", "circle", "hstripes", "vstripes")


def pattern_image(cls: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A simple, learnable RGB pattern of one class in a random colour pair."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    period = rng.integers(6, 12)
    if cls == "hstripes":
        on = (yy // period) % 2 == 0
    elif cls == "vstripes":
        on = (xx // period) % 2 == 0
    elif cls == "checker":
        on = ((xx // period) + (yy // period)) % 2 == 0
    else:
        r = rng.uniform(0.25, 0.4) * min(w, h)
        cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h
        on = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
    fg = rng.integers(140, 256, 3)
    bg = rng.integers(0, 100, 3)
    img = np.where(on[..., None], fg, bg).astype(np.float32)
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def make_image_folder(root: Path, per_class: dict[str, int], seed: int = 0, splits=("train", "val"),
                      gray: bool = False) -> Path:
    """Write root/<split>/<class>/*.png|jpg with varied sizes."""
    rng = np.random.default_rng(seed)
    for split in splits:
        n = per_class[split]
        for cls in CLASSES:
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                size = (int(rng.integers(24, 72)), int(rng.integers(24, 72)))
                im = pattern_image(cls, size, rng)
                if gray:
                    im = im.convert("L")
                ext = ".jpg" if i % 3 == 0 else ".png"
                im.save(d / f"{cls}_{i}{ext}", quality=92) if ext == ".jpg" else im.save(d / f"{cls}_{i}{ext}")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """4 classes, RGB, varied sizes: 60 train + 15 val + 10 test images per class (340 in all)."""
    return built_once(tmp_path_factory, "folder", lambda root: make_image_folder(
        root, {"train": 60, "val": 15, "test": 10}, splits=("train", "val", "test")))


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """A short digits training run shared by tests that need trained weights."""
    import cnnkit

    def build(root):
        cnnkit.train("classify", data="digits", epochs=3, out=str(root / "digits"), verbose=False)
        return root / "digits"

    return built_once(tmp_path_factory, "runs", build)


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capsys):
    """Run ``cnnkit ARGS`` in-process; returns exit code and captured output."""
    from cnnkit.cli.main import main

    def run(*args: str) -> CliResult:
        code = main([str(a) for a in args])
        cap = capsys.readouterr()
        return CliResult(code, cap.out, cap.err)

    return run


def run_subprocess(args: list[str], cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed ``cnnkit`` entry point as a user would."""
    exe = Path(sys.executable).parent / "cnnkit"
    return subprocess.run([str(exe), *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "120"})


# ---- one tiny trained model per task, shared by the whole session (export, explain, serve...) ----


@pytest.fixture(scope="session")
def tiny_yolo(tmp_path_factory) -> Path:
    """Generated shapes at 128 px (24 train, 12 val images, 2 classes) as a YOLO dataset."""
    from cnnkit.cli.main import main

    def build(root):
        assert main(["convert", "shapes", "--to", "yolo", "--out", str(root / "yolo"), "--imgsz", "128", "--sizes",
                     "train=24,val=12", "--classes", "2", "--max-objects", "3"]) == 0
        return root / "yolo" / "data.yaml"

    return built_once(tmp_path_factory, "det", build)


@pytest.fixture(scope="session")
def tiny_run(tiny_yolo, tmp_path_factory) -> Path:
    """One short fastdet training on ``tiny_yolo`` (a run folder)."""
    from cnnkit.cli.main import main

    def build(root):
        assert main(["detect", "train", "--data", str(tiny_yolo), "--imgsz", "128", "--epochs", "2", "--batch", "8",
                     "--width", "8", "--out", str(root / "run")]) == 0
        return root / "run"

    return built_once(tmp_path_factory, "detrun", build)


@pytest.fixture(scope="session")
def seg_data(tmp_path_factory):
    """A tiny shapes segmentation dataset written as mask folders (64 px, 2 shape classes)."""
    from cnnkit.data.segmentation import shapes_segmentation, write_mask_folders

    def build(root):
        return write_mask_folders(shapes_segmentation(64, {"train": 24, "val": 8}, num_classes=2, max_objects=2), root)

    return built_once(tmp_path_factory, "segdata", build)


@pytest.fixture(scope="session")
def seg_run(seg_data, tmp_path_factory):
    from cnnkit.cli.main import main

    def build(root):
        assert main(["segment", "train", "--data", str(seg_data), "--imgsz", "64", "--epochs", "2", "--batch", "8",
                     "--encoder", "smallcnn", "--out", str(root / "run")]) == 0
        return root / "run"

    return built_once(tmp_path_factory, "segrun", build)


@pytest.fixture(scope="session")
def instance_run(tmp_path_factory):
    import cnnkit.data.detection as dd
    from cnnkit.cli.main import main

    def build(root):
        saved = dd.SHAPES_DET_SIZES
        dd.SHAPES_DET_SIZES = {"train": 8, "val": 4, "test": 4}
        try:
            code = main(["instance", "train", "--data", "shapes", "--classes", "2", "--max-objects", "2", "--imgsz",
                         "64", "--epochs", "1", "--batch", "4", "--out", str(root / "run")])
        finally:
            dd.SHAPES_DET_SIZES = saved
        assert code == 0
        return root / "run"

    return built_once(tmp_path_factory, "inst", build)


def _train_medical(tmp_path_factory, name: str, model: str, sizes: dict[str, int]) -> Path:
    """A one-epoch ``cnnkit medical train`` on a few phantoms (a run folder)."""
    import cnnkit.data.volumes as dv
    from cnnkit.cli.main import main

    def build(root):
        saved = dv.PHANTOM_SIZES
        dv.PHANTOM_SIZES = sizes
        try:
            code = main(["medical", "train", "--model", model, "--epochs", "1", "--batch", "2", "--out",
                         str(root / "run")])
        finally:
            dv.PHANTOM_SIZES = saved
        assert code == 0
        return root / "run"

    return built_once(tmp_path_factory, name, build)


@pytest.fixture(scope="session")
def medical_run(tmp_path_factory):
    return _train_medical(tmp_path_factory, "med", "unet3d", {"train": 4, "val": 2})


@pytest.fixture(scope="session")
def medical_classifier_run(tmp_path_factory):
    return _train_medical(tmp_path_factory, "medcls", "densenet3d", {"train": 4, "val": 4})


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (40, 40, 230)}


def make_colour_csv(root, n: int, seed: int, name: str = "train.csv") -> list[tuple[str, list[str]]]:
    """Gray noise images with a square of each colour present with probability 0.4; the labels
    are the colours present (a learnable multi-label set, 24 px)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        img = rng.integers(90, 160, (24, 24, 1)).repeat(3, 2).astype(np.uint8)
        labels = [c for c in COLOURS if rng.random() < 0.4]
        for c in labels:
            x, y = rng.integers(0, 18, 2)
            img[y:y + 6, x:x + 6] = COLOURS[c]
        path = root / "img" / f"{name[:-4]}_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        rows.append((str(path), labels))
    from cnnkit.data.formats.multilabel_csv import write_multilabel_csv

    write_multilabel_csv(root / name, rows)
    return rows


@pytest.fixture(scope="session")
def multilabel_run(tmp_path_factory) -> Path:
    """A short multi-label training on coloured squares (24 px, 3 labels) with a test split."""
    from cnnkit.cli.main import main

    def build(root):
        make_colour_csv(root / "data", 96, 0, "train.csv")
        make_colour_csv(root / "data", 32, 1, "val.csv")
        make_colour_csv(root / "data", 16, 2, "test.csv")
        assert main(["multilabel", "train", "--data", str(root / "data"), "--imgsz", "24", "--epochs", "2",
                     "--batch", "16", "--out", str(root / "run")]) == 0
        return root / "run"

    return built_once(tmp_path_factory, "mlrun", build)


@pytest.fixture(scope="session")
def fitted_detector(tiny_yolo, tmp_path_factory):
    """fastdet (width 8) fitted to tiny_yolo's 24 training scenes, validated on them too (so the
    best weights are the fitted ones): a detector that finds its objects, in about 20 s."""
    import yaml

    from cnnkit.cli.main import main

    def build(root):
        spec = yaml.safe_load(tiny_yolo.read_text())
        spec.update(path=str(tiny_yolo.parent), val=spec["train"])
        (root / "data.yaml").write_text(yaml.safe_dump(spec))
        assert main(["detect", "train", "--data", str(root / "data.yaml"), "--imgsz", "128", "--width", "8",
                     "--epochs", "60", "--batch", "8", "--lr", "0.003", "--aug", "none", "--mosaic", "0", "--out",
                     str(root / "run")]) == 0
        return root / "run", root / "data.yaml"

    return built_once(tmp_path_factory, "fitted", build)


def tiny_classifier(size: int, batch: int):
    """A freshly initialized smallcnn (width 8, 4 classes, RGB ``size`` px, normalization inside
    the core) and a seeded random batch: ``(pipeline, model, core, x)``."""
    import torch

    from cnnkit.core.card import InputSpec, ModelCard
    from cnnkit.runtime.pipeline import pipeline_for

    torch.manual_seed(0)
    card = ModelCard("classify", "smallcnn", ["a", "b", "c", "d"],
                     InputSpec(size, size, 3, mean=(0.5,) * 3, std=(0.25,) * 3), model_kwargs={"width": 8, "drop_rate": 0.0})
    pipe = pipeline_for(card)
    model = pipe.build().eval()
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    return pipe, model, pipe.core(model).eval(), x
