"""The batch a ``--time`` budget picks (issue 19): the rule, that timing it leaves no trace on the
training that follows, and that only a left-out ``--batch`` on a fresh run is fitted."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cnnkit.engine.budget import MIN_BUDGET_STEPS, StepCost, choose, fit_batch_to_budget, rebatch


SHAPES = StepCost(0.01, 0.012, 5.0, 1600)  # 64 px on 2 cores: a step's time grows with the batch
DIGITS = StepCost(0.03, 0.0005, 1.0, 3000)  # 16 px: the fixed cost of a step dominates


@pytest.mark.parametrize("cost, minutes, default, want, steps", [
    (SHAPES, 2, 32, 8, {32: 242, 16: 476, 8: 916}),  # none reaches 1000: the smallest
    (SHAPES, 4, 32, 8, {32: 485, 16: 952, 8: 1832}),  # the largest that does
    (SHAPES, 20, 32, 32, {32: 2429, 16: 4761, 8: 9160}),  # a long budget keeps the default
    (DIGITS, 2, 32, 32, {32: 2117, 16: 2769, 8: 3272}),
    (SHAPES, 2, 16, 8, {16: 476, 8: 916}),  # segmentation's and detection's 16
    (SHAPES, 2, 4, 4, {4: 1702}),  # volumes' batch 4: nothing to halve
    (StepCost(0.01, 0.012, 5.0, 1600, accumulate=2), 4, 32, 8, {32: 242, 16: 476, 8: 916}),  # 2 batches a step
])
def test_the_largest_batch_with_enough_steps(cost, minutes, default, want, steps):
    """Per step ``fixed + per_image * b`` plus the epoch's validation shared by its ``n / b``
    steps; the largest batch predicted to take :data:`MIN_BUDGET_STEPS` steps wins."""
    assert MIN_BUDGET_STEPS == 1000
    assert choose(cost, minutes * 60, default) == (want, steps)


def _trainer(batch: int = 32, ema: float = 0.99, adv: bool = False):
    from cnnkit.engine.adversarial import AdversarialTraining, AttackConfig
    from cnnkit.engine.config import TrainConfig
    from cnnkit.engine.trainer import Trainer
    from cnnkit.tasks.classify.task import ClassifyTask

    torch.manual_seed(0)
    x, y = torch.rand(96, 1, 8, 8), torch.randint(0, 3, (96,))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0),
                        collate_fn=lambda items: {"images": torch.stack([i[0] for i in items]),
                                                  "targets": torch.stack([i[1] for i in items])})
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    cfg = TrainConfig(epochs=2, batch=batch, lr=0.05, ema=ema, warmup_epochs=0.5)
    # adversarial training: a hook whose random starts must not be consumed by the timing
    hooks = [AdversarialTraining(AttackConfig("pgd", 0.03, 2, seed=0))] if adv else []
    return Trainer(ClassifyTask(["a", "b", "c"]), net, loader, loader, cfg, torch.device("cpu"), hooks=hooks)


def test_timing_leaves_no_trace_on_the_training_that_follows():
    """A budget too short for 1000 steps at any batch picks the smallest (8); the timed steps are
    undone (weights, BN statistics, optimizer, EMA, schedule, random state, an adversarial hook's
    random starts), so training from there gives bit for bit what a trainer built at batch 8 gives."""
    timed = _trainer(adv=True)
    before = {k: v.clone() for k, v in timed.model.state_dict().items()}
    choice = fit_batch_to_budget(timed, minutes=0.001)
    assert choice is not None and choice.value == 8 and "--time 0.001: batch 32 would take about" in choice.reason
    assert all(torch.equal(before[k], v) for k, v in timed.model.state_dict().items())  # BN statistics too
    assert timed.global_step == 0 and timed.lr_history == [] and not timed.optimizer.state
    assert timed.train_loader.batch_size == 8 and timed.steps_per_epoch == 12  # 96 images
    plain = _trainer(batch=8, adv=True)
    timed.fit()
    plain.fit()
    assert timed.lr_history == plain.lr_history  # the schedule was rebuilt for 12 steps an epoch
    for a, b in zip(timed.eval_model.state_dict().values(), plain.eval_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_long_budget_keeps_the_batch():
    trainer = _trainer()
    assert fit_batch_to_budget(trainer, minutes=10_000) is None
    assert trainer.train_loader.batch_size == 32 and trainer.steps_per_epoch == 3


def test_rebatch_keeps_the_seeded_order():
    loader = _trainer().train_loader
    small = rebatch(loader, 8)
    loader.generator.manual_seed(3)
    a = torch.cat([b["targets"] for b in loader])
    small.generator.manual_seed(3)
    b = torch.cat([b["targets"] for b in small])
    assert small.batch_size == 8 and len(small) == 12 and torch.equal(a, b)


def test_only_a_left_out_batch_is_fitted_to_the_budget(tmp_path):
    """``--time`` with ``--batch`` left out fits the batch (named in config.yaml with the reason);
    a given ``--batch`` stays, and so does a run without ``--time``."""
    import yaml

    import cnnkit

    kw = dict(data="digits", imgsz=12, seed=0, verbose=False)
    cnnkit.train("classify", time=0.002, out=str(tmp_path / "fit"), **kw)
    text = (tmp_path / "fit" / "config.yaml").read_text()
    assert "batch: 8  # derived from the data: --time 0.002: batch 32 would take about" in text, text
    cnnkit.train("classify", time=0.002, batch=32, out=str(tmp_path / "given"), **kw)
    cnnkit.train("classify", epochs=1, out=str(tmp_path / "none"), **kw)
    for run in ("given", "none"):
        assert yaml.safe_load((tmp_path / run / "config.yaml").read_text())["batch"] == 32
