"""Where a training step's time goes: cnnkit's Trainer against a plain PyTorch loop, phase by phase.

    python benchmarks/step_phases.py [--data photo|shapes] [--epochs 2] [--rounds 2] [--threads 1]
    python benchmarks/step_phases.py --data photo -- --batch 16      # options after -- go to cnnkit

Why: on the photographs of benchmarks/photo_scenes.py, ``segment_vs_smp.py`` measured cnnkit's
training at 0.92-0.94x the images/s of smp's U-Net in a plain loop, even at the same batch, so at
equal time cnnkit saw fewer epochs. This script says which part of a step a gap is in; it found
this one in the network's forward and backward, with five times the peer's page faults (fixed by
``cnnkit.utils.memory.keep_freed_memory``; BENCHMARKS.md, "Where the photographs' 8% went").

Both sides run in this one process, one after the other with the same number of torch threads,
``--rounds`` times in alternation (cnnkit, peer, cnnkit, peer, ...), so a machine that slows down
for a minute slows both. Each side trains ``--epochs`` epochs on the same data:

- cnnkit: ``cnnkit.train("segment", data=..., epochs=E)``, the call behind ``cnnkit segment train``
  (progress bar included), at its defaults (or the options after ``--``), with timers wrapped around the Trainer's parts:
  fetching the batch from the loader, ``task.to_device``, ``task.forward``, ``task.loss``,
  ``task.step_metric`` (the progress bar's running pixel accuracy), the rest of
  ``_forward_backward`` (the backward pass, the finite-loss check, the loss read back as a float),
  ``_optimizer_step`` (AdamW, zero_grad, the schedule) and the hooks' ``after_step``.
- peer: ``smp.Unet(resnet18, encoder_weights=None)`` trained by the plain loop of
  ``segment_vs_smp.py --peer-recipe plain`` (CE + Dice, AdamW 1e-3, flips, batch 16), with the
  same timers around its lines.

``other`` is an epoch's training time (cnnkit: the Trainer's own ``train_time_s``; peer: the loop's)
minus the phases: the Python between them. Figures are milliseconds per training image, so two
batch sizes compare; the first epoch of every run is left out (allocator and thread-pool warm-up).
Validation and checkpoints happen after an epoch's clock stops, on both sides, and are not counted.
``page_faults``: the process's minor page faults per training image inside those loops
(``getrusage``), memory the kernel had to map and zero for the step.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PHASES = ("loader", "to_device", "forward", "loss", "step_metric", "backward", "optimizer", "hooks", "other")


class Clock:
    """Seconds per phase for the epoch running, and the list of finished epochs."""

    def __init__(self):
        self.epochs: list[dict[str, float]] = []
        self.now: dict[str, float] = defaultdict(float)
        self.images = 0
        self.on = False  # only inside a training epoch's loop (not validation)
        self.faults = 0  # minor page faults of the epoch's loop so far
        self._faults_at = 0

    @contextlib.contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.on:
                self.now[name] += time.perf_counter() - t

    def timed(self, name: str, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            with self.phase(name):
                return fn(*a, **k)

        return wrapper

    def start(self) -> None:
        self.on, self._faults_at = True, resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def stop(self) -> None:
        if self.on:
            self.faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self._faults_at
        self.on = False

    def end_epoch(self, total_s: float) -> None:
        row = {p: self.now.get(p, 0.0) for p in PHASES if p != "other"}
        row["other"] = total_s - sum(row.values())
        row["total"], row["images"], row["faults"] = total_s, self.images, self.faults
        self.epochs.append(row)
        self.now, self.images, self.faults = defaultdict(float), 0, 0


class TimedLoader:
    """The Trainer's training loader with the wait for each batch timed; the clock runs while
    its batches are being iterated, so the task's methods called by validation are not counted."""

    def __init__(self, loader, clock: Clock, batch_size):
        self.loader, self.clock, self.batch_size = loader, clock, batch_size
        self.generator = loader.generator

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        self.clock.start()
        try:
            while True:
                with self.clock.phase("loader"):
                    try:
                        batch = next(it)
                    except StopIteration:
                        return
                self.clock.images += self.batch_size(batch)
                yield batch
        finally:
            self.clock.stop()


@contextlib.contextmanager
def instrumented_trainer(clock: Clock):
    """Wrap every Trainer built inside this block with the clock's timers."""
    from cnnkit.engine.trainer import Trainer

    fit, fb, step, run_epoch = Trainer.fit, Trainer._forward_backward, Trainer._optimizer_step, Trainer._run_epoch

    def timed_fit(self):
        t = self.task
        for name in ("to_device", "forward", "loss", "step_metric"):
            setattr(t, name, clock.timed(name, getattr(t, name)))
        self.train_loader = TimedLoader(self.train_loader, clock, t.batch_size)
        for h in self.hooks:
            h.after_step = clock.timed("hooks", h.after_step)
        return fit(self)

    def timed_fb(self, batch):
        inner = sum(clock.now[p] for p in ("to_device", "forward", "loss", "step_metric"))
        t0 = time.perf_counter()
        out = fb(self, batch)
        if clock.on:
            spent_inner = sum(clock.now[p] for p in ("to_device", "forward", "loss", "step_metric")) - inner
            clock.now["backward"] += time.perf_counter() - t0 - spent_inner
        return out

    def timed_run_epoch(self):
        run_epoch(self)
        clock.end_epoch(self.history[-1]["train_time_s"])

    Trainer.fit, Trainer._forward_backward = timed_fit, timed_fb
    Trainer._optimizer_step, Trainer._run_epoch = clock.timed("optimizer", step), timed_run_epoch
    try:
        yield
    finally:
        Trainer.fit, Trainer._forward_backward, Trainer._optimizer_step, Trainer._run_epoch = fit, fb, step, run_epoch


def run_cnnkit(data_spec: str, epochs: int, seed: int, out: Path, extra: dict) -> tuple[list[dict], dict]:
    import cnnkit

    clock = Clock()
    with instrumented_trainer(clock):
        res = cnnkit.train("segment", data=data_spec, epochs=epochs, seed=seed, out=str(out), **extra)
    cfg = (res.run_dir / "config.yaml").read_text()
    batch = next((ln.split(":", 1)[1].split("#")[0].strip() for ln in cfg.splitlines() if ln.startswith("batch:")),
                 "?")
    return clock.epochs, {"batch": batch}


def run_peer(data_spec: str, epochs: int, seed: int) -> tuple[list[dict], dict]:
    """The plain loop of ``segment_vs_smp.py --peer-recipe plain``, with timers."""
    import segmentation_models_pytorch as smp

    from cnnkit.data.classification import make_loader
    from cnnkit.data.segmentation import SegmentationDataset, load_segmentation_data, shapes_segmentation
    from cnnkit.tasks.segment.spec import parse_seg_aug
    from cnnkit.tasks.segment.task import SegmentTask

    torch.manual_seed(seed)
    data = shapes_segmentation(128, seed=seed) if data_spec == "shapes" else load_segmentation_data(data_spec)
    k = len(data.names)
    task = SegmentTask(data.names)
    train_ds = SegmentationDataset(data.split("train"), 128, k, parse_seg_aug("flip,vflip", 128))
    train_dl = make_loader(train_ds, 16, True, 0, task.collate, torch.Generator().manual_seed(seed), drop_last=True)
    model = smp.Unet("resnet18", encoder_weights=None, classes=k).to(memory_format=torch.channels_last)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    dice = smp.losses.DiceLoss("multiclass", ignore_index=255)
    opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    clock = Clock()
    for _ in range(epochs):
        model.train()
        clock.start()
        t0 = time.perf_counter()
        it = iter(train_dl)
        while True:
            with clock.phase("loader"):
                b = next(it, None)
            if b is None:
                break
            with clock.phase("to_device"):
                x = ((b["images"].float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
                y = b["masks"]
            with clock.phase("forward"):
                out = model(x)
            with clock.phase("loss"):
                loss = F.cross_entropy(out, y, ignore_index=255) + dice(out, y)
            with clock.phase("optimizer"):
                opt.zero_grad(set_to_none=True)
            with clock.phase("backward"):
                loss.backward()
            with clock.phase("optimizer"):
                opt.step()
                sched.step()
            clock.images += len(y)
        clock.stop()
        clock.end_epoch(time.perf_counter() - t0)
    return clock.epochs, {"batch": 16, "smp": smp.__version__}


def per_image_ms(epochs: list[dict]) -> dict[str, float]:
    """Milliseconds per training image of each phase over ``epochs``."""
    n = sum(e["images"] for e in epochs)
    ms = {p: round(1000 * sum(e[p] for e in epochs) / max(1, n), 2) for p in (*PHASES, "total")}
    return {**ms, "page_faults": round(sum(e["faults"] for e in epochs) / max(1, n))}


def parse_extra(extra: list[str]) -> dict:
    """``--batch 16 --lr 1e-3`` -> ``{"batch": 16, "lr": 0.001}`` for ``cnnkit.train``."""
    out, key = {}, None
    for tok in extra:
        if tok == "--":
            continue
        if tok.startswith("--"):
            key = tok[2:].replace("-", "_")
            out[key] = True
        elif key is not None:
            out[key] = _number(tok)
    return out


def _number(tok: str):
    for kind in (int, float):
        try:
            return kind(tok)
        except ValueError:
            pass
    return tok


def main() -> None:
    from _common import save

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["shapes", "photo"], default="photo")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of each run (the first is left out)")
    ap.add_argument("--rounds", type=int, default=2, help="cnnkit and peer runs, in alternation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    args, extra = ap.parse_known_args()
    torch.set_num_threads(args.threads)
    options = parse_extra(extra)
    sides: dict[str, list[dict]] = {"cnnkit": [], "smp": []}
    info: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_spec = "shapes"
        if args.data == "photo":
            from photo_scenes import write_photo_scenes

            data_spec = str(write_photo_scenes(Path(tmp) / "photo_scenes", seed=args.seed))
        for r in range(args.rounds):
            rows, info["cnnkit"] = run_cnnkit(data_spec, args.epochs, args.seed, Path(tmp) / f"run{r}", options)
            sides["cnnkit"] += rows[1:]
            print(f"round {r + 1} cnnkit (batch {info['cnnkit']['batch']}): {per_image_ms(rows[1:])}", flush=True)
            rows, info["smp"] = run_peer(data_spec, args.epochs, args.seed)
            sides["smp"] += rows[1:]
            print(f"round {r + 1} smp    (batch 16): {per_image_ms(rows[1:])}", flush=True)
    ms = {side: per_image_ms(rows) for side, rows in sides.items()}
    print(f"\nms per training image, {args.data}, {args.threads} thread(s), {args.rounds} rounds of "
          f"{args.epochs} epochs (first epoch of each left out)")
    print(f"{'phase':<12}{'cnnkit':>10}{'smp':>10}{'diff':>10}")
    for p in (*PHASES, "total", "page_faults"):
        print(f"{p:<12}{ms['cnnkit'][p]:>10.2f}{ms['smp'][p]:>10.2f}{ms['cnnkit'][p] - ms['smp'][p]:>+10.2f}")
    ratio = round(ms["smp"]["total"] / ms["cnnkit"]["total"], 3)
    print(f"training images/s cnnkit/smp {ratio}")
    save("step_phases" + (f"_{args.tag}" if args.tag else ""),
         {"data": args.data, "threads": args.threads, "epochs": args.epochs, "rounds": args.rounds,
          "cnnkit_options": options, "info": info, "ms_per_image": ms, "ratio_images_per_s": ratio,
          "epochs_raw": sides})


if __name__ == "__main__":
    main()
