"""A trained (federated) forecaster from MLflow, as a twin ``forecast_fn``.

The forecasting runs (``task=bitbrains`` / ``task=workload``) log the final
global model as ``model/final_state_dict.pt`` with the whole config as
params. This module rebuilds that model and wraps it as the callable the
digital twin's MPC baseline and RL observations take:
``forecast_fn(history (N, L, 1)) -> (N, H)`` in the units of ``history``.

Units: the model was trained on per-site z-scored CPU %; the twin's demand is
a per-node request rate proportional to a VM's CPU %. Each node's history is
z-scored with its own statistics (over the whole history the twin exposes,
as the training series was over its training slice), forecast, and mapped
back, so the model only needs the shape of the series, not its scale.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tasks.forecast.models import anchor_level_steps, build_forecaster
from tasks.forecast.training import predict

ForecastFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class TrainedForecaster:
    """A forecaster and the window / horizon it was trained with."""

    model: torch.nn.Module
    window: int
    horizon: int
    run_id: str = ""
    kind: str = "tcn"
    level_steps: int | None = None
    quantiles: tuple[float, ...] = ()

    def to_bytes(self) -> bytes:
        """The model and what rebuilds it, for a Flower ConfigRecord (RL clients get it that way)."""
        buffer = io.BytesIO()
        torch.save({"kind": self.kind, "window": self.window, "horizon": self.horizon, "run_id": self.run_id,
                    "level_steps": self.level_steps, "quantiles": list(self.quantiles),
                    "state": self.model.state_dict()}, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> "TrainedForecaster":
        """Inverse of :meth:`to_bytes`."""
        raw = torch.load(io.BytesIO(blob), weights_only=True)
        quantiles = tuple(raw.get("quantiles", ()))
        model = build_forecaster(raw["kind"], in_channels=1, horizon=raw["horizon"], level_steps=raw["level_steps"],
                                 quantiles=quantiles)
        model.load_state_dict(raw["state"])
        return cls(model=model.eval(), window=raw["window"], horizon=raw["horizon"], run_id=raw["run_id"],
                   kind=raw["kind"], level_steps=raw["level_steps"], quantiles=quantiles)

    def forecast_fn(self, horizon: int | None = None) -> ForecastFn:
        """``history (N, L, 1) -> (N, horizon)``; ``horizon`` <= the trained H."""
        horizon = self.horizon if horizon is None else horizon
        if not 1 <= horizon <= self.horizon:
            raise ValueError(f"horizon={horizon}: this forecaster predicts 1..{self.horizon} steps")

        def forecast(history: np.ndarray) -> np.ndarray:
            window = _last_window(np.asarray(history, dtype=np.float64), self.window)
            mean = window.mean(axis=1, keepdims=True)
            std = np.where((s := window.std(axis=1, keepdims=True)) > 0, s, 1.0)
            z = ((window - mean) / std).astype(np.float32)
            return (predict(self.model, z)[:, :horizon, 0] * std[:, :, 0] + mean[:, :, 0]).clip(min=0.0)

        return forecast


def _last_window(history: np.ndarray, window: int) -> np.ndarray:
    """The last ``window`` steps of each node, (N, W, 1); a shorter history is
    padded at the front with its first value (the twin starts with a day of
    envelope history, so this only happens in tiny scenarios)."""
    if history.ndim != 3 or history.shape[-1] != 1:
        raise ValueError(f"history must be (N, L, 1), got {history.shape}")
    if history.shape[1] >= window:
        return history[:, -window:]
    pad = np.repeat(history[:, :1], window - history.shape[1], axis=1)
    return np.concatenate([pad, history], axis=1)


def load_from_mlflow(run_id: str, tracking_uri: str) -> TrainedForecaster:
    """Rebuild a forecasting run's final global model.

    Raises
    ------
    ValueError
        The run is not a finished single-column forecasting run with a logged model.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception as err:  # noqa: BLE001 - MLflow raises several types for "no such run"
        raise ValueError(f"forecaster federated:{run_id}: no such MLflow run at {tracking_uri} ({err})") from None
    params = run.data.params
    if params.get("task.kind") != "forecast":
        raise ValueError(f"MLflow run {run_id} is not a forecasting run (task.kind={params.get('task.kind')}): "
                         "train one with `make run ARGS=task=bitbrains`")
    columns = json.loads(params["task.columns"].replace("'", '"'))
    if len(columns) != 1:
        raise ValueError(f"MLflow run {run_id} forecasts {columns}; the twin's demand is one series: "
                         "use a run with task.columns=[cpu_usage_pct]")
    window, horizon = int(params["task.window"]), int(params["task.horizon"])
    if "task.anchor" in params:
        level_steps = anchor_level_steps(params["task.anchor"], window)
        quantiles = tuple(float(q) for q in json.loads(params["task.quantiles"]))
    else:  # runs from before task.anchor: a window-mean level or none, point forecasts
        level_steps, quantiles = (window if params.get("task.level_centred") == "True" else None), ()
    if params.get("task.personal_head") == "True":
        raise ValueError(f"MLflow run {run_id} kept personal heads on its sites (task.personal_head=true): its "
                         "global model has no trained head; use a run without personal heads")
    model = build_forecaster(params["task.model"], in_channels=1, horizon=horizon, level_steps=level_steps,
                             quantiles=quantiles)
    path = Path(client.download_artifacts(run_id, "model/final_state_dict.pt"))
    model.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    return TrainedForecaster(model=model, window=window, horizon=horizon, run_id=run_id,
                             kind=params["task.model"], level_steps=level_steps, quantiles=quantiles)
