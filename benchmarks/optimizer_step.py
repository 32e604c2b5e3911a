"""One optimizer step: cnnkit's optimizer (fused AdamW/SGD) against torch's default, which a
plain training loop gets from ``torch.optim.AdamW(model.parameters())``.

    python benchmarks/optimizer_step.py [--threads 1] [--steps 20] [--batch 8]

For each model: the median time of an optimizer step over ``--steps`` steps (after 3 warm-up
steps) with random gradients, for torch's default (on CPU a Python loop over the tensors),
torch's ``foreach=True`` and cnnkit's ``build_optimizer`` (the groups it trains with: no weight
decay on biases and norm weights, ``fused=True`` on CPU and CUDA). The U-Net row also times one
forward + backward at ``--batch`` (128 px, the built-in shapes scenes' size), to put the step in
proportion: the share of a training step the optimizer takes with each.

The two calls alternate, so a slow spell of the machine hits both; run it alone.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import save

from cnnkit.engine.schedule import build_optimizer
from cnnkit.models import create_model
from cnnkit.models.segmentation import build_segmenter

MODELS = {
    "unet resnet18 (segment)": lambda: build_segmenter("unet", 5, 3, "resnet18", False),
    "resnet18 (classify)": lambda: create_model("resnet18", 10, 3),
    "smallcnn (classify)": lambda: create_model("smallcnn", 10, 3),
}


def step_ms(opts: dict, steps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in opts}
    for i in range(steps + 3):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            if i >= 3:
                times[name].append(time.perf_counter() - t0)
    return {k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="the U-Net's forward + backward batch (128 px)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    for name, make in MODELS.items():
        torch.manual_seed(0)
        model = make()
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opts = {"torch default": torch.optim.AdamW(model.parameters(), 1e-3),
                "torch foreach": torch.optim.AdamW(model.parameters(), 1e-3, foreach=True),
                "cnnkit": build_optimizer(model, "adamw", 1e-3, 0.01, 0.9)}
        ms = step_ms(opts, args.steps)
        row = {"params_m": round(sum(p.numel() for p in params) / 1e6, 2), "step_ms": ms,
               "speedup_vs_default": round(ms["torch default"] / ms["cnnkit"], 2)}
        if name.startswith("unet"):
            x = torch.rand(args.batch, 3, 128, 128).contiguous(memory_format=torch.channels_last)
            model = model.to(memory_format=torch.channels_last)
            y = torch.randint(0, 5, (args.batch, 128, 128))
            fb = []
            for i in range(4):
                t0 = time.perf_counter()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                if i:
                    fb.append(time.perf_counter() - t0)
            fb_ms = statistics.median(fb) * 1e3
            row["forward_backward_ms"] = round(fb_ms, 1)
            row["optimizer_share"] = {k: round(v / (fb_ms + v), 4) for k, v in ms.items()}
        rows[name] = row
        print(name, row, flush=True)
    save("optimizer_step" + args.tag, {"threads": args.threads, "batch": args.batch, "rows": rows})


if __name__ == "__main__":
    main()
