"""A trained forecaster from MLflow as the twin's ``forecast_fn``."""

from __future__ import annotations

import numpy as np
import pytest

from fl_server.experiments.config import compose_config, flatten
from fl_server.experiments.tracking import RunTracker
from tasks.forecast.models import build_forecaster, forecaster_from_settings
from tasks.forecast.server import forecaster_settings
from tasks.forecast.trained import TrainedForecaster, load_from_mlflow
from tasks.forecast.training import predict


def logged_forecasting_run(uri: str, *overrides: str) -> tuple[str, object]:
    # zero_head=false: a random head, so the forecasts are not just the last value
    cfg = compose_config(["task=workload", "task.window=48", "task.horizon=6", "task.season=48",
                          "task.zero_head=false", *overrides])
    model = forecaster_from_settings(forecaster_settings(cfg), 1, 6, seed=0)
    tracker = RunTracker(uri, experiment="t", run_name="forecast")
    tracker.log_params(flatten(cfg))
    tracker.log_torch_state(model.state_dict(), "model/final_state_dict.pt")
    tracker.finish()
    return tracker.run_id, model


def test_forecast_fn_rescales_each_node_and_matches_the_model(tracking_uri):
    # Prepare: two nodes with the same shape at different scales
    run_id, model = logged_forecasting_run(tracking_uri)
    shape = np.sin(np.arange(60) / 48 * 2 * np.pi) + 2.0
    history = np.stack([10 * shape, 1000 * shape])[:, :, None]
    # Execute
    forecast = load_from_mlflow(run_id, tracking_uri).forecast_fn(3)(history)
    # Assert: z-scored last window -> model -> back to each node's units
    window = history[:, -48:]
    mean, std = window.mean(axis=1, keepdims=True), window.std(axis=1, keepdims=True)
    expected = predict(model, ((window - mean) / std).astype(np.float32))[:, :3, 0] * std[:, :, 0] + mean[:, :, 0]
    assert forecast.shape == (2, 3)
    np.testing.assert_allclose(forecast, np.clip(expected, 0, None), rtol=1e-5)
    np.testing.assert_allclose(forecast[1], 100 * forecast[0], rtol=1e-4)  # scale-free


def test_not_a_forecasting_run_is_refused(tracking_uri):
    tracker = RunTracker(tracking_uri, experiment="t", run_name="image")
    tracker.log_params(flatten(compose_config([])))
    tracker.finish()
    with pytest.raises(ValueError, match=r"is not a forecasting run \(task.kind=image\)"):
        load_from_mlflow(tracker.run_id, tracking_uri)


def test_a_longer_horizon_than_trained_is_refused(tracking_uri):
    run_id, _ = logged_forecasting_run(tracking_uri)
    with pytest.raises(ValueError, match=r"horizon=7: this forecaster predicts 1..6 steps"):
        load_from_mlflow(run_id, tracking_uri).forecast_fn(7)


def test_bytes_round_trip_gives_the_same_forecasts(tracking_uri):
    # Prepare
    run_id, _ = logged_forecasting_run(tracking_uri)
    loaded = load_from_mlflow(run_id, tracking_uri)
    history = np.abs(np.random.default_rng(0).normal(50, 10, size=(3, 80, 1)))
    # Execute
    shipped = TrainedForecaster.from_bytes(loaded.to_bytes())
    # Assert
    assert (shipped.window, shipped.horizon, shipped.run_id, shipped.kind) == (48, 6, run_id, "tcn")
    np.testing.assert_array_equal(shipped.forecast_fn(6)(history), loaded.forecast_fn(6)(history))


def test_a_run_from_before_task_anchor_loads_as_window_mean_point_forecaster(tracking_uri):
    # Prepare: the params of an older run (task.level_centred, no anchor / quantiles)
    cfg = compose_config(["task=workload", "task.window=48", "task.horizon=6", "task.season=48"])
    params = {k: v for k, v in flatten(cfg).items() if k not in ("task.anchor", "task.quantiles", "task.zero_head",
                                                                  "task.personal_head", "task.finetune_epochs")}
    model = build_forecaster("tcn", 1, 6, seed=0, level_steps=48)
    tracker = RunTracker(tracking_uri, experiment="t", run_name="old")
    tracker.log_params({**params, "task.level_centred": True})
    tracker.log_torch_state(model.state_dict(), "model/final_state_dict.pt")
    tracker.finish()
    # Execute
    loaded = load_from_mlflow(tracker.run_id, tracking_uri)
    # Assert
    assert (loaded.level_steps, loaded.quantiles) == (48, ())
    x = np.random.default_rng(0).normal(size=(2, 48, 1)).astype(np.float32)
    np.testing.assert_array_equal(predict(loaded.model, x), predict(model, x))
