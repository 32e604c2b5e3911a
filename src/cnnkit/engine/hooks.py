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
    """Hook for ``--time``: after each epoch, set the number of epochs that fit in the budget
    (mean epoch time so far, validation included) and stretch the LR schedule to it, as
    Ultralytics' ``time=`` does; stop when the budget is spent."""

    def __init__(self, minutes: float):
        self.budget = minutes * 60.0
        self.used = 0.0
        self._t0 = 0.0

    def before_train(self, trainer) -> None:
        self._t0 = time.perf_counter()

    def before_epoch(self, trainer) -> None:
        self._t0 = time.perf_counter()

    def after_epoch(self, trainer) -> None:
        self.used += time.perf_counter() - self._t0
        per_epoch = self.used / max(1, trainer.epoch)
        epochs = max(trainer.epoch, int(self.budget / per_epoch))
        if self.used >= self.budget or epochs <= trainer.epoch:
            trainer.should_stop = True
            trainer.stop_reason = f"time budget of {self.budget / 60:.1f} min spent after {trainer.epoch} epochs"
            epochs = trainer.epoch
        trainer.cfg.epochs = epochs
        for fn in trainer.scheduler.lr_lambdas:
            fn.total = max(1, epochs * trainer.steps_per_epoch)

    def state_dict(self) -> dict:
        return {"used": self.used}

    def load_state_dict(self, state: dict) -> None:
        self.used = float(state.get("used", 0.0))
