"""A task-agnostic training loop.

Plain by design: the loss lives in the task, extras live in hooks. What it does for every
task: optimizer and LR schedule, AMP (bf16/fp16) on GPU, ``channels_last``, gradient
accumulation and clipping, EMA weights, seeded epochs (an epoch replays identically after
``--resume``), non-finite-loss protection with rollback, best/last checkpoints.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from cnnkit.engine.checkpoint import save_checkpoint, save_weights
from cnnkit.engine.config import TrainConfig
from cnnkit.engine.hooks import Hook
from cnnkit.engine.schedule import build_optimizer, build_scheduler
from cnnkit.errors import TrainingError
from cnnkit.tasks.base import Task
from cnnkit.utils.seed import epoch_seed, get_rng_state, seed_everything, set_rng_state


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on ``device`` (None: full precision)."""
    if mode == "off" or device.type == "cpu" and mode == "auto":
        return None
    if mode == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return torch.bfloat16 if mode == "bf16" else torch.float16


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, task: Task, device: torch.device,
             amp_dtype: torch.dtype | None = None, channels_last: bool = False,
             keep: int = 0) -> tuple[dict[str, Any], list[tuple[torch.Tensor, Any, dict]], list]:
    """Run ``model`` over ``loader`` and compute the task's metrics.

    Returns:
        ``(metrics, kept, skipped)``: the metrics dict; the first ``keep`` (image, output,
        target) triples for drawing; and ``(path, reason)`` of images that could not be read.
    """
    was_training = model.training
    model.eval()
    state = task.metrics(device)
    kept: list = []
    skipped: list = []
    for batch in loader:
        skipped += batch.get("skipped", [])
        if task.batch_size(batch) == 0:
            continue
        batch = task.to_device(batch, device, channels_last)
        with _autocast(device, amp_dtype):
            out = task.forward(model, batch)
        state.update(out, batch)
        if len(kept) < keep:
            n = min(keep - len(kept), task.batch_size(batch))
            kept += [(batch["images"][i].float().cpu(), out[i].float().cpu(), batch["targets"][i].cpu())
                     for i in range(n)]
    model.train(was_training)
    return state.compute(), kept, skipped


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


class WarmupEMA:
    """EMA update for ``AveragedModel`` whose decay ramps up as ``min(decay, (1 + n) / (10 + n))``.

    Without the ramp a decay of 0.999 keeps the average near the random initialisation for
    thousands of steps, which short runs never get past (timm's ModelEmaV3 warms up the same
    way; torch's ``get_ema_multi_avg_fn`` has no warmup).
    """

    def __init__(self, decay: float):
        self.decay = decay

    @torch.no_grad()
    def __call__(self, ema_params: list[torch.Tensor], params: list[torch.Tensor], n: torch.Tensor) -> None:
        n = float(n)
        decay = min(self.decay, (1.0 + n) / (10.0 + n))
        floats = [(e, p) for e, p in zip(ema_params, params) if e.is_floating_point()]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [p for _, p in floats], 1.0 - decay)
        for e, p in zip(ema_params, params):
            if not e.is_floating_point():
                e.copy_(p)


class Trainer:
    """Trains ``model`` on ``task`` with the optimization settings of ``cfg``.

    Args:
        task: defines forward, loss and metrics.
        model: any ``nn.Module`` the task can run.
        train_loader: must carry a ``torch.Generator`` (``generator=``) so epochs are seedable.
        val_loader: evaluated after every epoch; its monitored metric picks the best weights.
        cfg: the optimization and run settings.
        device: where to train.
        run_dir: where ``weights/`` go; None keeps everything in memory (tests, notebooks).
        card: model card written beside the best weights (metrics are added).
        hooks: extra :class:`Hook` objects, called in order.
        batch_transforms: callables ``batch -> batch`` applied to every training batch on
            ``device`` (whole-batch augmentation, mixup/cutmix), in order.
        model_transforms: callables ``model -> model`` applied, in order, before the optimizer
            is built (a QAT prepare, a DDP wrap, an adapter around a student), so the optimizer
            sees the parameters of the transformed model.
    """

    def __init__(self, task: Task, model: nn.Module, train_loader: DataLoader,
                 val_loader: DataLoader | None, cfg: TrainConfig, device: torch.device,
                 run_dir: Path | None = None, card: dict[str, Any] | None = None,
                 hooks: Sequence[Hook] = (), batch_transforms: Sequence = (), model_transforms: Sequence = ()):
        self.task, self.cfg, self.device = task, cfg, device
        self.train_loader, self.val_loader = train_loader, val_loader
        self.run_dir = Path(run_dir) if run_dir else None
        self.card = dict(card or {})
        self.hooks = list(hooks)
        self.batch_transforms = list(batch_transforms)
        self.amp_dtype = resolve_amp(cfg.amp, device)
        for transform in model_transforms:
            model = transform(model)
        self.model = model.to(device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum,
                                         cfg.layer_decay)
        self._schedule()
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = None
        if cfg.ema > 0:
            from torch.optim.swa_utils import AveragedModel

            self.ema = AveragedModel(self.model, multi_avg_fn=WarmupEMA(cfg.ema), use_buffers=True)
        # progress state, read by hooks
        self.epoch = 0  # epochs completed
        self.global_step = 0  # optimizer steps taken
        self.history: list[dict[str, Any]] = []
        self.lr_history: list[float] = []
        self.best_metric: float | None = None
        self.best_epoch = 0
        self.improved_epoch = 0  # last epoch that strictly beat the best (early stopping counts from it)
        self.improved = False
        self.should_stop = False
        self.stop_reason = ""
        self.max_steps: int | None = None  # an epoch ends early at this optimizer step (a --time budget's last epoch)
        self.epoch_steps = 0  # optimizer steps of the epoch running or just run
        self.last_metrics: dict[str, Any] = {}
        self.step_loss = float("nan")
        self.step_images = 0
        self.step_metric: tuple[str, float] | None = None  # running train metric of this epoch
        self._metric_sum, self._metric_count = 0.0, 0
        self.skipped: dict[str, str] = {}
        self.nonfinite_steps = 0
        self._good_state = self._snapshot()

    def _schedule(self) -> None:
        cfg = self.cfg
        self.steps_per_epoch = max(1, math.ceil(len(self.train_loader) / cfg.accumulate))
        self.scheduler = build_scheduler(
            self.optimizer, cfg.schedule, cfg.epochs * self.steps_per_epoch,
            int(round(cfg.warmup_epochs * self.steps_per_epoch)), cfg.step_size * self.steps_per_epoch, cfg.gamma,
            cycles=max(1, cfg.snapshots))

    # ---- public API -------------------------------------------------------------------
    def use_train_loader(self, loader: DataLoader) -> None:
        """Train from ``loader`` instead (another batch size): the LR schedule is rebuilt for its
        steps per epoch. Only before training starts."""
        if self.global_step:
            raise RuntimeError("the training loader can only be replaced before the first step")
        self.train_loader = loader
        self._schedule()

    @property
    def eval_model(self) -> nn.Module:
        """The model that is evaluated and saved: the EMA copy when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def fit(self) -> dict[str, Any]:
        """Train from ``self.epoch`` to ``cfg.epochs``; returns the best epoch's metrics.

        On CPU the memory each step frees is kept for the next one while training runs
        (:func:`cnnkit.utils.memory.keep_freed_memory`: no page faults on re-allocated
        activations and gradients; 7.5-14% faster CPU training in ``benchmarks/train_memory.py``)."""
        from cnnkit.utils.memory import keep_freed_memory

        with keep_freed_memory(self.device.type == "cpu"):
            for h in self.hooks:
                h.before_train(self)
            while self.epoch < self.cfg.epochs and not self.should_stop:
                self._run_epoch()
            for h in self.hooks:
                h.after_train(self)
        return self.best_metrics()

    def best_metrics(self) -> dict[str, Any]:
        for row in self.history:
            if row["epoch"] == self.best_epoch:
                return row
        return self.history[-1] if self.history else {}

    # ---- one epoch ----------------------------------------------------------------------
    def _run_epoch(self) -> None:
        cfg = self.cfg
        seed = epoch_seed(cfg.seed, self.epoch)
        seed_everything(seed)
        if self.train_loader.generator is not None:
            self.train_loader.generator.manual_seed(seed)
        self.model.train()
        for h in self.hooks:  # after train(), so a hook can put frozen BN layers back in eval mode
            h.before_epoch(self)
        t0 = time.perf_counter()
        loss_sum, n_images, n_batches = 0.0, 0, len(self.train_loader)
        self._metric_sum, self._metric_count, self.step_metric = 0.0, 0, None
        self.optimizer.zero_grad(set_to_none=True)
        self.epoch_steps = 0
        for i, batch in enumerate(self.train_loader):
            for path, reason in batch.get("skipped", []):
                self.skipped[path] = reason
            bs = self.task.batch_size(batch)
            boundary = (i + 1) % cfg.accumulate == 0 or i + 1 == n_batches
            if bs > 0:
                loss = self._forward_backward(batch)
                if loss is not None:
                    loss_sum += loss * bs
                    n_images += bs
            if boundary:
                self._optimizer_step()
                self.epoch_steps += 1
            self.step_loss = loss_sum / max(1, n_images)
            self.step_images = bs
            for h in self.hooks:
                h.after_step(self)
            if boundary and self.max_steps is not None and self.global_step >= self.max_steps:
                break  # the budget's last, shorter epoch
        train_time = time.perf_counter() - t0
        self.epoch += 1
        row: dict[str, Any] = {"epoch": self.epoch, "train_loss": loss_sum / max(1, n_images)}
        if self.step_metric is not None:
            row[f"train_{self.step_metric[0]}"] = self.step_metric[1]
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics: dict[str, Any] = {}
        if self.val_loader is not None:
            metrics, _, skipped = evaluate(self.eval_model, self.val_loader, self.task, self.device,
                                           self.amp_dtype, cfg.channels_last)
            for path, reason in skipped:
                self.skipped[path] = reason
            row["val_loss"] = metrics.get("loss", float("nan"))
            row.update({k: v for k, v in metrics.items() if isinstance(v, float) and k != "loss"})
        row["train_time_s"] = train_time
        row["images_per_s"] = n_images / train_time if train_time > 0 else 0.0
        self.last_metrics = metrics
        self.history.append(row)
        self._update_best(row)
        self._good_state = self._snapshot()
        self._save()
        for h in self.hooks:
            h.after_epoch(self)
        if self.run_dir is not None:
            self._save_last()  # after the hooks, so their state (e.g. early stopping) is included

    def _forward_backward(self, batch: dict) -> float | None:
        batch = self.task.to_device(batch, self.device, self.cfg.channels_last)
        for transform in self.batch_transforms:
            batch = transform(batch)
        for h in self.hooks:
            batch = h.before_step(self, batch) or batch
        with _autocast(self.device, self.amp_dtype):
            out = self.task.forward(self.model, batch)
            losses = self.task.loss(out, batch)
        loss = losses["loss"]
        sm = self.task.step_metric(out, batch)
        if sm is not None:
            name, value, count = sm
            self._metric_sum += value * count
            self._metric_count += count
            self.step_metric = (name, self._metric_sum / max(1, self._metric_count))
        if not torch.isfinite(loss):
            self._on_nonfinite()
            return None
        if self.cfg.accumulate > 1:
            loss = loss / self.cfg.accumulate
        self.scaler.scale(loss).backward()
        for h in self.hooks:
            h.after_backward(self)
        return float(losses["loss"].detach())

    def _optimizer_step(self) -> None:
        has_grad = any(p.grad is not None for g in self.optimizer.param_groups for p in g["params"])
        if has_grad:
            if self.cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_history.append(self.optimizer.param_groups[0]["lr"])
        if has_grad:
            self.scheduler.step()
        else:
            with warnings.catch_warnings():  # a skipped step still advances the schedule, on purpose
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                self.scheduler.step()
        self.global_step += 1

    # ---- non-finite protection -----------------------------------------------------------
    def _snapshot(self) -> dict[str, Any]:
        return {
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "ema": copy.deepcopy(self.ema.state_dict()) if self.ema is not None else None,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        """Put back the weights, optimizer and EMA of a :meth:`_snapshot`."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    def _on_nonfinite(self) -> None:
        """Skip the step; if the weights themselves went bad, roll back to the last good epoch."""
        self.nonfinite_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        bad_weights = any(not torch.isfinite(p).all() for p in self.model.parameters())
        if bad_weights:
            self._restore(self._good_state)
        limit = max(10, len(self.train_loader) // 4)
        if self.nonfinite_steps > limit:
            where = f"; the last good weights are in {self.run_dir / 'weights'}" if self.run_dir else ""
            raise TrainingError(f"the loss was NaN or infinite in {self.nonfinite_steps} steps, so "
                                f"training stopped at epoch {self.epoch + 1}{where}; lower --lr or "
                                "set --grad-clip")

    # ---- best / checkpoints --------------------------------------------------------------
    def _update_best(self, row: dict[str, Any]) -> None:
        key = self.task.monitor if self.task.monitor in row else "val_loss"
        if key not in row:
            key = "train_loss"
        value = row[key]
        maximize = self.task.monitor_mode == "max" and key == self.task.monitor
        better = (self.best_metric is None or (value > self.best_metric if maximize else value < self.best_metric))
        # a tie goes to the later epoch: it has trained longer at a lower learning rate (and its
        # EMA has settled). On small val sets ties are common (digits: 270 images, so top-1
        # moves in steps of 0.0037), and keeping the first of equals picked half-trained weights
        tie = value == self.best_metric
        self.improved = bool((better or tie) and math.isfinite(value))
        if self.improved:
            self.best_metric, self.best_epoch = value, self.epoch
        if better and math.isfinite(value):
            self.improved_epoch = self.epoch

    def _save(self) -> None:
        if self.run_dir is None or not self.improved:
            return
        state = self.eval_model.state_dict()
        if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
            return  # never publish non-finite weights
        metrics = {k: v for k, v in self.history[-1].items() if isinstance(v, (int, float))}
        card = {**self.card, "metrics": metrics, "epoch": self.epoch}
        save_weights(self.run_dir / "weights" / "best.safetensors", state, card)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact resume."""
        return {
            "epoch": self.epoch, "global_step": self.global_step,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": get_rng_state(), "history": self.history, "lr_history": self.lr_history,
            "best_metric": self.best_metric, "best_epoch": self.best_epoch, "improved_epoch": self.improved_epoch,
            "skipped": self.skipped, "nonfinite_steps": self.nonfinite_steps,
            "hooks": [h.state_dict() for h in self.hooks], "config": self.cfg.to_dict(), "card": self.card,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.history, self.lr_history = list(state["history"]), list(state["lr_history"])
        self.best_metric, self.best_epoch = state["best_metric"], state["best_epoch"]
        self.improved_epoch = state.get("improved_epoch", self.best_epoch)
        self.skipped = dict(state.get("skipped", {}))
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        for h, hs in zip(self.hooks, state.get("hooks", [])):
            h.load_state_dict(hs)
        self._good_state = self._snapshot()

    def _save_last(self) -> None:
        save_checkpoint(self.run_dir / "weights" / "last.ckpt", self.state_dict())
