"""Host memory during CPU training: keep what a step frees for the next step.

PyTorch allocates CPU tensors with the C library's ``malloc``. Under glibc (most Linux systems)
a block over the mmap threshold (128 KB, sliding up to at most 32 MB) is mapped fresh from the
kernel and unmapped when freed, and free memory at the top of the heap is handed back once it
passes the trim threshold. A training step frees its activations and gradients and allocates
the same sizes again a moment later, so every step pays the kernel to map and zero those pages
again: on the U-Net at 128 px and batch 16 (one thread), about 5,000 minor page faults per
training image (``benchmarks/step_phases.py`` counts them); keeping the memory makes CPU
training 7.5-14% faster on segment, detect and classify (``benchmarks/train_memory.py``).

:func:`keep_freed_memory` turns both off for the duration of training (``mallopt``:
``M_MMAP_MAX`` 0, ``M_TRIM_THRESHOLD`` -1), so freed blocks stay in the process and are
reused, and afterwards puts glibc's defaults back and returns the free memory to the system
(``malloc_trim``). The process's memory stays at its peak while training, which a training
step reaches anyway. PyTorch's own CPU launcher (``python -m torch.backends.xeon.run_cpu``)
swaps in jemalloc or tcmalloc for the same reason; this needs no preloaded library. Outside
glibc (macOS, Windows, musl) it does nothing, and ``CNNKIT_KEEP_FREED_MEMORY=0`` in the
environment turns it off (``benchmarks/train_memory.py`` compares the two).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536  # glibc's defaults

_lock = threading.Lock()
_depth = 0  # nested or concurrent trainings: the settings go back when the last one ends


def _glibc():
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # Windows: no handle for the process itself
        return None
    if not all(hasattr(libc, name) for name in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None
    return libc


@contextlib.contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the block, memory the process frees is kept for reuse instead of being returned
    to the kernel (glibc only, unless ``CNNKIT_KEEP_FREED_MEMORY=0``); yields whether the
    setting is in effect."""
    global _depth
    enabled = enabled and os.environ.get("CNNKIT_KEEP_FREED_MEMORY", "1") != "0"
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, -1)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
