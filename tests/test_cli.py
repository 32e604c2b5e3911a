"""The command line end to end: grammar, ImageFolder train/val/predict, bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import run_subprocess


def test_version_info_and_help(cli):
    import cnnkit

    r = cli("--version")
    assert r.code == 0 and r.out.strip() == f"cnnkit {cnnkit.__version__}"
    r = cli("info")
    assert r.code == 0 and "torch threads" in r.out and "default device" in r.out
    for args in (("--help",), ("classify", "--help"), ("classify", "train", "--help"),
                 ("classify", "val", "--help"), ("classify", "predict", "--help")):
        r = cli(*args)
        assert r.code == 0 and "Usage:" in r.out
    r = cli("classify", "train", "--help")
    assert "[default: 20]" in r.out and "--resume" in r.out and "--init" in r.out
    r = cli("models")
    assert "resnet18" in r.out and "convnext_tiny" in r.out


def test_unknown_option_and_command_suggest_close_match(cli):
    r = cli("classify", "train", "--epoch", "3")
    assert r.code == 2 and "No such option '--epoch'" in r.err and "--epochs" in r.err
    r = cli("clasify", "train")
    assert r.code == 2 and "Did you mean 'classify'?" in r.err
    r = cli("classify", "trian")
    assert r.code == 2 and "Did you mean 'train'?" in r.err


def test_image_folder_train_val_predict(cli, image_folder, tmp_path):
    run = tmp_path / "run"
    r = cli("classify", "train", "--data", image_folder, "--imgsz", "32", "--epochs", "6", "--out", run)
    assert r.code == 0, r.err
    res = json.loads((run / "results.json").read_text())
    assert res["top1"] >= 0.9, res["top1"]  # a learnable 4-class pattern set
    r = cli("classify", "val", "--weights", run, "--data", image_folder, "--split", "test",
            "--json", tmp_path / "val.json")
    assert r.code == 0, r.err
    val = json.loads((tmp_path / "val.json").read_text())
    assert val["split"] == "test" and val["num_images"] == 40 and val["top1"] >= 0.85
    assert set(val["per_class"]) == {"checker", "circle", "hstripes", "vstripes"}
    assert "hstripes" in r.out  # per-class table
    r = cli("classify", "predict", "--weights", run / "weights" / "best.safetensors",
            "--source", image_folder / "test", "--json", tmp_path / "pred.json", "--topk", "3")
    assert r.code == 0, r.err
    preds = json.loads((tmp_path / "pred.json").read_text())
    assert len(preds) == 40 and set(preds[0]) == {"path", "label", "score", "topk"}
    assert len(preds[0]["topk"]) == 3 and preds[0]["topk"][0] == [preds[0]["label"], preds[0]["score"]]
    correct = sum(p["label"] == p["path"].split("/")[-2] for p in preds)
    assert correct >= 34
    # the config written by the run reruns it
    r = cli("classify", "train", "--config", run / "config.yaml", "--epochs", "1", "--out", tmp_path / "rerun")
    assert r.code == 0, r.err
    cfg = (tmp_path / "rerun" / "config.yaml").read_text()
    assert "epochs: 1" in cfg and "imgsz: 32" in cfg


def test_corrupt_training_image_is_skipped_and_listed(cli, tmp_path):
    from conftest import make_image_folder

    root = make_image_folder(tmp_path / "data", {"train": 12, "val": 4})
    bad = root / "train" / "circle" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    trunc = root / "val" / "checker" / "cut.png"
    data = (root / "val" / "checker" / "checker_1.png").read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    r = cli("classify", "train", "--data", root, "--imgsz", "24", "--epochs", "1", "--out", tmp_path / "run")
    assert r.code == 0, r.err
    assert "skipped 2 unreadable image(s)" in r.out
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert sorted(s["path"] for s in res["skipped_images"]) == sorted([str(bad), str(trunc)])


def test_python_api_mirrors_cli(digits_run, tmp_path):
    import cnnkit
    from cnnkit.data.digits import digits_arrays

    model = cnnkit.load(digits_run / "weights" / "best.safetensors")
    images, labels = digits_arrays("test")
    preds = model.predict(list(images[:50]))
    assert len(preds) == 50 and sum(p.class_id == y for p, y in zip(preds, labels[:50])) >= 45
    Image.fromarray(images[0]).save(tmp_path / "d.png")
    one = model.predict(str(tmp_path / "d.png"))
    assert one[0].label == preds[0].label and one[0].path == str(tmp_path / "d.png")
    metrics = cnnkit.val("classify", digits_run, "digits", split="test", verbose=False)
    assert metrics["top1"] > 0.9


# ---- bad input: one sentence, exit code 2, no traceback --------------------------------------
def _err(r) -> str:
    assert r.code == 2, (r.code, r.out, r.err)
    assert "Traceback" not in r.err + r.out
    lines = [ln for ln in r.err.strip().splitlines() if ln]
    assert len(lines) == 1, r.err
    return lines[0]


def test_bad_inputs(cli, tmp_path, digits_run, image_folder):
    w = digits_run / "weights" / "best.safetensors"
    assert _err(cli("classify", "train", "--data", tmp_path / "nowhere")) == \
        f"Error: data path '{tmp_path / 'nowhere'}' does not exist"
    (tmp_path / "empty").mkdir()
    assert _err(cli("classify", "train", "--data", tmp_path / "empty")) == \
        f"Error: data folder '{tmp_path / 'empty'}' is empty"
    hole = tmp_path / "hole" / "train"
    (hole / "a").mkdir(parents=True)
    (hole / "b").mkdir()
    Image.new("RGB", (8, 8)).save(hole / "a" / "x.png")
    assert _err(cli("classify", "train", "--data", tmp_path / "hole")).startswith(
        f"Error: class folder '{hole / 'b'}' has no images")
    assert _err(cli("classify", "train", "--model", "resnet19")).startswith(
        "Error: unknown model 'resnet19'; did you mean 'resnet18'")
    assert _err(cli("classify", "train", "--epochs", "-1")) == "Error: --epochs must be at least 1, got -1"
    # corrupt, truncated and non-image files given to predict
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))
    assert re.match(r"Error: cannot read image '.*corrupt.png': ",
                    _err(cli("classify", "predict", "--weights", w, "--source", tmp_path / "corrupt.png")))
    buf = (image_folder / "val" / "circle" / "circle_1.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(buf[: len(buf) // 2])
    assert re.match(r"Error: cannot read image '.*trunc.png': corrupt or truncated",
                    _err(cli("classify", "predict", "--weights", w, "--source", tmp_path / "trunc.png")))
    (tmp_path / "notes.txt").write_text("hello")
    assert _err(cli("classify", "predict", "--weights", w, "--source", tmp_path / "notes.txt")) == \
        f"Error: cannot read image '{tmp_path / 'notes.txt'}': not an image file Pillow can identify"
    assert _err(cli("classify", "predict", "--weights", tmp_path / "no.safetensors", "--source", tmp_path)) == \
        f"Error: weights file '{tmp_path / 'no.safetensors'}' does not exist"
    # weights for a different number of classes
    assert _err(cli("classify", "val", "--weights", w, "--data", image_folder)) == \
        f"Error: weights '{w}' were trained on 10 classes but data '{image_folder}' has 4; evaluate on data with the same classes"
    # weights for a different number of channels (digits: 1 channel; folder: RGB)
    assert _err(cli("classify", "train", "--data", image_folder, "--init", w, "--epochs", "1",
                    "--out", tmp_path / "ft")) == \
        f"Error: --init weights '{w}' take 1-channel images but the data has 3 channel(s); pass --channels 1"
    # a run folder written before the error is untouched
    assert w.is_file() and (digits_run / "weights" / "last.ckpt").is_file()


def test_errors_as_a_subprocess_have_no_traceback(tmp_path):
    r = run_subprocess(["classify", "train", "--data", str(tmp_path / "missing")])
    assert r.returncode == 2 and r.stderr.strip() == f"Error: data path '{tmp_path / 'missing'}' does not exist"
    r = run_subprocess(["classify", "train", "--epochs", "0"])
    assert r.returncode == 2 and r.stderr.strip() == "Error: --epochs must be at least 1, got 0"


def test_init_rebuilds_head_for_new_classes(cli, tmp_path, image_folder):
    src = tmp_path / "src"
    assert cli("classify", "train", "--data", image_folder, "--imgsz", "24", "--epochs", "1", "--out", src).code == 0
    flat = tmp_path / "two"
    rng = np.random.default_rng(0)
    for cls, val in (("dark", 30), ("light", 220)):
        (flat / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((16, 16, 3), val + rng.integers(-20, 20), np.uint8)).save(flat / cls / f"{i}.png")
    r = cli("classify", "train", "--data", flat, "--imgsz", "24", "--epochs", "1", "--init",
            src / "weights" / "best.safetensors", "--out", tmp_path / "ft")
    assert r.code == 0, r.err
    assert "the classifier head was rebuilt for 2 classes" in r.out


def test_help_imports_no_torch():
    """`cnnkit --help` and every `cnnkit TASK MODE --help` build from torch-free configs."""
    code = ("import sys\nfrom cnnkit.cli.main import cli, main\n"
            "for name, group in cli.commands.items():\n"
            "    assert main([name, '--help']) == 0\n"
            "    for mode in getattr(group, 'commands', {}):\n"
            "        assert main([name, mode, '--help']) == 0\n"
            "assert main(['--help']) == 0\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'timm', 'monai')))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout[-500:]


def test_smallcnn_width_is_an_option_the_card_rebuilds(cli, tmp_path):
    """`--width` scales smallcnn (a wider teacher, a narrower student); the card records it, so
    the weights load at that width; other models refuse it with one sentence."""
    import cnnkit

    r = cli("classify", "train", "--data", "digits", "--width", "8", "--epochs", "1", "--out", tmp_path / "w8")
    assert r.code == 0, r.err
    model = cnnkit.load(tmp_path / "w8")
    assert model.card.model_kwargs["width"] == 8
    assert sum(p.numel() for p in model.model.parameters()) < 60_000  # about 1/16 of the default's 0.58 M
    assert cnnkit.val("classify", tmp_path / "w8", "digits", verbose=False)["top1"] > 0.3
    r = cli("classify", "train", "--data", "digits", "--model", "resnet18", "--width", "8", "--out", tmp_path / "x")
    assert r.code == 2 and "--width sets smallcnn's channels" in r.err and r.err.count("\n") == 1, r.err
