"""``cnnkit demo``: the two-minute tour that ``make run`` starts."""

from __future__ import annotations

import time
from pathlib import Path


def run_demo(out: str, epochs: int, device: str) -> None:
    """Train on digits, evaluate on the test split, predict a few saved test images."""
    from PIL import Image

    from cnnkit import api
    from cnnkit.data.digits import digits_arrays
    from cnnkit.engine.progress import console

    con = console()
    t0 = time.perf_counter()
    con.rule("[bold]1/3 train[/] a small CNN on 1,257 real handwritten digits (8x8, scikit-learn)")
    result = api.train("classify", data="digits", epochs=epochs, device=device, out=out)
    con.rule("[bold]2/3 evaluate[/] the best weights on the 270 held-out test digits")
    test = api.val("classify", result.run_dir, "digits", split="test", device=device,
                   json_path=Path(out) / "test_results.json")
    con.rule("[bold]3/3 predict[/] eight test digits saved as PNG files")
    samples = Path(out) / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    images, labels = digits_arrays("test")
    for i in range(8):
        Image.fromarray(images[i]).resize((32, 32), Image.NEAREST).save(samples / f"digit_{i}_true{labels[i]}.png")
    api.predict("classify", result.run_dir, samples, topk=3, device=device, json_path=Path(out) / "predictions.json")
    run = Path(result.run_dir)
    con.rule("[bold]done[/]")
    con.print(f"test top-1 accuracy {test['top1']:.4f} on {test['num_images']} digits · "
              f"{time.perf_counter() - t0:.0f} s in all")
    for what, path in [("weights + model card", run / "weights" / "best.safetensors"),
                       ("resumable checkpoint", run / "weights" / "last.ckpt"),
                       ("config (rerun with --config)", run / "config.yaml"),
                       ("per-epoch metrics", run / "metrics.csv"),
                       ("final metrics", run / "results.json"),
                       ("test metrics", run / "test_results.json"),
                       ("predictions", run / "predictions.json"),
                       ("plots", run / "plots")]:
        con.print(f"  {what:<30} {path}")
    con.print(f"next: cnnkit classify predict --weights {run} --source YOUR_IMAGES/")
