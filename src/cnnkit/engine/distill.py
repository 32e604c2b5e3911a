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
classifiers; for segmenters and medical segmenters by default channel-wise (``--kd-dense
channel``, Shu et al., 2021: each class map's softmax over its pixels or voxels, so a small
object's class weighs as much as the background; on ``shapes`` it lifted a U-Net student far
above itself alone where per-pixel KD cost it), or per pixel / voxel (``--kd-dense pixel``); binary
cross-entropy against the teachers' sigmoid at T, label by label, for multi-label
classifiers. A fastdet student learns from a fastdet teacher at every anchor point: its class
scores (sigmoid, as for multi-label) and its box-side distributions (the KL divergence of each
side's distribution at T, weighted by the teacher's class confidence at that point, so
background points do not swamp it: localization distillation, Zheng et al., 2022); the two
share the input size, so their anchor points line up. A Faster R-CNN or Mask R-CNN student
learns from an R-CNN teacher on its own sampled proposals (Chen et al., 2017): the teacher's box
head classifies the same regions (scaled to the teacher's input size) from its own features,
and the student's region class scores (background included) meet the teacher's softmax at T;
the RPN and the box deltas keep their own losses. Other torchvision detectors (RetinaNet, SSD)
learn through ``--kd feature`` only. Validation runs the student alone.

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

KD_KINDS = ("logit", "feature", "both")
KD_DENSE = ("channel", "pixel")  # a segmenter's logit KD: softmax over each class map (the default), or per pixel
ADAPTERS = "kd_adapters"  # the student's attribute holding the feature adapters (left out of its state_dict)
SOFTMAX_TASKS = ("classify", "segment", "medical")
SIGMOID_TASKS = ("multilabel",)
DENSE_TASKS = ("segment", "medical")
RCNN_ARCHS = ("fasterrcnn", "maskrcnn")  # torchvision detectors with a region box head


def kd_softmax(student: torch.Tensor, teachers: list[torch.Tensor], t: float) -> torch.Tensor:
    """``T^2 * KL(mean_i softmax(teacher_i / T) || softmax(student / T))`` over dim 1 (classes),
    averaged over every other position (samples, pixels)."""
    p = torch.stack([F.softmax(x.float() / t, 1) for x in teachers]).mean(0)
    log_q = F.log_softmax(student.float() / t, 1)
    kl = (p * (p.clamp_min(1e-12).log() - log_q)).sum(1)
    return kl.mean() * t * t


def kd_channel(student: torch.Tensor, teachers: list[torch.Tensor], t: float) -> torch.Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021) of dense class scores ``(B, C, *space)``:
    ``T^2 * KL(mean_i softmax(teacher_i / T) || softmax(student / T))`` where each softmax runs over
    the positions of one class map, averaged over samples and classes.

    Per-pixel KD (:func:`kd_softmax` over dim 1) weighs every pixel alike, so the background
    that covers most of an image drives it; here each class map is one distribution over the
    image, so a class on a few pixels counts as much as the background, and the student learns
    where the teacher puts each class rather than how sure it is at each pixel."""
    log_q = F.log_softmax(student.float().flatten(2) / t, -1)
    p = torch.stack([F.softmax(x.float().flatten(2) / t, -1) for x in teachers]).mean(0)
    kl = (p * (p.clamp_min(1e-12).log() - log_q)).sum(-1)  # (B, C)
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
        self.torchvision = card.task in ("detect", "instance") and card.arch != "fastdet"
        self.fastdet = card.task == "detect" and not self.torchvision
        if self.torchvision:
            for p in self.members:
                if p.card.arch == "fastdet":
                    raise CnnkitError(f"a {card.arch} student learns from a torchvision detector, not from the "
                                      f"fastdet '{p.source}' (their outputs do not correspond)")
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
    def __call__(self, images: torch.Tensor, regions: RegionCatch | None = None) -> list[torch.Tensor]:
        """Each member's class scores for a student batch (normalized as the student's data);
        torchvision detectors: the region class logits for the student's proposals in
        ``regions`` (without: the backbones run, for feature distillation, and nothing is
        returned)."""
        c = self.card.input.channels
        x = images[:, :c].float()
        if self.torchvision:
            out = []
            for p in self.members:
                net = p.model.net
                with torch.autocast(x.device.type, enabled=False):
                    shown, _ = net.transform(list(x.clamp(0, 1)))
                    features = net.backbone(shown.tensors)  # (the feature stages' hooks fire here)
                    if regions is not None:
                        out.append(regions.classify(net, features, shown.image_sizes))
            return out
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


class RegionCatch:
    """The regions an R-CNN student classified on its last forward: its sampled proposals (the
    box RoI pool's input), the image sizes they refer to, and its region class logits (the box
    predictor's output), caught by forward hooks on the student's ``roi_heads``."""

    def __init__(self, student: torch.nn.Module):
        heads = student.net.roi_heads
        self.caught: dict[str, Any] = {}
        caught = self.caught  # (closures: a deep copy of the student, its EMA, shares them harmlessly)

        def pooled(module, args, output):
            caught["proposals"], caught["sizes"] = [b.detach() for b in args[1]], list(args[2])

        def predicted(module, args, output):
            caught["logits"] = output[0]

        heads.box_roi_pool.register_forward_hook(pooled)
        heads.box_predictor.register_forward_hook(predicted)

    @property
    def logits(self) -> torch.Tensor:
        return self.caught["logits"]

    def classify(self, net: torch.nn.Module, features, sizes: list[tuple[int, int]]) -> torch.Tensor:
        """A teacher R-CNN's (``net``) region class logits for the caught proposals, scaled from
        the student's image sizes to the teacher's (``sizes``)."""
        boxes = []
        for b, (th, tw), (sh, sw) in zip(self.caught["proposals"], sizes, self.caught["sizes"]):
            scale = b.new_tensor([tw / sw, th / sh, tw / sw, th / sh])
            boxes.append(b.float() * scale)
        heads = net.roi_heads
        return heads.box_predictor(heads.box_head(heads.box_roi_pool(features, boxes, sizes)))[0].float()


def kd_feature(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The FitNets hint loss, made scale-free: the mean squared difference of the (adapted)
    student feature map and the teacher's, resized to the teacher's grid, over the teacher's
    mean square."""
    if student.shape[2:] != teacher.shape[2:]:
        mode = "bilinear" if teacher.dim() == 4 else "trilinear"
        student = F.interpolate(student, size=teacher.shape[2:], mode=mode, align_corners=False)
    t = teacher.float()
    return F.mse_loss(student.float(), t) / t.pow(2).mean().clamp_min(1e-8)


class FeatureKD:
    """Feature distillation: student stages (the pipeline's ``feature_layers``, ``--kd-layers``,
    default the deepest) mapped by 1x1 convolutions (adapters, trained with the student) to the
    teacher's stage of the same name, else at the same relative depth. Forward hooks catch both
    sides' outputs on every training batch."""

    def __init__(self, student: torch.nn.Module, card, teacher: Teacher, names: list[str] | None):
        from cnnkit.runtime.pipeline import pipeline_for

        if len(teacher.members) != 1:
            raise CnnkitError("--kd feature takes one teacher (an ensemble's features do not line up)")
        pipe = pipeline_for(card)
        mine = pipe.feature_layers(student)
        t = teacher.members[0]
        theirs = t.pipeline.feature_layers(t.model)
        if not mine or not theirs:
            raise CnnkitError(f"--kd feature needs named feature stages, which {card.arch} or the teacher lacks")
        names = names or [list(mine)[-1]]
        unknown = [n for n in names if n not in mine]
        if unknown:
            raise CnnkitError(f"--kd-layers: '{unknown[0]}' is not a feature stage of {card.arch} "
                              f"(stages: {', '.join(mine)})")
        order, t_order = list(mine), list(theirs)
        self.pairs = {}
        for n in names:
            j = n if n in theirs else t_order[round(order.index(n) * (len(t_order) - 1) / max(1, len(order) - 1))]
            self.pairs[n] = j
        self.s_out: dict[str, torch.Tensor] = {}
        self.t_out: dict[str, torch.Tensor] = {}
        self.handles = [mine[n].register_forward_hook(self._catch(self.s_out, n)) for n in self.pairs]
        self.handles += [theirs[j].register_forward_hook(self._catch(self.t_out, j)) for j in set(self.pairs.values())]
        # channel counts from one dry run of each side
        x = pipe.example_input(1).to(next(student.parameters()).device)
        was = student.training
        student.eval()
        with torch.no_grad():
            student(x)
            teacher(x)
        student.train(was)
        dims = 3 if card.input.dims == 3 else 2
        conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
        self.adapters = torch.nn.ModuleDict({  # (module names cannot hold dots)
            n.replace(".", "_"): conv(self._channels(self.s_out[n]), self._channels(self.t_out[j]), 1)
            for n, j in self.pairs.items()})

    @staticmethod
    def _channels(out) -> int:
        out = out if torch.is_tensor(out) else next(o for o in out if torch.is_tensor(o))
        return int(out.shape[1])

    @staticmethod
    def _catch(store: dict, name: str):
        def hook(module, inputs, output):
            store[name] = output if torch.is_tensor(output) else next(o for o in output if torch.is_tensor(o))
        return hook

    def attach(self, model: torch.nn.Module) -> torch.nn.Module:
        """The adapters become part of ``model`` (so the optimizer trains them) but stay out of
        the weights it saves."""
        setattr(model, ADAPTERS, self.adapters)

        def drop(module, state, prefix, local_metadata):
            for k in [k for k in state if k.startswith(prefix + ADAPTERS + ".")]:
                del state[k]
            return state

        def missing_is_fine(module, incompatible):  # loading saved weights (or a good-state snapshot) back
            incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if ADAPTERS + "." not in k]

        model._register_state_dict_hook(drop)
        model.register_load_state_dict_post_hook(missing_is_fine)
        return model

    def loss(self) -> torch.Tensor:
        terms = [kd_feature(self.adapters[n.replace(".", "_")](self.s_out[n]), self.t_out[j].detach())
                 for n, j in self.pairs.items()]
        return torch.stack(terms).mean()


class DistilledTask:
    """The student's task with the teacher's soft targets added to its training loss; every
    other attribute is the wrapped task's."""

    def __init__(self, task, teacher: Teacher, temperature: float, alpha: float, kind: str = "logit",
                 features: FeatureKD | None = None, regions: RegionCatch | None = None, dense: str | None = None):
        name = teacher.card.task
        if name not in SOFTMAX_TASKS + SIGMOID_TASKS and not teacher.fastdet and not teacher.torchvision:
            raise CnnkitError(f"--teacher is not there yet for {name} models (distillation covers classify, "
                              "multilabel, detect, instance, segment and medical)")
        self.regions = regions
        self.task, self.teacher, self.t, self.alpha = task, teacher, float(temperature), float(alpha)
        self.dense = dense  # segment/medical: "channel" or "pixel" (see dense_kd)
        self.kd = kd_sigmoid if name in SIGMOID_TASKS else kd_channel if dense == "channel" else kd_softmax
        self.kind, self.features = kind, features
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
        teachers = self.teacher(batch["images"], self.regions if self.kind != "feature" else None)
        if self.kind == "feature":
            kd = self.features.loss()
            return {**parts, "loss": (1 - self.alpha) * parts["loss"] + self.alpha * kd, "kd": kd.detach()}
        if self.teacher.fastdet:
            if teachers[0][1].shape != output[1].shape:
                raise CnnkitError(f"the fastdet teacher's box distributions {tuple(teachers[0][1].shape[2:])} differ "
                                  f"from the student's {tuple(output[1].shape[2:])} (another --reg-max?)")
            kd = kd_fastdet(output[0], output[1], teachers, self.t)
            if self.kind == "both":
                kd = kd + self.features.loss()
            total = (1 - self.alpha) * parts["loss"] + self.alpha * kd
            return {**parts, "loss": total, "kd": kd.detach()}
        scores = self.regions.logits if self.regions is not None else output if torch.is_tensor(output) else output[0]
        if teachers[0].shape[-2:] != scores.shape[-2:] and scores.ndim == 4:  # a segmenter's other resolution
            teachers = [F.interpolate(t, size=scores.shape[-2:], mode="bilinear", align_corners=False)
                        for t in teachers]
        kd = self.kd(scores, teachers, self.t)
        if self.kind == "both":
            kd = kd + self.features.loss()
        total = (1 - self.alpha) * parts["loss"] + self.alpha * kd
        return {**parts, "loss": total, "kd": kd.detach()}


def distil(task, card, cfg, device: torch.device, model: torch.nn.Module | None = None) -> DistilledTask:
    """The student's ``task`` wrapped for ``cfg.teacher`` (validated here); with ``--kd feature``
    or ``both`` the adapters are attached to the student ``model``."""
    if cfg.kd not in KD_KINDS:
        raise CnnkitError(f"--kd must be one of {', '.join(KD_KINDS)}, got '{cfg.kd}'")
    if cfg.kd_dense is not None and cfg.kd_dense not in KD_DENSE:
        raise CnnkitError(f"--kd-dense must be one of {', '.join(KD_DENSE)}, got '{cfg.kd_dense}'")
    if cfg.kd_dense is not None and card.task not in DENSE_TASKS:
        raise CnnkitError(f"--kd-dense chooses how the class maps of segmenters ({', '.join(DENSE_TASKS)}) are "
                          f"distilled; a {card.task} student has none")
    if cfg.kd_dense is not None and cfg.kd == "feature":
        raise CnnkitError(f"--kd-dense {cfg.kd_dense} shapes the logit term; give it with --kd logit or --kd both, "
                          "not --kd feature")
    torchvision = card.task in ("detect", "instance") and card.arch != "fastdet"
    if torchvision and cfg.kd != "feature" and card.arch not in RCNN_ARCHS:
        raise CnnkitError(f"--kd {cfg.kd} for torchvision detectors distils the R-CNN region classifier "
                          f"({', '.join(RCNN_ARCHS)}); a {card.arch} student learns with --kd feature")
    weights = [w for w in str(cfg.teacher).replace(",", " ").split() if w]
    teacher = Teacher(weights, card, device)
    regions = None
    if torchvision and cfg.kd != "feature":
        other = next((p for p in teacher.members if p.card.arch not in RCNN_ARCHS), None)
        if other is not None:
            raise CnnkitError(f"--kd {cfg.kd}: the teacher '{other.source}' is a {other.card.arch}; an R-CNN student "
                              f"learns region class scores from an R-CNN teacher ({', '.join(RCNN_ARCHS)})")
        regions = RegionCatch(model)
    features = None
    if cfg.kd in ("feature", "both"):
        names = [n.strip() for n in str(cfg.kd_layers or "").split(",") if n.strip()] or None
        features = FeatureKD(model, card, teacher, names)
        features.attach(model)
    return DistilledTask(task, teacher, cfg.kd_temperature, cfg.kd_alpha, cfg.kd, features, regions,
                         dense_kd(cfg.kd_dense, card.task) if cfg.kd != "feature" else None)


def dense_kd(choice: str | None, task: str) -> str | None:
    """``--kd-dense`` as used: a segmenter's choice, else channel-wise (measured far ahead of
    per-pixel KD on ``shapes``: BENCHMARKS.md, segmentation students); None for other tasks."""
    return (choice or "channel") if task in DENSE_TASKS else None
