"""How long the command line takes to answer `--help` (median of N runs, each a new process).

    python benchmarks/startup.py [--runs 10]

Times `cnnkit --help`, `cnnkit classify train --help` and `cnnkit detect predict --help`, and
`python -c "import torch"` beside them as the peer (what any command that imports torch pays
at least). Goal (issue 15): `--help` under 0.5 s. Run it alone.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import save

EXE = str(Path(sys.executable).parent / "cnnkit")
COMMANDS = {
    "cnnkit --help": [EXE, "--help"],
    "cnnkit classify train --help": [EXE, "classify", "train", "--help"],
    "cnnkit detect predict --help": [EXE, "detect", "predict", "--help"],
    "python -c 'import torch' (peer)": [sys.executable, "-c", "import torch"],
}


def median_seconds(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    median_seconds(COMMANDS["cnnkit --help"], 2)  # warm the file cache
    rows = {name: round(median_seconds(cmd, args.runs), 3) for name, cmd in COMMANDS.items()}
    for name, s in rows.items():
        print(f"{name:<36} {s:.3f} s")
    save("startup", {"runs": args.runs, "median_s": rows})


if __name__ == "__main__":
    main()
