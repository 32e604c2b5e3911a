"""Classification losses on one target-distribution form.

Every loss here works on a target distribution ``t`` of shape ``(B, K)``: hard labels become
(label-smoothed) one-hot rows and mixup/cutmix targets are used as they are, so each loss
also works with mixed samples. Written here rather than imported because no well-kept
library ships softmax focal loss, symmetric CE or generalized CE with soft targets, class
weights and OHEM together (torchvision's ``sigmoid_focal_loss`` is the one-vs-all detection
form); each is a few lines and is tested against its formula.

- ``ce``: cross-entropy ``-sum_k t_k log p_k``.
- ``focal``: ``-sum_k t_k (1 - p_k)^gamma log p_k`` (Lin et al., 2017; softmax form).
- ``sce``: symmetric CE ``alpha * CE + beta * RCE`` with
  ``RCE = -sum_k p_k log clamp(t_k, 1e-4)`` (Wang et al., 2019; robust to label noise).
- ``gce``: generalized CE ``sum_k t_k (1 - p_k^q) / q`` (Zhang & Sabuncu, 2018; q -> 0 is
  CE, q = 1 is MAE; robust to label noise).

``weight`` (per class) scales each sample by ``sum_k t_k w_k``; ``ohem`` keeps only the
hardest fraction of the batch (online hard example mining, Shrivastava et al., 2016).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSSES = ("ce", "focal", "sce", "gce")


def target_distribution(targets: torch.Tensor, num_classes: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """``(B,)`` class ids or ``(B, K)`` soft targets -> ``(B, K)`` float distribution."""
    if targets.ndim == 2:
        t = targets.float()
    else:
        t = F.one_hot(targets.long(), num_classes).float()
    if label_smoothing > 0:
        t = t * (1 - label_smoothing) + label_smoothing / num_classes
    return t


def per_sample_loss(logits: torch.Tensor, t: torch.Tensor, kind: str = "ce", gamma: float = 2.0,
                    q: float = 0.7, alpha: float = 0.1, beta: float = 1.0) -> torch.Tensor:
    """The loss of every sample, shape ``(B,)``, for logits and target distribution ``(B, K)``."""
    logp = F.log_softmax(logits.float(), dim=1)
    if kind == "ce":
        return -(t * logp).sum(1)
    p = logp.exp()
    if kind == "focal":
        return -(t * (1 - p).pow(gamma) * logp).sum(1)
    if kind == "sce":
        rce = -(p * t.clamp(min=1e-4).log()).sum(1)
        return alpha * -(t * logp).sum(1) + beta * rce
    if kind == "gce":
        return (t * (1 - p.clamp(min=1e-7).pow(q)) / q).sum(1)
    raise ValueError(f"unknown loss '{kind}'; choose from {', '.join(LOSSES)}")


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str = "ce",
                        label_smoothing: float = 0.0, weight: torch.Tensor | None = None,
                        ohem: float = 0.0, gamma: float = 2.0, q: float = 0.7) -> torch.Tensor:
    """Mean loss over the batch (or over its hardest ``ohem`` fraction when ``ohem > 0``).

    Args:
        logits: ``(B, K)`` raw scores.
        targets: ``(B,)`` class ids or ``(B, K)`` soft targets (mixup/cutmix).
        kind: one of :data:`LOSSES`.
        label_smoothing: applied to hard and soft targets alike.
        weight: ``(K,)`` class weights (mean 1 keeps the loss scale).
        ohem: keep the ``ceil(ohem * B)`` largest losses; 0 keeps all.
        gamma: focal exponent. q: GCE exponent.
    """
    k = logits.shape[1]
    t = target_distribution(targets, k, label_smoothing)
    loss = per_sample_loss(logits, t, kind, gamma=gamma, q=q)
    if weight is not None:
        loss = loss * (t @ weight.to(t.device))
    if 0 < ohem < 1 and loss.numel() > 1:
        loss = loss.topk(max(1, math.ceil(ohem * loss.numel()))).values
    return loss.mean()
