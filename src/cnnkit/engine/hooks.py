"""The hook protocol: small, checkpointable plug-ins around the training loop.

A hook overrides any of the methods below; each receives the Trainer. State that must
survive ``--resume`` goes through ``state_dict``/``load_state_dict`` (saved in last.ckpt).
Distillation, adversarial training or a new logger is a task or a hook, not a fork of the
Trainer.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cnnkit.engine.trainer import Trainer


class Hook:
    """Base class with no-op callbacks."""

    def before_train(self, trainer: Trainer) -> None: ...

    def before_epoch(self, trainer: Trainer) -> None: ...

    def before_step(self, trainer: Trainer, batch: dict) -> dict | None:
        """A training batch on the device, after batch transforms and before the forward pass;
        return a changed batch (adversarial examples, a teacher's targets) or None to keep it."""

    def after_backward(self, trainer: Trainer) -> None:
        """Gradients of this batch are in ``trainer.model`` (scaled under fp16), before the
        optimizer step (gradient masks for pruning, gradient checks)."""

    def after_step(self, trainer: Trainer) -> None: ...

    def after_epoch(self, trainer: Trainer) -> None: ...

    def after_train(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class EarlyStopping(Hook):
    """Stop when the monitored metric has not improved for ``patience`` epochs."""

    def __init__(self, patience: int):
        self.patience = patience

    def after_epoch(self, trainer: Trainer) -> None:
        if self.patience and trainer.epoch - trainer.improved_epoch >= self.patience:
            trainer.stop_reason = (f"early stopping: no improvement in {trainer.task.monitor} for "
                                   f"{self.patience} epochs (best epoch {trainer.best_epoch})")
            trainer.should_stop = True


class MetricsCSV(Hook):
    """Rewrite ``metrics.csv`` (one row per epoch) after every epoch, atomically."""

    def __init__(self, path):
        self.path = path

    def after_epoch(self, trainer: Trainer) -> None:
        from cnnkit.utils.io import write_text

        rows = trainer.history
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        lines = [",".join(keys)]
        for r in rows:
            lines.append(",".join(_fmt(r.get(k, "")) for k in keys))
        write_text(self.path, "\n".join(lines) + "\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


class Freeze(Hook):
    """``--freeze`` / ``--linear-probe``: frozen parameters (and their BN statistics) until
    epoch ``unfreeze_at`` (0: for the whole run). The optimizer holds every parameter, so
    unfreezing needs no new optimizer; the state follows ``trainer.epoch``, so resume is exact.
    """

    def __init__(self, spec: str | int, unfreeze_at: int = 0):
        self.spec, self.unfreeze_at = spec, unfreeze_at
        self.names: set[str] = set()

    def _frozen_now(self, trainer: Trainer) -> bool:
        return not self.unfreeze_at or trainer.epoch < self.unfreeze_at

    def before_train(self, trainer: Trainer) -> None:
        from cnnkit.models.finetune import frozen_names, set_frozen

        self.names = frozen_names(trainer.model, self.spec) if self._frozen_now(trainer) else set()
        set_frozen(trainer.model, self.names)

    def before_epoch(self, trainer: Trainer) -> None:
        from cnnkit.models.finetune import freeze_norm_stats, set_frozen

        if self.names and not self._frozen_now(trainer):
            self.names = set()
            set_frozen(trainer.model, self.names)
        freeze_norm_stats(trainer.model, self.names)


class Snapshots(Hook):
    """Save the weights at the end of every cyclic-LR cycle (snapshot ensembles) as
    ``weights/snapshotK.safetensors``; ``cnnkit classify val --weights ...snapshot*`` ensembles them."""

    def __init__(self, every: int):
        self.every = every

    def after_epoch(self, trainer: Trainer) -> None:
        if trainer.run_dir is None or trainer.epoch % self.every:
            return
        from cnnkit.engine.checkpoint import save_weights

        k = trainer.epoch // self.every
        metrics = {k2: v for k2, v in trainer.history[-1].items() if isinstance(v, (int, float))}
        save_weights(trainer.run_dir / "weights" / f"snapshot{k}.safetensors", trainer.model.state_dict(),
                     {**trainer.card, "metrics": metrics, "epoch": trainer.epoch, "snapshot": k})


class TimeBudget(Hook):
    """Hook for ``--time``: after each epoch, fit the rest of the run into the budget and
    stretch the LR schedule to it, as Ultralytics' ``time=`` does, except that the run ends on
    the optimizer step that fills the budget, not on the last whole epoch that fits: the
    seconds a whole epoch would overshoot go to a last, shorter epoch (validated and saved like
    any other) instead of being left unused, which was up to one epoch in eight at 9 minutes.

    The plan uses the mean seconds of an optimizer step and the mean seconds an epoch spends
    outside its steps (validation, checkpoints) so far. ``spent`` is time the budget already
    paid before training (the workflow's timing of the batch for the budget).
    """

    MIN_LAST = 0.1  # a last epoch shorter than this share of an epoch is not worth its validation

    def __init__(self, minutes: float, spent: float = 0.0):
        self.budget = minutes * 60.0
        self.used = spent  # seconds of the budget spent: before training, then wall-clock since
        self.before = spent  # of which before training
        self.max_steps: int | None = None  # the planned last step, kept for a resume
        self._base = self._start = 0.0

    def before_train(self, trainer) -> None:
        self._base, self._start = self.used, time.perf_counter()
        trainer.max_steps = self.max_steps

    def after_epoch(self, trainer) -> None:
        self.used = self._base + time.perf_counter() - self._start
        train_s = sum(float(row.get("train_time_s", 0.0)) for row in trainer.history)  # in training steps
        steps_per_epoch = trainer.steps_per_epoch
        per_step = train_s / max(1, trainer.global_step)
        per_epoch = max(0.0, self.used - self.before - train_s) / max(1, trainer.epoch)  # outside the steps
        left = self.budget - self.used
        epoch_s = max(1e-9, steps_per_epoch * per_step + per_epoch)
        whole = int(max(0.0, left) // epoch_s)
        rest = left - whole * epoch_s - per_epoch
        last = min(steps_per_epoch - 1, int(max(0.0, rest) // per_step)) if per_step > 0 else 0
        if last < self.MIN_LAST * steps_per_epoch:
            last = 0
        cut = trainer.max_steps is not None and trainer.epoch_steps < steps_per_epoch
        if left <= 0 or cut or (whole == 0 and last == 0):
            trainer.should_stop = True
            trainer.stop_reason = (f"time budget of {self.budget / 60:.1f} min spent after {trainer.epoch} epochs"
                                   + (f" (the last one {trainer.epoch_steps} of its {steps_per_epoch} steps)"
                                      if cut else ""))
            trainer.cfg.epochs = trainer.epoch
            self.max_steps = trainer.max_steps = None
            return
        total = trainer.global_step + whole * steps_per_epoch + last
        trainer.cfg.epochs = trainer.epoch + whole + (last > 0)
        self.max_steps = trainer.max_steps = total if last else None
        for fn in trainer.scheduler.lr_lambdas:
            fn.total = max(1, total)

    def state_dict(self) -> dict:
        return {"used": self.used, "before": self.before, "max_steps": self.max_steps}

    def load_state_dict(self, state: dict) -> None:
        self.used = float(state.get("used", 0.0))
        self.before = float(state.get("before", 0.0))
        self.max_steps = state.get("max_steps")
