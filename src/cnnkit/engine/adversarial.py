"""Adversarial examples in pixel space, shared by ``cnnkit TASK attack`` (``methods/attack.py``)
and adversarial training (``train --adv``, the :class:`AdversarialTraining` hook).

FGSM (Goodfellow et al., 2015) and PGD (Madry et al., 2018) in the L-infinity or L2 ball, on
images in [0, 1], against any differentiable loss per sample; the Carlini-Wagner L2 attack
(Carlini & Wagner, 2017) against a margin per sample (a classifier's logit margin); and
AutoAttack's parameter-free APGD (Croce & Hein, 2020) with the cross-entropy and the DLR loss.
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

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CnnkitError(f"--method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if self.method == "cw":  # the L2 attack; its "step" is Adam's learning rate
            self.norm = "l2"
            self.steps = 50 if self.steps is None else self.steps
            self.alpha = 0.01 if self.alpha is None else self.alpha
        if self.method == "autoattack":  # APGD sets its own step sizes
            self.steps = 100 if self.steps is None else self.steps
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
            margin_fn=None, objective_fn=None) -> torch.Tensor:
    """Adversarial ``x`` (images in [0, 1]) maximizing ``loss_fn(x) -> (B,)`` under ``cfg``.

    FGSM is one step of size eps from ``x``; PGD starts from a random point of the eps ball
    (uniform in each coordinate for L-infinity, as torchattacks; a random direction scaled by a
    uniform radius for L2) and takes ``steps`` steps of ``alpha``, each projected back onto the
    ball and into [0, 1]. CW minimizes ``margin_fn`` instead (see :func:`carlini_wagner`).
    """
    x = x.detach()
    if cfg.method == "cw":
        if margin_fn is None:
            raise CnnkitError("--method cw needs a margin between class scores; it attacks single-label "
                              "classifiers (use pgd with --norm l2 for other tasks)")
        return carlini_wagner(margin_fn, x, cfg)
    if cfg.method == "autoattack":
        if objective_fn is None:
            raise CnnkitError("--method autoattack needs a margin between class scores; it attacks single-label "
                              "classifiers (use pgd for other tasks)")
        return auto_attack(objective_fn, x, cfg, generator)
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


def apgd(objective, x: torch.Tensor, cfg: AttackConfig, loss: str, generator: torch.Generator | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Auto-PGD (Croce & Hein, 2020), as in torchattacks' and AutoAttack's ``APGD``: a random
    start in the eps ball, a first step of 2 eps, momentum 0.75, and at checkpoints (22% of the
    steps, shrinking by 3% to at least 6%) the step halved for images whose loss rose in fewer
    than 75% of the steps since the last checkpoint or did not improve, restarting them from
    their best point.

    ``objective(adv, loss) -> (loss per sample, fooled per sample)`` (``loss``: "ce" or "dlr").
    Returns ``(adv, fooled)``:
    each image's first fooling point, else its highest-loss point.
    """
    n, steps, eps = len(x), cfg.steps, cfg.eps
    n_iter_2, n_iter_min, size_decr = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    view = (-1, *[1] * (x.ndim - 1))
    if cfg.norm == "linf":
        t = torch.rand(x.shape, generator=generator).to(x.device) * 2 - 1
        x_adv = x + eps * t / t.flatten(1).abs().amax(1).view(view)
    else:
        t = torch.randn(x.shape, generator=generator).to(x.device)
        x_adv = x + eps * t / (t.flatten(1).norm(dim=1).view(view) + 1e-12)
    x_adv = x_adv.clamp(0, 1)

    def grad_at(a: torch.Tensor):
        a = a.detach().requires_grad_(True)
        with torch.enable_grad():
            value, fooled = objective(a, loss)
            g = torch.autograd.grad(value.sum(), a)[0].detach()
        return value.detach(), fooled.detach(), g

    def project(a: torch.Tensor) -> torch.Tensor:
        if cfg.norm == "linf":
            return torch.min(torch.max(a, x - eps), x + eps).clamp(0, 1)
        d = a - x
        return (x + d * (eps / (d.flatten(1).norm(dim=1).view(view) + 1e-12)).clamp(max=1)).clamp(0, 1)

    def step(a: torch.Tensor, g: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        if cfg.norm == "linf":
            return a + size * g.sign()
        return a + size * g / (g.flatten(1).norm(dim=1).view(view) + 1e-12)

    value, fooled, grad = grad_at(x_adv)
    x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), value.clone()
    x_first = torch.where(fooled.view(view), x_adv, x_best)
    ever = fooled.clone()
    size = torch.full((n, *[1] * (x.ndim - 1)), 2.0 * eps, device=x.device)
    x_old = x_adv.clone()
    history = torch.zeros(steps, n, device=x.device)
    k, counter = n_iter_2, 0
    best_at_check = loss_best.clone()
    reduced_at_check = torch.ones(n, dtype=torch.bool, device=x.device)
    for i in range(steps):
        momentum = x_adv - x_old
        x_old = x_adv.clone()
        a = 0.75 if i > 0 else 1.0
        z = project(step(x_adv, grad, size))
        x_adv = project(x_adv + (z - x_adv) * a + momentum * (1 - a))
        value, fooled, grad = grad_at(x_adv)
        newly = fooled & ~ever
        x_first = torch.where(newly.view(view), x_adv, x_first)
        ever |= fooled
        history[i] = value
        better = value > loss_best
        x_best = torch.where(better.view(view), x_adv, x_best)
        grad_best = torch.where(better.view(view), grad, grad_best)
        loss_best = torch.where(better, value, loss_best)
        counter += 1
        if counter == k:
            rises = sum((history[i - j] > history[i - j - 1]).float() for j in range(k) if i - j - 1 >= 0)
            oscillating = torch.as_tensor(rises, device=x.device) <= k * 0.75
            stuck = ~reduced_at_check & (best_at_check >= loss_best)
            halve = oscillating | stuck
            reduced_at_check = halve.clone()
            best_at_check = loss_best.clone()
            size = torch.where(halve.view(view), size / 2, size)
            x_adv = torch.where(halve.view(view), x_best, x_adv)
            grad = torch.where(halve.view(view), grad_best, grad)
            counter = 0
            k = max(k - size_decr, n_iter_min)
    return torch.where(ever.view(view), x_first, x_best).detach(), ever


def auto_attack(objective, x: torch.Tensor, cfg: AttackConfig, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """AutoAttack's APGD pair: APGD with the cross-entropy, then APGD with the DLR loss (the
    logit margin over the gap between the first and third logits, invariant to the logits'
    scale) on the images the first did not fool. The full standard AutoAttack also runs a
    targeted APGD, FAB and the Square attack; this is its two white-box APGD runs."""
    adv, fooled = apgd(objective, x, cfg, "ce", generator)
    rest = (~fooled).nonzero().flatten()
    if len(rest):
        def sub(a, loss, idx=rest):
            return objective(a, loss, idx)

        adv2, _ = apgd(sub, x[rest], cfg, "dlr", generator)
        adv = adv.clone()
        adv[rest] = adv2
    return adv


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
