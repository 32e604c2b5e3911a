"""Adversarial examples in pixel space, shared by ``cnnkit TASK attack`` (``methods/attack.py``)
and adversarial training (``train --adv``, the :class:`AdversarialTraining` hook).

FGSM (Goodfellow et al., 2015) and PGD (Madry et al., 2018) in the L-infinity or L2 ball, on
images in [0, 1], against any differentiable loss per sample; the Carlini-Wagner L2 attack
(Carlini & Wagner, 2017) against a margin per sample (a classifier's logit margin); and
AutoAttack's standard ensemble (Croce & Hein, 2020; in :mod:`cnnkit.engine.autoattack`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cnnkit.core.options import ATTACK_METHODS as METHODS
from cnnkit.core.options import ATTACK_NORMS as NORMS
from cnnkit.core.options import parse_fraction
from cnnkit.engine.hooks import Hook
from cnnkit.errors import CnnkitError


def parse_eps(text: str | float) -> float:
    """``8/255``, ``0.03`` -> a float; a one-sentence error for anything else."""
    return parse_fraction(text, "--eps")


@dataclass
class AttackConfig:
    """One attack: ``method`` fgsm or pgd, ``eps`` the perturbation budget (pixel units, in
    the ``norm`` ball), ``steps`` and ``alpha`` (PGD's step; default eps/4, torchattacks' 2/255
    at 8/255) and ``random_start`` (PGD starts at a random point of the ball), ``targeted`` a
    class index to push toward (None: away from the clean answer)."""

    method: str = "pgd"
    eps: float = 8 / 255
    steps: int | None = None  # None: 10 for PGD, 50 for CW
    alpha: float | None = None
    norm: str = "linf"
    targeted: int | None = None
    random_start: bool = True
    seed: int = 0
    c: float = 1.0  # CW: weight of the margin term
    kappa: float = 0.0  # CW: confidence
    queries: int = 5000  # AutoAttack: the Square attack's queries per image

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CnnkitError(f"--method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if self.method == "cw":  # the L2 attack; its "step" is Adam's learning rate
            self.norm = "l2"
            self.steps = 50 if self.steps is None else self.steps
            self.alpha = 0.01 if self.alpha is None else self.alpha
        if self.method == "autoattack":  # APGD sets its own step sizes; APGD and FAB take 100 steps
            self.steps = 100 if self.steps is None else self.steps
            if self.queries < 1:
                raise CnnkitError(f"--queries must be at least 1, got {self.queries}")
        self.steps = 10 if self.steps is None else self.steps
        if self.norm not in NORMS:
            raise CnnkitError(f"--norm must be linf or l2, got '{self.norm}'")
        if not 0 < self.eps <= (1 if self.norm == "linf" else 1e4):
            raise CnnkitError(f"--eps must be in (0, 1] (pixel units), got {self.eps:g}")
        if self.steps < 1:
            raise CnnkitError(f"--steps must be at least 1, got {self.steps}")
        if self.alpha is None:
            self.alpha = self.eps / 4
        if self.alpha <= 0:
            raise CnnkitError(f"--alpha must be above 0, got {self.alpha:g}")


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, *[1] * (delta.ndim - 1))
    return delta * (eps / n).clamp(max=1.0)


def _step(grad: torch.Tensor, alpha: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return alpha * grad.sign()
    n = grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, *[1] * (grad.ndim - 1))
    return alpha * grad / n


def perturb(loss_fn, x: torch.Tensor, cfg: AttackConfig, generator: torch.Generator | None = None,
            margin_fn=None, logits_fn=None, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Adversarial ``x`` (images in [0, 1]) maximizing ``loss_fn(x) -> (B,)`` under ``cfg``.

    FGSM is one step of size eps from ``x``; PGD starts from a random point of the eps ball
    (uniform in each coordinate for L-infinity, as torchattacks; a random direction scaled by a
    uniform radius for L2) and takes ``steps`` steps of ``alpha``, each projected back onto the
    ball and into [0, 1]. CW minimizes ``margin_fn`` instead (see :func:`carlini_wagner`);
    AutoAttack attacks ``logits_fn``'s class scores away from ``labels``
    (see :mod:`cnnkit.engine.autoattack`).
    """
    x = x.detach()
    if cfg.method == "cw":
        if margin_fn is None:
            raise CnnkitError("--method cw needs a margin between class scores; it attacks single-label "
                              "classifiers (use pgd with --norm l2 for other tasks)")
        return carlini_wagner(margin_fn, x, cfg)
    if cfg.method == "autoattack":
        if logits_fn is None or labels is None:
            raise CnnkitError("--method autoattack needs a margin between class scores; it attacks single-label "
                              "classifiers (use pgd for other tasks)")
        from cnnkit.engine.autoattack import auto_attack

        return auto_attack(logits_fn, x, labels, cfg.eps, cfg.norm, cfg.steps, cfg.queries, generator)[0]
    if cfg.method == "fgsm":
        steps, alpha, delta = 1, cfg.eps, torch.zeros_like(x)
    else:
        steps, alpha = cfg.steps, cfg.alpha
        if cfg.random_start:
            g = generator
            if cfg.norm == "linf":
                delta = (torch.rand(x.shape, generator=g, device="cpu").to(x.device) * 2 - 1) * cfg.eps
            else:
                d = torch.randn(x.shape, generator=g, device="cpu").to(x.device)
                r = torch.rand(len(x), generator=g, device="cpu").to(x.device).view(-1, *[1] * (x.ndim - 1))
                delta = d / d.flatten(1).norm(dim=1).view(-1, *[1] * (x.ndim - 1)) * r * cfg.eps
            delta = (x + delta).clamp(0, 1) - x
        else:
            delta = torch.zeros_like(x)
    for _ in range(steps):
        adv = (x + delta).requires_grad_(True)
        with torch.enable_grad():
            grad = torch.autograd.grad(loss_fn(adv).sum(), adv, allow_unused=True)[0]
        if grad is None:  # nothing to push against (no detections): the image stays clean
            break
        delta = _project(delta + _step(grad, alpha, cfg.norm), cfg.eps, cfg.norm)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def carlini_wagner(margin_fn, x: torch.Tensor, cfg: AttackConfig) -> torch.Tensor:
    """The Carlini-Wagner L2 attack: the smallest L2 change found that makes ``margin_fn``
    (``(B,)``, below 0 once the answer is overturned: the true class's logit minus the best
    other's) negative.

    As in torchattacks' ``CW``: the image is ``(tanh(w) + 1) / 2`` (always in [0, 1]), Adam
    (learning rate ``cfg.alpha``) minimizes ``||adv - x||^2 + c * max(margin, -kappa)`` for
    ``cfg.steps`` steps with a fixed ``c`` (no binary search), stopping early when the cost has
    not fallen over a tenth of the steps; each image keeps its smallest successful
    perturbation, or stays clean where none succeeded. Unlike torchattacks, pixels at exactly
    0 or 1 can move (``w`` starts at ``atanh`` of values kept just inside (-1, 1)), and the
    margin masks the true class out with -inf rather than 0.
    """
    w = torch.atanh((x * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6)).detach().requires_grad_(True)
    best = x.clone()
    best_l2 = torch.full((len(x),), float("inf"), device=x.device)
    optimizer = torch.optim.Adam([w], lr=cfg.alpha)
    prev = float("inf")
    every = max(cfg.steps // 10, 1)
    for step in range(cfg.steps):
        with torch.enable_grad():
            adv = (torch.tanh(w) + 1) / 2
            l2 = (adv - x).flatten(1).pow(2).sum(1)
            margin = margin_fn(adv)
            cost = l2.sum() + cfg.c * margin.clamp(min=-cfg.kappa).sum()
            optimizer.zero_grad()
            cost.backward()
        optimizer.step()
        with torch.no_grad():
            better = (margin.detach() < 0) & (l2.detach() < best_l2)
            best_l2 = torch.where(better, l2.detach(), best_l2)
            best = torch.where(better.view(-1, *[1] * (x.ndim - 1)), adv.detach(), best)
        if step % every == 0:
            if float(cost.detach()) > prev:
                break
            prev = float(cost.detach())
    return best.detach()


# ---- defence: adversarial training ----------------------------------------------------------
class AdversarialTraining(Hook):
    """``train --adv pgd|fgsm --adv-eps E [--adv-steps N]``: each training batch is replaced by
    its adversarial version against the model being trained and the task's own training loss
    (Madry et al., 2018), for any task.

    A trainer hook (``before_step``): the batch's images are taken back to [0, 1] pixels (a
    classifier's data is normalized before the model; detectors and segmenters normalize
    inside), perturbed by :func:`perturb` maximizing ``task.loss(task.forward(model, batch))``,
    and normalized again. BatchNorm layers keep their running statistics while the attack's
    extra forward passes run (momentum 0), so only the adversarial batch the model then trains
    on updates them.
    """

    def __init__(self, cfg: AttackConfig, mean=None, std=None):
        self.cfg = cfg
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}  # the random starts replay after --resume

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])

    @classmethod
    def from_train_config(cls, tc, card) -> AdversarialTraining:
        """From a training config's ``adv``, ``adv_eps`` and ``adv_steps`` and the card's
        normalization (a classifier's data arrives normalized)."""
        if card.input.mask_channel:
            raise CnnkitError("--adv does not combine with --missing-input mask")
        if card.input.illumination != "none":
            raise CnnkitError("--adv does not combine with --illumination yet: the attack would perturb the image "
                              "after its lighting is normalized, not the pixels")
        norm = card.task in ("classify", "multilabel") and card.input.mean is not None
        return cls(AttackConfig(tc.adv, parse_eps(tc.adv_eps), tc.adv_steps, seed=tc.seed),
                   card.input.mean if norm else None, card.input.std if norm else None)

    def before_step(self, trainer, batch: dict) -> dict:
        x = batch["images"]
        mean = None if self.mean is None else self.mean.to(x.device)
        std = None if self.std is None else self.std.to(x.device)
        pixels = x.float() if mean is None else x.float() * std + mean

        def loss(a: torch.Tensor) -> torch.Tensor:
            b = dict(batch, images=a if mean is None else (a - mean) / std)
            return trainer.task.loss(trainer.task.forward(trainer.model, b), b)["loss"].view(1)

        with _frozen_norm_statistics(trainer.model):
            adv = perturb(loss, pixels.clamp(0, 1), self.cfg, self.generator)
        adv = adv if mean is None else (adv - mean) / std
        return dict(batch, images=adv.to(x.dtype).contiguous(memory_format=_memory_format(x)))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


class _frozen_norm_statistics:
    """BatchNorm running statistics unchanged inside (momentum 0), restored after."""

    def __init__(self, model: torch.nn.Module):
        self.norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def __enter__(self) -> None:
        self.saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
                      for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0

    def __exit__(self, *exc) -> None:
        for m, (momentum, tracked) in zip(self.norms, self.saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
