"""``cnnkit classify train`` options and the --imbalance parser: a torch-free dataclass, so ``cnnkit --help`` and
``config.yaml`` handling import no torch (validation imports what it checks against)."""

from __future__ import annotations

from dataclasses import dataclass

from cnnkit.core.options import Opt, attack_options, explain_options, robustness_options, shared
from cnnkit.engine.config import ImageClassifierConfig
from cnnkit.errors import CnnkitError

IMBALANCE = ("weighted-sampler", "oversample", "undersample", "class-weights", "class-balanced", "focal",
             "ohem", "smote")
SAMPLERS = ("weighted-sampler", "oversample", "undersample")


def parse_imbalance(spec: str | None) -> dict[str, float | None]:
    """``--imbalance`` as ``{name: value or None}``, e.g. ``"oversample,focal=2"``.

    At most one sampler (weighted-sampler, oversample, undersample) and one of class-weights /
    class-balanced. Values: ``class-balanced=BETA`` (0.999), ``focal=GAMMA`` (2),
    ``ohem=FRACTION`` (0.5 of each batch kept).
    """
    out: dict[str, float | None] = {}
    for token in [t.strip() for t in (spec or "").split(",") if t.strip() and t.strip() != "none"]:
        name, _, value = token.partition("=")
        if name not in IMBALANCE:
            import difflib

            close = difflib.get_close_matches(name, IMBALANCE, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise CnnkitError(f"unknown --imbalance strategy '{name}'{hint}; choose from {', '.join(IMBALANCE)}")
        try:
            out[name] = float(value) if value else None
        except ValueError:
            raise CnnkitError(f"--imbalance {name}={value} needs a number") from None
    if sum(k in out for k in SAMPLERS) > 1:
        raise CnnkitError("--imbalance takes one sampler: weighted-sampler, oversample or undersample")
    if "class-weights" in out and "class-balanced" in out:
        raise CnnkitError("--imbalance takes class-weights or class-balanced, not both")
    if (v := out.get("ohem")) is not None and not 0 < v < 1:
        raise CnnkitError(f"--imbalance ohem=F keeps a fraction F of each batch, in (0, 1); got {v}")
    if (v := out.get("class-balanced")) is not None and not 0 < v < 1:
        raise CnnkitError(f"--imbalance class-balanced=BETA needs BETA in (0, 1); got {v}")
    return out


@dataclass
class ClassifyConfig(ImageClassifierConfig):
    """``cnnkit classify train`` options (the shared ones plus classification's own)."""

    TASK = "classify"  # a class attribute, not an option (VAL and PREDICT are set below the class)

    # defaults measured on digits (benchmarks/digits_vs_svc.py): one-cycle + EMA gave the
    # steadiest test accuracy across seeds
    schedule: str = "onecycle"
    ema: float = 0.995
    label_smoothing: float = 0.1
    aug: str | None = None  # None: the dataset's default (digits: affine; shapes: affine,flip; folders: crop=0.6,flip)
    # loss, mixing and data-level experiments
    loss: str = "ce"  # ce, sce (symmetric CE) or gce (generalized CE); focal comes with --imbalance focal
    mixup: float = 0.0  # mixup Beta(alpha, alpha); 0 is off
    cutmix: float = 0.0  # CutMix Beta(alpha, alpha); 0 is off
    batch_aug: str | None = None  # whole-batch augmentation on the training device (GPU), e.g. flip,rotate=15
    imbalance: str | None = None  # e.g. weighted-sampler, class-weights, focal=2, ohem=0.5, smote
    imbalance_ratio: float = 1.0  # make the train split long-tailed: the rarest class keeps this fraction
    label_noise: float = 0.0  # flip this fraction of train and val labels (experiments)
    noise_type: str = "symmetric"  # symmetric or pairflip (class k -> k+1)
    bootstrap: bool = False  # train on a bootstrap sample of the train split (bagging)
    missing: float = 0.0  # drop up to this share of every training image (each image draws from [0, P])
    missing_mode: str = "patch"  # pixel or patch
    missing_input: str = "zero"  # zero: zero-fill holes; mask: also feed the observation mask as a channel
    train_temperature: float = 1.0  # the training loss sees logits / T; inference uses T = 1

    def validate(self) -> None:
        super().validate()
        from cnnkit.data.sampling import NOISE_TYPES
        from cnnkit.tasks.losses import LOSSES

        if self.loss not in LOSSES or self.loss == "focal":
            raise CnnkitError(f"--loss must be ce, sce or gce, got '{self.loss}' (focal: --imbalance focal)")
        if self.mixup < 0 or self.cutmix < 0:
            raise CnnkitError("--mixup and --cutmix take a Beta alpha of 0 or more")
        if not 0 < self.imbalance_ratio <= 1:
            raise CnnkitError(f"--imbalance-ratio must be in (0, 1], got {self.imbalance_ratio}")
        if not 0 <= self.label_noise < 1:
            raise CnnkitError(f"--label-noise must be in [0, 1), got {self.label_noise}")
        if self.noise_type not in NOISE_TYPES:
            raise CnnkitError(f"--noise-type must be one of {', '.join(NOISE_TYPES)}, got '{self.noise_type}'")
        from cnnkit.data.missing import MISSING_INPUTS, MISSING_MODES

        if not 0 <= self.missing < 1:
            raise CnnkitError(f"--missing must be in [0, 1), got {self.missing}")
        if self.missing_mode not in MISSING_MODES or self.missing_input not in MISSING_INPUTS:
            raise CnnkitError(f"--missing-mode must be one of {', '.join(MISSING_MODES)} and --missing-input "
                              f"one of {', '.join(MISSING_INPUTS)}")
        imb = parse_imbalance(self.imbalance)
        if "focal" in imb and self.loss != "ce":
            raise CnnkitError(f"--imbalance focal replaces the loss; it cannot be combined with --loss {self.loss}")
        if not self.train_temperature > 0:
            raise CnnkitError(f"--train-temperature must be above 0, got {self.train_temperature:g}")
        if not 0 <= self.label_smoothing < 1:
            raise CnnkitError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")


WEIGHTS_HELP = ("best.safetensors or its run folder (or an exported .onnx); several (--weights A B C, or a shell "
                "glob such as run/weights/snapshot*.safetensors) are combined into an ensemble")
_WEIGHTS = shared("weights", kind="paths", help=WEIGHTS_HELP)
_ENSEMBLE = Opt("ensemble", default="mean", choices=("mean", "vote"),
                help="how several --weights combine: mean (average probabilities) or vote (majority of the "
                     "members' top-1, ties broken by mean probability)")
_TTA = Opt("tta", help="test-time augmentation, views averaged with the original: flip (horizontal), vflip, "
                       "scale[=S] (zoom by 1-S and 1+S, default 0.1), comma-separated (every combination is a "
                       "view); use views that keep the label: scale for digits and text (a flipped digit is "
                       "another symbol), flip,scale for objects such as shapes")
ClassifyConfig.VAL = (
    _WEIGHTS, shared("data", help="dataset: digits, shapes or an ImageFolder path"), shared("split"),
    shared("batch"), shared("device"), shared("workers"), _ENSEMBLE, _TTA,
    Opt("missing", help="missing-data curve: comma-separated shares of each image to drop (e.g. 0,0.1,0.3,0.5); "
                        "several --weights are then compared, not ensembled"),
    Opt("missing_mode", default="patch", choices=("pixel", "patch"),
        help="with --missing: drop single pixels or square patches"),
    Opt("plot", "file", "missing_curve.png", "with --missing: where the accuracy-vs-missing PNG goes"),
    shared("json_path"),
)
ClassifyConfig.PREDICT = (
    _WEIGHTS, shared("source"), Opt("topk", int, 5, "how many classes to list per image", lo=1), shared("batch"),
    shared("device"), _ENSEMBLE, _TTA,
    shared("json_path", help='write [{"path", "label", "score", "topk": [[label, score], ...]}] to this file'),
)
ClassifyConfig.EXPLAIN = explain_options(
    "the class to explain (a name or an index; default: the predicted class)",
    "digits, shapes (where the shape's pixels are known) or an ImageFolder path")
ClassifyConfig.ATTACK = attack_options(ClassifyConfig.VAL)
ClassifyConfig.ROBUSTNESS = robustness_options(ClassifyConfig.VAL)
