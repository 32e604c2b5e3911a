"""Label-level data tools for experiments and for skewed data.

- :func:`long_tail` makes a long-tailed version of a split (``--imbalance-ratio``).
- :func:`noisy_labels` injects symmetric or class-dependent label noise (``--label-noise``).
- :func:`bootstrap` draws a bootstrap sample (``--bootstrap``, bagging).
- :class:`ClassBalancedSampler` and :func:`make_sampler` rebalance the classes an epoch sees
  (``--imbalance weighted-sampler|oversample|undersample``).
- :func:`class_weights` gives inverse-frequency or effective-number loss weights.

All of it works on a dataset's ``targets`` list, so no image is decoded to relabel or resample.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, WeightedRandomSampler

from cnnkit.errors import DataError


class LabelView(Dataset):
    """The items ``indices`` of ``base`` with (possibly changed) ``labels``.

    Keeps the dataset attributes the workflows read (``classes``, ``channels``, ``name``,
    ``default_imgsz``) and exposes the new ``targets``.
    """

    def __init__(self, base: Dataset, indices: Sequence[int], labels: Sequence[int] | None = None):
        self.base = base
        self.indices = [int(i) for i in indices]
        src = base.targets
        self.targets = [int(y) for y in labels] if labels is not None else [int(src[i]) for i in self.indices]
        if len(self.targets) != len(self.indices):
            raise ValueError("labels and indices differ in length")
        for attr in ("classes", "channels", "name", "default_imgsz"):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))
        paths = getattr(base, "paths", None)
        self.paths = [paths[i] for i in self.indices] if paths else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, _ = self.base[self.indices[i]]
        return img, self.targets[i]


def class_counts(targets: Sequence[int], num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes)


def long_tail(targets: Sequence[int], num_classes: int, ratio: float, seed: int = 0) -> list[int]:
    """Indices of a long-tailed subset: class ``k`` keeps ``ratio ** (k / (K - 1))`` of its items.

    Class 0 keeps everything, the last class keeps ``ratio`` of its items (at least one), with an
    exponential profile between (Cao et al., 2019, "LDAM"). Which items stay is seeded.
    """
    if not 0 < ratio <= 1:
        raise DataError(f"--imbalance-ratio must be in (0, 1], got {ratio}")
    y = np.asarray(targets, dtype=np.int64)
    rng = np.random.default_rng([seed, 0x7A11])
    keep: list[int] = []
    for k in range(num_classes):
        idx = np.flatnonzero(y == k)
        frac = ratio ** (k / max(1, num_classes - 1))
        n = max(1, int(round(len(idx) * frac))) if len(idx) else 0
        keep += rng.choice(idx, size=n, replace=False).tolist()
    return sorted(keep)


NOISE_TYPES = ("symmetric", "pairflip")


def noisy_labels(targets: Sequence[int], num_classes: int, p: float, kind: str = "symmetric",
                 seed: int = 0) -> list[int]:
    """Labels with a fraction ``p`` replaced by wrong ones.

    ``symmetric``: a flipped label goes to any other class uniformly. ``pairflip``
    (class-dependent): class ``k`` flips to ``k + 1`` (mod K), the usual asymmetric benchmark
    noise (Han et al., 2018). Exactly ``round(p * n)`` labels change.
    """
    if not 0 <= p < 1:
        raise DataError(f"--label-noise must be in [0, 1), got {p}")
    if kind not in NOISE_TYPES:
        raise DataError(f"--noise-type must be one of {', '.join(NOISE_TYPES)}, got '{kind}'")
    y = np.asarray(targets, dtype=np.int64).copy()
    rng = np.random.default_rng([seed, 0x4015E])
    flip = rng.choice(len(y), size=int(round(p * len(y))), replace=False)
    if kind == "symmetric":
        shift = rng.integers(1, num_classes, size=len(flip))  # never the true class
        y[flip] = (y[flip] + shift) % num_classes
    else:
        y[flip] = (y[flip] + 1) % num_classes
    return y.tolist()


def bootstrap(n: int, seed: int = 0) -> list[int]:
    """``n`` indices drawn with replacement (one bagging member's training set)."""
    return np.random.default_rng([seed, 0xB00757]).integers(0, n, size=n).tolist()


class ClassBalancedSampler(Sampler[int]):
    """Each epoch, every class contributes the same number of items.

    ``oversample``: every class is topped up to the largest class's count with extra random
    picks (with replacement). ``undersample``: every class is cut to the smallest class's
    count (a fresh random subset each epoch). The order is shuffled. Randomness comes from
    ``generator``, which the Trainer reseeds every epoch, so epochs replay after ``--resume``.
    """

    def __init__(self, targets: Sequence[int], num_classes: int, mode: str, generator: torch.Generator):
        self.mode, self.generator = mode, generator
        y = torch.as_tensor(list(targets), dtype=torch.long)
        self.by_class = [torch.nonzero(y == k).flatten() for k in range(num_classes)]
        self.by_class = [ix for ix in self.by_class if len(ix)]
        sizes = [len(ix) for ix in self.by_class]
        self.per_class = max(sizes) if mode == "oversample" else min(sizes)

    def __len__(self) -> int:
        return self.per_class * len(self.by_class)

    def __iter__(self) -> Iterator[int]:
        g = self.generator
        parts = []
        for ix in self.by_class:
            perm = ix[torch.randperm(len(ix), generator=g)]
            if self.mode == "oversample" and len(ix) < self.per_class:
                extra = ix[torch.randint(len(ix), (self.per_class - len(ix),), generator=g)]
                perm = torch.cat([perm, extra])
            parts.append(perm[: self.per_class])
        order = torch.cat(parts)
        return iter(order[torch.randperm(len(order), generator=g)].tolist())


def make_sampler(mode: str, targets: Sequence[int], num_classes: int,
                 generator: torch.Generator) -> Sampler[int]:
    """The sampler for ``--imbalance weighted-sampler|oversample|undersample``."""
    if mode == "weighted-sampler":
        counts = class_counts(targets, num_classes).astype(np.float64)
        w = 1.0 / np.maximum(counts, 1)
        weights = torch.as_tensor(w[np.asarray(targets, dtype=np.int64)], dtype=torch.double)
        return WeightedRandomSampler(weights, num_samples=len(targets), replacement=True, generator=generator)
    return ClassBalancedSampler(targets, num_classes, mode, generator)


def class_weights(targets: Sequence[int], num_classes: int, kind: str = "inverse",
                  beta: float = 0.999) -> torch.Tensor:
    """Per-class loss weights, normalized to mean 1 over the classes present.

    ``inverse``: ``1 / n_k``. ``effective``: ``(1 - beta) / (1 - beta ** n_k)``, the
    effective-number weights of Cui et al. (2019), "Class-Balanced Loss".
    """
    n = class_counts(targets, num_classes).astype(np.float64)
    present = n > 0
    w = np.zeros(num_classes)
    if kind == "inverse":
        w[present] = 1.0 / n[present]
    else:
        w[present] = (1.0 - beta) / (1.0 - beta ** n[present])
    w[present] *= present.sum() / w[present].sum()
    return torch.as_tensor(w, dtype=torch.float32)
