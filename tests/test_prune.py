"""`cnnkit prune`: channels removed through the dependency graph for every task that can be,
the card rebuilds the narrower network exactly, and `--init` fine-tunes it."""

from __future__ import annotations

import json

import pytest
import torch

import cnnkit
from cnnkit.methods.prune import apply, prune, prune_network

PRUNABLE = ["digits_run", "resnet18_weights", "multilabel_run", "tiny_run", "seg_run", "medical_run"]


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory):
    """An untrained resnet18 (timm) with its card: residual joins for the dependency graph."""
    from cnnkit.core.card import InputSpec, ModelCard
    from cnnkit.engine.checkpoint import save_weights
    from cnnkit.runtime.pipeline import pipeline_for

    card = ModelCard("classify", "resnet18", ["a", "b", "c"], InputSpec(64, 64, 3, mean=(0.5,) * 3, std=(0.25,) * 3))
    path = tmp_path_factory.mktemp("resnet") / "best.safetensors"
    save_weights(path, pipeline_for(card).build().state_dict(), card)
    return path


def _outputs(predictor, x):
    with torch.no_grad():
        return predictor.backend(x)


@pytest.mark.parametrize("fixture", PRUNABLE)
def test_pruned_model_keeps_its_outputs_and_is_rebuilt_from_its_card(fixture, request, tmp_path):
    """Half the channels go (about a quarter of the parameters stay); the output shapes are the
    task's; the file loads through the card to the very network pruning made (same outputs as
    the pruned network in memory, which a rebuild at the wrong widths could not give)."""
    run = request.getfixturevalue(fixture)
    full = cnnkit.load(run)
    out = tmp_path / "pruned.safetensors"
    report = prune(run, 0.5, "l1", out=out, verbose=False)
    assert 0.15 < report["params_after"] / report["params_before"] < 0.45, report
    assert report["layers_kept"]  # the layers writing the outputs kept their widths
    small = cnnkit.load(out)
    x = full.pipeline.example_input(2)
    want, got = _outputs(full, x), _outputs(small, x)
    assert [t.shape for t in got] == [t.shape for t in want]
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["extra"]["pruned"]["ratio"] == 0.5 and card["metrics"] == {}
    # the network pruning made, before it was written, answers as the file does
    from cnnkit.runtime.pipeline import load_model

    model, _, pipe = load_model(run)
    pruned = prune_network(model, pipe, 0.5, "l1")[0]
    assert sum(p.numel() for p in pruned.parameters()) == report["params_after"]
    with torch.no_grad():
        mem = pruned(x)
    mem = mem if isinstance(mem, tuple) else (mem,)
    for a, b in zip(mem, got):  # (fastdet's file is served with BatchNorm folded: float noise)
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_l1_removes_the_channels_that_do_nothing_and_outputs_do_not_change(digits_run, tmp_path):
    """Channels whose every weight is zero (conv, BN scale and shift) add nothing: with them
    the lowest-ranked, pruning exactly them leaves every output as it was."""
    from cnnkit.engine.checkpoint import load_weights, save_weights

    state, card = load_weights(digits_run)
    model = cnnkit.load(digits_run).model
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    # zero the second half of the channels of every conv (and its BN), so they output 0 after ReLU
    for name in convs:
        w = state[f"{name}.weight"]
        half = w.shape[0] // 2
        bn = name.rsplit(".", 1)[0] + ".1"
        state[f"{name}.weight"][half:] = 0
        state[f"{bn}.weight"][half:] = 0
        state[f"{bn}.bias"][half:] = 0
        nxt = convs.index(name) + 1  # what reads them (the next conv, or the classifier) ignores them too
        state[f"{convs[nxt]}.weight" if nxt < len(convs) else "fc.weight"][:, half:] = 0
    src = tmp_path / "zeroed.safetensors"
    save_weights(src, state, card)
    before = cnnkit.load(src)
    report = prune(src, 0.5, "l1", out=tmp_path / "p.safetensors", verbose=False)
    after = cnnkit.load(report["file"])
    x = before.pipeline.example_input(4)
    (a,), (b,) = _outputs(before, x), _outputs(after, x)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert report["params_after"] < 0.3 * report["params_before"]


def test_pruned_digits_fine_tune_back_and_the_card_carries_the_record(digits_run, tmp_path, cli):
    """Pruning costs accuracy until fine-tuned; `--init` trains the narrower network (its run's
    card rebuilds it), and a few epochs bring top-1 back within 2 points of the full model."""
    full = json.loads((digits_run / "results.json").read_text())["top1"]
    r = cli("prune", "--weights", digits_run, "--ratio", "0.5", "--method", "taylor", "--data", "digits",
            "--images", "32", "--out", tmp_path / "p.safetensors", "--json", tmp_path / "report.json")
    assert r.code == 0, r.err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["method"] == "taylor" and report["latency_ms_after"] > 0
    r = cli("classify", "train", "--data", "digits", "--init", tmp_path / "p.safetensors", "--epochs", "4",
            "--out", tmp_path / "ft")
    assert r.code == 0, r.err
    tuned = json.loads((tmp_path / "ft" / "results.json").read_text())["top1"]
    assert tuned >= full - 0.02, (tuned, full)
    ft = cnnkit.load(tmp_path / "ft")
    assert sum(p.numel() for p in ft.model.parameters()) == report["params_after"]
    assert ft.card.extra["pruned"]["ratio"] == 0.5
    # one table: the full model and the pruned one, eager and on ONNX Runtime, with their metric
    r = cli("benchmark", "--weights", digits_run, "--variants", f"pruned={tmp_path / 'ft'}", "--data", "digits",
            "--split", "test", "--formats", "torch,onnx", "--runs", "3", "--warmup", "1", "--batch", "4",
            "--json", tmp_path / "bench.json")
    assert r.code == 0, r.err
    rows = {(row["variant"], row["format"]): row for row in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert list(rows) == [("fp32", "torch"), ("fp32", "onnx"), ("pruned", "torch"), ("pruned", "onnx")]
    assert rows[("pruned", "onnx")]["params"] == report["params_after"] < rows[("fp32", "torch")]["params"]
    assert rows[("pruned", "onnx")]["size_mb"] < 0.5 * rows[("fp32", "onnx")]["size_mb"]
    assert abs(rows[("pruned", "torch")]["metric"] - rows[("pruned", "onnx")]["metric"]) < 0.01
    assert rows[("pruned", "torch")]["metric_delta"] == pytest.approx(
        rows[("pruned", "torch")]["metric"] - rows[("fp32", "torch")]["metric"], abs=1e-5)
    r = cli("benchmark", "--weights", digits_run, "--variants", "pruned")
    assert r.code == 2 and "NAME=WEIGHTS" in r.err


def test_prune_errors_are_one_sentence(cli, digits_run, instance_run, tmp_path):
    for ratio in ("0", "1", "1.5"):
        r = cli("prune", "--weights", digits_run, "--ratio", ratio)
        assert r.code == 2 and "--ratio must be in (0, 1)" in r.err and r.err.count("\n") == 1
    r = cli("prune", "--weights", digits_run, "--method", "taylor")
    assert r.code == 2 and "give --data" in r.err
    r = cli("prune", "--weights", instance_run)
    assert r.code == 2 and "cannot be pruned" in r.err and r.err.count("\n") == 1
    r = cli("prune", "--weights", digits_run, "--out", tmp_path / "p.safetensors", "--json", tmp_path / "p.json")
    assert r.code == 2 and "model card" in r.err and not (tmp_path / "p.safetensors").exists()
    r = cli("prune", "--weights", tmp_path / "missing")
    assert r.code == 2 and "does not exist" in r.err


def test_apply_refuses_a_record_of_another_network(digits_run):
    from cnnkit.errors import ModelError

    model = cnnkit.load(digits_run).model
    with pytest.raises(ModelError, match="does not have"):
        apply(model, {"modules": {"no.such.layer": {"out_channels": 8}}, "tensors": {}})


def test_pruned_fastdet_fine_tunes_through_init(tiny_run, tiny_yolo, tmp_path, cli):
    prune(tiny_run, 0.5, "l1", out=tmp_path / "p.safetensors", verbose=False)
    r = cli("detect", "train", "--data", tiny_yolo, "--imgsz", "128", "--epochs", "1", "--batch", "8",
            "--init", tmp_path / "p.safetensors", "--out", tmp_path / "x")  # fastdet's default width is 16, not 8
    assert r.code == 2 and "train with the same model options" in r.err and "width=8" in r.err, r.err
    r = cli("detect", "train", "--data", tiny_yolo, "--imgsz", "128", "--epochs", "1", "--batch", "8", "--width", "8",
            "--init", tmp_path / "p.safetensors", "--out", tmp_path / "ft")
    assert r.code == 0, r.err
    ft = cnnkit.load(tmp_path / "ft")
    assert ft.card.extra["pruned"]["ratio"] == 0.5
    assert len(ft(str(next(tiny_yolo.parent.rglob("*.png"))))) == 1


def test_fastdet_weights_saved_with_one_csp_input_conv_still_load():
    """Before the C2f blocks had two 1x1 branches they had one conv of twice the width whose
    output was chunked: such weights load split in two and compute the same function."""
    from cnnkit.models.detection.fastdet import FastDet

    torch.manual_seed(0)
    new = FastDet(3, width=8).eval()
    old = {}
    for k, v in new.state_dict().items():
        if ".cv0." in k:
            continue
        twin = k.replace(".cv1.", ".cv0.")
        is_csp_input = ".cv1." in k and twin in new.state_dict() and ".m." not in k
        old[k] = torch.cat([new.state_dict()[twin], v]) if is_csp_input and v.dim() > 0 else v
    assert any(v.shape[0] == 2 * new.state_dict()[k].shape[0] for k, v in old.items() if v.dim() > 0)
    loaded = FastDet(3, width=8).eval()
    loaded.load_state_dict(old)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(new.raw(x), loaded.raw(x)):
            assert torch.equal(a, b)
