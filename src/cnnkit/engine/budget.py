"""The batch a ``--time`` budget wants (issue 19): fewer, larger steps or more, smaller ones.

A time budget fixes the wall-clock, not the number of optimizer steps. Where the convolutions
dominate (64 px shapes on 2 CPU cores) a step's time grows with the batch, so every batch size
fits about the same epochs into the budget and a smaller batch simply takes more steps: at two
minutes, batch 8 took 4x the steps of the default 32 and reached test top-1 0.665 against
0.455 (``benchmarks/budget_batch.py``). Where a step's fixed cost dominates (16 px digits), the
batch made no difference. So with ``--time`` and ``--batch`` left out, the workflow times a few
training steps at the default batch and at half of it, fits ``seconds = fixed + per_image *
batch``, adds the validation pass, and predicts the steps each batch (the default, halved down
to :data:`~cnnkit.data.defaults.MIN_BATCH`) takes in the budget: it keeps the largest batch
with at least :data:`MIN_BUDGET_STEPS` of them (or, when none gets there, the smallest).

The timing runs the real training step (task loss, distillation teacher, fake quantization,
adversarial examples, EMA) on the real model, then puts the weights, optimizer, EMA, schedule,
loss scale, hook state and random state back, so the training that follows is the one the chosen batch would give
without the timing. It takes a few seconds, which count in the budget.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from cnnkit.data.defaults import MIN_BATCH, Derived

MIN_BUDGET_STEPS = 1000  # optimizer steps a budget should buy; below it the batch is halved
TIMED_STEPS = 2  # timed steps per batch size, after one untimed warm-up step


@dataclass(frozen=True)
class StepCost:
    """Seconds a training batch takes at ``batch`` images: ``fixed + per_image * batch``, and
    ``val`` seconds of validation an epoch of ``n_train`` images adds; ``accumulate`` batches
    make one optimizer step."""

    fixed: float
    per_image: float
    val: float
    n_train: int
    accumulate: int = 1

    def steps(self, batch: int, budget_s: float) -> int:
        """Optimizer steps at ``batch`` that fit in ``budget_s`` seconds, validation included."""
        per_batch = self.fixed + self.per_image * batch + self.val * batch / max(1, self.n_train)
        return int(budget_s / max(per_batch, 1e-9) / self.accumulate)


def rebatch(loader: DataLoader, batch: int) -> DataLoader:
    """``loader`` at another batch size: the same dataset, sampler and seeded generator (an
    epoch's order is the same), collate function and workers."""
    from cnnkit.data.classification import make_loader

    return make_loader(loader.dataset, batch, False, loader.num_workers, loader.collate_fn, loader.generator,
                       loader.drop_last, loader.pin_memory, sampler=loader.sampler)


def choose(cost: StepCost, budget_s: float, default: int) -> tuple[int, dict[int, int]]:
    """The batch for ``budget_s`` seconds: the largest of ``default``, ``default / 2``, ... (not
    below :data:`MIN_BATCH`) predicted to take at least :data:`MIN_BUDGET_STEPS` steps, else
    the smallest; and the predicted steps of each candidate."""
    candidates = [default]
    while candidates[-1] // 2 >= MIN_BATCH:
        candidates.append(candidates[-1] // 2)
    steps = {b: cost.steps(b, budget_s) for b in candidates}
    return next((b for b in candidates if steps[b] >= MIN_BUDGET_STEPS), candidates[-1]), steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(trainer, batches: tuple[int, int]) -> StepCost:
    """Time :data:`TIMED_STEPS` training steps of ``trainer`` (after one warm-up) at each of the
    two ``batches``, and a validation batch; the caller restores the trainer's state."""
    from cnnkit.engine.trainer import _autocast

    task, device = trainer.task, trainer.device
    trainer.model.train()
    seconds = {}
    for b in batches:
        loader = rebatch(trainer.train_loader, b)
        it = iter(loader)
        times = []
        for i in range(TIMED_STEPS + 1):
            _sync(device)
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            if task.batch_size(batch) > 0:
                trainer._forward_backward(batch)
            trainer._optimizer_step()
            _sync(device)
            if i:
                times.append(time.perf_counter() - t0)
        seconds[b] = statistics.median(times)
    (b0, t0), (b1, t1) = sorted(seconds.items(), reverse=True)
    per_image = max(0.0, (t0 - t1) / (b0 - b1))
    fixed = max(0.0, t0 - per_image * b0)
    val = 0.0
    if trainer.val_loader is not None and len(trainer.val_loader):
        model = trainer.eval_model
        model.eval()
        it = iter(trainer.val_loader)
        with torch.no_grad():
            t = time.perf_counter()
            batch = task.to_device(next(it), device, trainer.cfg.channels_last)
            if task.batch_size(batch) > 0:
                with _autocast(device, trainer.amp_dtype):
                    task.forward(model, batch)
            _sync(device)
        val = (time.perf_counter() - t) * len(trainer.val_loader)
        trainer.model.train()
    return StepCost(fixed, per_image, val, len(trainer.train_loader.dataset), trainer.cfg.accumulate)


def fit_batch_to_budget(trainer, minutes: float) -> Derived | None:
    """For ``--time minutes`` with ``--batch`` left out: the batch :func:`choose` picks from
    the measured step cost, with the reason (None when the trainer's batch stays: it already
    buys enough steps, it is at :data:`MIN_BATCH`, or its loader cannot be rebatched). The
    trainer is left as it was, training from the chosen batch's loader."""
    from cnnkit.utils.seed import get_rng_state, set_rng_state

    default = trainer.train_loader.batch_size
    if default is None or default // 2 < MIN_BATCH or minutes <= 0:
        return None
    rng, state, hooks = get_rng_state(), trainer._snapshot(), [h.state_dict() for h in trainer.hooks]
    scaler = trainer.scaler.state_dict()  # (fp16 on a GPU: the loss scale)
    t = time.perf_counter()
    try:
        cost = measure(trainer, (default, default // 2))
    finally:  # the timed steps leave no trace: weights, optimizer, EMA, schedule, counters, random state
        trainer._restore(state)
        trainer.global_step, trainer.lr_history, trainer.nonfinite_steps = 0, [], 0
        trainer._metric_sum, trainer._metric_count, trainer.step_metric = 0.0, 0, None
        trainer.skipped.clear()
        trainer.optimizer.zero_grad(set_to_none=True)
        set_rng_state(rng)
        trainer.scaler.load_state_dict(scaler)
        for h, hook_state in zip(trainer.hooks, hooks, strict=True):  # (an attack's random starts)
            h.load_state_dict(hook_state)
        trainer.use_train_loader(trainer.train_loader)  # a fresh schedule
    timed = time.perf_counter() - t
    batch, steps = choose(cost, minutes * 60.0, default)
    if batch == default:
        return None
    trainer.use_train_loader(rebatch(trainer.train_loader, batch))
    return Derived(batch, (
        f"--time {minutes:g}: batch {default} would take about {steps[default]} optimizer steps in the budget, "
        f"batch {batch} about {steps[batch]} (at least {MIN_BUDGET_STEPS} wanted: a short budget learns more "
        f"from more, smaller steps; timed in {timed:.1f} s)"))
