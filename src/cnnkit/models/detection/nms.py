"""Non-maximum suppression for every detector: hard (torchvision's ``batched_nms``) or soft.

Soft-NMS (Bodla et al., ICCV 2017) does not delete a box that overlaps a better one of the same
class; it lowers its score by ``exp(-IoU^2 / sigma)`` (Gaussian) or ``1 - IoU`` above the IoU
threshold (linear), so two heavily overlapping objects (one occluding the other) can both
survive. Why hand-written: torchvision ships only hard NMS (its soft-NMS request,
pytorch/vision#2453, stays open), and the greedy loop is twenty lines here rather than
another dependency (mmcv's compiled op).

Examples:
    >>> boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]])
    >>> keep, scores = soft_nms(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 0]))
    >>> keep.tolist()  # the overlapping box is kept, with a lower score
    [0, 2, 1]
"""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms, box_iou

from cnnkit.core.choices import NMS_METHODS


def soft_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float = 0.5,
             sigma: float = 0.5, min_score: float = 0.001, method: str = "gaussian",
             max_det: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-wise soft-NMS.

    Args:
        boxes: ``(N, 4)`` xyxy.
        scores: ``(N,)``.
        labels: ``(N,)`` class ids; boxes of different classes never suppress each other.
        iou: linear method: overlaps above it are decayed by ``1 - IoU``; gaussian: unused.
        sigma: gaussian decay ``exp(-IoU^2 / sigma)``.
        min_score: boxes whose decayed score falls below it are dropped.
        method: ``"gaussian"`` or ``"linear"``.
        max_det: stop after this many boxes are kept.

    Returns:
        ``(keep (K,) indices into the inputs, in decreasing order of new score; new_scores (K,))``.
    """
    if method not in ("gaussian", "linear"):
        raise ValueError(f"soft-NMS method must be gaussian or linear, got {method!r}")
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device), scores.new_zeros(0)
    # offsetting each class by more than the image extent keeps classes apart (as batched_nms)
    offset = labels.to(boxes.dtype)[:, None] * (boxes.max() + 1)
    ious = box_iou(boxes + offset, boxes + offset)  # (N, N); N is at most a few thousand here
    s = scores.clone().float()
    alive = torch.ones(n, dtype=torch.bool, device=boxes.device)
    keep, kept_scores = [], []
    limit = n if max_det is None else min(n, max_det)
    while len(keep) < limit:
        masked = torch.where(alive, s, torch.full_like(s, -1.0))
        i = int(masked.argmax())
        if masked[i] < min_score:
            break
        keep.append(i)
        kept_scores.append(s[i].clone())
        alive[i] = False
        o = ious[i]
        decay = torch.exp(-(o * o) / sigma) if method == "gaussian" else torch.where(o > iou, 1 - o, torch.ones_like(o))
        s = torch.where(alive, s * decay, s)
    if not keep:
        return torch.zeros(0, dtype=torch.long, device=boxes.device), scores.new_zeros(0)
    return torch.tensor(keep, device=boxes.device), torch.stack(kept_scores).to(scores.dtype)


def suppress(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float, max_det: int,
             method: str = "hard", min_score: float = 0.001) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, scores)`` after class-wise NMS: ``method`` ``"hard"`` (torchvision's
    ``batched_nms``, scores unchanged) or ``"soft"`` (Gaussian :func:`soft_nms`)."""
    if method == "hard":
        keep = batched_nms(boxes, scores, labels, iou)[:max_det]
        return keep, scores[keep]
    if method == "soft":
        return soft_nms(boxes, scores, labels, iou, min_score=min_score, max_det=max_det)
    raise ValueError(f"NMS method must be one of {', '.join(NMS_METHODS)}, got {method!r}")
