"""Spatial complexity of an image by renormalisation (paper 004 §3.2, eqs. 1-2;
Bagrov et al. 2020, "Multiscale structural complexity of natural patterns").

The image is coarse-grained ``scales - 1`` times by averaging ``G x G`` blocks
(each block becomes one pixel, eq. 1's ``s_ae(n)``); every coarse image is
blown back up to the original size so that overlaps between scales are plain
means of products. ``O[n, m]`` is the overlap of scales ``n`` and ``m``; the
complexity is ``C = sum_n |O[n+1, n] - (O[n, n] + O[n+1, n+1]) / 2|`` (eq. 2).
Hand-written: it is ten lines of NumPy and no well-kept library ships it.
"""

from __future__ import annotations

import numpy as np


def coarse_grain(images: np.ndarray, block: int) -> np.ndarray:
    """Average ``block x block`` blocks of ``images`` (N, H, W); H and W must be multiples of ``block``."""
    n, h, w = images.shape
    return images.reshape(n, h // block, block, w // block, block).mean(axis=(2, 4))


def spatial_complexity(images: np.ndarray, block: int = 2, scales: int = 3) -> np.ndarray:
    """Eq. 2's complexity of every image of ``images`` (N, H, W) or (N, 1, H, W), values in [0, 1].

    Parameters
    ----------
    images : ndarray
        Grey images; ``H`` and ``W`` divisible by ``block ** (scales - 1)`` (28x28: block 2, 3 scales).
    block : int
        ``G``, the side of the blocks merged per renormalisation step.
    scales : int
        ``N``, the number of scales (the original counts as scale 0).

    Returns
    -------
    ndarray
        One complexity per image.
    """
    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 4:
        x = x[:, 0]
    side = block ** (scales - 1)
    if x.shape[1] % side or x.shape[2] % side:
        raise ValueError(f"images of {x.shape[1]}x{x.shape[2]} cannot be coarse-grained {scales - 1} times by "
                         f"{block}x{block} blocks: use sides divisible by {side}")
    levels = [x]
    for _ in range(scales - 1):
        levels.append(coarse_grain(levels[-1], block))
    full = [np.kron(level, np.ones((1, block ** k, block ** k))) for k, level in enumerate(levels)]  # back to H x W

    def overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a * b).mean(axis=(1, 2))

    return sum(np.abs(overlap(full[n + 1], full[n]) - 0.5 * (overlap(full[n], full[n]) + overlap(full[n + 1], full[n + 1])))
               for n in range(scales - 1))
