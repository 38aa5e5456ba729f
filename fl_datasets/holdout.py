"""Class-balanced hold-outs (test set, the server's public validation set)."""

from __future__ import annotations

import numpy as np

from .sources import DataError


def balanced_holdout(
    labels: np.ndarray, per_class: int, rng: np.random.Generator, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``per_class`` samples of every class and the rest.

    Returns
    -------
    (held, rest) : tuple of sorted index arrays, disjoint, covering ``labels``.
    """
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise DataError(
                f"{what} needs {per_class} samples of class {c} but only {len(idx)} "
                f"exist: lower {what.replace(' ', '_')}_per_class"
            )
        held.append(rng.choice(idx, size=per_class, replace=False))
    held_idx = np.sort(np.concatenate(held)) if held else np.array([], dtype=int)
    rest = np.setdiff1d(np.arange(len(labels)), held_idx)
    return held_idx, rest
