"""Click options generated from the config dataclasses, so the CLI, ``config.yaml`` and the
Python API share one set of names, defaults and help texts."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

import click

from cnnkit.core.choices import ATTENTION, ILLUMINATION, POOLS
from cnnkit.engine.config import AMP_MODES, OPTIMIZERS, QAT_WEIGHTS, SCHEDULES

CHOICES: dict[str, tuple[str, ...]] = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "amp": AMP_MODES,
                                       "attention": ("none", *ATTENTION), "pool": POOLS,
                                       "loss": ("ce", "sce", "gce"), "noise_type": ("symmetric", "pairflip"),
                                       "missing_mode": ("pixel", "patch"), "missing_input": ("zero", "mask"),
                                       "adv": ("pgd", "fgsm"), "illumination": ILLUMINATION,
                                       "kd": ("logit", "feature", "both"), "kd_dense": ("channel", "pixel"),
                                       "qat_weights": QAT_WEIGHTS}

HELP: dict[str, str] = {
    "data": "dataset: digits, shapes, or an ImageFolder path (root/train/<class>/..., optional val/ and test/)",
    "model": "architecture from `cnnkit models` (smallcnn, resnet18, ...; timm:NAME for any timm model)",
    "imgsz": "input size in pixels (square); default: the dataset's (digits 16, shapes 64; a folder: its median "
             "image's side rounded to the network's stride, 16 to 224)",
    "pretrained": "start from published ImageNet weights (torchvision/timm loaders; needs network once)",
    "init": "start from these weights (a cnnkit .safetensors or a state-dict file): fine-tuning, not resuming",
    "freeze": "freeze 'backbone' (all but the head; a segmenter's or detector's encoder) or N (the stem and the first N stages), BN statistics included",
    "unfreeze_at": "epoch at which frozen layers start training (gradual fine-tuning); 0 keeps them frozen",
    "layer_decay": "layer-wise LR decay: each depth group below the head gets this factor times the LR above; 1 is off",
    "linear_probe": "train only a linear head on frozen features (the backbone and its BN statistics stay fixed)",
    "epochs": "number of epochs",
    "batch": "batch size; default: the task's (classify and multilabel 32, detect, instance and segment 16, "
             "medical 4), halved for a small training set of your own so that an epoch takes at least 20 steps, "
             "and with --time halved until the budget buys about 1000 steps (timed on a few steps first)",
    "lr": "peak learning rate; default: the task's (2e-3; segment, instance and medical 1e-3)",
    "optimizer": "optimizer (sgd uses Nesterov momentum)",
    "weight_decay": "weight decay (not applied to biases and norm layers)",
    "momentum": "SGD momentum",
    "schedule": "learning-rate schedule (cosine, step and constant use --warmup-epochs)",
    "warmup_epochs": "linear warmup length in epochs (fractions allowed)",
    "step_size": "epochs between decays with --schedule step",
    "gamma": "decay factor with --schedule step",
    "grad_clip": "clip the gradient norm to this value; 0 turns clipping off",
    "accumulate": "accumulate gradients over N batches per optimizer step",
    "ema": "keep an exponential moving average of the weights with this decay (e.g. 0.999); 0 is off",
    "amp": "mixed precision; auto is bf16 on a CUDA GPU that supports it (else fp16), off on CPU",
    "channels_last": "use the channels_last memory format (faster convolutions on recent GPUs)",
    "time": "training time budget in minutes (validation included): after each epoch the number of epochs "
            "that fit is set and the LR schedule stretched to it, the last epoch shorter where a whole one "
            "would overrun (with --batch left out, a short budget gets a smaller batch); 0 is off",
    "patience": "stop after N epochs without improvement; 0 turns early stopping off",
    "snapshots": "snapshot ensemble: with --schedule cyclic, N cosine cycles and weights/snapshotK.safetensors "
                 "saved at the end of each (ensemble them with val --weights)",
    "seed": "random seed (data order, augmentation, initialization)",
    "adv": "adversarial training (a defence): train on pgd or fgsm examples of every batch against the model "
           "being trained",
    "teacher": "distil from these trained weights (same task and classes; comma-separated: an ensemble, their "
               "soft targets averaged); the teacher runs without gradients on the same augmented batches",
    "kd": "what is distilled: logit (the class scores: softmax KL, per pixel for segmenters; sigmoid BCE for "
          "multi-label; fastdet: class scores and box-side distributions; Faster/Mask R-CNN: the teacher's class "
          "scores for the student's region proposals), feature (stage outputs through "
          "learned 1x1 adapters, FitNets) or both",
    "kd_layers": "--kd feature: the student's feature stages to match (comma-separated; default the deepest); "
                 "each meets the teacher's stage of the same name, else the one at the same relative depth",
    "kd_temperature": "--teacher: the softmax temperature T of the soft targets (high T with --kd-alpha 1: "
                      "defensive distillation)",
    "kd_alpha": "--teacher: weight of the distillation term; 1 - alpha weighs the task's own loss",
    "kd_dense": "--kd logit for segment and medical: channel (the default: channel-wise distillation, each class "
                "map's softmax over the image, so small objects count as much as the background) or pixel (the "
                "classes' softmax at each pixel)",
    "qat": "quantization-aware training: fine-tune the --init weights with int8 rounding simulated (per-channel "
           "weights, per-tensor activations), then write weights/best.int8.onnx (ONNX Runtime QDQ) and its metric",
    "qat_weights": "--qat: one weight scale per output channel (per-channel, the finer) or one per tensor "
                   "(per-tensor, for runtimes and chips that take nothing else); the int8 file is written the same way",
    "train_temperature": "the training loss sees the logits divided by T (inference uses T = 1): with T 20 or "
                         "more, the teacher of defensive distillation",
    "illumination": "normalize the lighting inside the model (recorded in its card, applied at train and "
                    "inference time alike): standardize (per-image brightness and contrast), grayworld (colour "
                    "cast), equalize (histogram equalization of the luma: any tone curve)",
    "adv_eps": "--adv budget in pixel units of [0, 1] images (L-infinity), e.g. 8/255 or 0.1",
    "adv_steps": "--adv pgd: attack steps per batch (step eps/4); each costs a forward and backward pass",
    "device": "auto, cpu, cuda, cuda:N or mps",
    "workers": "data-loading worker processes (0 loads in the main process)",
    "out": "run directory (default: runs/TASK/trainN, the first free N)",
    "name": "run name under runs/TASK/ (instead of trainN)",
    "label_smoothing": "label smoothing of the cross-entropy loss",
    "aug": "training augmentations, e.g. flip,rotate=15,scale=0.8:1.2,translate=0.1,crop=0.6,jitter=0.4,"
           "erase=0.25,blur=1.5,noise=0.05,gamma=0.7:1.5,shadow=0.5,randaugment[=N:M],trivialaugment,"
           "autoaugment (cutout = erase) or none; default: the dataset's (digits: affine; shapes: affine,flip; "
           "folders: crop=0.6,flip)",
    "drop_rate": "dropout before the classifier",
    "val_fraction": "fraction of train/ held out for validation when a folder has no val/",
    "channels": "1 (grayscale) or 3 (RGB); default: detected from the images",
    "attention": "insert attention blocks: se, cbam or eca (smallcnn after every stage; resnets in every block)",
    "loss": "ce (cross-entropy), sce (symmetric CE) or gce (generalized CE); sce and gce resist label noise",
    "mixup": "mixup with Beta(A, A) mixing weights; 0 is off (e.g. 0.2)",
    "cutmix": "CutMix with Beta(A, A) box areas; 0 is off (e.g. 1.0); with --mixup each batch uses one of the two",
    "batch_aug": "augment whole batches on the training device (GPU), e.g. flip,rotate=15,scale=0.9:1.1,jitter=0.2; "
                 "turns the default --aug off",
    "imbalance": "class-imbalance strategies, comma-separated: one sampler (weighted-sampler, oversample, "
                 "undersample), class-weights or class-balanced[=BETA], focal[=GAMMA], ohem[=FRACTION], smote",
    "imbalance_ratio": "make the train split long-tailed for experiments: the last class keeps this fraction "
                       "(exponential profile; 1 leaves the data as it is)",
    "label_noise": "flip this fraction of the train and val labels for experiments (test stays clean)",
    "noise_type": "symmetric (to any other class) or pairflip (class k to k+1)",
    "missing": "missing-data training: drop up to this share of every image (each draws a share in [0, P])",
    "missing_mode": "what goes missing: single pixels or square patches",
    "missing_input": "zero: holes are zero-filled; mask: the model also gets the observation mask as an extra channel",
    "bootstrap": "train on a bootstrap sample of the train split (bagging members: use different --seed)",
    "width": "smallcnn's first-stage channels (later stages 2x and 4x); default 32, about 0.6 M parameters; "
             "64 is about 2.3 M",
    "pool": "global pooling: avg, max, avgmax, lp (power mean p=3), gem (learnable p), spp (1+2x2+4x4 pyramid)",
}


def _base_type(tp: Any) -> tuple[type, bool]:
    """(python type, optional?) of a dataclass field annotation."""
    if isinstance(tp, str):
        tp = eval(tp, {"int": int, "float": float, "str": str, "bool": bool, "None": None})
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def config_options(cls: type, skip: tuple[str, ...] = ()) -> Callable:
    """A decorator adding one click option per dataclass field of ``cls``."""

    def decorate(f: Callable) -> Callable:
        for fld in reversed(dataclasses.fields(cls)):
            if fld.name in skip:
                continue
            tp, _optional = _base_type(fld.type)
            flag = "--" + fld.name.replace("_", "-")
            help_ = HELP.get(fld.name, "")
            if tp is bool:  # a flag that is on by default also gets its --no- form to turn it off
                decl = f"{flag}/--no-{flag[2:]}" if fld.default else flag
                f = click.option(decl, fld.name, is_flag=True, default=fld.default, help=help_,
                                 show_default=True)(f)
            else:
                choice = CHOICES.get(fld.name)
                f = click.option(flag, fld.name, type=click.Choice(choice) if choice else tp,
                                 default=fld.default, help=help_,
                                 show_default=fld.default is not None)(f)
        return f

    return decorate


def explicit_options(ctx: click.Context, names: list[str]) -> dict[str, Any]:
    """The options the user actually typed (not defaults), for layering over a config file."""
    from click.core import ParameterSource

    return {n: ctx.params[n] for n in names
            if ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT, None)}


def option(name: str, **changes: Any) -> Callable:
    """The shared click option ``name`` (type, default, choices and help from
    :data:`cnnkit.core.options.SHARED`), with ``changes`` (``default``, ``help``, ``required``)
    for a command that needs its own."""
    from cnnkit.core.options import shared

    return mode_options((shared(name, **changes),))


# ---- val and predict: options generated from a task's VAL / PREDICT lists (cnnkit.core.options) ----
def mode_options(opts) -> Callable:
    """A decorator adding one click option per :class:`~cnnkit.core.options.Opt` in ``opts``."""
    from cnnkit.cli.multivalue import MultiValueOption

    def decorate(f: Callable) -> Callable:
        for o in reversed(opts):
            kw: dict[str, Any] = {"help": o.help, "required": o.required}
            decl = o.cli_flag
            if o.kind == "paths":
                kw.update(cls=MultiValueOption, metavar="PATH...")
            elif o.kind is bool:
                if o.default is None or o.default:
                    decl = f"{decl}/--no-{decl[2:]}"
                else:
                    kw["is_flag"] = True
                kw["default"] = o.default
            else:
                kw["type"] = (click.Choice(o.choices) if o.choices else
                              click.Path(dir_okay=False) if o.kind == "file" else
                              click.Path(file_okay=False) if o.kind == "dir" else o.kind)
                if not o.required:
                    kw["default"] = o.default
            f = click.option(decl, o.name, **kw)(f)
        return f

    return decorate
