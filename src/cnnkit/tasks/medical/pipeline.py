"""Medical volumes' inference pipeline.

A volume (a NIfTI path or a (D, H, W) array) is z-scored. Segmenters slide cubes of the
card's window side over it (quarter overlap, Gaussian blending, MONAI) on either backend and
take the arg-max per voxel; classifiers see it resized (trilinear) to the window cube and
give class probabilities. The core is the network: ``(B, 1, S, S, S)`` in, logits out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnkit.core.card import ModelCard
from cnnkit.core.results import VolumeClass, VolumeLabels
from cnnkit.runtime.pipeline import Pipeline

WINDOW_BATCH = 2


class MedicalPipeline(Pipeline):
    task = "medical"
    batchable = False  # volumes differ in size

    def __init__(self, card: ModelCard):
        super().__init__(card)
        self.classify = card.head == "classify"
        self.window = int(card.input.height)

    def build(self) -> nn.Module:
        from cnnkit.models.volumetric import build_volume_model

        return build_volume_model(self.card.arch, self.card.num_classes, self.card.input.channels)

    def feature_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The encoder's stages, input to output: DenseNet's dense blocks (``block1``-``block4``),
        the U-Net's levels (``down1``... and ``bottom``), V-Net's input and down levels."""
        net = getattr(model, "net", model)  # SliceWise wraps a 2-D network
        if hasattr(net, "features") and hasattr(net, "class_layers"):  # MONAI DenseNet
            return {n.replace("denseblock", "block"): m for n, m in net.features.named_children()
                    if n.startswith("denseblock")}
        if isinstance(getattr(net, "model", None), nn.Sequential):  # MONAI UNet: nested (down, skip(...), up)
            stages, seq = {}, net.model
            while isinstance(seq, nn.Sequential) and len(seq) == 3 and hasattr(seq[1], "submodule"):
                stages[f"down{len(stages) + 1}"] = seq[0]
                seq = seq[1].submodule
            stages["bottom"] = seq
            return stages
        return {n: m for n, m in net.named_children() if n == "in_tr" or n.startswith("down_tr")}  # V-Net

    def explain_layer(self, model: nn.Module, selector: Any) -> tuple[str, nn.Module] | None:
        """The deepest stage whose output is still at least 4 voxels a side on the model's
        window (a 32-voxel cube halves to one voxel at DenseNet's last block, where a CAM map
        is one value); found with one forward pass of an empty window."""
        stages = self.feature_layers(model)
        sides: dict[str, int] = {}
        hooks = [m.register_forward_hook(lambda mod, i, out, n=n: sides.__setitem__(
            n, min((out[0] if isinstance(out, (tuple, list)) else out).shape[2:])))
            for n, m in stages.items()]
        try:
            p = next(model.parameters())
            with torch.no_grad():
                model(torch.zeros(1, self.card.input.channels, *(self.window,) * 3, device=p.device, dtype=p.dtype))
        finally:
            for h in hooks:
                h.remove()
        fit = [n for n in stages if sides.get(n, 0) >= 4]
        name = fit[-1] if fit else next(iter(stages), None)
        return None if name is None else (name, stages[name])

    def decode(self, item: Any, max_pixels: int | None = None) -> torch.Tensor:
        return self.decode_meta(item, max_pixels)[0]

    def decode_meta(self, item: Any, max_pixels: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """A NIfTI path or the bytes of a ``.nii``/``.nii.gz`` file (an upload; over
        ``max_pixels`` voxels refused from its header), or an array; the meta holds the file's
        affine, so label volumes overlay their scans."""
        from cnnkit.data.volumes import read_nifti, read_nifti_bytes

        if isinstance(item, (str, Path)):
            vol, affine = read_nifti(item)
        elif isinstance(item, (bytes, bytearray, memoryview)):
            vol, affine = read_nifti_bytes(bytes(item), max_voxels=max_pixels)
        else:
            vol, affine = np.asarray(item, np.float32), None
        return torch.as_tensor(np.asarray(vol, np.float32)), {"affine": affine}

    def prepare(self, volume: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        v = volume.float()
        shape = list(v.shape)
        v = (v - v.mean()) / v.std().clamp(min=1e-6)
        x = v[None]
        if self.classify and tuple(shape) != (self.window,) * 3:
            x = torch.nn.functional.interpolate(x[None], size=(self.window,) * 3, mode="trilinear",
                                                align_corners=False)[0]
        return x, {"shape": shape}

    def run(self, backend, x: torch.Tensor, metas: list[dict[str, Any]]) -> tuple[torch.Tensor, ...]:
        if self.classify:
            return backend(x)
        from monai.inferers import sliding_window_inference

        return (sliding_window_inference(x, (self.window,) * 3, WINDOW_BATCH, lambda t: backend(t)[0],
                                         overlap=0.25, mode="gaussian"),)

    def postprocess(self, raw: tuple[torch.Tensor, ...], metas: list[dict[str, Any]], **_) -> list:
        if self.classify:
            out = []
            for p, m in zip(raw[0].float().softmax(1).cpu(), metas):
                j = int(p.argmax())
                out.append(VolumeClass(m.get("path"), m["shape"], self.classes[j], float(p[j]),
                                       {n: float(v) for n, v in zip(self.classes, p)}))
            return out
        labels = raw[0].float().argmax(1).to(torch.uint8).cpu()
        return [VolumeLabels(m.get("path"), lab, self.classes, affine=m.get("affine"))
                for lab, m in zip(labels, metas)]

    def target(self, raw: tuple[torch.Tensor, ...], selector: Any) -> torch.Tensor:
        """Classifiers: the logit of class ``selector``; segmenters: its mean logit, over the
        voxels of ``(class, region)`` where a region is given (else over the whole volume)."""
        return self._class_score(raw[0], selector)

    def target_prob(self, raw: tuple[torch.Tensor, ...], selector: Any) -> torch.Tensor:
        """The class's softmax probability (segmenters: its mean over the region's voxels)."""
        return self._class_score(raw[0].float().softmax(1), selector)

    def _class_score(self, scores: torch.Tensor, selector: Any) -> torch.Tensor:
        """Class ``selector``'s channel of ``scores`` per sample: as is for classifiers, its mean
        over the region's voxels (the whole volume without one) for segmenters."""
        cls, region = selector if isinstance(selector, tuple) else (selector, None)
        s = scores[:, int(cls)]
        if self.classify:
            return s
        if region is None:
            return s.flatten(1).mean(1)
        r = region.to(s.device, s.dtype)
        return (s * r).flatten(1).sum(1) / r.sum().clamp(min=1)

    def select(self, raw: tuple[torch.Tensor, ...], target: Any, meta: dict[str, Any] | None = None) -> tuple[Any, str]:
        """``target``: a class name or index. Classifiers: None is the top class. Segmenters:
        None is the foreground class with the most predicted voxels, and the region explained
        is that class's predicted voxels (the whole volume when none are)."""
        from cnnkit.runtime.classifier import class_index
        from cnnkit.runtime.pipeline import predicted_region

        if self.classify:
            idx = int(raw[0][0].argmax()) if target is None else class_index(self.classes, target)
            return idx, f"class {self.classes[idx]}"
        return predicted_region(raw[0][0].argmax(0), self.classes, target, "voxels", "volume")

    def map_to_image(self, m: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
        """A map over the core's input -> over the volume: classifiers saw it resized to the
        window cube (trilinear back); segmenters saw it whole."""
        shape = tuple(int(s) for s in meta["shape"])
        if tuple(m.shape) == shape:
            return m
        return torch.nn.functional.interpolate(m[None, None].float(), size=shape, mode="trilinear",
                                               align_corners=False)[0, 0]


def pipeline(card: ModelCard) -> MedicalPipeline:
    return MedicalPipeline(card)
