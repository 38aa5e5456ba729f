"""ASS weights and aggregation, hand-computed (paper 003 §4.2)."""

import numpy as np
import pytest

from strategies.ass import AccuracyStabilitySize, ass_weights, range_normalise
from tests.fake_grid import FakeGrid, arrays, train_reply

# Three toy clients, two classes:
#   A: acc [0.9, 0.7] -> sd 0.1, max 0.9, n 100
#   B: acc [0.8, 0.8] -> sd 0.0, max 0.8, n  50
#   C: acc [1.0, 0.4] -> sd 0.3, max 1.0, n 150
ACC = np.array([[0.9, 0.7], [0.8, 0.8], [1.0, 0.4]])
SIZES = np.array([100, 50, 150])


def test_range_normalise_with_and_without_floor():
    assert range_normalise(np.array([1.0, 2.0, 3.0])).tolist() == [0.0, 0.5, 1.0]
    np.testing.assert_allclose(range_normalise(np.array([1.0, 2.0, 3.0]), floor=0.1), [0.1, 0.55, 1.0])


def test_three_clients_hand_computed_with_floor():
    # W = 0.1 + 0.9 * [2/3, 1, 0] = [0.7, 1.0, 0.1]  (from -sd = [-0.1, 0, -0.3])
    # U = 0.1 + 0.9 * [0.5, 0, 1] = [0.55, 0.1, 1.0]
    # B = 0.1 + 0.9 * [0.5, 0, 1] = [0.55, 0.1, 1.0]
    # products [0.21175, 0.01, 0.1], sum 0.32175
    weights, factors = ass_weights(ACC, SIZES, 1, 1, 1, floor=0.1)
    np.testing.assert_allclose(factors["stability"], [0.7, 1.0, 0.1])
    np.testing.assert_allclose(factors["capability"], [0.55, 0.1, 1.0])
    np.testing.assert_allclose(weights, np.array([0.21175, 0.01, 0.1]) / 0.32175)


def test_exponents_switch_factors_on_and_off():
    # stability only, paper-literal normalisation: W = [2/3, 1, 0] -> / (5/3)
    weights, _ = ass_weights(ACC, SIZES, 1, 0, 0, floor=0.0)
    np.testing.assert_allclose(weights, [0.4, 0.6, 0.0])
    # all exponents 0: every client equal
    weights, _ = ass_weights(ACC, SIZES, 0, 0, 0, floor=0.0)
    np.testing.assert_allclose(weights, [1 / 3] * 3)
    # alpha 2 squares the stability factor: [4/9, 1, 0] / (13/9)
    weights, _ = ass_weights(ACC, SIZES, 2, 0, 0, floor=0.0)
    np.testing.assert_allclose(weights, [4 / 13, 9 / 13, 0.0])


def test_zero_range_and_ties_give_equal_weights():
    same = np.array([[0.5, 0.7], [0.5, 0.7], [0.5, 0.7]])
    weights, factors = ass_weights(same, np.array([10, 10, 10]), 1, 1, 1)
    np.testing.assert_allclose(weights, [1 / 3] * 3)
    assert factors["stability"].tolist() == [1.0, 1.0, 1.0]


def test_single_client_gets_all_the_weight():
    weights, _ = ass_weights(ACC[:1], SIZES[:1], 1, 1, 1)
    assert weights.tolist() == [1.0]


def test_all_zero_products_fall_back_to_sample_shares():
    # A most stable but smallest and weakest; B the opposite: W=[1,0], U=[0,1], B=[0,1]
    weights, _ = ass_weights(np.array([[0.8, 0.8], [1.0, 0.6]]), np.array([10, 20]), 1, 1, 1, floor=0.0)
    np.testing.assert_allclose(weights, [1 / 3, 2 / 3])


def _strategy(per_class_by_value, **kwargs):
    """A strategy whose 'public validation' reads accuracies off the model's first value
    (NaN scores for a value it does not know, e.g. a NaN model's)."""
    return AccuracyStabilitySize(
        evaluate_per_class=lambda record: per_class_by_value.get(float(record.to_numpy_ndarrays()[0][0]),
                                                                 np.full(2, np.nan)),
        min_available_nodes=1, min_train_nodes=1, **kwargs,
    )


def test_aggregate_is_the_v_weighted_model_average():
    # Prepare: models [1], [2], [3] with the toy accuracies; stability only, floor 0
    strategy = _strategy({1.0: ACC[0], 2.0: ACC[1], 3.0: ACC[2]}, alpha=1, beta=0, gamma=0, floor=0.0)
    replies = [train_reply(arrays([float(v)]), int(n), node_id=v, **{"partition-id": v - 1})
               for v, n in zip((1, 2, 3), SIZES)]
    # Execute
    new, metrics = strategy.aggregate_train(1, replies)
    # Assert: 0.4 * 1 + 0.6 * 2 + 0 * 3 = 1.6
    np.testing.assert_allclose(new.to_numpy_ndarrays()[0], [1.6])
    assert metrics["ass_weight_p0"] == pytest.approx(0.4)
    assert metrics["ass_weight_p1"] == pytest.approx(0.6)
    assert metrics["ass_rejected"] == 0


def test_nan_or_inf_models_are_rejected_not_averaged():
    strategy = _strategy({1.0: ACC[0], 2.0: ACC[1]}, alpha=1, beta=0, gamma=0, floor=0.0)
    replies = [train_reply(arrays([1.0]), 100, node_id=1), train_reply(arrays([2.0]), 50, node_id=2),
               train_reply(arrays([np.nan]), 10, node_id=3), train_reply(arrays([np.inf]), 10, node_id=4)]
    new, metrics = strategy.aggregate_train(1, replies)
    # A and B only: sd [0.1, 0.0] -> W = [0, 1] -> all weight on B
    np.testing.assert_allclose(new.to_numpy_ndarrays()[0], [2.0])
    assert metrics["ass_rejected"] == 2


def test_a_broken_model_is_rejected_even_where_it_scores_finite_or_gets_zero_weight():
    # Prepare: the NaN model scores finite (as a real network's argmax does) and is the least
    # stable of three, so with floor 0 the optimistic weighted sum would give it weight 0
    scores = {1.0: ACC[0], 2.0: ACC[1], 3.0: np.array([0.0, 1.0])}
    strategy = _strategy(scores, alpha=1, beta=0, gamma=0, floor=0.0)
    replies = [train_reply(arrays([1.0], [0.0]), 100, node_id=1), train_reply(arrays([2.0], [0.0]), 50, node_id=2),
               train_reply(arrays([3.0], [np.nan]), 10, node_id=3)]
    # Execute
    new, metrics = strategy.aggregate_train(1, replies)
    # Assert: as if it had never come (A and B only: all weight on the stable B)
    np.testing.assert_allclose(new.to_numpy_ndarrays()[0], [2.0])
    assert metrics["ass_rejected"] == 1


def test_only_broken_models_aggregate_to_nothing():
    strategy = _strategy({}, floor=0.0)
    new, metrics = strategy.aggregate_train(1, [train_reply(arrays([np.nan]), 10)])
    assert new is None and metrics["ass_rejected"] == 1


@pytest.mark.parametrize("bad", [dict(alpha=-1), dict(beta=-0.5), dict(gamma=-2), dict(floor=1.0), dict(floor=-0.1)])
def test_bad_parameters_are_refused(bad):
    with pytest.raises(ValueError, match="must"):
        AccuracyStabilitySize(evaluate_per_class=lambda r: None, **bad)


def test_configure_train_is_fedavg_sampling():
    strategy = _strategy({}, fraction_train=0.5)
    sent = list(strategy.configure_train(1, arrays([0.0]), __import__("flwr").app.ConfigRecord({}), FakeGrid(range(4))))
    assert len(sent) == 2
