"""Trainer behaviour: learning, schedules, EMA, accumulation, non-finite protection, atomic
checkpoints and exact resume after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cnnkit.engine.workflow import train as _train
from cnnkit.tasks.classify.config import ClassifyConfig
from cnnkit.tasks.classify.spec import SPEC
from cnnkit.engine.checkpoint import load_checkpoint, save_checkpoint
from cnnkit.engine.schedule import WarmupSchedule
from cnnkit.errors import ModelError, TrainingError
from cnnkit.tasks.classify.task import ClassifyTask

FAST = dict(data="digits", epochs=2, imgsz=12, batch=64)


def train(cfg=None, **kw):
    """The classify workflow with a config object (``cnnkit.train("classify", cfg)``)."""
    return _train(SPEC, cfg, **kw)


def test_learns_digits_and_writes_run_dir(digits_run):
    run = digits_run
    for rel in ("config.yaml", "weights/best.safetensors", "weights/best.json", "weights/last.ckpt",
                "metrics.csv", "results.json", "plots/results.png", "plots/confusion_matrix.png",
                "plots/val_predictions.png"):
        assert (run / rel).is_file(), rel
    import json

    res = json.loads((run / "results.json").read_text())
    assert {"top1", "top5", "macro_f1", "balanced_accuracy", "per_class"} <= set(res)
    assert res["top1"] > 0.9 and res["test"]["top1"] > 0.9  # 3 epochs are enough for > 90%
    card = json.loads((run / "weights/best.json").read_text())
    assert card["task"] == "classify" and card["arch"] == "smallcnn" and card["input"]["channels"] == 1
    assert card["classes"] == [str(i) for i in range(10)] and [card["input"]["height"], card["input"]["width"]] == [16, 16]
    import csv

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert card["metrics"]["top1"] == pytest.approx(max(float(r["top1"]) for r in rows), abs=1e-5)
    assert {"epoch", "train_loss", "train_acc", "val_loss", "top1", "lr"} <= set(rows[0])
    assert len((run / "metrics.csv").read_text().splitlines()) == 4  # header + 3 epochs


def test_warmup_schedule_shapes():
    s = WarmupSchedule("cosine", total=100, warmup=10, start=0.1, final=0.0)
    assert s(0) == pytest.approx(0.1) and s(10) == pytest.approx(1.0)
    assert s(55) == pytest.approx(0.5, abs=0.01) and s(100) == pytest.approx(0.0, abs=1e-9)
    st = WarmupSchedule("step", total=100, warmup=0, step=30, gamma=0.1)
    assert (st(29), st(30), st(65)) == (1.0, pytest.approx(0.1), pytest.approx(0.01))


def _lr_trace(tmp_path, **kw):
    from cnnkit.engine.checkpoint import load_checkpoint

    r = train(ClassifyConfig(**{**FAST, **kw}, out=str(tmp_path / kw.get("schedule", "x"))), verbose=False)
    return load_checkpoint(r.run_dir)["lr_history"]


def test_lr_follows_schedule(tmp_path):
    lrs = _lr_trace(tmp_path, schedule="cosine", lr=1e-2, warmup_epochs=1.0)
    steps_per_epoch = len(lrs) // 2
    assert lrs[0] == pytest.approx(1e-2 * 0.04)
    assert max(lrs) == pytest.approx(1e-2, rel=1e-6) and lrs.index(max(lrs)) == steps_per_epoch
    assert lrs[-1] < 1e-3


def test_nonfinite_loss_skips_step_and_rolls_back(tmp_path, monkeypatch):
    calls = {"n": 0}
    orig = ClassifyTask.loss

    def flaky(self, output, batch):
        calls["n"] += 1
        out = orig(self, output, batch)
        if calls["n"] in (3, 4):
            return {"loss": out["loss"] * float("nan")}
        return out

    monkeypatch.setattr(ClassifyTask, "loss", flaky)
    r = train(ClassifyConfig(**FAST, out=str(tmp_path / "nan")), verbose=False)
    state = load_file(str(r.weights))
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert load_checkpoint(r.run_dir)["nonfinite_steps"] == 2
    assert r.metrics["top1"] > 0.5


def test_diverging_loss_stops_with_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(ClassifyTask, "loss", lambda self, o, b: {"loss": o.sum() * float("inf")})
    with pytest.raises(TrainingError, match=r"^the loss was NaN or infinite in \d+ steps, so training stopped at epoch 1"):
        train(ClassifyConfig(**FAST, out=str(tmp_path / "inf")), verbose=False)


def test_ema_accumulation_clip_and_sgd_train(tmp_path):
    r = train(ClassifyConfig(**FAST, ema=0.9, accumulate=2, grad_clip=1.0, optimizer="sgd", lr=0.05,
                             schedule="step", step_size=1, warmup_epochs=0, out=str(tmp_path / "ema")), verbose=False)
    ck = load_checkpoint(r.run_dir)
    assert ck["ema"] is not None
    n_batches = -(-1257 // 64)
    assert len(ck["lr_history"]) == 2 * (-(-n_batches // 2))  # one step per 2 batches
    assert ck["lr_history"][-1] == pytest.approx(0.05 * 0.1)  # step decay after epoch 1
    # the saved best weights are the EMA weights, not the raw ones
    best = load_file(str(r.weights))
    ema_w = {k[len("module."):]: v for k, v in ck["ema"].items() if k.startswith("module.")}
    raw = ck["model"]
    key = "fc.weight"
    if ck["best_epoch"] == 2:
        assert torch.equal(best[key], ema_w[key]) and not torch.equal(best[key], raw[key])


def test_early_stopping(tmp_path, monkeypatch):
    import cnnkit.engine.trainer as tr

    monkeypatch.setattr(tr.Trainer, "_update_best", lambda self, row: setattr(self, "improved", self.epoch == 1)
                        or (self.epoch == 1 and (setattr(self, "best_epoch", 1), setattr(self, "improved_epoch", 1),
                                                 setattr(self, "best_metric", 0.5))))
    r = train(ClassifyConfig(**{**FAST, "epochs": 6}, patience=2, out=str(tmp_path / "es")), verbose=False)
    assert r.metrics["epochs_run"] == 3


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})

    def dying_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    ck = load_checkpoint(path)
    assert ck["epoch"] == 1 and torch.equal(ck["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_checkpoint(tmp_path / "none.ckpt")
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"^checkpoint '.*bad.ckpt' is unreadable"):
        load_checkpoint(tmp_path / "bad.ckpt")


def test_same_seed_same_weights_with_workers(tmp_path):
    a = train(ClassifyConfig(**FAST, workers=2, out=str(tmp_path / "a")), verbose=False)
    b = train(ClassifyConfig(**FAST, workers=2, out=str(tmp_path / "b")), verbose=False)
    wa, wb = load_file(str(a.weights)), load_file(str(b.weights))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _cnnkit(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "cnnkit"), *args]


@pytest.mark.slow
def test_exact_resume_after_sigkill(tmp_path):
    """Train 4 epochs straight; train again, SIGKILL it after epoch 2, resume to 4: same weights
    (max abs diff < 1e-6) and the same learning rate at every step."""
    common = ["classify", "train", "--data", "digits", "--epochs", "4", "--imgsz", "12", "--seed", "7",
              "--ema", "0.9", "--device", "cpu"]
    env = {**os.environ, "COLUMNS": "120"}
    straight = subprocess.run(_cnnkit(*common, "--out", str(tmp_path / "straight")), env=env,
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(_cnnkit(*common, "--out", str(killed_dir)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    csv = killed_dir / "metrics.csv"
    deadline = time.time() + 300
    while time.time() < deadline:
        if csv.exists() and len(csv.read_text().splitlines()) >= 3:  # header + 2 epochs
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epoch_at_kill = load_checkpoint(killed_dir)["epoch"]
    assert 1 <= epoch_at_kill < 4, "the kill came too late to test resuming"
    resumed = subprocess.run(_cnnkit("classify", "train", "--resume", str(killed_dir)), env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(killed_dir)
    assert a["epoch"] == b["epoch"] == 4
    assert a["lr_history"] == b["lr_history"]
    for key in ("model", "ema"):
        diff = max((a[key][k].double() - b[key][k].double()).abs().max().item()
                   for k in a[key] if a[key][k].is_floating_point())
        assert diff < 1e-6, f"{key} differs by {diff}"
    assert len(csv.read_text().splitlines()) == 5  # no duplicated epoch rows after resume


@pytest.mark.slow
def test_sigkill_during_training_never_leaves_an_unloadable_checkpoint(tmp_path):
    out = tmp_path / "kill"
    args = _cnnkit("classify", "train", "--data", "digits", "--epochs", "50", "--imgsz", "8",
                   "--batch", "256", "--out", str(out))
    for delay in (0.05, 0.11, 0.17, 0.23, 0.29):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # wait until a checkpoint exists, then kill at a varying offset into the save cycle
        deadline = time.time() + 120
        while not (out / "weights" / "last.ckpt").exists() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ck = load_checkpoint(out)
        assert ck["epoch"] >= 1


def test_channels_last_and_bf16_autocast_on_cpu(tmp_path):
    r = train(ClassifyConfig(**FAST, channels_last=True, amp="bf16", out=str(tmp_path / "cl")), verbose=False)
    assert r.metrics["top1"] > 0.7
    ck = load_checkpoint(r.run_dir)
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_before_step_after_backward_hooks_and_model_transforms():
    """before_step sees (and may replace) every training batch, after_backward may edit the
    gradients before the optimizer step, and model transforms run before the optimizer is built."""
    from torch.utils.data import DataLoader, TensorDataset

    from cnnkit.engine.config import TrainConfig
    from cnnkit.engine.hooks import Hook
    from cnnkit.engine.trainer import Trainer

    torch.manual_seed(0)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 2, (32,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0),
                        collate_fn=lambda items: {"images": torch.stack([i[0] for i in items]),
                                                  "targets": torch.stack([i[1] for i in items])})

    class Freeze(torch.nn.Module):  # a transform that adds a parameter the optimizer must see
        def __init__(self, inner):
            super().__init__()
            self.inner, self.scale = inner, torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.inner(x) * self.scale

    class Spy(Hook):
        def __init__(self):
            self.batches, self.backwards = 0, 0

        def before_step(self, trainer, batch):
            self.batches += 1
            return {**batch, "images": batch["images"] * 0 + 0.5}  # every sample the same image

        def after_backward(self, trainer):
            self.backwards += 1
            trainer.model.inner[1].weight.grad = None  # this layer never moves

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    before, bias = net[1].weight.detach().clone(), net[1].bias.detach().clone()
    spy = Spy()
    cfg = TrainConfig(epochs=2, batch=8, lr=0.1, warmup_epochs=0, ema=0.0)
    trainer = Trainer(ClassifyTask(["a", "b"]), net, loader, None, cfg, torch.device("cpu"), hooks=[spy],
                      model_transforms=[Freeze])
    trainer.fit()
    assert isinstance(trainer.model, Freeze) and spy.batches == spy.backwards == 8
    assert torch.equal(net[1].weight, before) and not torch.equal(net[1].bias, bias)
    assert trainer.model.scale.item() != 1.0  # the transform's parameter was optimized


def test_time_budget_fills_the_budget_with_a_shorter_last_epoch(monkeypatch):
    """Under a fake clock (a step takes 1 s, an epoch 2 s more outside its 8 steps) a 54 s
    budget trains five whole epochs and a sixth of 2 steps, ending on the budget with the LR
    schedule at its end; the old whole-epoch rule stopped after five (50 s). The plan survives
    a resume through the hook's state."""
    from torch.utils.data import DataLoader, TensorDataset

    from cnnkit.engine.config import TrainConfig
    from cnnkit.engine.hooks import Hook, TimeBudget
    from cnnkit.engine.trainer import Trainer

    now = [1000.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])

    class Clock(Hook):
        def after_step(self, trainer):
            now[0] += 1.0

        def after_epoch(self, trainer):  # validation, checkpoints
            now[0] += 2.0

    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 4, 4), torch.randint(0, 2, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0),
                        collate_fn=lambda items: {"images": torch.stack([i[0] for i in items]),
                                                  "targets": torch.stack([i[1] for i in items])})
    budget = TimeBudget(0.9)
    cfg = TrainConfig(epochs=100, batch=8, lr=0.1, warmup_epochs=0, ema=0.0, schedule="cosine")
    trainer = Trainer(ClassifyTask(["a", "b"]), torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2)),
                      loader, None, cfg, torch.device("cpu"), hooks=[Clock(), budget])
    start = now[0]
    trainer.fit()
    assert trainer.epoch == 6 and trainer.global_step == 42 and trainer.epoch_steps == 2
    assert now[0] - start == pytest.approx(54.0) and budget.used == pytest.approx(54.0)
    assert "the last one 2 of its 8 steps" in trainer.stop_reason
    assert trainer.scheduler.lr_lambdas[0].total == 42  # the cosine ends on the last step
    assert trainer.lr_history[-1] < 0.1 * 0.01 and len(trainer.lr_history) == 42

    resumed = TimeBudget(0.9)
    resumed.load_state_dict({**budget.state_dict(), "max_steps": 42})
    resumed.before_train(trainer)
    assert trainer.max_steps == 42 and resumed.used == budget.used


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_the_optimizer_is_fused_and_steps_as_torch_default(name):
    """On CPU the optimizer runs torch's fused kernel; its update equals torch's default loop on
    the same groups (weight decay off for biases and norm weights), step after step."""
    from cnnkit.engine.schedule import build_optimizer
    from cnnkit.models import create_model

    torch.manual_seed(0)
    a = create_model("smallcnn", 4, 3)
    b = create_model("smallcnn", 4, 3)
    b.load_state_dict(a.state_dict())
    init = [p.detach().clone() for p in a.parameters()]
    fused = build_optimizer(a, name, 1e-2, 0.05, 0.9)
    assert all(g["fused"] for g in fused.param_groups)
    plain = type(fused)([{k: v for k, v in g.items() if k != "fused"} | {"params": list(pb)}
                         for g, pb in zip(fused.param_groups, _same_groups(fused, a, b))], lr=1e-2, fused=False)
    assert {g["weight_decay"] for g in plain.param_groups} == {0.0, 0.05}
    for i in range(3):
        x = torch.randn(8, 3, 16, 16)
        for m, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            torch.manual_seed(i)  # the same dropout masks
            m(x).square().mean().backward()
            opt.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5, msg=n)  # rounding, amplified by Adam near 0
    assert any(not torch.equal(p, p0) for p, p0 in zip(a.parameters(), init))  # the steps moved the weights


def _same_groups(opt, a, b):
    """``opt``'s parameter groups (over ``a``) as lists of ``b``'s parameters of the same names."""
    by_id = {id(p): n for n, p in a.named_parameters()}
    of_b = dict(b.named_parameters())
    return [[of_b[by_id[id(p)]] for p in g["params"]] for g in opt.param_groups]
