"""Strategies built from config: Flower's FedAvg and FedAvgM on plain arrays."""

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg, FedAvgM

from fl_server.experiments.config import compose_config
from strategies import build_strategy
from strategies.weighted_sum import FastFedAvg
from tests.fake_grid import FakeGrid, arrays, train_reply


def _round(strategy, server_round, global_arrays, replies):
    """configure_train on a 2-node grid, then aggregate the given replies."""
    grid = FakeGrid([1, 2])
    sent = list(strategy.configure_train(server_round, global_arrays, _config(), grid))
    assert len(sent) == 2
    new_arrays, metrics = strategy.aggregate_train(server_round, replies)
    return new_arrays, metrics


def _config():
    from flwr.app import ConfigRecord

    return ConfigRecord({})


def test_fedavgm_from_config_uses_paper_momentum():
    # Prepare / Execute
    strategy = build_strategy(compose_config(["strategy=fedavgm", "clients.num=2"]))
    # Assert: Flower's default momentum is 0.0; paper 001 uses 0.9
    assert isinstance(strategy, FedAvgM)
    assert strategy.server_momentum == 0.9
    assert strategy.server_learning_rate == 1.0
    assert strategy.min_available_nodes == 2  # clients.min_train


def test_fedavg_from_config():
    strategy = build_strategy(compose_config(["clients.num=4", "clients.fraction_train=0.5"]))
    assert isinstance(strategy, FedAvg) and type(strategy) is FastFedAvg  # Flower's, averaging replaced
    assert strategy.fraction_train == 0.5
    assert strategy.min_available_nodes == 2  # clients.min_train: the driver waits for all


def test_fedavgm_two_rounds_hand_computed():
    # Prepare: w0 = [1, 2], momentum 0.9, server lr 1
    strategy = build_strategy(compose_config(["strategy=fedavgm", "clients.num=2"]))
    w0 = arrays([1.0, 2.0])

    # Execute round 1: clients [0, 1] (n=1) and [2, 5] (n=3)
    #   avg = [(0 + 6) / 4, (1 + 15) / 4] = [1.5, 4.0]
    #   g1 = w0 - avg = [-0.5, -2.0];  v1 = g1;  w1 = w0 - v1 = [1.5, 4.0]
    w1, metrics1 = _round(
        strategy, 1, w0,
        [train_reply(arrays([0.0, 1.0]), 1, 1, train_loss=1.0),
         train_reply(arrays([2.0, 5.0]), 3, 2, train_loss=3.0)],
    )
    # Execute round 2: clients [1, 3] (n=1) and [2, 3] (n=1)
    #   avg = [1.5, 3.0];  g2 = w1 - avg = [0.0, 1.0]
    #   v2 = 0.9 * v1 + g2 = [-0.45, -0.8];  w2 = w1 - v2 = [1.95, 4.8]
    w2, _ = _round(
        strategy, 2, w1,
        [train_reply(arrays([1.0, 3.0]), 1, 1, train_loss=1.0),
         train_reply(arrays([2.0, 3.0]), 1, 2, train_loss=1.0)],
    )

    # Assert
    np.testing.assert_allclose(w1.to_numpy_ndarrays()[0], [1.5, 4.0])
    assert metrics1["train_loss"] == pytest.approx((1.0 * 1 + 3.0 * 3) / 4)
    np.testing.assert_allclose(w2.to_numpy_ndarrays()[0], [1.95, 4.8])


def test_fedavgm_without_momentum_equals_fedavg():
    plain = build_strategy(compose_config(["clients.num=2"]))
    momentum_free = build_strategy(
        compose_config(["strategy=fedavgm", "strategy.server_momentum=0.0", "clients.num=2"])
    )
    replies = [train_reply(arrays([0.0, 1.0]), 1, 1), train_reply(arrays([2.0, 5.0]), 3, 2)]
    a, _ = _round(plain, 1, arrays([1.0, 2.0]), replies)
    b, _ = _round(momentum_free, 1, arrays([1.0, 2.0]), replies)
    np.testing.assert_allclose(a.to_numpy_ndarrays()[0], b.to_numpy_ndarrays()[0])
