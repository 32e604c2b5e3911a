"""Knowledge distillation: ``train --teacher W [W2 ...] --kd logit [--kd-temperature 4] [--kd-alpha 0.5]``.

A :class:`DistilledTask` wraps the student's task for training. On every training batch (the
same augmented images the student gets) the teacher runs in eval mode without gradients, on
its own input: the batch taken back to [0, 1] pixels with the student's normalization, resized
to the teacher's input size; the teacher's core normalizes them its own way (its card's mean,
std and illumination). The loss becomes

    (1 - alpha) * task loss + alpha * T^2 * KD(student / T, teacher / T)

(Hinton et al., 2015; the T^2 keeps the soft term's gradients at the hard term's scale). KD
compares class scores the way the task reads them: the KL divergence from the teachers'
softmax at temperature T (averaged over teachers: an ensemble teacher) for single-label
classifiers, per pixel for segmenters and per voxel for medical segmenters; binary
cross-entropy against the teachers' sigmoid at T, label by label, for multi-label
classifiers. A fastdet student learns from a fastdet teacher at every anchor point: its class
scores (sigmoid, as for multi-label) and its box-side distributions (the KL divergence of each
side's distribution at T, weighted by the teacher's class confidence at that point, so
background points do not swamp it: localization distillation, Zheng et al., 2022); the two
share the input size, so their anchor points line up. Validation runs the student alone.

With ``--kd-alpha 1`` and a high temperature this is defensive distillation (Papernot et al.,
2016): the student learns only the teacher's soft labels at T and is used at T = 1, which
flattens its loss surface around the data, so gradient attacks such as FGSM and PGD weaken
while the Carlini-Wagner attack, which works on logit margins, does not (see BENCHMARKS.md).
Here the teacher is a normally trained model; Papernot et al. also train the teacher at T.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from cnnkit.errors import CnnkitError

KD_KINDS = ("logit",)
SOFTMAX_TASKS = ("classify", "segment", "medical")
SIGMOID_TASKS = ("multilabel",)


def kd_softmax(student: torch.Tensor, teachers: list[torch.Tensor], t: float) -> torch.Tensor:
    """``T^2 * KL(mean_i softmax(teacher_i / T) || softmax(student / T))`` over dim 1 (classes),
    averaged over every other position (samples, pixels)."""
    p = torch.stack([F.softmax(x.float() / t, 1) for x in teachers]).mean(0)
    log_q = F.log_softmax(student.float() / t, 1)
    kl = (p * (p.clamp_min(1e-12).log() - log_q)).sum(1)
    return kl.mean() * t * t


def kd_sigmoid(student: torch.Tensor, teachers: list[torch.Tensor], t: float) -> torch.Tensor:
    """``T^2 * BCE(sigmoid(student / T), mean_i sigmoid(teacher_i / T))``, averaged over labels."""
    p = torch.stack([torch.sigmoid(x.float() / t) for x in teachers]).mean(0)
    return F.binary_cross_entropy_with_logits(student.float() / t, p) * t * t


def kd_fastdet(cls: torch.Tensor, box: torch.Tensor, teachers: list[tuple[torch.Tensor, torch.Tensor]],
               t: float) -> torch.Tensor:
    """fastdet's KD: :func:`kd_sigmoid` on the class logits ``(B, A, C)`` plus ``T^2 *`` the KL
    divergence of each box side's distribution ``(B, A, 4, reg_max)`` from the teachers' (mean
    softmax at T), averaged over sides and weighted per anchor point by the teachers' highest
    class probability."""
    cls_kd = kd_sigmoid(cls, [c for c, _ in teachers], t)
    p = torch.stack([F.softmax(b.float() / t, -1) for _, b in teachers]).mean(0)
    log_q = F.log_softmax(box.float() / t, -1)
    kl = (p * (p.clamp_min(1e-12).log() - log_q)).sum(-1).mean(-1)  # (B, A)
    w = torch.stack([torch.sigmoid(c.float()).amax(-1) for c, _ in teachers]).mean(0)
    return cls_kd + (kl * w).sum() / w.sum().clamp_min(1e-6) * t * t


class Teacher:
    """One or more trained models of the student's task and classes, run on the student's
    batches (see the module docstring)."""

    def __init__(self, weights: list[str], card, device: torch.device):
        from cnnkit.runtime.pipeline import load

        self.members = []
        for w in weights:
            p = load(w, str(device), task=card.task)
            if p.model is None:
                raise CnnkitError(f"--teacher takes cnnkit weights (.safetensors or a run folder), not the exported "
                                  f"'{w}'")
            if list(p.classes) != list(card.classes):
                raise CnnkitError(f"the teacher '{w}' was trained on classes {p.classes[:8]}, the student on "
                                  f"{list(card.classes)[:8]}; distillation needs the same classes in the same order")
            if p.card.input.channels != card.input.channels:
                raise CnnkitError(f"the teacher '{w}' takes {p.card.input.channels}-channel images, the student "
                                  f"{card.input.channels}")
            self.members.append(p)
        self.card = card
        self.fastdet = card.task == "detect"
        if self.fastdet:
            for p in self.members:
                if p.card.arch != "fastdet" or p.card.input.height != card.input.height:
                    raise CnnkitError(f"a fastdet student learns from a fastdet teacher of the same input size (its "
                                      f"anchor points must line up); '{p.source}' is {p.card.arch} at "
                                      f"{p.card.input.height} px, the student fastdet at {card.input.height} px")
        i = card.input
        self.normalized = card.task in ("classify", "multilabel") and i.mean is not None
        self.mean = torch.tensor(i.mean, device=device).view(1, -1, 1, 1) if self.normalized else None
        self.std = torch.tensor(i.std, device=device).view(1, -1, 1, 1) if self.normalized else None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each member's class scores for a student batch (normalized as the student's data)."""
        c = self.card.input.channels
        x = images[:, :c].float()
        if self.normalized:
            x = x * self.std + self.mean
        out = []
        for p in self.members:
            if self.card.task == "medical":  # z-scored volumes (or cubes of them): fully convolutional
                out.append(p.backend.core(x).float())
                continue
            size = (p.card.input.height, p.card.input.width)
            xi = x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode="bilinear",
                                                                      align_corners=False, antialias=True)
            if self.fastdet:  # class and box-side logits at every anchor point
                out.append(tuple(r.float() for r in p.model.raw(xi.clamp(0, 1))[:2]))
                continue
            raw = p.backend.core(xi.clamp(0, 1))
            out.append((raw if torch.is_tensor(raw) else raw[0]).float())
        return out


class DistilledTask:
    """The student's task with the teacher's soft targets added to its training loss; every
    other attribute is the wrapped task's."""

    def __init__(self, task, teacher: Teacher, temperature: float, alpha: float):
        name = teacher.card.task
        if name not in SOFTMAX_TASKS + SIGMOID_TASKS and not teacher.fastdet:
            raise CnnkitError(f"--teacher is not there yet for {name} models (distillation covers classify, "
                              "multilabel, fastdet, segment and medical)")
        self.task, self.teacher, self.t, self.alpha = task, teacher, float(temperature), float(alpha)
        self.kd = kd_sigmoid if name in SIGMOID_TASKS else kd_softmax
        self._training = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)

    def forward(self, model, batch: dict):
        self._training = model.training
        return self.task.forward(model, batch)

    def loss(self, output, batch: dict) -> dict[str, torch.Tensor]:
        parts = self.task.loss(output, batch)
        if not self._training:
            return parts
        teachers = self.teacher(batch["images"])
        if self.teacher.fastdet:
            if teachers[0][1].shape != output[1].shape:
                raise CnnkitError(f"the fastdet teacher's box distributions {tuple(teachers[0][1].shape[2:])} differ "
                                  f"from the student's {tuple(output[1].shape[2:])} (another --reg-max?)")
            kd = kd_fastdet(output[0], output[1], teachers, self.t)
            total = (1 - self.alpha) * parts["loss"] + self.alpha * kd
            return {**parts, "loss": total, "kd": kd.detach()}
        scores = output if torch.is_tensor(output) else output[0]
        if teachers[0].shape[-2:] != scores.shape[-2:] and scores.ndim == 4:  # a segmenter's other resolution
            teachers = [F.interpolate(t, size=scores.shape[-2:], mode="bilinear", align_corners=False)
                        for t in teachers]
        kd = self.kd(scores, teachers, self.t)
        total = (1 - self.alpha) * parts["loss"] + self.alpha * kd
        return {**parts, "loss": total, "kd": kd.detach()}


def distil(task, card, cfg, device: torch.device) -> DistilledTask:
    """The student's ``task`` wrapped for ``cfg.teacher`` (validated here)."""
    if cfg.kd not in KD_KINDS:
        raise CnnkitError(f"--kd {cfg.kd} is not there yet; --kd logit distils the class scores")
    if card.task == "detect" and card.arch != "fastdet":
        raise CnnkitError(f"--teacher is not there yet for {card.arch} (torchvision's detectors compute their losses "
                          "inside); distil into fastdet")
    weights = [w for w in str(cfg.teacher).replace(",", " ").split() if w]
    return DistilledTask(task, Teacher(weights, card, device), cfg.kd_temperature, cfg.kd_alpha)
