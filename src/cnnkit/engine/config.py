"""Training configuration shared by every task.

One flat dataclass whose field names are the command-line option names (``--epochs`` is
``epochs``), so a key is findable with one grep and ``config.yaml`` reruns a training.
Tasks subclass it to add their own fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from cnnkit.errors import CnnkitError

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "onecycle", "step", "constant", "cyclic")
AMP_MODES = ("auto", "off", "bf16", "fp16")
QAT_WEIGHTS = ("per-channel", "per-tensor")  # --qat-weights: one weight scale per output channel, or per tensor


@dataclass
class TrainConfig:
    """Options common to every ``cnnkit TASK train``."""

    DEFAULT_BATCH = 32  # class attributes, not options: what --batch and --lr left out (None) become; a
    DEFAULT_LR = 2e-3  # user's small training set gets a smaller batch (data/defaults.py)

    # data and model
    data: str = "digits"
    model: str = "smallcnn"
    imgsz: int | None = None  # None: the dataset's default size
    pretrained: bool = False
    init: str | None = None  # start from these weights (fine-tuning), unlike resume
    # fine-tuning
    freeze: str | None = None  # "backbone" or N (the stem and the first N stages)
    unfreeze_at: int = 0  # epoch at which frozen layers start training; 0 keeps them frozen
    layer_decay: float = 1.0  # layer-wise LR decay per depth group below the head; 1 is off
    linear_probe: bool = False  # frozen backbone (BN statistics too) + a trained linear head
    # optimization
    epochs: int = 20
    batch: int | None = None  # None: the task's DEFAULT_BATCH, smaller for a small user set or a short --time
    lr: float | None = None  # None: the task's DEFAULT_LR
    optimizer: str = "adamw"
    weight_decay: float = 0.05
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    step_size: int = 10  # epochs between decays for schedule=step
    gamma: float = 0.1
    grad_clip: float = 0.0  # max gradient norm; 0 turns clipping off
    accumulate: int = 1  # optimizer step every N batches
    ema: float = 0.0  # EMA decay of the weights (e.g. 0.999); 0 turns EMA off
    amp: str = "auto"  # auto: bf16 on a CUDA GPU that supports it, off on CPU
    channels_last: bool = False
    time: float = 0.0  # training time budget in minutes (validation included); sets the epochs; 0 is off
    patience: int = 0  # early stopping after N epochs without improvement; 0 turns it off
    snapshots: int = 0  # with --schedule cyclic: N cycles, weights saved at the end of each
    # adversarial training (a defence): train on PGD or FGSM examples of every batch
    adv: str | None = None  # None (off), pgd or fgsm
    adv_eps: str = "8/255"  # budget in pixel units of [0, 1] images (L-infinity)
    adv_steps: int = 7  # PGD steps per batch (step eps/4)
    # knowledge distillation from trained teachers of the same task and classes
    teacher: str | None = None  # weights (a run folder or .safetensors); several comma-separated: an ensemble
    kd: str = "logit"  # what is distilled: logit (the class scores), feature (stage outputs), both
    kd_layers: str | None = None  # --kd feature: the student's stages (comma-separated); default the deepest
    kd_temperature: float = 4.0
    kd_alpha: float = 0.5  # weight of the distillation term (1 - alpha: the task's own loss)
    kd_dense: str | None = None  # segment/medical --kd logit: channel (each class map's softmax; default) or pixel
    qat: bool = False  # quantization-aware fine-tuning of --init weights; writes weights/best.int8.onnx
    qat_weights: str = "per-channel"  # --qat: one of QAT_WEIGHTS
    # run
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    out: str | None = None  # run directory; default runs/TASK/trainN
    name: str | None = None

    def validate(self) -> None:
        """Raise :class:`CnnkitError` for values that cannot work."""
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch is None or self.batch >= 1, f"--batch must be at least 1, got {self.batch}"),
            (self.lr is None or self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.imgsz is None or self.imgsz >= 8, f"--imgsz must be at least 8, got {self.imgsz}"),
            (self.workers >= 0, f"--workers must be 0 or more, got {self.workers}"),
            (self.accumulate >= 1, f"--accumulate must be at least 1, got {self.accumulate}"),
            (0 <= self.ema < 1, f"--ema must be in [0, 1), got {self.ema}"),
            (self.grad_clip >= 0, f"--grad-clip must be 0 or more, got {self.grad_clip}"),
            (self.patience >= 0, f"--patience must be 0 or more, got {self.patience}"),
            (self.time >= 0, f"--time must be 0 (off) or a number of minutes, got {self.time}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be 0 or more, got {self.warmup_epochs}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}"),
            (self.amp in AMP_MODES, f"--amp must be one of {', '.join(AMP_MODES)}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise CnnkitError(msg)
        if self.adv is not None:
            from cnnkit.core.options import parse_fraction

            if self.adv not in ("pgd", "fgsm"):
                raise CnnkitError(f"--adv must be pgd or fgsm, got '{self.adv}'")
            eps = parse_fraction(self.adv_eps, "--adv-eps")
            if not 0 < eps <= 1:
                raise CnnkitError(f"--adv-eps must be in (0, 1] (pixel units), got {eps:g}")
            if self.adv_steps < 1:
                raise CnnkitError(f"--adv-steps must be at least 1, got {self.adv_steps}")
        if self.teacher:
            from pathlib import Path

            for w in str(self.teacher).replace(",", " ").split():
                if not Path(w).exists():
                    raise CnnkitError(f"--teacher '{w}' does not exist (give a run folder or its .safetensors)")
            if not self.kd_temperature > 0:
                raise CnnkitError(f"--kd-temperature must be above 0, got {self.kd_temperature:g}")
            if not 0 <= self.kd_alpha <= 1:
                raise CnnkitError(f"--kd-alpha must be in [0, 1], got {self.kd_alpha:g}")
        if self.qat and not self.init:
            raise CnnkitError("--qat fine-tunes trained weights for int8: give them with --init")
        if self.qat_weights not in QAT_WEIGHTS:
            raise CnnkitError(f"--qat-weights must be {' or '.join(QAT_WEIGHTS)}, got '{self.qat_weights}'")
        if self.qat_weights != "per-channel" and not self.qat:
            raise CnnkitError("--qat-weights needs --qat")
        if self.freeze not in (None, "", "none", "backbone", "all") and not str(self.freeze).isdigit():
            raise CnnkitError(f"--freeze must be 'backbone' or a number of stages, got '{self.freeze}'")
        if not 0 < self.layer_decay <= 1:
            raise CnnkitError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if self.unfreeze_at < 0:
            raise CnnkitError(f"--unfreeze-at must be 0 or more, got {self.unfreeze_at}")
        if self.unfreeze_at and not (self.freeze or self.linear_probe):
            raise CnnkitError("--unfreeze-at needs --freeze or --linear-probe (nothing is frozen)")
        if self.linear_probe and self.freeze not in (None, "", "none", "backbone", "all"):
            raise CnnkitError("--linear-probe freezes the whole backbone; drop --freeze")
        if (self.schedule == "cyclic") != (self.snapshots > 0):
            raise CnnkitError("--schedule cyclic and --snapshots N go together (N cosine cycles, one "
                              "snapshot at the end of each)")
        if self.snapshots and (self.snapshots > self.epochs or self.epochs % self.snapshots):
            raise CnnkitError(f"--snapshots {self.snapshots} must divide --epochs {self.epochs} "
                              "(each cycle is a whole number of epochs)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names - {"task"})
        if unknown:
            import difflib

            hints = [f"'{u}'" + (f" (did you mean '{c[0]}'?)" if (c := difflib.get_close_matches(u, names, 1)) else "")
                     for u in unknown]
            raise CnnkitError(f"{source} has unknown key(s) {', '.join(hints)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def save_yaml(self, path: str | Path, task: str, notes: dict[str, str] | None = None) -> None:
        """``config.yaml``: every option, so the file reruns the training; ``notes`` become
        comments beside their options (``imgsz: 16  # derived from the data: ...``)."""
        from cnnkit.utils.io import write_text

        text = yaml.safe_dump({"task": task, **self.to_dict()}, sort_keys=False)
        if notes:
            lines = text.splitlines()
            for i, line in enumerate(lines):
                key = line.split(":", 1)[0]
                if key in notes and not line.startswith(" "):
                    lines[i] = f"{line}  # derived from the data: {' '.join(notes[key].split())}"
            text = "\n".join(lines) + "\n"
        write_text(path, text)


def read_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read a ``config.yaml`` into a dict, with a clear error for bad files."""
    p = Path(path)
    if not p.is_file():
        raise CnnkitError(f"config file '{p}' does not exist")
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise CnnkitError(f"config file '{p}' is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise CnnkitError(f"config file '{p}' must hold a mapping of option names to values")
    return d


@dataclass
class ImageClassifierConfig(TrainConfig):
    """Options shared by single- and multi-label classification (folders, channels, head)."""

    val_fraction: float = 0.2  # held out from train when the data has no val split
    channels: int | None = None  # None: detect (1 for all-grayscale images, else 3)
    drop_rate: float = 0.2
    attention: str | None = None  # se, cbam or eca blocks in the backbone (smallcnn, resnets)
    pool: str = "avg"  # global pooling: avg, max, avgmax, lp, gem, spp
    width: int | None = None  # smallcnn: first-stage channels (None: its default, 32)
    illumination: str = "none"  # standardize, grayworld or equalize: inside the model, recorded in the card

    def validate(self) -> None:
        super().validate()
        check_illumination(self.illumination)
        if not 0 < self.val_fraction < 1:
            raise CnnkitError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.channels not in (None, 1, 3):
            raise CnnkitError(f"--channels must be 1 or 3, got {self.channels}")
        if not 0 <= self.drop_rate < 1:
            raise CnnkitError(f"--drop-rate must be in [0, 1), got {self.drop_rate}")
        if self.width is not None and self.model != "smallcnn":
            raise CnnkitError(f"--width sets smallcnn's channels; {self.model} has its own (pick a larger or "
                              "smaller model instead)")
        if self.width is not None and not 4 <= self.width <= 512:
            raise CnnkitError(f"--width must be between 4 and 512, got {self.width}")


def check_illumination(mode: str) -> None:
    """``--illumination``: one of :data:`cnnkit.core.choices.ILLUMINATION` (one sentence otherwise)."""
    from cnnkit.core.choices import ILLUMINATION

    if mode not in ILLUMINATION:
        raise CnnkitError(f"--illumination must be one of {', '.join(ILLUMINATION)}, got '{mode}'")
