"""The hook protocol: small, checkpointable plug-ins around the training loop.

A hook overrides any of the methods below; each receives the Trainer. State that must
survive ``--resume`` goes through ``state_dict``/``load_state_dict`` (saved in last.ckpt).
Distillation, adversarial training or a new logger is a task or a hook, not a fork of the
Trainer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cnnkit.engine.trainer import Trainer


class Hook:
    """Base class with no-op callbacks."""

    def before_train(self, trainer: Trainer) -> None: ...

    def before_epoch(self, trainer: Trainer) -> None: ...

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
        if self.patience and trainer.epoch - trainer.best_epoch >= self.patience:
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
