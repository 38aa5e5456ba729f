"""The serverless-invocation generator (Azure Functions style) and its task config."""

from __future__ import annotations

import numpy as np

from fl_datasets.forecast_data import ForecastSpec, build_forecast_data
from fl_datasets.synthetic import FUNCTIONS_STEP_S, synthetic_invocations
from fl_server.experiments.config import compose_config


def test_invocations_are_per_minute_counts_deterministic_per_seed():
    # Prepare / Execute
    a, b, c = (synthetic_invocations(5, 3 * 1440, seed=s) for s in (1, 1, 2))
    # Assert
    assert a.columns == ("invocations",) and a.step_s == FUNCTIONS_STEP_S == 60
    assert a.values.shape == (5, 3 * 1440, 1)
    np.testing.assert_array_equal(a.values, b.values)
    assert not np.array_equal(a.values, c.values)
    assert (a.values >= 0).all() and np.array_equal(a.values, np.round(a.values))  # counts
    # popularity spans well over an order of magnitude across apps
    means = a.values[..., 0].mean(axis=1)
    assert means.max() / means.min() > 3


def test_http_traffic_follows_the_day():
    # Prepare: many apps, two weeks; the mean over apps keeps the diurnal cycle
    traces = synthetic_invocations(40, 14 * 1440, seed=0)
    per_minute_of_day = traces.values[..., 0].reshape(40, 14, 1440).mean(axis=(0, 1))
    # Assert: the busiest hour of the day is clearly busier than the quietest
    hourly = per_minute_of_day.reshape(24, 60).mean(axis=1)
    assert hourly.max() > 1.2 * hourly.min()


def test_task_functions_forecasts_invocations_at_60_s():
    cfg = compose_config(["task=functions", "clients.num=3"])
    data = build_forecast_data(ForecastSpec.from_config(cfg))
    assert data.columns == ("invocations",) and data.step_s == 60
    assert [s.site for s in data.sites] == ["app0", "app1", "app2"]
    assert data.sites[0].test[1].shape[1:] == (60, 1)  # one hour ahead
