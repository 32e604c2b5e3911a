"""cnnkit's Trainer versus a bare hand-written PyTorch loop: same model, data, batch, optimizer.

    python benchmarks/train_overhead.py [--epochs 3] [--repeats 3] [--model smallcnn] [--imgsz 16]

Both loops iterate the same DataLoader over digits (same transforms) and use the same AdamW
optimizer and per-step cosine schedule (EMA off in both); the Trainer runs with its progress bar hook (rendered to a
buffer) as in `cnnkit classify train`, validation off (the bare loop has none). Runs are
interleaved (alternating which goes first) and the median throughput of each is compared.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import torch
import torch.nn.functional as F
from rich.console import Console

from _common import save
from cnnkit.tasks.classify.config import ClassifyConfig
from cnnkit.data.classification import TransformedDataset, load_classification_data, make_loader
from cnnkit.data.transforms import Preprocess, parse_aug
from cnnkit.engine.progress import ProgressHook
from cnnkit.engine.schedule import build_optimizer, build_scheduler
from cnnkit.engine.trainer import Trainer
from cnnkit.models import create_model
from cnnkit.tasks.classify.task import ClassifyTask


def loader(cfg: ClassifyConfig):
    data = load_classification_data(cfg.data)
    pre = Preprocess(cfg.imgsz, (0.3,) * data.channels, (0.4,) * data.channels, data.channels)
    ds = TransformedDataset(data.split("train"), pre.train_transform(parse_aug("affine", cfg.imgsz)))
    return make_loader(ds, cfg.batch, True, cfg.workers, generator=torch.Generator().manual_seed(0)), data


def bare(cfg: ClassifyConfig) -> float:
    dl, data = loader(cfg)
    torch.manual_seed(0)
    model = create_model(cfg.model, len(data.classes), data.channels)
    opt = build_optimizer(model, "adamw", cfg.lr, cfg.weight_decay, 0.9)
    sched = build_scheduler(opt, "cosine", cfg.epochs * len(dl), len(dl), 1, 0.1)
    model.train()
    n, t0 = 0, time.perf_counter()
    for _ in range(cfg.epochs):
        for batch in dl:
            loss = F.cross_entropy(model(batch["images"]), batch["targets"], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            n += len(batch["targets"])
    return n / (time.perf_counter() - t0)


def ours(cfg: ClassifyConfig, progress: bool = True) -> float:
    dl, data = loader(cfg)
    torch.manual_seed(0)
    model = create_model(cfg.model, len(data.classes), data.channels)
    hooks = [ProgressHook(Console(file=io.StringIO(), force_terminal=False))] if progress else []
    trainer = Trainer(ClassifyTask(data.classes, 0.1), model, dl, None, cfg, torch.device("cpu"), hooks=hooks)
    t0 = time.perf_counter()
    trainer.fit()
    return cfg.epochs * len(dl.dataset) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--model", default="smallcnn")
    ap.add_argument("--imgsz", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--no-progress", action="store_true", help="run the Trainer without its progress bar")
    args = ap.parse_args()
    cfg = ClassifyConfig(data="digits", model=args.model, imgsz=args.imgsz, batch=args.batch,
                         lr=ClassifyConfig.DEFAULT_LR, epochs=args.epochs, workers=0, warmup_epochs=1.0, schedule="cosine", ema=0.0)
    b, o = [], []
    for i in range(args.repeats):  # alternate the order so neither side always runs first
        if i % 2 == 0:
            b.append(bare(cfg))
            o.append(ours(cfg, not args.no_progress))
        else:
            o.append(ours(cfg, not args.no_progress))
            b.append(bare(cfg))
        print(f"repeat {i + 1}: bare {b[-1]:.0f} img/s · cnnkit Trainer {o[-1]:.0f} img/s", flush=True)
    ratio = statistics.median(o) / statistics.median(b)
    print(f"throughput ratio cnnkit/bare = {ratio:.3f} (goal >= 0.95)")
    save("train_overhead", {"command": "python benchmarks/train_overhead.py", "config": vars(args),
                            "bare_img_s": b, "cnnkit_img_s": o, "ratio": ratio})


if __name__ == "__main__":
    main()
