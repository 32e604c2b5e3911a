"""Every command in the README's bash and python blocks runs as written."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def commands() -> list[str]:
    out = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(("cnnkit ", "curl ")) or line == "kill %1":
                out.append(line)
    return out


BACKGROUND: list[subprocess.Popen] = []  # `cnnkit ... &` started by a README command, stopped by `kill %1`


def test_readme_quickstart_comes_first():
    text = README.read_text(encoding="utf-8")
    quick = text.index("## Quickstart")
    first_block = blocks("bash")[0]
    assert text.index(first_block) > quick
    assert [ln.split("#")[0].strip() for ln in first_block.strip().splitlines()] == ["make run", "make test"]


@pytest.fixture(scope="module")
def readme_dir(tmp_path_factory) -> Path:
    """One folder for all README commands, which build on each other in order."""
    return tmp_path_factory.mktemp("readme")


def test_readme_has_commands():
    assert len(commands()) >= 6 and blocks("python")


# one test per command (in README order, sharing one folder), so each gets its own time limit; they run
# in-process (no interpreter start and torch import per command), the first one also as a real
# subprocess through the installed entry point
@pytest.mark.slow
@pytest.mark.parametrize("cmd", commands(), ids=[f"{i:02d}-{' '.join(c.split()[1:3])}" for i, c in
                                                 enumerate(commands())])
def test_readme_command_runs_as_written(cmd, readme_dir, monkeypatch, capsys):
    from cnnkit.cli.main import main

    if cmd.endswith(" &"):  # a server: started through the installed entry point, stopped by `kill %1`
        exe = Path(sys.executable).parent / "cnnkit"
        BACKGROUND.append(subprocess.Popen([str(exe), *shlex.split(cmd[:-2])[1:]], cwd=readme_dir,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        return
    if cmd == "kill %1":
        proc = BACKGROUND.pop()
        proc.terminate()
        assert proc.wait(60) == 0, proc.stderr.read()[-2000:]
        return
    if cmd.startswith("curl "):
        r = subprocess.run(shlex.split(cmd), cwd=readme_dir, capture_output=True, text=True, check=False,
                           timeout=300)
        assert r.returncode == 0 and r.stdout.strip(), f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        for prefix, check in CHECKS.items():
            if cmd.startswith(prefix):
                check(r.stdout)
        return
    if cmd == commands()[0]:
        exe = Path(sys.executable).parent / "cnnkit"
        r = subprocess.run([str(exe), *shlex.split(cmd)[1:]], cwd=readme_dir, capture_output=True, text=True,
                           check=False, timeout=900)
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        return
    monkeypatch.chdir(readme_dir)
    code = main(shlex.split(cmd)[1:])
    out = capsys.readouterr()
    assert code == 0, f"{cmd}\n{out.out[-2000:]}\n{out.err[-2000:]}"
    for prefix, check in CHECKS.items():
        if cmd.startswith(prefix):
            check(readme_dir)


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
        assert (out / f"val_0015.{method}.png").is_file(), method
        assert np.load(out / f"val_0000.{method}.npy").shape == (64, 64)


def robustness_table_covers_every_corruption(root: Path) -> None:
    """The README's shapes robustness run: every corruption at every severity, a heat map and
    examples; the corrupted images change the answers (the 5-epoch model is weak, so the size
    of the drop is left to tests/test_robustness.py)."""
    from cnnkit.methods.corruptions import CORRUPTIONS

    res = json.loads((root / "runs" / "robustness" / "shapes.json").read_text())
    assert list(res["corruptions"]) == list(CORRUPTIONS) and res["images"] == 200
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


@pytest.mark.slow
@pytest.mark.parametrize("code", blocks("python"), ids=[f"python-{i}" for i in range(len(blocks("python")))])
def test_readme_python_runs_as_written(code, readme_dir, monkeypatch):
    monkeypatch.chdir(readme_dir)
    exec(compile(code, "<README python block>", "exec"), {"__name__": "__readme__"})


def test_readme_error_example_is_true(cli):
    text = README.read_text(encoding="utf-8")
    m = re.search(r"\$ (cnnkit [^\n]+)\n(Error: [^\n]+)", text)
    assert m, "README shows an error example"
    r = cli(*shlex.split(m.group(1))[1:])
    assert r.code == 2 and r.err.strip() == m.group(2)


def test_every_readme_check_matches_one_command():
    for prefix in CHECKS:
        assert sum(c.startswith(prefix) for c in commands()) == 1, prefix
