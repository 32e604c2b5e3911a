"""Distillation under a parameter budget: a student with at most a quarter of its teacher's
parameters, trained alone and distilled, for the same epochs.

    python benchmarks/distill.py [--tasks classify,detect,segment] [--epochs 15] [--teacher-epochs 15]
        [--kd logit|feature|both] [--kd-temperature 4] [--kd-alpha 0.5] [--kd-dense channel|pixel] [--report]

Per task (all on the built-in ``shapes`` data, one seed):

- classify: teacher smallcnn ``--width 64`` (2.33 M parameters), student ``--width 28`` (0.45 M;
  a resnet18 teacher trained from scratch at 64 px was at 0.25 val top-1 after 7 epochs,
  far behind smallcnn, so it would teach nothing here); peer:
  timm's own ``timm.task.LogitDistillationTask`` (the logit KD behind ``train.py
  --kd-model-name``) driving the same student in a plain loop over cnnkit's training batches
  (same augmentation, epochs, batch, AdamW and learning rate, label smoothing 0.1, the same T
  and weights), with warmup + cosine and no EMA, as a plain loop is written (cnnkit's classify
  defaults are one-cycle with EMA, so the two differ in that too).
- detect: teacher fastdet ``--width 16`` (3.0 M), student ``--width 7`` (0.74 M), at
  ``--det-imgsz`` with 3 classes and up to 4 objects per scene; the student distils with
  ``--kd logit`` (class and box-distribution KD) and ``--kd both`` (plus the deepest stage).
- segment: teacher U-Net with a resnet18 encoder (14.3 M), student U-Net with the smallcnn
  encoder (0.83 M), at ``--seg-imgsz``; its logit KD is channel-wise (each class map's softmax
  over the image, cnnkit's default for segmenters), or per pixel with ``--kd-dense pixel`` (the
  default before 2026-12-07, which the first segmentation figures used).

With ``--report``, each task also gets the one table of issue 17: the teacher pruned by half
(``cnnkit prune``, at the ratio from 0.5 up that leaves at most a quarter of its parameters),
then fine-tuned for the student's epochs, alone and with the unpruned teacher's KD (prune, then
distil), joins the students, and ``cnnkit
benchmark --variants`` times every model on eager PyTorch, ONNX Runtime and ONNX Runtime int8
(calibrated on the train split) and scores each on the test split; the latency columns need the
machine to themselves.

Every cnnkit run is the command a user types (``cnnkit.train`` with the same options); the
metric is the test split's (top-1, mAP50-95, mIoU) of each run's best checkpoint. Accuracy at
equal epochs is what is compared, so the figures do not depend on what else runs on the
machine; the times printed do.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from _common import save

KD = {"kd_temperature": 4.0, "kd_alpha": 0.5}
TASKS = {
    "classify": {"metric": "top1", "common": {"data": "shapes"},
                 "teacher": {"width": 64}, "student": {"width": 28}},
    "detect": {"metric": "map50_95", "common": {"data": "shapes", "classes": 3, "max_objects": 4},
               "teacher": {"width": 16}, "student": {"width": 7}},
    "segment": {"metric": "miou", "common": {"data": "shapes"},
                "teacher": {"encoder": "resnet18"}, "student": {"encoder": "smallcnn"}},
}


def params(run: Path) -> int:
    import cnnkit

    return sum(p.numel() for p in cnnkit.load(run).model.parameters())


def prune_to_quarter(teacher: str, out: Path) -> dict:
    """``cnnkit prune`` (L1) at the smallest ratio from 0.5 up, in steps of 0.01, that leaves at most
    a quarter of the teacher's parameters (the layers kept whole, such as the output layers, make
    0.5 of the channels a little more than a quarter of the parameters on some networks)."""
    import cnnkit

    for step in range(11):
        ratio = 0.5 + step / 100
        res = cnnkit.prune(teacher, ratio, out=str(out), verbose=False)
        if res["params_after"] * 4 <= res["params_before"]:
            break
    print(f"pruned at {ratio:.2f}: {res['params_after'] / 1e6:.2f} M of {res['params_before'] / 1e6:.2f} M parameters",
          flush=True)
    return dict(res, ratio=ratio)


def kd_label(kd: str, dense: dict) -> str:
    """The row name of a ``--kd`` kind: "logit", "feature", "logit and feature"; a segmenter's
    logit KD is "channel-wise logit" unless ``dense`` asks for per-pixel KD."""
    name = {"logit": "logit", "feature": "feature", "both": "logit and feature"}[kd]
    if dense.get("kd_dense") == "channel" and kd != "feature":
        name = name.replace("logit", "channel-wise logit")
    return name


def train_row(task: str, metric: str, out: Path, epochs: int, common: dict, opts: dict) -> dict:
    """One ``cnnkit.train`` run: its test metric (val without a test split), parameters, time."""
    import cnnkit

    t0 = time.perf_counter()
    res = cnnkit.train(task, out=str(out), epochs=epochs, **common, **opts)
    m = res.test_metrics or res.metrics
    return {"metric": round(float(m[metric]), 4), "params": params(out), "train_s": round(time.perf_counter() - t0, 1),
            "options": opts}


def timm_peer(teacher_run: Path, epochs: int, seed: int, log=print) -> dict:
    """The same student (cnnkit's smallcnn) distilled by timm's ``LogitDistillationTask`` in a
    plain loop over cnnkit's shapes batches (``ClassifySpec.setup``: same augmentation and
    normalization), tested on the test split."""
    from timm.task import DistillationTeacher, LogitDistillationTask

    import cnnkit
    from cnnkit.data.classification import TransformedDataset, make_loader
    from cnnkit.tasks import config_class
    from cnnkit.tasks.classify.spec import SPEC

    torch.manual_seed(seed)
    dev = torch.device("cpu")
    cfg = config_class("classify")(data="shapes", epochs=epochs, seed=seed, **TASKS["classify"]["student"])
    setup = SPEC.setup(cfg, dev, False, False)
    student = setup.model.to(dev)
    teacher = cnnkit.load(teacher_run).model.to(dev).eval()
    mean, std = setup.card.input.mean, setup.card.input.std
    for m in (student, teacher):  # timm reads each model's normalization from its pretrained_cfg
        m.pretrained_cfg = {"mean": tuple(mean), "std": tuple(std)}
    kd = LogitDistillationTask(student, DistillationTeacher(teacher, device=dev), criterion=torch.nn.CrossEntropyLoss(label_smoothing=0.1),
                               task_loss_weight=1 - KD["kd_alpha"], temperature=KD["kd_temperature"], device=dev,
                               verbose=False)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = epochs * len(setup.train_loader)
    warm = len(setup.train_loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))

    def top1(split: str, model) -> float:
        ds = TransformedDataset(setup.data.splits[split], setup.state["pre"].eval_transform())
        right = total = 0
        model.eval()
        with torch.no_grad():
            for b in make_loader(ds, 128, False, 0, setup.task.collate):
                right += int((model(b["images"].to(dev)).argmax(1).cpu() == b["targets"]).sum())
                total += len(b["targets"])
        return right / total

    best_val, best_state, t0 = -1.0, None, time.perf_counter()
    for epoch in range(epochs):
        kd.train()
        for b in setup.train_loader:
            out = kd(b["images"].to(dev), b["targets"].to(dev))
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            sched.step()
        val = top1("val", student)
        if val > best_val:
            best_val, best_state = val, {k: v.clone() for k, v in student.state_dict().items()}
        log(f"timm peer epoch {epoch + 1}/{epochs}  kd {out['kd_loss'].item():.4f}  val top1 {val:.4f}")
    student.load_state_dict(best_state)
    return {"test": round(top1("test", student), 4), "val": round(best_val, 4),
            "train_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="classify,detect,segment")
    ap.add_argument("--epochs", type=int, default=15, help="student epochs (alone and distilled alike)")
    ap.add_argument("--teacher-epochs", type=int, default=15)
    ap.add_argument("--det-imgsz", type=int, default=160)
    ap.add_argument("--seg-imgsz", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", action="store_true",
                    help="add the pruned teacher and time every variant in fp32 and int8 (cnnkit benchmark)")
    ap.add_argument("--runs", type=int, default=20, help="--report: timed calls per model, format and batch")
    ap.add_argument("--kd-temperature", type=float, default=KD["kd_temperature"], help="T of every distilled run")
    ap.add_argument("--kd-alpha", type=float, default=KD["kd_alpha"], help="weight of the KD term")
    ap.add_argument("--kd", choices=["logit", "feature", "both"], default="logit",
                    help="what the distilled student learns from (detect also runs --kd both)")
    ap.add_argument("--kd-dense", choices=["channel", "pixel"], default="channel",
                    help="segment: channel-wise or per-pixel logit KD")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    KD.update(kd_temperature=args.kd_temperature, kd_alpha=args.kd_alpha)

    import cnnkit

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            spec = TASKS[task]
            common = dict(spec["common"], seed=args.seed, verbose=False)
            if task == "detect":
                common["imgsz"] = args.det_imgsz
            if task == "segment":
                common["imgsz"] = args.seg_imgsz
            rows, root = {}, Path(tmp) / task
            results[task] = {"metric": spec["metric"], "rows": rows, "imgsz": common.get("imgsz"), "report": None}

            def checkpoint() -> None:
                # After every run, so a long benchmark that is stopped keeps what it finished.
                save("distill" + args.tag, {"epochs": args.epochs, "teacher_epochs": args.teacher_epochs,
                                            "kd": {**KD, "kd_dense": args.kd_dense},
                                            "results": results})

            def run(name: str, epochs: int, task=task, spec=spec, rows=rows, root=root, common=common, **opts):
                rows[name] = train_row(task, spec["metric"], root / name, epochs, common, opts)
                print(f"{task} {name}: test {spec['metric']} {rows[name]['metric']}  "
                      f"({rows[name]['params'] / 1e6:.2f} M parameters, {rows[name]['train_s']} s)", flush=True)
                checkpoint()

            run("teacher", args.teacher_epochs, **spec["teacher"])
            run("student alone", args.epochs, **spec["student"])
            teacher = str(root / "teacher")
            dense = {"kd_dense": args.kd_dense} if task == "segment" else {}
            run(f"student + {kd_label(args.kd, dense)} KD", args.epochs, teacher=teacher, kd=args.kd, **KD, **dense, **spec["student"])
            if task == "detect" and args.kd != "both":
                run("student + logit and feature KD", args.epochs, teacher=teacher, kd="both", **KD,
                    **spec["student"])
            if task == "classify":
                peer = timm_peer(root / "teacher", args.epochs, args.seed)
                rows["student + timm LogitDistillationTask"] = {"metric": peer["test"],
                                                                "params": rows["student alone"]["params"],
                                                                "train_s": peer["train_s"]}
                print(f"classify timm peer: test top1 {peer['test']}", flush=True)
                checkpoint()
            report = None
            if args.report:
                pruned = prune_to_quarter(teacher, root / "pruned.safetensors")
                share = f"{pruned['ratio']:.0%}"
                run(f"teacher pruned {share}, fine-tuned", args.epochs, init=pruned["file"], **spec["teacher"])
                # Prune, then distil: the same pruned network fine-tuned for the same epochs with its
                # unpruned teacher's KD (the student's best kind: logit and feature KD for fastdet).
                kd = "both" if task == "detect" else args.kd
                run(f"teacher pruned {share}, fine-tuned with {kd_label(kd, dense)} KD", args.epochs, init=pruned["file"],
                    teacher=teacher, kd=kd, **KD, **dense, **spec["teacher"])
                from cnnkit.methods.benchmark import benchmark

                variants = {name: str(root / name) for name in rows if name != "teacher" and (root / name).exists()}
                report = benchmark(teacher, spec["common"]["data"], batch=16, formats=("torch", "onnx", "int8"),
                                   runs=args.runs, split="test", verbose=True, variants=variants)
            results[task]["report"] = report
            checkpoint()


if __name__ == "__main__":
    main()
