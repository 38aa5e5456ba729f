"""Residual-on-persistence and quantile forecasters, per-horizon and
probabilistic metrics, the baselines from each origin's whole past, the tuned
ETS baseline, and FedPer-style personal heads that never leave the client."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from flwr.app import MessageType

from fl_datasets.naive_forecasts import forecasts_from_origins, last_value_forecast
from fl_server.experiments.config import ConfigError, compose_config
from fl_server.experiments.experiment import run_experiment
from tasks.forecast.classical import ets_forecast, fit_ets
from tasks.forecast.models import build_forecaster, is_head_key
from tasks.forecast.task import PERSONAL_KEY
from tasks.forecast.training import (
    coverage,
    evaluate_forecaster,
    forecast_metrics,
    pinball,
    pinball_loss,
    train_forecaster,
)
from tests.conftest import persistent_clients
from tests.tasks.forecast.test_forecast_fl import SMALL

# ------------------------------------------------------------------ models


@pytest.mark.parametrize("name", ["tcn", "lstm"])
@pytest.mark.parametrize("quantiles", [(), (0.1, 0.5, 0.9)])
def test_residual_on_persistence_with_zero_weights_is_exactly_the_last_value(name, quantiles):
    # Prepare: anchor = last value (level_steps=1), every weight 0
    model = build_forecaster(name, in_channels=2, horizon=12, seed=0, level_steps=1, quantiles=quantiles)
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    x = torch.randn(5, 40, 2)
    # Execute
    out = model(x)
    # Assert: bit for bit the last-value forecast (and every quantile equals it)
    assert torch.equal(out, torch.as_tensor(last_value_forecast(x.numpy(), 12)))
    if quantiles:
        assert torch.equal(model.forward_quantiles(x), out.unsqueeze(-1).expand(-1, -1, -1, 3))


def test_a_zero_head_starts_training_from_persistence():
    # Prepare / Execute: random trunk, zeroed output layer
    model = build_forecaster("tcn", 1, 6, seed=3, level_steps=1, quantiles=(0.1, 0.5, 0.9), zero_head=True)
    x = torch.randn(4, 30, 1)
    # Assert
    assert torch.equal(model(x), torch.as_tensor(last_value_forecast(x.numpy(), 6)))
    assert any(p.abs().sum() > 0 for k, p in model.named_parameters() if not is_head_key(k))


def test_quantiles_never_cross_and_the_point_forecast_is_the_median():
    model = build_forecaster("tcn", 1, 4, seed=0, quantiles=(0.1, 0.5, 0.9)).eval()  # eval: no dropout
    x = torch.randn(8, 30, 1)
    q = model.forward_quantiles(x)
    assert q.shape == (8, 4, 1, 3)
    assert (q[..., 1:] >= q[..., :-1]).all()
    assert torch.equal(model(x), q[..., 1])


@pytest.mark.parametrize("levels", [(0.1, 0.9), (0.5, 0.3), (0.0, 0.5)])
def test_bad_quantile_levels_are_refused(levels):
    with pytest.raises(ValueError, match="strictly increasing levels in \\(0, 1\\) including 0.5"):
        build_forecaster("tcn", 1, 4, quantiles=levels)


def test_quantile_forecaster_trains_on_the_pinball_loss_and_reports_coverage():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 30, 1)).astype(np.float32)
    Y = (X[:, -1:] + rng.normal(size=(64, 3, 1))).astype(np.float32)
    model = build_forecaster("tcn", 1, 3, seed=0, channels=8, levels=2, level_steps=1, quantiles=(0.1, 0.5, 0.9))
    losses = train_forecaster(model, X, Y, epochs=3, batch_size=16, lr=1e-2, seed=0)
    scores = evaluate_forecaster(model, X, Y, X[:, :, 0].reshape(-1, 1), season=1)
    assert losses[-1] < losses[0]
    assert {"pinball", "coverage80", "mase_h1", "mase_h3"} <= set(scores)
    assert 0.0 <= scores["coverage80"] <= 1.0


# ----------------------------------------------------------------- metrics


def test_pinball_loss_and_interval_coverage_hand_computed():
    # Prepare: levels 0.1 / 0.5 / 0.9; y = 1 with quantiles (0, 1, 2), y = 3 with (2, 2, 2)
    levels = (0.1, 0.5, 0.9)
    y = np.array([[[1.0]], [[3.0]]])  # (N=2, H=1, C=1)
    q = np.array([[[[0.0, 1.0, 2.0]]], [[[2.0, 2.0, 2.0]]]])  # (2, 1, 1, 3)
    # y=1: u = 1, 0, -1 -> 0.1*1, 0, (0.9-1)*(-1) = 0.1, 0, 0.1
    # y=3: u = 1, 1, 1  -> 0.1, 0.5, 0.9; mean of the six = 1.7 / 6
    # Execute / Assert
    assert pinball(y, q, levels) == pytest.approx(1.7 / 6)
    torch_loss = pinball_loss(torch.as_tensor(y), torch.as_tensor(q), levels)
    assert float(torch_loss) == pytest.approx(1.7 / 6)
    # y=1 inside [0, 2]; y=3 outside [2, 2]
    assert coverage(y, q[..., 0], q[..., -1]) == 0.5
    metrics = forecast_metrics(y, q[..., 1], np.array([0.0, 1.0, 3.0]), 1, q, levels)
    assert metrics["coverage80"] == 0.5 and metrics["pinball"] == pytest.approx(1.7 / 6)


def test_per_horizon_metrics_hand_computed():
    # Prepare: 2 windows, H = 2; errors at step 1: 1 and 3, at step 2: 2 and 2
    y = np.array([[[10.0], [10.0]], [[10.0], [10.0]]])
    yhat = np.array([[[11.0], [12.0]], [[7.0], [8.0]]])
    y_train = np.array([0.0, 2.0, 4.0])  # one-step scale: mean |diff| = 2
    # Execute
    m = forecast_metrics(y, yhat, y_train, 1)
    # Assert
    assert (m["mae_h1"], m["mae_h2"], m["mae"]) == (2.0, 2.0, 2.0)
    assert (m["mase_h1"], m["mase_h2"]) == (1.0, 1.0)
    assert m["smape_h1"] == pytest.approx(100 * np.mean([2 / 21, 6 / 17]))


# --------------------------------------------------------------- baselines


def test_baselines_from_each_origins_whole_past_hand_computed():
    # Prepare: y[t] = t on 20 steps, NaN at step 3; origins 10 and 12; H = 2
    series = np.arange(20, dtype=np.float64)[:, None]
    series[3] = np.nan
    # Execute: a 4-step season, a 9-step "week" and a 3-step moving average
    out = forecasts_from_origins(series, np.array([10, 12]), 2, {"s4": 4, "s9": 9}, 3)
    # Assert
    np.testing.assert_array_equal(out["last_value"][:, :, 0], [[10, 10], [12, 12]])
    np.testing.assert_array_equal(out["s4"][:, :, 0], [[7, 8], [9, 10]])  # y[t + h - 4]
    # origin 10: y[2], y[3]=NaN -> last value 10; origin 12: y[4], y[5]
    np.testing.assert_array_equal(out["s9"][:, :, 0], [[2, 10], [4, 5]])
    np.testing.assert_array_equal(out["moving_average"][:, :, 0], [[9, 9], [11, 11]])
    # a season reaching before the series falls back to the last value
    early = forecasts_from_origins(series, np.array([1]), 1, {"s9": 9}, 3)
    assert early["s9"][0, 0, 0] == 1 and early["moving_average"][0, 0, 0] == 0.5


@pytest.mark.parametrize("trend, seasonal", [(None, None), ("add", None), (None, "add")])
def test_ets_rolling_forecasts_reproduce_statsmodels(trend, seasonal):
    # Prepare
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    rng = np.random.default_rng(0)
    t = np.arange(400)
    y = 10 + 3 * np.sin(2 * np.pi * t / 24) + 0.01 * t + rng.normal(0, 0.5, len(t))
    fit = fit_ets(y, "candidate", trend, seasonal, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ExponentialSmoothing(y, trend=trend, damped_trend=trend is not None, seasonal=seasonal,
                                   seasonal_periods=24 if seasonal else None,
                                   initialization_method="heuristic" if seasonal else "estimated").fit()
    # Execute: one step ahead from every origin, and 12 steps from the last
    one_step = ets_forecast(fit, y, np.arange(len(y) - 1), 1)[:, 0]
    from_end = ets_forecast(fit, y, np.array([len(y) - 1]), 12)[0]
    # Assert: statsmodels' in-sample one-step predictions and its forecast
    np.testing.assert_allclose(one_step, res.fittedvalues[1:], atol=1e-9)
    np.testing.assert_allclose(from_end, res.forecast(12), atol=1e-9)


def test_forecast_config_errors_name_the_value_and_the_fix():
    with pytest.raises(ConfigError, match=r"task.anchor=median is unknown: choose one of last_value, window_mean"):
        compose_config([*SMALL, "task.anchor=median"])
    with pytest.raises(ConfigError, match=r"task.quantiles=\[0.1, 0.9\]: .*including 0.5"):
        compose_config([*SMALL, "task.quantiles=[0.1,0.9]"])
    with pytest.raises(ConfigError, match=r"task.personal_head=True .* set clients.fraction_evaluate=1.0"):
        compose_config([*SMALL, "task.personal_head=true"])


# ---------------------------------------------------------- personal heads


def test_personal_heads_never_leave_the_client(tracking_uri):
    # Prepare: FedPer, 2 rounds, 4 sites, replies recorded as they leave the clients
    cfg = compose_config([*SMALL, "task.personal_head=true", "clients.fraction_evaluate=1.0"])
    grid, contexts = persistent_clients(4)
    replies = []
    answer = grid.reply_fn

    def recording(message):
        reply = answer(message)
        if message.metadata.message_type == MessageType.TRAIN:
            replies.append((message, reply))
        return reply

    grid.reply_fn = recording
    # Execute
    final = run_experiment(grid, cfg, tracking_uri)
    # Assert: every uplink's head is the head it received, bit for bit ...
    assert len(replies) == 8
    for sent, reply in replies:
        got, received = reply.content["arrays"], sent.content["arrays"]
        heads = [k for k in got if is_head_key(k)]
        assert heads and all(np.array_equal(got[k].numpy(), received[k].numpy()) for k in heads)
        assert any(not np.array_equal(got[k].numpy(), received[k].numpy()) for k in got if not is_head_key(k))
    # ... while each site's own trained head stays in its context.state, and differs from it
    last_sent = {m.metadata.dst_node_id: m for m, _ in replies[-4:]}
    for node, context in contexts.items():
        personal = context.state[PERSONAL_KEY]
        assert set(personal) == {k for k in last_sent[node].content["arrays"] if is_head_key(k)}
        assert all(not np.array_equal(personal[k].numpy(), last_sent[node].content["arrays"][k].numpy())
                   for k in personal)
    # the sites scored what they deploy; the run reports that, per horizon too
    assert np.isfinite(final["fed_test_mase"]) and final["test_mase"] == final["fed_test_mase"]


def test_cpu_and_memory_together_score_every_baseline_and_the_quantile_model():
    # Prepare: both targets of the synthetic sites
    from fl_datasets.forecast_data import build_forecast_data
    from tasks.forecast.server import BASELINES, score_baselines, score_sites
    from tests.tasks.forecast.test_forecast_fl import small_spec

    spec = small_spec(columns=("cpu_usage_pct", "mem_usage_kb"), num_clients=2)
    data = build_forecast_data(spec)
    model = build_forecaster("tcn", 2, spec.horizon, seed=0, level_steps=1, quantiles=(0.1, 0.5, 0.9), zero_head=True)
    # Execute
    baselines = score_baselines(data, spec)
    scores = score_sites(model, data, spec.season, "test")
    # Assert: every baseline on every site; the zero-head model is persistence, up to float32 rounding
    assert set(baselines) == set(BASELINES) and all(len(v) == 2 for v in baselines.values())
    for site in data.site_ids():
        assert scores[site]["mase_h6"] == pytest.approx(baselines["last_value"][site]["mase_h6"], rel=1e-5)
        assert {"pinball", "coverage80"} <= set(baselines["last_value"][site])
