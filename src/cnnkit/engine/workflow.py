"""One training workflow for every task.

A task describes itself with a :class:`WorkflowSpec` (``cnnkit/tasks/<task>/spec.py``): how it
loads data and builds its model, ``Task`` and card (:meth:`~WorkflowSpec.setup`), any step
after the loop (:meth:`~WorkflowSpec.after_fit`: SMOTE on the head, threshold tuning), how it
evaluates a predictor on a split (:meth:`~WorkflowSpec.evaluate`) and what it reports. This
module runs the steps that are the same for all of them, in one place:

resolve the config (or ``--resume``) -> device and seed -> ``spec.setup`` -> run folder and
``config.yaml`` -> the Trainer (standard hooks, the spec's hooks, batch and model transforms)
-> ``spec.after_fit`` -> the best weights as a predictor -> val and test metrics through
``spec.evaluate`` -> ``results.json`` -> curves and the spec's plots and tables.
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnkit.core.card import ModelCard
from cnnkit.engine.config import TrainConfig


@dataclass
class TrainResult:
    """What ``train`` returns: where the run went and its final metrics."""

    run_dir: Path
    metrics: dict[str, Any]
    test_metrics: dict[str, Any] | None = None
    best_epoch: int = 0
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def weights(self) -> Path:
        return self.run_dir / "weights" / "best.safetensors"


@dataclass
class Setup:
    """What a spec builds for one run."""

    model: Any  # nn.Module
    task: Any  # cnnkit.tasks.base.Task
    train_loader: Any
    val_loader: Any
    card: ModelCard
    data: Any  # the task's data object (splits for the final evaluation and plots)
    hooks: list = field(default_factory=list)
    batch_transforms: list = field(default_factory=list)
    model_transforms: list = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)  # whatever the spec's later steps need
    derived: dict[str, Any] = field(default_factory=dict)  # option -> Derived: defaults chosen from the data


class WorkflowSpec:
    """A task's part of the workflow (see the module docstring)."""

    config: type[TrainConfig] = TrainConfig  # the task's options; its TASK attribute is the task's name
    curves: tuple[str, ...] = ()  # metrics drawn in plots/results.png
    drift_reference = True  # training writes weights/drift.json (image features for cnnkit serve)
    keep = 0  # validation samples kept for the prediction plot

    @property
    def name(self) -> str:
        return self.config.TASK

    def setup(self, cfg: TrainConfig, device, verbose: bool, resuming: bool) -> Setup:
        raise NotImplementedError

    def after_fit(self, cfg: TrainConfig, run, setup: Setup, trainer, device, verbose: bool) -> None:
        """Work after the training loop that changes the best weights or card."""

    def curve_keys(self, cfg: TrainConfig) -> tuple[str, ...]:
        """Metrics drawn in ``plots/results.png``."""
        return self.curves

    def has_split(self, setup: Setup, split: str) -> bool:
        return bool(setup.data.splits.get(split))

    def evaluate(self, cfg: TrainConfig, setup: Setup, predictor, split: str, keep: int = 0) -> tuple[dict, list]:
        """``(metrics, kept samples)`` of ``predictor`` on ``split`` of the run's data."""
        raise NotImplementedError

    def public(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The metrics written to ``results.json``."""
        return metrics

    def line(self, metrics: dict[str, Any], split: str) -> str:
        """One line of headline metrics."""
        raise NotImplementedError

    def report(self, cfg: TrainConfig, run, setup: Setup, predictor, trainer, val: dict, test: dict | None,
               kept: list, verbose: bool) -> None:
        """The task's own plots (written always) and tables (printed when verbose)."""

    # ---- val and predict: the steps are here, the task's parts in the hooks below ----------
    load_options: tuple[str, ...] = ()  # val/predict options the predictor is loaded with (iou, nms, tile)
    call_options: tuple[str, ...] = ()  # predict options passed to every predictor call (conf, topk)
    predict_batch = 8  # images per predictor call when the task has no --batch

    def val(self, weights, data: str, *, verbose: bool = True, **options: Any) -> dict[str, Any]:
        """Evaluate ``weights`` (``.safetensors``, a run folder, ``.onnx`` or ``.torchscript``) on
        a split of ``data``; what ``cnnkit TASK val`` and :func:`cnnkit.val` run. ``options``
        are the task's ``VAL`` options (``cnnkit TASK val --help``)."""
        from cnnkit.core.options import resolve

        o = resolve(self.config.VAL, {"weights": weights, "data": data, **options}, f"cnnkit {self.name} val")
        model = self.load(o)
        records = self.val_records(model, o["data"], o["split"], verbose)
        ev = self.val_metrics(model, records, o)
        result = {**self.public(ev.metrics), **ev.extra, "split": o["split"], "data": o["data"],
                  "weights": _weights_name(o["weights"]), "backend": model.backend.name}
        title = f"{o['data']} · {o['split']} · {len(records)} images"
        return finish_val(result, o["json_path"], verbose, self.val_table(ev.metrics, title),
                          self.line(ev.metrics, o["split"]), ev.skipped, ev.notes)

    def predict(self, weights, source, *, verbose: bool = True, **options: Any) -> list[dict[str, Any]]:
        """Predict a file or a folder (searched recursively); what ``cnnkit TASK predict`` and
        :func:`cnnkit.predict` run. Returns the ``to_dict()`` of every result (the ``--json``
        rows). Unreadable files inside a folder are reported and skipped; a single unreadable
        file is an error."""
        from cnnkit.core.options import resolve

        o = resolve(self.config.PREDICT, {"weights": weights, "source": source, **options},
                    f"cnnkit {self.name} predict")
        model = self.load(o)
        skipped: list[tuple[str, str]] = []
        timing: dict[str, float] = {}
        results = self.predict_results(model, self.sources(o), o, skipped, timing)
        notes = []
        if o.get("save_dir"):
            out = Path(o["save_dir"])
            out.mkdir(parents=True, exist_ok=True)
            notes.append(self.save_results(model, results, out, o))
        rows = [r.to_dict() for r in results]
        table, lines = self.predict_view(model, results, timing, o) if verbose else (None, [])
        return finish_predict(rows, o["json_path"], verbose, table, lines, skipped, notes)

    def explain(self, weights, source=None, *, verbose: bool = True, **options: Any) -> dict[str, Any]:
        """Heat maps of what the model's answers rest on (``cnnkit TASK explain``,
        :func:`cnnkit.explain`), for ``source`` images or a ``data`` split (whose ground truth
        also scores the maps with ``eval``). ``options`` are the task's ``EXPLAIN`` options."""
        from cnnkit.core.options import resolve
        from cnnkit.methods.explain import run

        o = resolve(self.config.EXPLAIN, {"weights": weights, "source": source, **options},
                    f"cnnkit {self.name} explain")
        return run(self, o, verbose)

    def attack(self, weights, data: str, *, verbose: bool = True, **options: Any) -> dict[str, Any]:
        """The task's val metric on a split of ``data``, clean and under an adversarial attack
        (``cnnkit TASK attack``, :func:`cnnkit.attack`); ``options`` are the task's ``ATTACK``
        options."""
        from cnnkit.core.options import resolve
        from cnnkit.methods.attack import run

        o = resolve(self.config.ATTACK, {"weights": weights, "data": data, **options}, f"cnnkit {self.name} attack")
        return run(self, o, verbose)

    def robustness(self, weights, data: str, *, verbose: bool = True, **options: Any) -> dict[str, Any]:
        """The task's val metric on a split of ``data``, clean and under each corruption and
        severity (``cnnkit TASK robustness``, :func:`cnnkit.robustness`); ``options`` are the
        task's ``ROBUSTNESS`` options."""
        from cnnkit.core.options import resolve
        from cnnkit.methods.robustness import run

        o = resolve(self.config.ROBUSTNESS, {"weights": weights, "data": data, **options},
                    f"cnnkit {self.name} robustness")
        return run(self, o, verbose)

    def explain_truth(self, records, i: int) -> list[tuple[Any, Any]]:
        """What to explain in record ``i`` of ``records`` (from :meth:`val_records`) and where it
        is: ``[(target, bool (H, W) object pixels or None), ...]`` for the pipeline's
        ``select``. The default explains the model's own top answer, with no known pixels."""
        return [(None, None)]

    def load(self, options: dict[str, Any]):
        """The predictor of ``options["weights"]`` on ``options["device"]``, with the task's
        ``load_options``."""
        from cnnkit.runtime.pipeline import load

        return load(options["weights"], options["device"], task=self.name,
                    **{k: options[k] for k in self.load_options if k in options})

    def val_records(self, model, data: str, split: str, verbose: bool) -> list:
        """The records of ``split`` of ``data``, read the way ``model`` was trained (checked by
        :func:`eval_records`)."""
        raise NotImplementedError

    def val_metrics(self, model, records: list, options: dict[str, Any]) -> Evaluation:
        """The metrics of ``model`` on ``records``."""
        raise NotImplementedError

    def record_input(self, records, i: int):
        """The input of record ``i`` of ``records`` (from :meth:`val_records`) as a predictor
        takes it (image tensor, array or path); calibration and analyses read data through it.
        The default reads datasets of ``(image, target)`` items."""
        return records[i][0]

    def record_inputs(self, records, indices) -> list:
        """:meth:`record_input` of each of ``indices``, leaving out images that cannot be read."""
        from cnnkit.errors import ImageDecodeError

        out = []
        for i in indices:
            try:
                out.append(self.record_input(records, i))
            except ImageDecodeError:
                continue
        return out

    def val_table(self, metrics: dict[str, Any], title: str):
        """A rich table of val metrics (per class), or None."""
        return

    def sources(self, options: dict[str, Any]) -> list:
        """What ``predict`` runs on: the images of ``options["source"]``."""
        from cnnkit.data.decode import list_sources

        return list_sources(options["source"])

    def predict_results(self, model, sources: list, options: dict[str, Any], skipped: list, timing: dict) -> list:
        """Typed results of ``model`` on ``sources``."""
        call = {k: options[k] for k in self.call_options}
        return model(sources, batch=options.get("batch") or self.predict_batch, skipped=skipped, timing=timing,
                     **call)

    def save_results(self, model, results: list, out: Path, options: dict[str, Any]) -> str:
        """Write ``--save-dir`` files for ``results`` into ``out``; return one line saying what."""
        raise NotImplementedError

    def predict_view(self, model, results: list, timing: dict, options: dict[str, Any]) -> tuple[Any, list[str]]:
        """``(table or None, lines)`` printed for ``results``: by default a line per result and the
        time per stage."""
        return None, [self.result_line(model, r) for r in results] + [speed_line(model, timing)]

    def result_line(self, model, result) -> str:
        return str(result.path)


@dataclass
class Evaluation:
    """What a task's ``val_metrics`` returns."""

    metrics: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # result keys beside the metrics (ensemble members)
    skipped: list = field(default_factory=list)  # (path, reason) of unreadable images
    notes: list[str] = field(default_factory=list)  # lines printed after the metrics


def _weights_name(weights) -> str | list[str]:
    from cnnkit.engine.checkpoint import resolve_weights

    if isinstance(weights, (list, tuple)):
        names = [str(resolve_weights(w)) for w in weights]
        return names[0] if len(names) == 1 else names
    return str(resolve_weights(weights))


def speed_line(model, timing: dict[str, float]) -> str:
    """``speed: P ms preprocess, I ms inference, Q ms postprocess per image (backend)``."""
    n = max(1, timing.get("images", 0))
    return (f"speed: {timing['preprocess_ms'] / n:.1f} ms preprocess, {timing['inference_ms'] / n:.1f} ms "
            f"inference, {timing['postprocess_ms'] / n:.1f} ms postprocess per image ({model.backend.name})")


def provenance(cfg: TrainConfig, **extra: Any) -> dict[str, Any]:
    """The card's provenance: data, epochs, seed, starting weights, date and cnnkit version."""
    import cnnkit

    return {"data": cfg.data, "epochs": cfg.epochs, "seed": cfg.seed, "pretrained": cfg.pretrained,
            "init": cfg.init, **extra, "cnnkit_version": cnnkit.__version__,
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}


def train(spec: WorkflowSpec, cfg: TrainConfig | None = None, *, resume: str | Path | None = None,
          verbose: bool = True, **overrides: Any) -> TrainResult:
    """Train ``spec``'s task; what every ``cnnkit TASK train`` and ``cnnkit.train`` run."""
    from cnnkit.engine.progress import console
    from cnnkit.engine.steps import (
        open_run,
        resolve_config,
        run_trainer,
        standard_hooks,
        write_run_results,
    )
    from cnnkit.engine.trainer import Trainer
    from cnnkit.runtime.pipeline import load
    from cnnkit.utils.device import select_device
    from cnnkit.utils.plotting import plot_curves
    from cnnkit.utils.seed import seed_everything

    con = console()
    cfg, ckpt, run = resolve_config(spec.config, spec.name, cfg, resume, overrides, verbose)
    batch_left_out = cfg.batch is None  # the data and a --time budget may pick it
    device = select_device(cfg.device)
    seed_everything(cfg.seed)
    s = spec.setup(cfg, device, verbose, ckpt is not None)
    from cnnkit.methods.prune import RECORD, apply, init_record

    if cfg.init and ckpt is not None:  # resuming a fine-tune of pruned weights: the checkpoint is narrow too
        apply(s.model, init_record(cfg.init))
    if getattr(s.model, RECORD, None) is not None:  # the card rebuilds the pruned network
        s.card.extra["pruned"] = getattr(s.model, RECORD)
    hooks = list(s.hooks)
    task = s.task
    if cfg.teacher:
        from cnnkit.engine.distill import distil

        task = distil(s.task, s.card, cfg, device, s.model)
        s.card.provenance.update(teacher=cfg.teacher, kd=cfg.kd, kd_temperature=cfg.kd_temperature,
                                 kd_alpha=cfg.kd_alpha, **({"kd_dense": task.dense} if task.dense else {}),
                                 **({"kd_layers": list(task.features.pairs.items())}
                                                          if task.features is not None else {}))
    if cfg.qat:
        from functools import partial

        from cnnkit.engine.qat import prepare

        # before the optimizer: fake quantization in every conv and linear layer
        s.model_transforms.append(partial(prepare, per_channel=cfg.qat_weights == "per-channel"))
        s.card.provenance.update(qat=True, qat_weights=cfg.qat_weights)
    if cfg.adv:
        from cnnkit.engine.adversarial import AdversarialTraining

        hooks.append(AdversarialTraining.from_train_config(cfg, s.card))
    trainer = Trainer(task, s.model, s.train_loader, s.val_loader, cfg, device, None, s.card.to_dict(), hooks,
                      s.batch_transforms, s.model_transforms)
    budget_spent = 0.0  # seconds of a --time budget spent before training: timing the batch for it
    if batch_left_out and cfg.time > 0 and ckpt is None:
        from cnnkit.data.defaults import adopt
        from cnnkit.engine.budget import fit_batch_to_budget

        t = time.perf_counter()
        adopt(cfg, s.derived, "batch", fit_batch_to_budget(trainer, cfg.time))
        budget_spent = time.perf_counter() - t
    if verbose and s.derived:
        con.print("defaults from the data (written to config.yaml; pass the option to override):")
        for name, d in s.derived.items():
            con.print(f"  --{name.replace('_', '-')} {d.value}: {d.reason}")
    run = open_run(cfg, spec.name, run, {k: d.reason for k, d in s.derived.items()})
    trainer.run_dir, trainer.hooks = run.root, standard_hooks(cfg, run, verbose, hooks, budget_spent)
    train_time = run_trainer(trainer, ckpt, run, spec.name, verbose)
    t0 = time.perf_counter()
    spec.after_fit(cfg, run, s, trainer, device, verbose)
    train_time += time.perf_counter() - t0
    best = load(run.best, str(device), task=spec.name)
    val, kept = spec.evaluate(cfg, s, best, "val", spec.keep)
    test = spec.evaluate(cfg, s, best, "test")[0] if spec.has_split(s, "test") else None
    results = write_run_results(trainer, run, spec.public(val), spec.public(test) if test is not None else None,
                                train_time)
    if cfg.qat:
        from cnnkit.utils.io import write_json

        results["int8"] = _qat_int8(spec, cfg, s, run, verbose)
        write_json(run.results, results)
    if spec.drift_reference:
        _drift_reference(spec, best, cfg.data, run.best.parent, verbose)
    plot_curves(trainer.history, run.plots / "results.png", list(spec.curve_keys(cfg)))
    spec.report(cfg, run, s, best, trainer, val, test, kept, verbose)
    if verbose:
        line = spec.line(val, "val") + ("  ·  " + spec.line(test, "test") if test is not None else "")
        con.print(line + f"  ·  trained {train_time:.0f} s")
        if trainer.skipped:
            con.print(f"[yellow]skipped {len(trainer.skipped)} unreadable image(s):[/]")
            for p, r in sorted(trainer.skipped.items()):
                con.print(f"  {p}: {r}")
        con.print(f"results in {run.root}/ (weights/best.safetensors, metrics.csv, results.json, plots/)")
    return TrainResult(run.root, results, results.get("test"), trainer.best_epoch, dict(trainer.skipped))


def _qat_int8(spec: WorkflowSpec, cfg: TrainConfig, s: Setup, run, verbose: bool) -> dict[str, Any]:
    """After ``--qat``: the int8 file of the best weights (``cnnkit quantize``: per-channel or
    per-tensor as ``--qat-weights`` says, min/max ranges from the train split, the scheme the
    training simulated) and its val metrics."""
    from cnnkit.methods.quantize import quantize
    from cnnkit.runtime.pipeline import load

    out = run.best.parent / "best.int8.onnx"
    quantize(run.best, cfg.data, out, method="minmax", per_channel=cfg.qat_weights == "per-channel", split="train",
             sensitivity=False, verbose=False)
    ev, _ = spec.evaluate(cfg, s, load(out, "cpu"), "val")
    public = spec.public(ev)
    if verbose:
        from cnnkit.engine.progress import console

        console().print(f"int8 (ONNX Runtime, {out.name}): " + spec.line(ev, "val"))
    return {"file": str(out.relative_to(run.root)), "val": public}


def _drift_reference(spec: WorkflowSpec, best, data: str, folder: Path, verbose: bool) -> None:
    """``weights/drift.json``: what `cnnkit serve` compares requests against. A data set the
    reference cannot read (no val split) leaves it out with a note; training has succeeded."""
    from cnnkit.errors import CnnkitError
    from cnnkit.methods.drift import REFERENCE_FILE, write_training_reference

    try:
        write_training_reference(spec, best, data, folder / REFERENCE_FILE)
    except CnnkitError as e:
        if verbose:
            from cnnkit.engine.progress import console

            console().print(f"[yellow]no drift reference written ({e})[/]")


# ---- val: the steps every task's ``val`` shares -----------------------------------------
def eval_records(model, ds, data: str, split: str) -> list:
    """The records of ``split`` of a dataset with ``names``, after checking that its classes
    are the model's and the split is not empty."""
    from cnnkit.errors import DataError

    if list(ds.names) != model.classes:
        raise DataError(f"the classes of '{data}' ({', '.join(ds.names)}) differ from the model's "
                        f"({', '.join(model.classes)})")
    records = ds.split(split)
    if not records:
        raise DataError(f"the {split} split of '{data}' has no images")
    return records


def finish_val(result: dict[str, Any], json_path, verbose: bool, table=None, line: str = "",
               skipped=(), notes=()) -> dict[str, Any]:
    """Add skipped images to a val ``result``, write it as JSON, print the table, the
    headline line, ``notes`` and the skipped images; return ``result``."""
    from cnnkit.utils.io import write_json

    skipped = [(s["path"], s["reason"]) if isinstance(s, dict) else s for s in skipped]
    if skipped:
        result["skipped_images"] = [{"path": p, "reason": r} for p, r in skipped]
    if json_path:
        write_json(json_path, result)
    if verbose:
        _print(table, [line] if line else [], notes, skipped)
    return result


def _print(table, lines, notes, skipped) -> None:
    from cnnkit.engine.progress import console

    con = console()
    for item in ([table] if table is not None else []) + list(lines) + list(notes):
        con.print(item, soft_wrap=isinstance(item, str))  # a line per image: never wrapped inside its path
    for p, reason in skipped:
        con.print(f"[yellow]skipped[/] {p}: {reason}", soft_wrap=True)


def finish_predict(rows: list[dict[str, Any]], json_path, verbose: bool, table=None, lines=(), skipped=(),
                   notes=()) -> list[dict[str, Any]]:
    """Write ``predict`` rows as JSON; print the table (or one line per image), the skipped
    images and ``notes``; return the rows."""
    from cnnkit.utils.io import write_json

    if json_path:
        write_json(json_path, rows)
    if verbose:
        _print(table, lines, list(notes) + ([f"predictions written to {json_path}"] if json_path else []), skipped)
    return rows
