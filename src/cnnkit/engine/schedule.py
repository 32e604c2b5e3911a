"""Learning-rate schedules with linear warmup, as one per-step LambdaLR multiplier.

A small callable object (not a lambda) so that LambdaLR's state dict carries it and resume
restores the exact position. torch's SequentialLR would also compose warmup with cosine but
its state handling across restarts has had bugs; this is 30 lines and exact.
"""

from __future__ import annotations

import math

import torch


class WarmupSchedule:
    """LR multiplier at optimizer step ``s`` out of ``total`` steps.

    ``cosine``: linear warmup from ``start`` to 1, then cosine down to ``final``.
    ``onecycle``: the 1cycle policy of torch's OneCycleLR (warmup over 30% of the steps
    from 1/25 of the peak, cosine down to 1/250000 of it); ignores ``--warmup-epochs``.
    ``step``: warmup, then multiply by ``gamma`` every ``step`` steps.
    ``constant``: warmup, then 1.
    """

    def __init__(self, kind: str, total: int, warmup: int, step: int = 1, gamma: float = 0.1,
                 start: float = 0.04, final: float = 1e-3):
        self.kind, self.total, self.warmup = kind, max(1, total), max(0, warmup)
        self.step, self.gamma, self.start, self.final = max(1, step), gamma, start, final

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return self.start + (1 - self.start) * s / self.warmup
        if self.kind in ("onecycle", "cosine"):
            t = min(1.0, (s - self.warmup) / max(1, self.total - self.warmup))
            return self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * t))
        if self.kind == "step":
            return self.gamma ** ((s - self.warmup) // self.step)
        return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int,
                    step_steps: int, gamma: float) -> torch.optim.lr_scheduler.LambdaLR:
    if kind == "onecycle":
        fn = WarmupSchedule(kind, total_steps, int(0.3 * total_steps), start=1 / 25, final=4e-6)
    else:
        warmup_steps = min(warmup_steps, max(0, total_steps - 1))
        fn = WarmupSchedule(kind, total_steps, warmup_steps, step_steps, gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def build_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float,
                    momentum: float) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW; no weight decay on biases and normalization weights."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or n.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)
