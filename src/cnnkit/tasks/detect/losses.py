"""fastdet's training loss, computed in the task (the model returns its raw outputs):
task-aligned assignment (TOOD), BCE on class scores, complete-IoU and distribution focal loss
on boxes. See :mod:`cnnkit.models.detection.fastdet` for the design."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, complete_box_iou_loss

from cnnkit.models.detection.fastdet import decode_boxes


class FastDetLoss:
    """``loss(raw, targets) -> {"loss", "box", "cls", "dfl"}`` for fastdet's raw outputs
    ``(cls (B, A, C), box (B, A, 4, R), points (A, 2), strides (A,))``.

    Args:
        reg_max: bins of the box-side distributions.
        topk: anchor points assigned per object.
        gains: weights of the box (CIoU), class (BCE) and DFL terms.
    """

    def __init__(self, reg_max: int = 16, topk: int = 10, gains: tuple[float, float, float] = (7.5, 0.5, 1.5)):
        self.reg_max, self.topk, self.gains = reg_max, topk, gains

    @classmethod
    def for_model(cls, model) -> FastDetLoss:
        return cls(model.reg_max, model.topk, model.gains)

    def __call__(self, raw, targets: list[dict]) -> dict[str, torch.Tensor]:
        cls, box, pts, strides = raw
        B, A, C = cls.shape
        M = max(1, max(len(t["boxes"]) for t in targets))
        gt_boxes = cls.new_zeros(B, M, 4, dtype=torch.float32)
        gt_labels = torch.zeros(B, M, dtype=torch.long, device=cls.device)
        gt_mask = torch.zeros(B, M, dtype=torch.bool, device=cls.device)
        for i, t in enumerate(targets):
            n = len(t["boxes"])
            gt_boxes[i, :n], gt_labels[i, :n], gt_mask[i, :n] = t["boxes"], t["labels"], True
        proj = torch.arange(self.reg_max, dtype=torch.float32, device=box.device)
        pred_boxes = decode_boxes(box, pts, strides, proj)
        with torch.no_grad():
            tgt_boxes, tgt_scores, fg = task_aligned_assign(
                cls.detach().float().sigmoid(), pred_boxes.detach(), pts, gt_boxes, gt_labels, gt_mask, self.topk)
        norm = tgt_scores.sum().clamp(min=1.0)
        loss_cls = F.binary_cross_entropy_with_logits(cls.float(), tgt_scores, reduction="sum") / norm
        if fg.any():
            weight = tgt_scores.sum(-1)[fg]
            loss_box = (complete_box_iou_loss(pred_boxes[fg], tgt_boxes[fg], reduction="none") * weight).sum() / norm
            s = strides[None].expand(B, A)[fg][:, None]
            p = pts[None].expand(B, A, 2)[fg]
            t = tgt_boxes[fg]
            ltrb = torch.cat([p - t[:, :2], t[:, 2:] - p], 1) / s
            loss_dfl = (dfl(box[fg].float(), ltrb.clamp(0, self.reg_max - 1.01)) * weight).sum() / norm
        else:
            loss_box = loss_dfl = pred_boxes.sum() * 0.0
        gb, gc, gd = self.gains
        total = gb * loss_box + gc * loss_cls + gd * loss_dfl
        return {"loss": total, "box": loss_box.detach(), "cls": loss_cls.detach(), "dfl": loss_dfl.detach()}


def dfl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Distribution focal loss: cross-entropy to the two bins around each continuous target,
    weighted by closeness. ``logits`` (N, 4, R), ``target`` (N, 4) in bins -> (N,)."""
    left = target.long()
    wl = left + 1 - target
    lp = F.log_softmax(logits, -1)
    ce_l = -lp.gather(-1, left[..., None]).squeeze(-1)
    ce_r = -lp.gather(-1, (left + 1)[..., None]).squeeze(-1)
    return (ce_l * wl + ce_r * (1 - wl)).mean(-1)


def task_aligned_assign(scores: torch.Tensor, pred_boxes: torch.Tensor, points: torch.Tensor,
                        gt_boxes: torch.Tensor, gt_labels: torch.Tensor, gt_mask: torch.Tensor,
                        topk: int = 10, alpha: float = 0.5, beta: float = 6.0, eps: float = 1e-9):
    """Task-aligned assignment (TOOD). Shapes: scores (B, A, C), pred_boxes (B, A, 4), points
    (A, 2), gt_boxes (B, M, 4), gt_labels (B, M), gt_mask (B, M) bool.

    Returns ``(target_boxes (B, A, 4), target_scores (B, A, C), fg (B, A) bool)``.
    """
    B, A, C = scores.shape
    M = gt_boxes.shape[1]
    lt = points[None, None] - gt_boxes[..., None, :2]
    rb = gt_boxes[..., None, 2:] - points[None, None]
    inside = (torch.cat([lt, rb], -1).amin(-1) > eps) & gt_mask[..., None]  # (B, M, A)
    iou = torch.stack([box_iou(g, p) for g, p in zip(gt_boxes, pred_boxes)]).clamp(min=0)  # (B, M, A)
    iou = iou * inside
    cls_score = scores.gather(2, gt_labels[:, None, :].expand(B, A, M)).transpose(1, 2)  # (B, M, A)
    align = cls_score.pow(alpha) * iou.pow(beta) * inside
    k = min(topk, A)
    top = align.topk(k, dim=-1).indices
    pos = torch.zeros_like(inside).scatter_(-1, top, True) & inside & (align > 0)
    # small objects may have no point with a positive alignment yet: take their nearest
    # inside points by IoU-free topk on the inside mask so every object gets gradients
    empty = (pos.sum(-1) == 0) & gt_mask
    if empty.any():
        centre = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2
        d = (points[None, None] - centre[..., None, :]).pow(2).sum(-1)
        d = d.masked_fill(~inside, float("inf"))
        near = d.topk(min(3, A), dim=-1, largest=False).indices
        extra = torch.zeros_like(inside).scatter_(-1, near, True) & inside
        pos = torch.where(empty[..., None], extra, pos)
    # a point claimed by several objects goes to the one it overlaps most
    multi = pos.sum(1, keepdim=True) > 1
    if multi.any():
        best = iou.argmax(1, keepdim=True)
        only = torch.zeros_like(pos).scatter_(1, best, True)
        pos = torch.where(multi, only & pos.any(1, keepdim=True), pos)
    fg = pos.any(1)  # (B, A)
    idx = pos.float().argmax(1)  # (B, A) object index of each point
    tgt_boxes = gt_boxes.gather(1, idx[..., None].expand(B, A, 4))
    tgt_labels = gt_labels.gather(1, idx)
    align = align * pos
    norm = (align * iou.amax(-1, keepdim=True) / (align.amax(-1, keepdim=True) + eps)).amax(1)  # (B, A)
    # points assigned by the fallback have zero alignment: give them their IoU as the target
    norm = torch.where(fg & (norm <= 0), (iou * pos).amax(1).clamp(min=0.05), norm)
    tgt_scores = F.one_hot(tgt_labels, C).float() * (norm * fg)[..., None]
    return tgt_boxes, tgt_scores, fg
