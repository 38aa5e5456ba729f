"""Workload forecasting task: windows, baselines, metrics, training, evaluation.

A forecast is issued at step ``t`` from the window ``y[t-W+1 .. t]`` and
covers ``y[t+1 .. t+H]``. The caller splits each series in time
(:func:`fl_datasets.traces.time_split`), fits a
:class:`~fl_datasets.traces.Normaliser` on the training slice only and builds
windows inside each slice separately, so no target of one split ever feeds
another split's inputs or statistics.

Units: models train and predict on normalised windows. :func:`evaluate_forecaster`
and :func:`evaluate_baselines` take those normalised windows plus the site's
normaliser and compute every metric in original units (e.g. CPU %), because
MAE, RMSE and sMAPE are not invariant to z-scoring (MASE is).

Metrics follow Hyndman & Koehler (2006), "Another look at measures of
forecast accuracy", Int. J. Forecasting 22(4), 679-688; every point metric is
also given per horizon step (``mase_h12``: the 12th step ahead alone). A
quantile forecaster is further scored by the pinball loss (Koenker & Bassett
1978) and the empirical coverage of its outermost interval (``coverage80``
for the 0.1 / 0.9 quantiles).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from fl_datasets.naive_forecasts import baseline_forecasts, last_value_forecast, seasonal_naive_forecast  # noqa: F401
from fl_datasets.traces import Normaliser
from fl_datasets.windows import make_windows, window_ends  # noqa: F401

# ------------------------------------------------------------------ metrics


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean absolute error, ``mean(|y - yhat|)``.

    Parameters
    ----------
    y_true, y_pred : numpy.ndarray
        Observations and forecasts of the same shape.
    """
    return float(np.mean(np.abs(_f64(y_true) - _f64(y_pred))))


def rmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Root mean squared error, ``sqrt(mean((y - yhat)**2))``.

    Parameters
    ----------
    y_true, y_pred : numpy.ndarray
        Observations and forecasts of the same shape.
    """
    return float(np.sqrt(np.mean((_f64(y_true) - _f64(y_pred)) ** 2)))


def smape(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Symmetric mean absolute percentage error, in percent (0 to 200).

    ``100 * mean(2 |y - yhat| / (|y| + |yhat|))``, with a term of 0 where
    ``y = yhat = 0`` (a perfect forecast of an idle step is no error).

    Parameters
    ----------
    y_true, y_pred : numpy.ndarray
        Observations and forecasts of the same shape.
    """
    y, yhat = _f64(y_true), _f64(y_pred)
    num = 2.0 * np.abs(y - yhat)
    den = np.abs(y) + np.abs(yhat)
    # den == 0 implies num == 0: the 0/0 case, defined as 0.
    terms = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return float(100.0 * np.mean(terms))


def mase(y_true: np.ndarray, y_pred: np.ndarray, y_train: np.ndarray, season: int) -> float:
    """Mean absolute scaled error against the in-sample seasonal-naive forecast.

    ``MASE = mean(|y - yhat|) / scale`` with
    ``scale = mean_{t=m+1..n} |y_train[t] - y_train[t-m]|``, m = ``season``:
    the in-sample MAE of the one-step seasonal-naive forecast on the
    training series (Hyndman & Koehler 2006). MASE < 1: the forecast errs
    less, on average, than seasonal-naive did in-sample. Scaled per column,
    so columns in different units (CPU %, KB) weigh alike in the mean.

    Parameters
    ----------
    y_true, y_pred : numpy.ndarray, shape (..., C)
        Observations and forecasts (e.g. (N, H, C) windows), original units.
    y_train : numpy.ndarray, shape (n, C) or (n,)
        The training series of the same site in the same units; NaN (masked
        steps) are skipped when forming the differences. Shape (n,) gives one
        scale for all columns.
    season : int
        Seasonal period m in steps (288 = one day at 300 s; 1 gives the
        non-seasonal, last-value scaling).

    Raises
    ------
    ValueError
        If the training series has no valid pair ``m`` steps apart, or its
        scale is 0 (a training series that repeats exactly every m steps).
    """
    y_train = _f64(y_train)
    if season < 1 or len(y_train) <= season:
        raise ValueError(f"need 1 <= season < len(y_train), got season={season}, len={len(y_train)}")
    diffs = np.abs(y_train[season:] - y_train[:-season])
    if np.isnan(diffs).all(axis=0).any():
        raise ValueError(f"no pair of valid training steps {season} apart: cannot scale MASE")
    scale = np.nanmean(diffs, axis=0)
    if np.any(scale == 0):
        raise ValueError(f"training series repeats exactly every {season} steps (scale 0): MASE undefined")
    return float(np.mean(np.abs(_f64(y_true) - _f64(y_pred)) / scale))


def pinball(y_true: np.ndarray, y_quantiles: np.ndarray, levels: tuple[float, ...]) -> float:
    """Mean pinball (quantile) loss over all quantile levels.

    ``rho_tau(u) = u * (tau - 1[u < 0])`` with ``u = y - q_tau``: an
    under-forecast costs ``tau`` per unit, an over-forecast ``1 - tau``. At
    tau = 0.5 it is half the absolute error.

    Parameters
    ----------
    y_true : numpy.ndarray, shape (..., C)
        Observations.
    y_quantiles : numpy.ndarray, shape (..., C, Q)
        Quantile forecasts, one per level.
    levels : tuple of float
        The Q levels.
    """
    u = _f64(y_true)[..., None] - _f64(y_quantiles)
    tau = np.asarray(levels, dtype=np.float64)
    return float(np.mean(u * (tau - (u < 0))))


def coverage(y_true: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> float:
    """Fraction of observations inside ``[lower, upper]`` (bounds included)."""
    y = _f64(y_true)
    return float(np.mean((y >= _f64(lower)) & (y <= _f64(upper))))


POINT_METRICS = ("mae", "rmse", "smape", "mase")
HORIZON_METRICS = ("mae", "smape", "mase")  # also given per horizon step as <metric>_h<step>


def forecast_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    y_train: np.ndarray,
    season: int,
    y_quantiles: np.ndarray | None = None,
    levels: tuple[float, ...] = (),
) -> dict[str, float]:
    """MAE, RMSE, sMAPE (%) and MASE of one set of forecasts, overall and per step.

    Parameters
    ----------
    y_true, y_pred : numpy.ndarray, shape (N, H, C)
        Observations and forecasts, original units.
    y_train : numpy.ndarray, shape (n, C) or (n,)
        Training series for the MASE scale (see :func:`mase`).
    season : int
        Seasonal period for the MASE scale.
    y_quantiles : numpy.ndarray, shape (N, H, C, Q), optional
        Quantile forecasts at ``levels``, original units.
    levels : tuple of float
        Their levels (increasing).

    Returns
    -------
    dict
        ``"mae"``, ``"rmse"``, ``"smape"``, ``"mase"`` over all steps;
        ``"<metric>_h<h>"`` for each step h = 1..H and metric of
        :data:`HORIZON_METRICS`; with quantiles also ``"pinball"`` and
        ``"coverage<P>"``, P the nominal percentage of the outermost interval
        (80 for levels 0.1 and 0.9).
    """
    out = {
        "mae": mae(y_true, y_pred),
        "rmse": rmse(y_true, y_pred),
        "smape": smape(y_true, y_pred),
        "mase": mase(y_true, y_pred, y_train, season),
    }
    for h in range(np.shape(y_true)[1]):
        step_true, step_pred = y_true[:, h], y_pred[:, h]
        out[f"mae_h{h + 1}"] = mae(step_true, step_pred)
        out[f"smape_h{h + 1}"] = smape(step_true, step_pred)
        out[f"mase_h{h + 1}"] = mase(step_true, step_pred, y_train, season)
    if y_quantiles is not None and len(levels) >= 2:
        out["pinball"] = pinball(y_true, y_quantiles, levels)
        out[f"coverage{round(100 * (levels[-1] - levels[0]))}"] = coverage(
            y_true, y_quantiles[..., 0], y_quantiles[..., -1])
    return out


def _f64(x: np.ndarray) -> np.ndarray:
    """float64 copy-free view where possible: metrics accumulate in double."""
    return np.asarray(x, dtype=np.float64)


# ---------------------------------------------------------------- training


def train_forecaster(
    model: nn.Module,
    X: np.ndarray,
    Y: np.ndarray,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    val: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[float]:
    """Fit ``model`` with Adam on the mean squared error, in place.

    Parameters
    ----------
    model : torch.nn.Module
        Maps (batch, W, C) to (batch, H, C).
    X : numpy.ndarray, shape (N, W, C)
        Normalised training windows.
    Y : numpy.ndarray, shape (N, H, C)
        Normalised training targets.
    epochs : int
        Passes over the data.
    batch_size : int
        Windows per optimiser step.
    lr : float
        Adam learning rate.
    seed : int
        Seeds the per-epoch shuffles and dropout. PyTorch's global RNG is
        forked, so the caller's random state is left untouched.
    val : tuple of numpy.ndarray, optional
        ``(X_val, Y_val)``, normalised. If given, the weights of the epoch
        with the lowest validation loss are restored at the end (early-stopping
        style model selection on the validation split, never on the test).

    Returns
    -------
    list of float
        Mean training loss of each epoch (normalised units): the MSE, or the
        pinball loss for a quantile forecaster (``quantile_levels``).
    """
    x_t, y_t = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(Y, dtype=torch.float32)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    losses: list[float] = []
    best = (float("inf"), None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(epochs):
            losses.append(_one_epoch(model, optimiser, x_t, y_t, batch_size))
            if val is not None:
                val_loss = validation_loss(model, *val)
                if val_loss < best[0]:
                    best = (val_loss, copy.deepcopy(model.state_dict()))
    if best[1] is not None:
        model.load_state_dict(best[1])
    return losses


def _one_epoch(
    model: nn.Module, optimiser: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> float:
    """One shuffled pass; returns the sample-weighted mean batch loss."""
    model.train()
    order = torch.randperm(len(x))  # from the forked, seeded global RNG
    total = 0.0
    for start in range(0, len(x), batch_size):
        idx = order[start : start + batch_size]
        optimiser.zero_grad()
        loss = forecast_loss(model, x[idx], y[idx])
        loss.backward()
        optimiser.step()
        total += loss.item() * len(idx)
    return total / len(x)


def quantile_levels(model: nn.Module) -> tuple[float, ...]:
    """The model's quantile levels; () for a point forecaster."""
    return tuple(getattr(model, "quantile_levels", ()))


def pinball_loss(y: torch.Tensor, q: torch.Tensor, levels: tuple[float, ...]) -> torch.Tensor:
    """Mean pinball loss of quantiles ``q`` (..., Q) at ``levels`` for ``y`` (...)."""
    u = y.unsqueeze(-1) - q
    tau = torch.as_tensor(levels, dtype=q.dtype)
    return torch.mean(torch.maximum(tau * u, (tau - 1) * u))


def forecast_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training loss: pinball for a quantile forecaster, else the MSE."""
    levels = quantile_levels(model)
    if levels:
        return pinball_loss(y, model.forward_quantiles(x), levels)
    return nn.functional.mse_loss(model(x), y)


@torch.no_grad()
def validation_loss(model: nn.Module, X: np.ndarray, Y: np.ndarray) -> float:
    """:func:`forecast_loss` on windows, in eval mode."""
    model.eval()
    return float(forecast_loss(model, torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(Y, dtype=torch.float32)))


@torch.no_grad()
def predict_quantiles(model: nn.Module, X: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Quantile forecasts (N, H, C, Q) of a quantile forecaster, in eval mode."""
    model.eval()
    x = torch.as_tensor(X, dtype=torch.float32)
    return torch.cat([model.forward_quantiles(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()


@torch.no_grad()
def predict(model: nn.Module, X: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Forecasts for many windows, in eval mode (dropout off).

    Parameters
    ----------
    model : torch.nn.Module
        Maps (batch, W, C) to (batch, H, C).
    X : numpy.ndarray, shape (N, W, C)
        Windows in the model's (normalised) units.
    batch_size : int, default 1024
        Windows per forward pass (bounds memory only).

    Returns
    -------
    numpy.ndarray of float32, shape (N, H, C)
    """
    model.eval()
    x = torch.as_tensor(X, dtype=torch.float32)
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()


# -------------------------------------------------------------- evaluation


def evaluate_forecaster(
    model: nn.Module,
    X: np.ndarray,
    Y: np.ndarray,
    y_train: np.ndarray,
    season: int,
    normaliser: Normaliser | None = None,
) -> dict[str, float]:
    """Metrics of ``model`` on one site's windows, in original units.

    Parameters
    ----------
    model : torch.nn.Module
        Trained forecaster.
    X : numpy.ndarray, shape (N, W, C)
        Normalised input windows of one site.
    Y : numpy.ndarray, shape (N, H, C)
        Normalised targets of the same windows.
    y_train : numpy.ndarray, shape (n, C)
        That site's training series in original units (for the MASE scale).
    season : int
        Seasonal period of the MASE scale, in steps.
    normaliser : Normaliser, optional
        That site's statistics (``mean``/``std`` of shape (1, C)), used to
        map forecasts and targets back to original units; None if the
        windows are already in original units.

    Returns
    -------
    dict
        See :func:`forecast_metrics`: overall and per-step point metrics, and
        for a quantile forecaster the pinball loss and interval coverage.
    """
    levels = quantile_levels(model)
    if not levels:
        return _metrics_in_units(predict(model, X), Y, y_train, season, normaliser)
    q = predict_quantiles(model, X)
    if normaliser is not None:  # z-scoring is monotone: quantiles map one to one
        q = normaliser.inverse_transform(q.swapaxes(-1, -2)).swapaxes(-1, -2)
        Y = normaliser.inverse_transform(Y)
    return forecast_metrics(Y, q[..., levels.index(0.5)], y_train, season, q, levels)


def evaluate_baselines(
    X: np.ndarray,
    Y: np.ndarray,
    y_train: np.ndarray,
    season: int,
    normaliser: Normaliser | None = None,
) -> dict[str, dict[str, float]]:
    """Seasonal-naive and last-value metrics on the same windows as the model.

    Parameters
    ----------
    X : numpy.ndarray, shape (N, W, C)
        Input windows (normalised or not, see ``normaliser``); W >= ``season``.
    Y : numpy.ndarray, shape (N, H, C)
        Targets of the same windows.
    y_train : numpy.ndarray, shape (n, C)
        Training series in original units (for the MASE scale).
    season : int
        Period of both the seasonal-naive forecast and the MASE scale.
    normaliser : Normaliser, optional
        As in :func:`evaluate_forecaster`.

    Returns
    -------
    dict
        ``"seasonal_naive"`` and ``"last_value"``, each a metrics dict.
    """
    forecasts = baseline_forecasts(X, Y.shape[1], season)
    return {name: _metrics_in_units(pred, Y, y_train, season, normaliser) for name, pred in forecasts.items()}


def _metrics_in_units(
    y_pred: np.ndarray, y_true: np.ndarray, y_train: np.ndarray, season: int, normaliser: Normaliser | None
) -> dict[str, float]:
    """Undo the normalisation on both sides, then score."""
    if normaliser is not None:
        y_pred, y_true = normaliser.inverse_transform(y_pred), normaliser.inverse_transform(y_true)
    return forecast_metrics(y_true, y_pred, y_train, season)
