"""Run directories: ``runs/TASK/NAME`` with the layout of DESIGN.md."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunDir:
    """Paths inside one run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def weights(self) -> Path:
        return self.root / "weights"

    @property
    def best(self) -> Path:
        return self.weights / "best.safetensors"

    @property
    def last(self) -> Path:
        return self.weights / "last.ckpt"

    @property
    def metrics_csv(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"


def new_run_dir(task: str, out: str | None = None, name: str | None = None, base: str = "runs") -> RunDir:
    """``out`` when given; else ``runs/TASK/NAME`` or the first free ``runs/TASK/trainN``."""
    if out:
        root = Path(out)
    elif name:
        root = Path(base) / task / name
    else:
        parent = Path(base) / task
        i = 1
        while (parent / (f"train{i}" if i > 1 else "train")).exists():
            i += 1
        root = parent / (f"train{i}" if i > 1 else "train")
    root.mkdir(parents=True, exist_ok=True)
    (root / "weights").mkdir(exist_ok=True)
    (root / "plots").mkdir(exist_ok=True)
    return RunDir(root)
