"""Flower's robust aggregators built from config, on hand-made arrays:
one poisoned update among honest ones."""

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum, MultiKrum

from fl_server.experiments.config import ConfigError, compose_config
from strategies import build_strategy
from tests.fake_grid import FakeGrid, arrays, train_reply


def _aggregate(strategy, values: list[list[float]]):
    """One round on a grid of len(values) nodes; each reply has 1 example."""
    grid = FakeGrid(range(1, len(values) + 1))
    sent = list(strategy.configure_train(1, arrays([0.0] * len(values[0])), ConfigRecord({}), grid))
    assert len(sent) == len(values)
    replies = [train_reply(arrays(v), 1, node_id=i + 1) for i, v in enumerate(values)]
    new_arrays, _ = strategy.aggregate_train(1, replies)
    return new_arrays.to_numpy_ndarrays()[0]


def test_fedmedian_takes_the_coordinate_wise_median():
    strategy = build_strategy(compose_config(["strategy=fedmedian", "clients.num=3"]))
    assert type(strategy) is FedMedian
    # per coordinate: median(1, 3, 100) = 3; median(2, 10, -4) = 2
    np.testing.assert_allclose(_aggregate(strategy, [[1.0, 2.0], [3.0, 10.0], [100.0, -4.0]]), [3.0, 2.0])


def test_fedtrimmedavg_drops_beta_of_each_end():
    strategy = build_strategy(compose_config(["strategy=fedtrimmedavg", "strategy.beta=0.2", "clients.num=5"]))
    assert type(strategy) is FedTrimmedAvg and strategy.beta == 0.2
    # n = 5, floor(0.2 * 5) = 1 cut at each end: (1, 2, 3, 4, 100) -> mean(2, 3, 4) = 3
    np.testing.assert_allclose(_aggregate(strategy, [[4.0], [100.0], [1.0], [3.0], [2.0]]), [3.0])


# Krum scores each update by the squared distances to its n - f - 2 = 2 nearest others (f = 1):
#   0: 1 + 6.25 = 7.25   1: 1 + 2.25 = 3.25   2.5: 0.25 + 2.25 = 2.5   3: 0.25 + 4 = 4.25   100: huge
HONEST_AND_POISONED = [[0.0], [1.0], [2.5], [3.0], [100.0]]


def test_krum_keeps_the_single_best_scored_update():
    strategy = build_strategy(compose_config(["strategy=krum", "clients.num=5"]))
    assert type(strategy) is Krum and strategy.num_malicious_nodes == 1
    np.testing.assert_allclose(_aggregate(strategy, HONEST_AND_POISONED), [2.5])


def test_multikrum_averages_the_m_best():
    strategy = build_strategy(
        compose_config(["strategy=krum", "strategy.num_nodes_to_select=3", "clients.num=5"])
    )
    assert type(strategy) is MultiKrum and strategy.num_nodes_to_select == 3
    # the three best: 2.5, 1, 3 -> (2.5 + 1 + 3) / 3
    np.testing.assert_allclose(_aggregate(strategy, HONEST_AND_POISONED), [6.5 / 3])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy=fedtrimmedavg", "strategy.beta=0.5"], "strategy.beta=0.5 is invalid"),
        (["strategy=krum", "clients.num=4"], "clients.num=4 allows f <= 0"),
        (["strategy=krum", "strategy.num_malicious_nodes=0", "strategy.num_nodes_to_select=5", "clients.num=4"],
         "strategy.num_nodes_to_select=5 is invalid"),
    ],
)
def test_robust_parameters_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(overrides)
