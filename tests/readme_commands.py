"""The README's commands, split into the folders they build on, and the checks their results must pass.

Three test files run them (``test_readme.py``, ``test_readme_shapes.py``, ``test_readme_tasks.py``),
each command in README order in its file's own folder: the commands of one part use nothing of
another's, so under pytest-xdist (``make test``) the parts run on different workers.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

# the parts: the detection, segmentation and multi-label commands; those on the `shapes` classifiers;
# the rest (digits, export, serving...), which starts with the README's first command
_TASKS = re.compile(r"cnnkit (multilabel|detect|segment|instance|convert shapes)")
_SHAPES = re.compile(r"cnnkit (classify train --data shapes|augment preview --data shapes)|.*runs/classify/shapes")
PARTS = ("rest", "shapes", "tasks")


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def commands(part: str | None = None) -> list[str]:
    """The README's commands in order: all of them, or those of one part."""
    out = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(("cnnkit ", "curl ")) or line == "kill %1":
                out.append(line)
    return out if part is None else [c for c in out if part_of(c) == part]


def part_of(cmd: str) -> str:
    return "tasks" if _TASKS.match(cmd) else "shapes" if _SHAPES.match(cmd) else "rest"


def python_blocks(part: str) -> list[str]:
    """The README's python blocks of one part (those on the other tasks' README runs are "tasks")."""
    def part_of_block(code: str) -> str:
        if re.search(r"runs/(multilabel|detect|segment|instance)|shapes_(yolo|seg|coco)", code):
            return "tasks"
        return "shapes" if "runs/classify/shapes" in code else "rest"

    return [code for code in blocks("python") if part_of_block(code) == part]


def command_params(part: str):
    """``pytest.mark.parametrize`` over one part's commands, with ids that keep README numbers."""
    every = commands()
    cmds = commands(part)
    return pytest.mark.parametrize("cmd", cmds, ids=[f"{every.index(c):02d}-{' '.join(c.split()[1:3])}" for c in cmds])


def python_params(part: str):
    """``pytest.mark.parametrize`` over one part's python blocks, with ids of README order."""
    every, codes = blocks("python"), python_blocks(part)
    return pytest.mark.parametrize("code", codes, ids=[f"python-{every.index(c)}" for c in codes])


def run_python(code: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(folder)
    exec(compile(code, "<README python block>", "exec"), {"__name__": "__readme__"})  # noqa: S102 (the README's own code)


BACKGROUND: list[subprocess.Popen] = []  # `cnnkit ... &` started by a README command, stopped by `kill %1`


def run_command(cmd: str, folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Run one README command as written in ``folder``, then its check (``CHECKS``) if it has one.

    Commands run in-process (no interpreter start and torch import per command); the README's first
    one also as a real subprocess through the installed entry point, like a server started with `&`.
    """
    from cnnkit.cli.main import main

    if cmd.endswith(" &"):  # a server: started through the installed entry point, stopped by `kill %1`
        exe = Path(sys.executable).parent / "cnnkit"
        BACKGROUND.append(subprocess.Popen([str(exe), *shlex.split(cmd[:-2])[1:]], cwd=folder,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        return
    if cmd == "kill %1":
        proc = BACKGROUND.pop()
        proc.terminate()
        assert proc.wait(60) == 0, proc.stderr.read()[-2000:]
        return
    if cmd.startswith("curl "):
        r = subprocess.run(shlex.split(cmd), cwd=folder, capture_output=True, text=True, check=False, timeout=300)
        assert r.returncode == 0 and r.stdout.strip(), f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        for prefix, check in CHECKS.items():
            if cmd.startswith(prefix):
                check(r.stdout)
        return
    if cmd == commands()[0]:
        exe = Path(sys.executable).parent / "cnnkit"
        r = subprocess.run([str(exe), *shlex.split(cmd)[1:]], cwd=folder, capture_output=True, text=True,
                           check=False, timeout=900)
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        return
    monkeypatch.chdir(folder)
    code = main(shlex.split(cmd)[1:])
    out = capsys.readouterr()
    assert code == 0, f"{cmd}\n{out.out[-2000:]}\n{out.err[-2000:]}"
    for prefix, check in CHECKS.items():
        if cmd.startswith(prefix):
            check(folder)


def multilabel_shapes_learns_well_above_chance(root: Path) -> None:
    """The README's multilabel run (about a minute on 2 CPU cores): measured test mAP 0.56 and
    micro-F1 0.55; a random scorer gets mAP 0.245 and predicting every label micro-F1 0.38."""
    from cnnkit.data.shapes import SHAPE_CLASSES

    res = json.loads((root / "runs/multilabel/shapes/results.json").read_text())
    assert res["test"]["map"] > 0.45 and res["test"]["micro_f1"] > 0.45, res["test"]
    assert res["map"] > 0.45 and res["num_images"] == 400
    assert set(res["per_class"]) == set(SHAPE_CLASSES)


def digits_default_training_reaches_98_5_percent(root: Path) -> None:
    """Acceptance: the default digits training beats 98.5% top-1 on the fixed test split.

    The README trains it with seeds 0, 1 and 2 (the ensemble members). One seed is not a fair
    bar: the test split has 270 images (one image is 0.0037), and the same seed with the same
    pins lands 6 images apart on two machines (most likely different CPU kernels) (seed 0:
    0.9963 on the machine BENCHMARKS.md was measured on, 0.9778 on an AMD EPYC with the same
    pins). The bar is on the mean of three seeds (there: 0.990; on the EPYC: 0.986).
    """
    top1 = []
    for run in ("digits", "digits-s1", "digits-s2"):
        res = json.loads((root / "runs/classify" / run / "results.json").read_text())
        assert res["test"]["num_images"] == 270
        top1.append(res["test"]["top1"])
    assert sum(top1) / 3 >= 0.985, top1


def served_prediction_is_the_predict_json(out: str) -> None:
    """The server's answer is the `predict --json` row of the sample (label, score, top-k)."""
    row = json.loads(out)[0]
    assert {"path", "label", "score", "topk"} == set(row) and 0 <= row["score"] <= 1


def pruned_digits_fine_tune_back(root: Path) -> None:
    """The README's pruned digits model: a quarter of the parameters and, fine-tuned at the
    defaults, within 2 points of the full model's test top-1."""
    full = json.loads((root / "runs/classify/digits/results.json").read_text())["test"]["top1"]
    pruned = json.loads((root / "runs/classify/digits-pruned/results.json").read_text())["test"]["top1"]
    assert pruned >= full - 0.02, (pruned, full)
    card = json.loads((root / "runs/classify/digits-pruned/weights/best.json").read_text())
    rec = card["extra"]["pruned"]
    assert rec["params_after"] < 0.3 * rec["params_before"]


def qat_wrote_an_int8_file_that_holds_accuracy(root: Path) -> None:
    """The README's QAT run: its int8 file exists and its val top-1 stays within 2 points of the
    float weights it ends with."""
    res = json.loads((root / "runs/classify/digits-qat/results.json").read_text())
    assert (root / "runs/classify/digits-qat" / res["int8"]["file"]).is_file()
    assert res["int8"]["val"]["top1"] >= res["top1"] - 0.02 and res["top1"] > 0.95, res


def served_volume_is_the_predict_json(out: str) -> None:
    """A phantom volume over HTTP: its voxels per class and its label volume, of its shape."""
    import base64

    from cnnkit.data.volumes import read_nifti_bytes

    (row,) = json.loads(out)
    labels, _ = read_nifti_bytes(base64.b64decode(row["labels_nifti"]))
    assert list(labels.shape) == row["shape"] and sum(row["voxels"].values()) == labels.size
    assert {"background", "organ"} <= set(row["voxels"]), row["voxels"]  # 3 epochs find the organ


def metrics_counted_the_request(out: str) -> None:
    assert 'cnnkit_requests_total{model="digits",status="200"} 2.0' in out, out  # the two predict calls


def explain_wrote_every_method(root: Path) -> None:
    """The README's explain --eval: a PNG and a map at the image's size per method and image."""
    import numpy as np

    from cnnkit.core.options import EXPLAIN_METHODS

    out = root / "runs" / "explain" / "shapes"
    for method in EXPLAIN_METHODS:
        assert (out / f"val_0007.{method}.png").is_file(), method
        assert np.load(out / f"val_0000.{method}.npy").shape == (64, 64)


def robustness_table_covers_every_corruption(root: Path) -> None:
    """The README's shapes robustness run: every corruption at every severity, a heat map and
    examples; the corrupted images change the answers (the 3-epoch model is weak, so the size
    of the drop is left to tests/test_robustness.py)."""
    from cnnkit.methods.corruptions import CORRUPTIONS

    res = json.loads((root / "runs" / "robustness" / "shapes.json").read_text())
    assert list(res["corruptions"]) == list(CORRUPTIONS) and res["images"] == 100
    assert all(len(v) == 5 for v in res["corruptions"].values())
    changed = [v != res["clean"] for values in res["corruptions"].values() for v in values]
    assert sum(changed) >= 0.8 * len(changed), res  # a corruption that did nothing would score the clean top-1
    assert (root / res["heatmap"]).is_file() and (root / res["examples"]).is_file()


# what a README run must reach, checked right after its command (README command prefix -> check; a
# curl command's check gets its output, a cnnkit command's the README folder)
CHECKS = {
    "curl -s --data-binary @runs/demo/samples/digit_0_true6.png": served_prediction_is_the_predict_json,
    "curl -s --data-binary @phantoms_nii/val/images/vol0000.nii.gz": served_volume_is_the_predict_json,
    "curl -s http://127.0.0.1:8000/metrics": metrics_counted_the_request,
    "cnnkit classify train --data digits --seed 2 --out runs/classify/digits-s2": digits_default_training_reaches_98_5_percent,
    "cnnkit multilabel train --data shapes --imgsz 32 --epochs 8 ": multilabel_shapes_learns_well_above_chance,
    "cnnkit classify explain --weights runs/classify/shapes --data shapes": explain_wrote_every_method,
    "cnnkit classify robustness --weights runs/classify/shapes --data": robustness_table_covers_every_corruption,
    "cnnkit classify train --data digits --init runs/classify/digits-pruned.safetensors": pruned_digits_fine_tune_back,
    "cnnkit classify train --data digits --init runs/classify/digits --qat": qat_wrote_an_int8_file_that_holds_accuracy,
}
