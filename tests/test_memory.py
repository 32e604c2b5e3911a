"""Host memory during CPU training: freed blocks are kept for reuse (no page faults on the
next step's allocations) and handed back to the system when training ends."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest
import torch

from cnnkit.utils import memory

needs_glibc = pytest.mark.skipif(memory._glibc() is None, reason="the setting exists only under glibc (Linux)")

# run in a fresh process, so no free block left by earlier tests can serve the allocations
PROBE = """
import json, resource, torch
from cnnkit.utils import memory

MB = 1 << 20

def faults():  # allocate, write and free 64 MB (over glibc's largest mmap threshold, 32 MB)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(64 * MB // 4)
    t.fill_(1.0)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() // MB

out = {"default": [faults() for _ in range(4)]}
with memory.keep_freed_memory() as on:
    out["on"] = on
    out["inside"] = [faults() for _ in range(16)]
    out["rss_inside"] = rss_mb()
out["rss_after"] = rss_mb()
out["after"] = faults()
print(json.dumps(out))
"""


@needs_glibc
def test_freed_memory_is_reused_inside_and_returned_after():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    pages = 64 * (1 << 20) // resource.getpagesize()
    assert min(out["default"]) > pages // 2, out  # glibc's default: every block mapped and zeroed afresh
    assert out["on"]
    # the heap grows for the first few blocks (posix_memalign asks a little more than a freed
    # block holds), then the blocks it keeps are reused without a page fault
    assert out["inside"][0] > pages // 2 and max(out["inside"][-4:]) < pages // 20, out
    assert out["rss_after"] < out["rss_inside"] - 128, out  # what was kept is handed back
    assert out["after"] > pages // 2, out
    with memory.keep_freed_memory(enabled=False) as on:
        assert not on and memory._depth == 0


def test_the_environment_can_turn_it_off(monkeypatch):
    monkeypatch.setenv("CNNKIT_KEEP_FREED_MEMORY", "0")
    with memory.keep_freed_memory() as on:
        assert not on and memory._depth == 0


def test_cpu_training_runs_inside_the_setting_and_leaves_it():
    from torch.utils.data import DataLoader, TensorDataset

    from cnnkit.engine.config import TrainConfig
    from cnnkit.engine.hooks import Hook
    from cnnkit.engine.trainer import Trainer
    from cnnkit.tasks.classify.task import ClassifyTask

    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 2, (16,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8, generator=torch.Generator().manual_seed(0),
                        collate_fn=lambda items: {"images": torch.stack([i[0] for i in items]),
                                                  "targets": torch.stack([i[1] for i in items])})

    class Depth(Hook):
        def __init__(self):
            self.seen: list[int] = []

        def after_step(self, trainer):
            self.seen.append(memory._depth)

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    trainer = Trainer(ClassifyTask(["a", "b"]), net, loader, None, TrainConfig(epochs=1, batch=8, lr=0.01, ema=0.0),
                      torch.device("cpu"), hooks=[depth := Depth()])
    trainer.fit()
    expected = 1 if memory._glibc() is not None else 0
    assert depth.seen == [expected, expected] and memory._depth == 0
