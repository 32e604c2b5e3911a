"""The options of ``val`` and ``predict`` for every task, declared once (no torch here).

Each task lists its modes' options in ``tasks/<task>/config.py`` (``VAL`` and ``PREDICT``),
mostly by naming a shared option from :data:`SHARED` and giving it the task's default or
wording. The command line generates its ``cnnkit TASK val|predict`` options from these
lists (``cli/options.py``), and the Python API (:func:`cnnkit.val`, :func:`cnnkit.predict`)
fills defaults and checks ranges with :func:`resolve`, so both accept the same names,
defaults and limits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from cnnkit.errors import CnnkitError


@dataclass(frozen=True)
class Opt:
    """One option: ``--name`` on the command line, ``name=`` in Python.

    ``kind`` is ``str``, ``int``, ``float``, ``bool`` (a flag; ``default=None`` makes it
    tri-state ``--x/--no-x``), ``"file"`` or ``"dir"`` (an output path), ``"paths"`` (one or
    more values: ``--weights A B C``). ``lo``/``hi`` bound numbers (``lo_open``: strictly
    above ``lo``).
    """

    name: str
    kind: Any = str
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] | None = None
    required: bool = False
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    flag: str | None = None  # the command-line spelling when it is not --name (--json for json_path)

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> None:
        """Raise a one-sentence :class:`CnnkitError` for a value out of range or choices."""
        if value is None:
            return
        if self.choices is not None and value not in self.choices:
            raise CnnkitError(f"{self.cli_flag} must be one of {', '.join(self.choices)}, got '{value}'")
        if self.kind in (int, float):
            low_bad = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
            high_bad = self.hi is not None and value > self.hi
            if low_bad or high_bad:
                if self.hi is None and not self.lo_open:
                    want = f"at least {self.lo:g}"
                else:
                    want = f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"
                raise CnnkitError(f"{self.cli_flag} must be {want}, got {value}")


SHARED: dict[str, Opt] = {o.name: o for o in (
    Opt("weights", required=True, help="best.safetensors or its run folder, or an exported .onnx / .torchscript "
                                       "(cnnkit export)"),
    Opt("data", required=True, help="dataset"),
    Opt("source", required=True, help="an image file or a folder (searched recursively)"),
    Opt("split", default="val", choices=("train", "val", "test"), help="which split"),
    Opt("batch", int, 64, "batch size", lo=1),
    Opt("device", default="auto", help="auto, cpu, cuda, cuda:N or mps"),
    Opt("workers", int, 0, "data-loading worker processes", lo=0),
    Opt("json_path", "file", None, "also write the metrics to this JSON file", flag="--json"),
    Opt("save_dir", "dir", None, "write drawn results here"),
)}


def shared(name: str, **changes: Any) -> Opt:
    """The shared option ``name`` with a task's own default or wording."""
    return replace(SHARED[name], **changes)


def resolve(opts: tuple[Opt, ...], given: dict[str, Any], what: str) -> dict[str, Any]:
    """``given`` with every missing option at its default, after refusing unknown names and
    values out of range; ``what`` names the mode in messages (``cnnkit detect val``)."""
    known = {o.name: o for o in opts}
    unknown = sorted(set(given) - set(known))
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], list(known), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise CnnkitError(f"{what} has no option '{unknown[0]}'{hint}; options: {', '.join(known)}")
    out = {}
    for o in opts:
        value = given.get(o.name, o.default)
        o.check(value)
        out[o.name] = value
    return out


def parse_fraction(text: str | float, flag: str) -> float:
    """``8/255`` or ``0.03`` -> a float; a one-sentence error naming ``flag`` for anything else."""
    if isinstance(text, (int, float)):
        return float(text)
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise CnnkitError(f"{flag} takes a number such as 0.03 or 8/255, got '{text}'") from None


EXPLAIN_METHODS = ("gradcam", "gradcam++", "scorecam", "eigencam", "saliency", "ig", "occlusion")


def explain_options(target_help: str, data_help: str) -> tuple[Opt, ...]:
    """The options of ``cnnkit TASK explain``; a task words ``--target`` and ``--data``."""
    return (
        shared("weights", help="best.safetensors or its run folder (explain needs the PyTorch model)"),
        shared("source", required=False, help="an image file or a folder (searched recursively)"),
        shared("data", required=False, help=data_help + "; its ground truth picks the targets and, with --eval, "
                                                        "scores the maps"),
        shared("split", help="with --data: which split"),
        Opt("limit", int, 16, "explain at most this many images", lo=1),
        Opt("method", default="gradcam",
            help=f"{', '.join(EXPLAIN_METHODS)}; several comma-separated, or all"),
        Opt("target", help=target_help),
        Opt("layer", help="the layer CAM methods look at (default: the model's deepest feature stage)"),
        Opt("out", "dir", "explain", "where the PNG overlays and .npy maps go"),
        Opt("eval", bool, False, "score the maps: deletion and insertion AUC, and with --data the energy inside "
                                 "the object and the pointing game, against random maps"),
        shared("device"),
        shared("json_path", help="write every map's scores (and the summary) to this JSON file"),
    )


CORRUPTION_GROUPS = ("noise", "blur", "weather", "digital", "imagenet-c", "illumination", "occlusion", "all")
_NOT_FOR_ROBUSTNESS = {"weights", "json_path", "ensemble", "tta", "missing", "missing_mode", "plot", "save_json"}


def robustness_options(val: tuple[Opt, ...]) -> tuple[Opt, ...]:
    """The options of ``cnnkit TASK robustness``: the task's ``val`` options (one model) and
    the corruptions'."""
    keep = tuple(o for o in val if o.name not in _NOT_FOR_ROBUSTNESS)
    return (shared("weights", help="best.safetensors, its run folder, or an exported .onnx (int8 too)"),) + keep + (
        Opt("corruptions", default="all",
            help="comma-separated corruptions (gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur, "
                 "motion_blur, zoom_blur, snow, frost, fog, brightness, contrast, elastic_transform, pixelate, "
                 "jpeg_compression, occlusion, gamma, shadow, colour_temperature) or groups (" +
                 ", ".join(CORRUPTION_GROUPS) + ")"),
        Opt("severities", default="1-5", help="severities from 1 to 5: a range (1-5) or a list (1,3,5)"),
        Opt("baseline", help="weights of a baseline model, evaluated on the same corrupted images: gives each "
                             "corruption's error relative to it (CE) and their mean over ImageNet-C (mCE)"),
        Opt("limit", int, 1000, "use at most this many images of the split", lo=1),
        Opt("seed", int, 0, "seed of the corruptions' random draws (the same for every model)"),
        Opt("out", "dir", "robustness", "where the heat map (robustness.png) and the examples (corruptions.png) go"),
        shared("json_path", help="write the metric per corruption and severity (and the CE, mCE) here"),
    )


ATTACK_METHODS = ("fgsm", "pgd", "cw", "autoattack")
ATTACK_NORMS = ("linf", "l2")
_NOT_FOR_ATTACK = {"weights", "json_path", "ensemble", "tta", "missing", "missing_mode", "plot"}


def attack_options(val: tuple[Opt, ...]) -> tuple[Opt, ...]:
    """The options of ``cnnkit TASK attack``: the task's ``val`` options (one model) and the attack's."""
    keep = tuple(o for o in val if o.name not in _NOT_FOR_ATTACK)
    return (shared("weights", help="best.safetensors or its run folder (attacks need the PyTorch model)"),) + keep + (
        Opt("limit", int, 256, "attack at most this many images of the split", lo=1),
        Opt("method", default="pgd", choices=ATTACK_METHODS,
            help="fgsm (one signed-gradient step of --eps), pgd (--steps steps of --alpha from a random start, "
                 "projected onto the --eps ball), cw (Carlini-Wagner L2, classifiers: the smallest L2 change "
                 "found that flips the answer, no budget; --steps Adam steps of learning rate --alpha) or "
                 "autoattack (classifiers: the standard AutoAttack, APGD-CE, APGD-T, FAB-T and the black-box "
                 "Square attack, each on the images the ones before left, in the --eps ball)"),
        Opt("eps", default="8/255", help="perturbation budget in pixel units of [0, 1] images (0.03 or 8/255); "
                                         "with --norm l2, the L2 radius"),
        Opt("steps", int, None, "PGD steps (default 10), CW optimizer steps (default 50), APGD and FAB steps "
                                "of autoattack (default 100)", lo=1),
        Opt("queries", int, 5000, "autoattack: the Square attack's queries per image", lo=1),
        Opt("alpha", help="PGD step size (default: eps/4, i.e. 2/255 at 8/255); CW's Adam learning rate (default 0.01)"),
        Opt("c", float, 1.0, "CW: weight of the misclassification term against the squared L2 size", lo=0, lo_open=True),
        Opt("kappa", float, 0.0, "CW: how far past the decision boundary the answer must go (logit margin)", lo=0),
        Opt("norm", default="linf", choices=ATTACK_NORMS, help="the ball the perturbation stays in"),
        Opt("targeted", help="push toward this class (name or index) instead of away from the clean answer"),
        Opt("seed", int, 0, "seed of PGD's random start"),
        Opt("out", "dir", "attack", "where the picture (clean / adversarial / difference) goes"),
        shared("json_path", help="write the clean and attacked metrics, success rate and perturbation size here"),
    )
