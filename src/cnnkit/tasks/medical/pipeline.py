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
        net = getattr(model, "net", model)  # SliceWise wraps a 2-D network
        named = dict(net.named_children())
        return {n: m for n, m in named.items() if n != "class_layers"}

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
        """Classifiers: the logit of class ``selector``; segmenters: its mean logit."""
        logits = raw[0][:, int(selector)]
        return logits if self.classify else logits.flatten(1).mean(1)


def pipeline(card: ModelCard) -> MedicalPipeline:
    return MedicalPipeline(card)
