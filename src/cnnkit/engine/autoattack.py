"""AutoAttack (Croce & Hein, ICML 2020), the standard version: four parameter-free attacks run
one after another, each on the images the ones before it left correctly classified.

1. **APGD-CE**: Auto-PGD on the cross-entropy (:func:`apgd`).
2. **APGD-T**: Auto-PGD on the targeted DLR loss, toward each of the nine classes the clean
   image scores highest after its own, in turn.
3. **FAB-T**: the targeted fast adaptive boundary attack (:func:`fab_targeted`), which walks
   to the nearest point of the linearized decision boundary toward each of the same targets.
4. **Square**: the Square attack (:func:`square`), a random search that uses only the
   model's scores, never its gradients, so it is not fooled by gradient masking.

An image counts as broken when an attack finds a point inside the ``eps`` ball (and in [0, 1])
that the model gets wrong; the point is checked with one more forward pass before it is kept.
Images no attack breaks are returned clean, as AutoAttack returns them.

Ported from the reference code (github.com/fra31/auto-attack), as torchattacks 3.5.1 packages
it, onto one callable ``logits_fn(images) -> (B, K)``, so every single-label classifier that
cnnkit loads is attacked the same way through its pipeline. Written here rather than imported:
AutoAttack is not on PyPI, and torchattacks is the peer ``benchmarks/attack_torchattacks.py``
measures these attacks against. The differences from torchattacks are deliberate: every random
draw comes from the caller's generator (not the global seed), APGD-T and FAB-T target at most
nine classes (the reference's ``n_target_classes``; torchattacks targets all), and the DLR
denominators fall back to the lowest score on models with fewer than four classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")
N_TARGETS = 9  # AutoAttack's standard n_target_classes


def _view(x: torch.Tensor) -> tuple[int, ...]:
    return (-1, *[1] * (x.ndim - 1))


def _norm(d: torch.Tensor, norm: str) -> torch.Tensor:
    """The per-sample size of ``d`` ``(B,)`` in the L-infinity or L2 norm."""
    d = d.flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


def project(a: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """``a`` moved into the ``eps`` ball around ``x`` and into [0, 1]."""
    if norm == "linf":
        return torch.min(torch.max(a, x - eps), x + eps).clamp(0, 1)
    d = a - x
    return (x + d * (eps / (d.flatten(1).norm(dim=1).view(_view(x)) + 1e-12)).clamp(max=1)).clamp(0, 1)


def _without(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The best score other than class ``y``'s, per sample."""
    return z.scatter(1, y.view(-1, 1), float("-inf")).amax(1)


def dlr_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """AutoAttack's difference-of-logits-ratio loss per sample, to maximize: the best other
    class's logit minus the true one, over the first logit minus the third (scale-invariant)."""
    top = z.sort(1, descending=True).values
    third = top[:, min(2, z.shape[1] - 1)]
    return (_without(z, y) - z.gather(1, y.view(-1, 1))[:, 0]) / (top[:, 0] - third + 1e-12)


def dlr_targeted_loss(z: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The targeted DLR loss: the target's logit minus the true one, over the first logit
    minus the mean of the third and fourth."""
    top = z.sort(1, descending=True).values
    k = z.shape[1] - 1
    low = 0.5 * (top[:, min(2, k)] + top[:, min(3, k)])
    own = z.gather(1, y.view(-1, 1))[:, 0]
    return (z.gather(1, target.view(-1, 1))[:, 0] - own) / (top[:, 0] - low + 1e-12)


def apgd(logits_fn: LogitsFn, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf", steps: int = 100,
         loss: str = "ce", target: torch.Tensor | None = None, generator: torch.Generator | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Auto-PGD: a random start in the ball, a first step of 2 eps, momentum 0.75, and at
    checkpoints (22% of the steps, shrinking by 3% to at least 6%) the step halved for images
    whose loss rose in fewer than 75% of the steps since the last checkpoint or did not
    improve, restarting them from their best point.

    ``loss``: "ce" (cross-entropy), "dlr" or "dlr-t" (toward ``target``, one class per image).
    Returns ``(adv, fooled)``: each image's first misclassified point, else its highest-loss point.
    """
    n = len(x)
    n_iter_2, n_iter_min, size_decr = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    view = _view(x)
    if norm == "linf":
        t = torch.rand(x.shape, generator=generator).to(x.device) * 2 - 1
        x_adv = x + eps * t / t.flatten(1).abs().amax(1).view(view)
    else:
        t = torch.randn(x.shape, generator=generator).to(x.device)
        x_adv = x + eps * t / (t.flatten(1).norm(dim=1).view(view) + 1e-12)
    x_adv = x_adv.clamp(0, 1)

    def grad_at(a: torch.Tensor):
        a = a.detach().requires_grad_(True)
        with torch.enable_grad():
            z = logits_fn(a).float()
            value = (F.cross_entropy(z, y, reduction="none") if loss == "ce" else
                     dlr_loss(z, y) if loss == "dlr" else dlr_targeted_loss(z, y, target))
            g = torch.autograd.grad(value.sum(), a)[0].detach()
        return value.detach(), (z.argmax(1) != y).detach(), g

    def step(a: torch.Tensor, g: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        if norm == "linf":
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
        z = project(step(x_adv, grad, size), x, eps, norm)
        x_adv = project(x_adv + (z - x_adv) * a + momentum * (1 - a), x, eps, norm)
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


# ---- FAB ----------------------------------------------------------------------------------------
def _hyperplane_linf(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The smallest L-infinity step ``d`` from each row of ``t`` onto the hyperplane
    ``w . (t + d) = b`` with ``t + d`` in the box [0, 1] (or as close as the box allows);
    FAB's ``projection_linf``, a sort and a bisection over the coordinates."""
    w, b = w.clone(), b.clone()
    sign = 2 * ((w * t).sum(1) - b >= 0) - 1
    w.mul_(sign.unsqueeze(1))
    b.mul_(sign)
    a = (w < 0).float()
    d = (a - t) * (w != 0).float()
    p = a - t * (2 * a - 1)
    indp = torch.argsort(p, dim=1)
    b = b - (w * t).sum(1)
    b0 = (w * d).sum(1)
    indp2 = indp.flip((1,))
    ws = w.gather(1, indp2)
    bs2 = -ws * d.gather(1, indp2)
    s = torch.cumsum(ws.abs(), dim=1)
    sb = torch.cumsum(bs2, dim=1) + b0.unsqueeze(1)
    b2 = sb[:, -1] - s[:, -1] * p.gather(1, indp[:, 0:1]).squeeze(1)
    c_l = b - b2 > 0
    c2 = (b - b0 > 0) & (~c_l)
    lb = torch.zeros(int(c2.sum()), device=t.device)
    ub = torch.full_like(lb, w.shape[1] - 1)
    indp_, sb_, s_, p_, b_ = indp[c2], sb[c2], s[c2], p[c2], b[c2]
    for _ in range(math.ceil(math.log2(w.shape[1]))):
        mid = torch.floor((lb + ub) / 2)
        j = mid.long().unsqueeze(1)
        cur = indp_.gather(1, indp_.size(1) - 1 - j)
        c = b_ - (sb_.gather(1, j) - s_.gather(1, j) * p_.gather(1, cur)).squeeze(1) > 0
        lb = torch.where(c, mid, lb)
        ub = torch.where(c, ub, mid)
    lb = lb.long()
    if c_l.any():
        lmbd = torch.clamp_min((b[c_l] - sb[c_l, -1]) / (-s[c_l, -1]), min=0).unsqueeze(-1)
        d[c_l] = (2 * a[c_l] - 1) * lmbd
    lmbd = torch.clamp_min((b[c2] - sb[c2, lb]) / (-s[c2, lb]), min=0).unsqueeze(-1)
    d[c2] = torch.min(lmbd, d[c2]) * a[c2] + torch.max(-lmbd, d[c2]) * (1 - a[c2])
    return d * (w != 0).float()


def _hyperplane_l2(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """As :func:`_hyperplane_linf`, the smallest L2 step (FAB's ``projection_l2``)."""
    w = w.clone()
    c = (w * t).sum(1) - b
    sign = 2 * (c >= 0) - 1
    w.mul_(sign.unsqueeze(1))
    c = c * sign
    r = torch.max(t / w, (t - 1) / w).clamp(min=-1e12, max=1e12)
    r.masked_fill_(w.abs() < 1e-8, 1e12)
    r[r == -1e12] *= -1
    rs, indr = torch.sort(r, dim=1)
    rs2 = F.pad(rs[:, 1:], (0, 1))
    rs.masked_fill_(rs == 1e12, 0)
    rs2.masked_fill_(rs2 == 1e12, 0)
    w3s = (w ** 2).gather(1, indr)
    w5 = w3s.sum(dim=1, keepdim=True)
    ws = w5 - torch.cumsum(w3s, dim=1)
    d = -(r * w)
    d.mul_((w.abs() > 1e-8).float())
    s = torch.cat((-w5 * rs[:, 0:1], torch.cumsum((-rs2 + rs) * ws, dim=1) - w5 * rs[:, 0:1]), 1)
    c4 = s[:, 0] + c < 0
    c3 = (d * w).sum(dim=1) + c > 0
    c2 = ~(c4 | c3)
    lb = torch.zeros(int(c2.sum()), device=t.device)
    ub = torch.full_like(lb, w.shape[1] - 1)
    s_, c_ = s[c2], c[c2]
    for _ in range(math.ceil(math.log2(w.shape[1]))):
        mid = torch.floor((lb + ub) / 2)
        up = s_.gather(1, mid.long().unsqueeze(1)).squeeze(1) + c_ > 0
        lb = torch.where(up, mid, lb)
        ub = torch.where(up, ub, mid)
    lb = lb.long()
    if c4.any():
        alpha = c[c4] / w5[c4].squeeze(-1)
        d[c4] = -alpha.unsqueeze(-1) * w[c4]
    if c2.any():
        alpha = (s[c2, lb] + c[c2]) / ws[c2, lb] + rs[c2, lb]
        alpha[ws[c2, lb] == 0] = 0
        c5 = (alpha.unsqueeze(-1) > r[c2]).float()
        d[c2] = d[c2] * c5 - alpha.unsqueeze(-1) * w[c2] * (1 - c5)
    return d * (w.abs() > 1e-8).float()


def fab_targeted(logits_fn: LogitsFn, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor, eps: float,
                 norm: str = "linf", steps: int = 100, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """FAB-T (Croce & Hein, ICML 2020): from the clean image, ``steps`` times linearize the
    boundary between the true class and ``target`` at the current point, project both the
    current point and the clean image onto it (in the box), and step to a mix of the two
    projections biased toward the clean image (``alpha_max``), overshooting by ``eta``; each
    misclassified point found is kept if it is the closest so far, and the search falls back
    toward the clean image by ``beta``. Returns ``(adv, fooled)``: the closest misclassified
    point per image, and whether it lies within ``eps``."""
    n = len(x)
    flat = x.reshape(n, -1)
    rows = torch.arange(n, device=x.device)
    hyperplane = _hyperplane_linf if norm == "linf" else _hyperplane_l2
    adv = x.clone()
    best = torch.full((n,), float("inf"), device=x.device)
    x1 = x.clone()
    for _ in range(steps):
        a = x1.detach().requires_grad_(True)
        with torch.enable_grad():
            z = logits_fn(a).float()
            diff = z[rows, target] - z[rows, y]
            g = torch.autograd.grad(diff.sum(), a)[0].detach().reshape(n, -1)
        b = -diff.detach() + (g * x1.reshape(n, -1)).sum(1)
        d3 = hyperplane(torch.cat((x1.reshape(n, -1), flat)), torch.cat((g, g)), torch.cat((b, b)))
        d1, d2 = d3[:n].reshape(x.shape), d3[n:].reshape(x.shape)
        a0 = _norm(d3, norm).clamp(min=1e-8)
        a1, a2 = a0[:n], a0[n:]
        alpha = (a1 / (a1 + a2)).clamp(0, alpha_max).view(_view(x))
        x1 = ((x1 + eta * d1) * (1 - alpha) + (x + d2 * eta) * alpha).clamp(0, 1)
        with torch.no_grad():
            wrong = logits_fn(x1).argmax(1) != y
        if wrong.any():
            dist = _norm(x1 - x, norm)
            closer = wrong & (dist < best)
            adv = torch.where(closer.view(_view(x)), x1, adv)
            best = torch.where(closer, dist, best)
            x1 = torch.where(wrong.view(_view(x)), x + (x1 - x) * beta, x1)
    return adv.detach(), best <= eps


# ---- Square -------------------------------------------------------------------------------------
def _p_schedule(p_init: float, i: int, queries: int) -> float:
    """The Square attack's share of the image one square covers at query ``i``, halving at
    fixed points of a 10,000-query schedule rescaled to ``queries``."""
    i = int(i / queries * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                       (8000, 256)):
        if i <= bound:
            return p_init / div
    return p_init / 512


def _signs(shape, generator) -> torch.Tensor:
    return torch.sign(2 * torch.rand(shape, generator=generator) - 1)


def _eta(s: int, generator) -> torch.Tensor:
    """The L2 Square attack's square: two rectangles of opposite sign, each a sum of nested
    squares of weight 1 / (k + 1)^2, unit L2 norm, randomly transposed."""
    def rectangles(h: int, w: int) -> torch.Tensor:
        delta = torch.zeros(h, w)
        ch, cw = h // 2, w // 2
        for k in range(max(ch + 1, cw + 1)):
            delta[max(ch - k, 0):min(ch - k + 2 * k + 1, h), max(cw - k, 0):min(cw - k + 2 * k + 1, w)] += 1.0 / (k + 1) ** 2
        return delta / delta.pow(2).sum().sqrt()

    delta = torch.cat((rectangles(s // 2, s), -rectangles(s - s // 2, s)))
    delta = delta / delta.pow(2).sum().sqrt()
    return delta.t() if torch.rand(1, generator=generator).item() > 0.5 else delta


def square(logits_fn: LogitsFn, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
           queries: int = 5000, p_init: float = 0.8, generator: torch.Generator | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Square attack (Andriushchenko et al., ECCV 2020): a random search over square
    patches that asks the model for its scores only, at most ``queries`` times per image.

    L-infinity: start from vertical stripes of +-eps, then each query sets one square (the same
    place for the whole batch, its size shrinking on a fixed schedule) to +-2 eps per channel,
    projected back; L2: start from a grid of the ``_eta`` squares, then each query moves the
    perturbation's mass from one square to another. A candidate is kept when it lowers the
    margin (true logit minus the best other). Returns ``(adv, fooled)``.
    """
    with torch.no_grad():
        n, (c, h, w) = len(x), x.shape[1:]
        dev = x.device

        def margin(a: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
            z = logits_fn(a).float()
            return z.gather(1, ys.view(-1, 1))[:, 0] - _without(z, ys)

        def rand_int(high: int) -> int:
            return int(torch.randint(0, max(high, 0) + 1, (1,), generator=generator)) if high > 0 else 0

        if norm == "linf":
            best = (x + eps * _signs((n, c, 1, w), generator).to(dev)).clamp(0, 1)
        else:
            s = max(h // 5, 1)
            start = (h - s * 5) // 2
            delta = torch.zeros_like(x)
            for vh in range(start, start + s * (h // s), s):
                for vw in range(start, start + s * (w // s), s):
                    if vh + s <= h and vw + s <= w:
                        delta[:, :, vh:vh + s, vw:vw + s] += (_eta(s, generator).view(1, 1, s, s)
                                                              * _signs((n, c, 1, 1), generator)).to(dev)
            best = (x + delta / (delta.flatten(1).norm(dim=1).view(_view(x)) + 1e-12) * eps).clamp(0, 1)
        m_best = margin(best, y)
        for i in range(queries):
            left = (m_best > 0).nonzero().flatten()
            if not len(left):
                break
            xc, bc, yc = x[left], best[left], y[left]
            p = _p_schedule(p_init, i, queries)
            if norm == "linf":
                s = min(max(round(math.sqrt(p * h * w)), 1), h, w)
                vh, vw = rand_int(h - s - 1), rand_int(w - s - 1)
                new = bc.clone()
                new[:, :, vh:vh + s, vw:vw + s] += 2.0 * eps * _signs((1, c, 1, 1), generator).to(dev)
                new = project(new, xc, eps, "linf")
            else:
                d = bc - xc
                s = max(round(math.sqrt(p * h * w)), 3)
                s += 1 - s % 2
                s = min(s, h, w)
                vh, vw = rand_int(h - s - 1), rand_int(w - s - 1)
                vh2, vw2 = rand_int(h - s - 1), rand_int(w - s - 1)
                window = d[:, :, vh:vh + s, vw:vw + s]
                norm_window = window.pow(2).sum((-2, -1), keepdim=True).sqrt()
                mask = torch.zeros_like(xc)
                mask[:, :, vh:vh + s, vw:vw + s] = 1.0
                mask[:, :, vh2:vh2 + s, vw2:vw2 + s] = 1.0
                norm_image = d.flatten(1).norm(dim=1).view(_view(xc))
                norm_windows = (d * mask).flatten(1).norm(dim=1).view(_view(xc))
                step = (_eta(s, generator).view(1, 1, s, s) * _signs((len(left), c, 1, 1), generator)).to(dev)
                step = step + window / (1e-12 + norm_window)
                budget = ((eps ** 2 - norm_image ** 2).clamp(min=0) / c + norm_windows ** 2).sqrt()
                step = step / (1e-12 + step.pow(2).sum((-2, -1), keepdim=True).sqrt()) * budget
                d = d.clone()
                d[:, :, vh2:vh2 + s, vw2:vw2 + s] = 0.0
                d[:, :, vh:vh + s, vw:vw + s] = step
                new = (xc + d / (d.flatten(1).norm(dim=1).view(_view(xc)) + 1e-12) * eps).clamp(0, 1)
            m = margin(new, yc)
            better = m < m_best[left]
            best[left] = torch.where(better.view(_view(xc)), new, bc)
            m_best[left] = torch.where(better, m, m_best[left])
    return best, m_best <= 0


# ---- the ensemble ---------------------------------------------------------------------------------
def auto_attack(logits_fn: LogitsFn, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
                steps: int = 100, queries: int = 5000, generator: torch.Generator | None = None,
                ) -> tuple[torch.Tensor, dict[str, int]]:
    """AutoAttack's standard version on ``x`` (images in [0, 1]) with labels ``y``: APGD-CE,
    APGD-T, FAB-T (``steps`` iterations each) and Square (``queries``), each on the images still
    classified correctly. Returns the adversarial images (clean where nothing broke them) and
    how many images each stage broke first."""
    x, y = x.detach(), y.long().to(x.device)
    adv = x.clone()
    with torch.no_grad():
        z = logits_fn(x).float()
    robust = z.argmax(1) == y
    order = z.argsort(1, descending=True)  # targets: the classes the clean image scores highest after the top
    n_targets = min(N_TARGETS, z.shape[1] - 1)
    broke = dict.fromkeys(STAGES, 0)

    def keep(stage: str, idx: torch.Tensor, a: torch.Tensor, fooled: torch.Tensor) -> None:
        a = project(a, x[idx], eps, norm)  # the check AutoAttack makes: inside the ball, and wrong
        with torch.no_grad():
            fooled = fooled & (logits_fn(a).argmax(1) != y[idx]) & (_norm(a - x[idx], norm) <= eps * (1 + 1e-5))
        adv[idx[fooled]] = a[fooled]
        robust[idx[fooled]] = False
        broke[stage] += int(fooled.sum())

    def left() -> torch.Tensor:
        return robust.nonzero().flatten()

    if len(idx := left()):
        keep("apgd-ce", idx, *apgd(logits_fn, x[idx], y[idx], eps, norm, steps, "ce", generator=generator))
    for stage in ("apgd-t", "fab-t"):
        for rank in range(1, n_targets + 1):
            if not len(idx := left()):
                break
            target = order[idx, rank]
            if stage == "apgd-t":
                keep(stage, idx, *apgd(logits_fn, x[idx], y[idx], eps, norm, steps, "dlr-t", target, generator))
            else:
                keep(stage, idx, *fab_targeted(logits_fn, x[idx], y[idx], target, eps, norm, steps))
    if len(idx := left()):
        keep("square", idx, *square(logits_fn, x[idx], y[idx], eps, norm, queries, generator=generator))
    return adv, broke
