"""Global long-tail class imbalance with ratio rho = n_max / n_min.

The exponential profile of CIFAR-10-LT (Cao et al., 2019): class c keeps
n_c = n_max * rho^(-c / (C - 1)) samples, so class 0 is the head and class
C-1 the tail. flwr-datasets has no such global subsampler, hence this module.
"""

from __future__ import annotations

import numpy as np


def long_tail_counts(n_max: int, num_classes: int, rho: float) -> np.ndarray:
    """Per-class sample counts of the exponential profile (at least 1 each)."""
    if rho < 1:
        raise ValueError(f"rho={rho} must be >= 1")
    if num_classes == 1:
        return np.array([n_max])
    exponents = np.arange(num_classes) / (num_classes - 1)
    counts = np.round(n_max * rho ** (-exponents)).astype(int)
    return np.maximum(counts, 1)


def long_tail_indices(labels: np.ndarray, rho: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of a long-tailed subsample of ``labels`` (sorted).

    ``n_max`` is the size of the smallest class, so every class can supply its
    quota; a random subset of each class is kept.
    """
    classes = np.unique(labels)
    per_class = [np.flatnonzero(labels == c) for c in classes]
    n_max = min(len(idx) for idx in per_class)
    counts = long_tail_counts(n_max, len(classes), rho)
    kept = [rng.choice(idx, size=n, replace=False) for idx, n in zip(per_class, counts)]
    return np.sort(np.concatenate(kept))
