"""Baselines: FFD packing by hand, and both controllers beat doing nothing."""

import numpy as np
import pytest

from edgesim import EdgeCloudTwin
from edgesim.baselines import (
    ForecastMPC,
    HoldPolicy,
    ThresholdAutoscaler,
    first_fit_decreasing,
    oracle_fn,
    run_episode,
    seasonal_naive_fn,
)

from .helpers import synthetic


def test_first_fit_decreasing_by_hand():
    # items 8, 5, 3 (nodes 2, 0, 1) into rooms 10, 4, 2 of one cluster:
    # 8 does not fit at home (2), goes to node 0 (room 10 -> 2);
    # 5 fits nowhere: keeps 2 at home (node 0), sends 3 to the cloud;
    # 3 fits at home (node 1, room 4 -> 1).
    placement, load = first_fit_decreasing(
        demand=np.array([5.0, 3.0, 8.0]),
        capacity=np.array([10.0, 4.0, 2.0]),
        cluster=np.zeros(3, dtype=int),
        alive=np.ones(3, dtype=bool),
        cloud_up=np.ones(3, dtype=bool),
    )
    np.testing.assert_allclose(placement, [[0.4, 0.0, 0.6], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    np.testing.assert_allclose(load, [10.0, 3.0, 0.0])


@pytest.fixture(scope="module")
def results():
    scenario = synthetic(episode_s=600, faults=[{"type": "cloud_outage", "start_s": 200, "duration_s": 200}])
    twin = EdgeCloudTwin(scenario)
    policies = {
        "hold": HoldPolicy(),
        "threshold": ThresholdAutoscaler(),
        "mpc-oracle": ForecastMPC(oracle_fn(twin, 3)),
        "mpc-seasonal": ForecastMPC(seasonal_naive_fn(3)),
    }
    return {name: run_episode(twin, policy, seed=1) for name, policy in policies.items()}


def test_controllers_beat_doing_nothing(results):
    hold = results["hold"]["slo_violation_rate"]
    for name in ("threshold", "mpc-oracle", "mpc-seasonal"):
        m = results[name]
        assert m["slo_violation_rate"] < 0.2 * hold, name
        assert m["fulfillment_rate"] > 0.95, name
        assert m["shield_capacity"] == 0 and m["shield_bounds"] == 0, name  # they respect the limits


def test_controllers_emit_env_actions():
    scenario = synthetic(episode_s=300, faults=[])
    twin = EdgeCloudTwin(scenario, seed=0)
    for policy in (ThresholdAutoscaler(), ForecastMPC(oracle_fn(twin, 2), horizon=2)):
        policy.reset(twin)
        rows = policy.act(twin)
        assert rows.shape == (12, 6) and (np.abs(rows) <= 1).all()


def test_bad_forecaster_shape_is_reported():
    scenario = synthetic(episode_s=300, faults=[])
    twin = EdgeCloudTwin(scenario, seed=0)
    policy = ForecastMPC(lambda history: np.zeros((3, 1)))
    policy.reset(twin)
    with pytest.raises(ValueError, match="forecast_fn returned shape"):
        policy.act(twin)


def test_baseline_script_prints_the_table(capsys):
    from edgesim.faults import rescale_faults
    from scripts.twin_baselines import main

    main(["--scenario", "synthetic", "--episode-s", "300", "--seeds", "0", "1", "--forecaster", "oracle", "--no-mlflow"])
    out = capsys.readouterr().out
    assert "| Heuristic (HPA + FFD binpack) |" in out and "| Forecast-only MPC (oracle) |" in out
    assert "p95 (ms)" in out and "Fairness var." in out and " ± " in out
    faults = rescale_faults([{"type": "node_failure", "fraction": 0.1, "at_step": 1200},
                              {"type": "cloud_outage", "start_s": 1800, "duration_s": 1800}], 0.5)
    assert faults[0]["at_step"] == 600 and faults[1]["start_s"] == 900 and faults[1]["duration_s"] == 900
