"""Cutting a series into (input window, target horizon) pairs (numpy only)."""

from __future__ import annotations

import numpy as np


def window_ends(mask: np.ndarray, window: int, horizon: int) -> np.ndarray:
    """Forecast origins ``t`` whose whole window and horizon are valid.

    Parameters
    ----------
    mask : numpy.ndarray of bool, shape (T,)
        True where the series holds a real or interpolated value.
    window : int
        Input steps W; the window is ``[t-W+1, t]``.
    horizon : int
        Target steps H; the targets are ``[t+1, t+H]``.

    Returns
    -------
    numpy.ndarray of int64
        Every ``t`` in increasing order such that ``mask[t-W+1 : t+H+1]`` is
        all True.

    Raises
    ------
    ValueError
        If W <= 0, H <= 0 or W + H exceeds the series length.
    """
    mask = np.asarray(mask, dtype=bool)
    if window <= 0 or horizon <= 0:
        raise ValueError(f"need window W >= 1 and horizon H >= 1, got W={window}, H={horizon}")
    span = window + horizon
    if span > len(mask):
        raise ValueError(
            f"W + H = {window} + {horizon} = {span} steps is a window longer than the series "
            f"({len(mask)} steps); shorten W or H or use a longer slice"
        )
    # Count of invalid steps in every length-`span` run, via a cumulative sum.
    bad = np.concatenate(([0], np.cumsum(~mask)))
    clean = (bad[span:] - bad[:-span]) == 0  # clean[s]: steps s .. s+span-1 all valid
    return np.flatnonzero(clean).astype(np.int64) + window - 1


def make_windows(
    values: np.ndarray, mask: np.ndarray, window: int, horizon: int, stride: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a series into (input window, target horizon) pairs.

    Parameters
    ----------
    values : numpy.ndarray, shape (T, C)
        One site's series (NaN allowed where ``mask`` is False).
    mask : numpy.ndarray of bool, shape (T,)
        True where ``values`` is real or interpolated.
    window : int
        Input steps W.
    horizon : int
        Target steps H.
    stride : int, default 1
        Keep every ``stride``-th valid window (in time order), to subsample
        the heavily overlapping windows of a long series cheaply.

    Returns
    -------
    X : numpy.ndarray of float32, shape (N, W, C)
        ``X[i] = values[t_i-W+1 : t_i+1]``.
    Y : numpy.ndarray of float32, shape (N, H, C)
        ``Y[i] = values[t_i+1 : t_i+H+1]``, with ``t_i`` from :func:`window_ends`;
        no window or target touches a masked step.

    Raises
    ------
    ValueError
        If W <= 0, H <= 0, W + H > T, shapes disagree or ``stride`` < 1.
    """
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2 or len(values) != len(mask):
        raise ValueError(f"need values (T, C) and mask (T,), got {values.shape} and {np.shape(mask)}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    ends = window_ends(mask, window, horizon)[::stride]
    steps = ends[:, None] + np.arange(-window + 1, horizon + 1)  # (N, W + H) indices
    both = values[steps]
    return both[:, :window], both[:, window:]


