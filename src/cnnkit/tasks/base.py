"""The task interface: everything the engine needs to know about one kind of problem.

The Trainer, the methods and the apps talk to a task only through these methods, so adding
a task never touches the Trainer. A task answers: what a batch looks like (``collate``),
how to build its model, the loss dict from model output and batch, which metrics to
update, how raw output becomes predictions, and how to draw them.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


def images_to_device(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [0, 1] on ``device`` (optionally channels_last)."""
    x = images.to(device, non_blocking=True).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class MetricState(Protocol):
    """Accumulates one evaluation pass."""

    def update(self, output: torch.Tensor, batch: dict) -> None: ...

    def compute(self) -> dict[str, Any]: ...


class Task:
    """Base class; subclasses fill in the methods below."""

    name: str = "task"
    monitor: str = "loss"  # metric that picks the best epoch
    monitor_mode: str = "min"  # "min" or "max"

    def collate(self, items: list) -> dict:
        raise NotImplementedError

    def to_device(self, batch: dict, device: torch.device, channels_last: bool = False) -> dict:
        """Move the tensors of a batch to ``device`` (images optionally channels_last)."""
        out = dict(batch)
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=True)
                if channels_last and k == "images" and v.ndim == 4:
                    v = v.contiguous(memory_format=torch.channels_last)
                out[k] = v
        return out

    def batch_size(self, batch: dict) -> int:
        return int(batch["images"].shape[0])

    def forward(self, model: nn.Module, batch: dict) -> Any:
        return model(batch["images"])

    def loss(self, output: Any, batch: dict) -> dict[str, torch.Tensor]:
        """Return ``{"loss": total, ...parts}``; ``loss`` is what gets backpropagated."""
        raise NotImplementedError

    def metrics(self) -> MetricState:
        raise NotImplementedError

    def step_metric(self, output: Any, batch: dict) -> tuple[str, float, int] | None:
        """A cheap training-batch metric for the progress bar: ``(name, value, count)``."""
        return None

    def summary(self, metrics: dict[str, Any]) -> str:
        """One short line for progress displays."""
        return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
