"""The tuned classical baseline: exponential smoothing (statsmodels) per site.

For each site and column, three additive exponential-smoothing models are
fitted by statsmodels (``statsmodels.tsa.holtwinters.ExponentialSmoothing``,
maximum likelihood on the training slice): simple (level only), Holt's damped
trend, and Holt-Winters with the daily season. The one with the lowest MAE
on the validation windows is kept ("tuned": chosen on validation, never on
the test). statsforecast's AutoETS was the first choice, but it pins
``pandas<3`` (the project runs pandas 3); statsmodels installs cleanly.

Rolling origin without refitting: with the fitted smoothing parameters and
initial states, the model's state recursion is run once over the whole series
(:func:`ets_states`), and the forecast from every origin ``t`` is read off the
states at ``t``, the way statsmodels forecasts from the end of its sample:

* ``l_t = a (y_t - s_{t-m}) + (1 - a)(l_{t-1} + phi b_{t-1})``
* ``b_t = b* (l_t - l_{t-1}) + (1 - b*) phi b_{t-1}``
* ``s_t = g (y_t - l_{t-1} - phi b_{t-1}) + (1 - g) s_{t-m}``
* ``yhat_{t+h} = l_t + (phi + ... + phi^h) b_t + s_{t+h-m}`` (h <= m)

(Hyndman & Athanasopoulos, "Forecasting: principles and practice", §8.3;
the same recursions as statsmodels' ``holtwinters``.) A masked step (NaN)
takes its one-step forecast as the observation, so the states carry on.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

CANDIDATES = (("level", None, None), ("damped trend", "add", None), ("daily season", None, "add"))


@dataclass(frozen=True)
class ETSFit:
    """Fitted parameters of one additive exponential-smoothing model."""

    name: str
    alpha: float
    beta: float = 0.0
    gamma: float = 0.0
    phi: float = 0.0  # 0: no trend
    level0: float = 0.0
    trend0: float = 0.0
    seasons0: np.ndarray | None = None  # s_{1-m} .. s_0, or None: no season

    @property
    def period(self) -> int:
        return 0 if self.seasons0 is None else len(self.seasons0)


def fit_ets(y: np.ndarray, name: str, trend: str | None, seasonal: str | None, season: int) -> ETSFit:
    """statsmodels' maximum-likelihood fit of one candidate on ``y`` (no NaN)."""
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    with warnings.catch_warnings():  # convergence chatter on flat series
        warnings.simplefilter("ignore")
        model = ExponentialSmoothing(
            y, trend=trend, damped_trend=trend is not None, seasonal=seasonal,
            seasonal_periods=season if seasonal else None,
            # "heuristic": the m initial seasons from a decomposition, not 288 more free parameters
            initialization_method="heuristic" if seasonal else "estimated",
        )
        p = model.fit().params
    return ETSFit(
        name=name, alpha=float(p["smoothing_level"]),
        beta=float(p["smoothing_trend"]) if trend else 0.0,
        gamma=float(p["smoothing_seasonal"]) if seasonal else 0.0,
        phi=float(p["damping_trend"]) if trend else 0.0,
        level0=float(p["initial_level"]), trend0=float(p["initial_trend"]) if trend else 0.0,
        seasons0=np.asarray(p["initial_seasons"], dtype=np.float64) if seasonal else None,
    )


def ets_states(fit: ETSFit, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Level, trend and season after each step of ``y`` (T,), NaN = masked.

    Returns ``level (T,)``, ``trend (T,)`` and ``season (m + T,)`` where
    ``season[m + t]`` is the seasonal state updated at step t (the first m
    entries are the initial seasons); all zeros where the model has none.
    """
    m = fit.period
    level, trend = np.empty(len(y)), np.empty(len(y))
    season = np.zeros(m + len(y))
    if m:
        season[:m] = fit.seasons0
    prev_l, prev_b = fit.level0, fit.trend0
    a, b_, g, phi = fit.alpha, fit.beta, fit.gamma, fit.phi
    for t, obs in enumerate(y.tolist()):
        s_old = season[t] if m else 0.0  # s_{t-m}
        if obs != obs:  # NaN: carry the one-step forecast
            obs = prev_l + phi * prev_b + s_old
        lvl = a * (obs - s_old) + (1 - a) * (prev_l + phi * prev_b)
        trd = b_ * (lvl - prev_l) + (1 - b_) * phi * prev_b
        if m:
            season[m + t] = g * (obs - prev_l - phi * prev_b) + (1 - g) * s_old
        level[t], trend[t] = lvl, trd
        prev_l, prev_b = lvl, trd
    return level, trend, season


def ets_forecast(fit: ETSFit, y: np.ndarray, origins: np.ndarray, horizon: int) -> np.ndarray:
    """Forecasts (N, H) from each origin (index into ``y``) for steps 1..H."""
    level, trend, season = ets_states(fit, y)
    h = np.arange(1, horizon + 1)
    damp = np.cumsum(fit.phi ** h) if fit.phi else np.zeros(horizon)  # phi + ... + phi^h
    out = level[origins, None] + damp[None, :] * trend[origins, None]
    if fit.period:
        m = fit.period
        # s_{t+h-m*k}, k = ceil(h/m): the latest update of that season slot (at or before t)
        slot = origins[:, None] + h[None, :] - m * np.ceil(h / m).astype(int)[None, :]
        out = out + season[m + slot]
    return out


def tuned_ets_forecasts(
    series: np.ndarray, train: slice, val_origins: np.ndarray, val_truth: np.ndarray,
    origins: np.ndarray, horizon: int, season: int,
) -> tuple[np.ndarray, list[str]]:
    """The validation-chosen ETS model's forecasts from ``origins``, per column.

    Parameters
    ----------
    series : numpy.ndarray, shape (T, C)
        One site's series in original units, NaN where masked.
    train : slice
        The training slice (fitting).
    val_origins, val_truth : numpy.ndarray
        Validation origins (N_v,) and their targets (N_v, H, C), for the choice.
    origins : numpy.ndarray
        Origins to forecast from (N,).
    horizon, season : int
        Steps ahead; the daily season of the seasonal candidate.

    Returns
    -------
    forecasts : numpy.ndarray, shape (N, H, C)
    chosen : list of str
        The chosen candidate per column.
    """
    out, chosen = [], []
    for c in range(series.shape[1]):
        y = series[:, c].astype(np.float64)
        fits = [fit_ets(_filled(y[train]), name, trend, seasonal, season)
                for name, trend, seasonal in CANDIDATES if seasonal is None or train.stop >= 2 * season]
        val_mae = [np.mean(np.abs(ets_forecast(f, y, val_origins, horizon) - val_truth[..., c])) for f in fits]
        best = fits[int(np.argmin(val_mae))]
        out.append(ets_forecast(best, y, origins, horizon))
        chosen.append(best.name)
    return np.stack(out, axis=-1), chosen


def _filled(y: np.ndarray) -> np.ndarray:
    """Masked steps linearly interpolated (statsmodels' optimiser fails on NaN)."""
    ok = np.isfinite(y)
    if ok.all():
        return y
    i = np.arange(len(y))
    return np.interp(i, i[ok], y[ok])
