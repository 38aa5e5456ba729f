"""Naive forecasts (seasonal-naive, last value, moving average): the baselines
every forecaster is judged against, and the twin's default forecaster (numpy only)."""

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




def forecasts_from_origins(
    series: np.ndarray, origins: np.ndarray, horizon: int, seasons: dict[str, int], average_steps: int
) -> dict[str, np.ndarray]:
    """Naive forecasts from the whole past of each origin (not only its window).

    For origin ``t`` (an index into ``series``) and steps h = 1..H:

    * ``last_value``: ``y[t]``;
    * each ``seasons`` entry ``name -> m``: seasonal-naive
      ``y[t + h - m * ceil(h/m)]`` (e.g. ``seasonal_naive_week`` with m = 2016
      at 300 s, longer than any input window);
    * ``moving_average``: the mean of ``y[t-k+1 .. t]``, k = ``average_steps``
      (masked steps skipped).

    A seasonal value that lies before the series or on a masked (NaN) step is
    replaced by the last value, so every forecast is defined.

    Parameters
    ----------
    series : numpy.ndarray, shape (T, C)
        Original units, NaN where masked; ``y[t]`` is valid at every origin.
    origins : numpy.ndarray of int, shape (N,)
    horizon : int
    seasons : dict of str to int
        Name and period (steps) of each seasonal-naive forecast.
    average_steps : int
        Steps in the moving average.

    Returns
    -------
    dict of str to numpy.ndarray, each (N, H, C)
    """
    series = np.asarray(series, dtype=np.float64)
    origins = np.asarray(origins, dtype=np.int64)
    if horizon < 1 or average_steps < 1 or any(m < 1 for m in seasons.values()):
        raise ValueError(f"need horizon, average_steps and seasons >= 1; got {horizon}, {average_steps}, {seasons}")
    last = np.repeat(series[origins][:, None, :], horizon, axis=1)
    out = {"last_value": last}
    h = np.arange(1, horizon + 1)
    for name, m in seasons.items():
        idx = origins[:, None] + h[None, :] - m * np.ceil(h / m).astype(np.int64)[None, :]
        values = series[np.clip(idx, 0, None)]
        values[idx < 0] = np.nan
        out[name] = np.where(np.isnan(values), last, values)
    steps = origins[:, None] - np.arange(average_steps)[None, :]
    past = series[np.clip(steps, 0, None)]
    past[steps < 0] = np.nan
    with np.errstate(all="ignore"):  # an all-NaN past cannot happen: y[t] is valid
        mean = np.nanmean(past, axis=1)
    out["moving_average"] = np.repeat(mean[:, None, :], horizon, axis=1)
    return out
