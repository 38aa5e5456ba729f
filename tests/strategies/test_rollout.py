"""The rollout guard: a planted regression is rolled back (or mixed), a good model adopted."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg, FedAvgM

from strategies.rollout import RolloutGuard, mix
from tests.fake_grid import FakeGrid, arrays, train_reply


def score(record: ArrayRecord) -> float:
    """Validation replay stand-in: the closer the model is to 1, the better (higher is better)."""
    return -float(np.abs(record.to_numpy_ndarrays()[0] - 1.0).mean())


def round_with(guard: RolloutGuard, server_round: int, start: ArrayRecord, *client_values: float):
    grid = FakeGrid(range(len(client_values)))
    sent = list(guard.configure_train(server_round, start, ConfigRecord(), grid))
    replies = [train_reply(arrays([v]), 1, node_id=m.metadata.dst_node_id) for m, v in zip(sent, client_values)]
    new, metrics = guard.aggregate_train(server_round, replies)
    return new, dict(metrics)


def fedavg():
    return FedAvg(min_available_nodes=1, min_train_nodes=1)


def test_an_improvement_is_adopted_and_becomes_stable():
    guard = RolloutGuard(fedavg(), score, threshold=0.01)
    new, metrics = round_with(guard, 1, arrays([0.0]), 0.8, 1.0)  # mean 0.9: score -0.1 > -1.0
    np.testing.assert_allclose(new.to_numpy_ndarrays()[0], [0.9])
    assert metrics["rollout_rejected"] == 0 and metrics["rollout_mixed"] == 0
    assert metrics["rollout_score"] == pytest.approx(-0.1) and metrics["rollout_stable_score"] == pytest.approx(-1.0)
    assert guard.stable is new


def test_a_planted_regression_is_rolled_back():
    # Prepare: round 1 brings the model to 0.9; round 2's clients are poisoned (mean -4.1)
    guard = RolloutGuard(fedavg(), score, threshold=0.05, relative=False)
    good, _ = round_with(guard, 1, arrays([0.0]), 0.8, 1.0)
    # Execute
    adopted, metrics = round_with(guard, 2, good, 0.9, -9.1)
    # Assert: the stable round-1 model is kept, counted and logged
    assert adopted is good
    assert metrics["rollout_rejected"] == 1 and metrics["rollout_rejected_total"] == 1
    assert metrics["rollout_score"] == pytest.approx(-5.1)
    assert metrics["rollout_adopted_score"] == pytest.approx(-0.1)


def test_a_regression_within_the_threshold_passes():
    guard = RolloutGuard(fedavg(), score, threshold=0.5, relative=True)  # tolerate 50 % of |stable|
    good, _ = round_with(guard, 1, arrays([0.0]), 0.8, 1.0)  # stable score -0.1
    adopted, metrics = round_with(guard, 2, good, 0.86, 0.86)  # -0.14: 0.04 below, limit 0.05
    assert metrics["rollout_rejected"] == 0
    np.testing.assert_allclose(adopted.to_numpy_ndarrays()[0], [0.86])


def test_mix_mode_mixes_in_the_stable_model():
    guard = RolloutGuard(fedavg(), score, threshold=0.05, relative=False, mode="mix", mix_fraction=0.75)
    good, _ = round_with(guard, 1, arrays([0.0]), 0.8, 1.0)  # 0.9
    adopted, metrics = round_with(guard, 2, good, -3.1, -3.1)  # candidate -3.1
    # 0.25 * -3.1 + 0.75 * 0.9 = -0.1
    np.testing.assert_allclose(adopted.to_numpy_ndarrays()[0], [-0.1])
    assert metrics["rollout_mixed"] == 1 and metrics["rollout_rejected"] == 0
    assert metrics["rollout_adopted_score"] == pytest.approx(-1.1)
    assert guard.stable is good  # the mix regressed too: the stable model stays


def test_a_rollback_resets_the_wrapped_strategys_model_and_momentum():
    inner = FedAvgM(server_momentum=0.9, min_available_nodes=1, min_train_nodes=1)
    guard = RolloutGuard(inner, score, threshold=0.0, relative=False)
    good, _ = round_with(guard, 1, arrays([0.0]), 1.0, 1.0)
    round_with(guard, 2, good, -5.0, -5.0)
    assert inner.current_arrays is good and inner.momentum_vector is None


def test_mix_is_per_float_tensor():
    out = mix(arrays([2.0, 4.0]), arrays([0.0, 0.0]), 0.25)
    np.testing.assert_allclose(out.to_numpy_ndarrays()[0], [1.5, 3.0])


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(mode="undo"), r"rollout mode 'undo' is unknown: use rollback or mix"),
    (dict(threshold=-1), r"rollout threshold=-1 must be >= 0"),
    (dict(mix_fraction=1.0), r"rollout mix_fraction=1.0 must lie in \(0, 1\)"),
])
def test_bad_guard_settings_are_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RolloutGuard(fedavg(), score, **kwargs)


def test_a_rollback_reaches_the_global_tier_of_a_hierarchy():
    from strategies.hierarchical import HierarchicalStrategy, Link, Network, TierRule

    net = Network(cluster_of={0: "a", 1: "b"}, region_of={"a": "x", "b": "x"}, lan=Link(1000, 1),
                  regional=Link(1000, 1), backhaul=Link(100, 1))
    top = FedAvgM(server_momentum=0.9, min_available_nodes=1, min_train_nodes=1)
    guard = RolloutGuard(HierarchicalStrategy(net, {"cluster": TierRule(fedavg)}, top), score, threshold=0.0,
                         relative=False)
    good, _ = round_with(guard, 1, arrays([0.0]), 1.0, 1.0)
    adopted, metrics = round_with(guard, 2, good, -5.0, -5.0)
    assert metrics["rollout_rejected"] == 1 and adopted is good
    assert top.current_arrays is good and top.momentum_vector is None
