"""Naive forecasts (seasonal-naive, last value): the baselines every forecaster
is judged against, and the twin's default forecaster (numpy only)."""

from __future__ import annotations

import numpy as np


def seasonal_naive_forecast(history: np.ndarray, horizon: int, season: int) -> np.ndarray:
    """Repeat the last observed season: ``yhat[t+h] = y[t+h - m*ceil(h/m)]``.

    With origin ``t`` the last step of ``history`` and m = ``season``, step
    ``h`` (1-based) copies the value one season earlier, or k seasons
    earlier when ``h > m`` (k = ceil(h/m)), so only observed past values are
    used (Hyndman & Athanasopoulos' snaive).

    Parameters
    ----------
    history : numpy.ndarray, shape (..., L, C)
        Past values, oldest first, time on axis -2; any leading batch axes
        (e.g. windows (N, W, C)).
    horizon : int
        Steps H to forecast.
    season : int
        Period m in steps; needs L >= m.

    Returns
    -------
    numpy.ndarray, shape (..., H, C)
    """
    history = np.asarray(history)
    if season < 1 or horizon < 1:
        raise ValueError(f"need season >= 1 and horizon >= 1, got season={season}, horizon={horizon}")
    if history.ndim < 2 or history.shape[-2] < season:
        raise ValueError(
            f"seasonal-naive needs history (..., L, C) with L >= season={season}; got shape {history.shape}"
        )
    last_season = history[..., -season:, :]
    # h = 1..H maps to position (h-1) mod m of the last season.
    return last_season[..., np.arange(horizon) % season, :]


def last_value_forecast(history: np.ndarray, horizon: int) -> np.ndarray:
    """Repeat the last observation: ``yhat[t+h] = y[t]`` for h = 1..H.

    Parameters
    ----------
    history : numpy.ndarray, shape (..., L, C)
        Past values, oldest first, time on axis -2, L >= 1.
    horizon : int
        Steps H to forecast.

    Returns
    -------
    numpy.ndarray, shape (..., H, C)
    """
    history = np.asarray(history)
    if history.ndim < 2 or history.shape[-2] < 1 or horizon < 1:
        raise ValueError(f"need history (..., L >= 1, C) and horizon >= 1, got {history.shape}, {horizon}")
    last = history[..., -1:, :]
    return np.repeat(last, horizon, axis=-2)


def baseline_forecasts(X: np.ndarray, horizon: int, season: int) -> dict[str, np.ndarray]:
    """Both baselines on the model's own windows.

    For window i with origin t (its last step), seasonal-naive predicts
    ``y[t+h] = y[t+h-season]`` (h <= season) and last-value ``y[t+h] = y[t]``,
    both read from ``X[i]`` alone, i.e. from values at or before t. Because
    both copy values, forecasting in normalised units and inverting the
    normalisation equals forecasting in original units.

    Parameters
    ----------
    X : numpy.ndarray, shape (N, W, C)
        Input windows from :func:`make_windows`; W >= ``season``.
    horizon : int
        Steps H to forecast.
    season : int
        Seasonal period in steps.

    Returns
    -------
    dict
        ``"seasonal_naive"`` and ``"last_value"``, each (N, H, C).
    """
    return {
        "seasonal_naive": seasonal_naive_forecast(X, horizon, season),
        "last_value": last_value_forecast(X, horizon),
    }


