"""Secure aggregation with Flower's SecAgg+ (fl_server/secagg.py,
fl_clients/secagg.py): the server-side code only ever sees masked vectors and
their sum, which unmasks to the clients' weighted-average update."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp.strategy import FedAvg

from fl_common import compression as comp
from fl_server.engine.secagg import SecAggSettings, secure_average
from fl_server.experiments.config import compose_config
from fl_server.experiments.experiment import run_experiment, train_config
from strategies.weighted_sum import FastFedAvg
from tasks.image.models import build_model
from tests.fake_grid import FakeGrid
from tests.fl_clients.privacy_helpers import history, only_run, stateful_clients, wire

NODES = [0, 1, 2]


class RecordingGrid(FakeGrid):
    """A FakeGrid that keeps every reply the server-side code receives."""

    def __init__(self, node_ids, reply_fn) -> None:
        super().__init__(node_ids, reply_fn)
        self.received: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.received.extend(replies)
        return replies


def _round_messages(cfg, arrays: ArrayRecord, grid) -> list[Message]:
    config = ConfigRecord(dict(train_config(cfg)))
    return list(FedAvg(min_available_nodes=3, min_train_nodes=3).configure_train(1, arrays, config, grid))


def _plain_update(cfg, message: Message, node: int) -> tuple[dict[str, np.ndarray], int]:
    """What the same client computes without SecAgg+ (its training is
    deterministic): its update and its num-examples. Test-side only."""
    reply = stateful_clients(len(NODES))(wire(message))
    sent = comp.tensors(message.content["arrays"])
    trained = comp.tensors(reply.content["arrays"])
    return comp.subtract(trained, sent), int(reply.content["metrics"]["num-examples"])


def test_server_side_code_never_sees_an_individual_update():
    # Prepare: 3 clients, one SecAgg+ round on the real ClientApp (with its mods)
    cfg = compose_config(["clients.num=3", "seed=1", "privacy=secagg"])
    arrays = ArrayRecord(build_model("cnn", 10, seed=1).state_dict())
    grid = RecordingGrid(NODES, stateful_clients(len(NODES)))
    messages = _round_messages(cfg, arrays, grid)
    settings = SecAggSettings.from_config(cfg.privacy.secagg, max_weight=1300)
    # Execute
    average, client_metrics, survivors = secure_average(grid, settings.workflow(60), 1, messages)
    # Assert 1: no reply carries model arrays; what stands for the update is
    # a vector of integers mod 2**32 under uniformly random masks
    updates = {n: _plain_update(cfg, m, n) for n, m in zip(NODES, messages)}
    masked_replies = 0
    for reply in grid.received:
        assert not reply.has_error()
        assert all(len(record) == 0 for record in reply.content.array_records.values())
        secagg = reply.content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS in secagg:
            masked_replies += 1
            # [0] is the weight factor, then one vector per tensor
            masked = np.concatenate([bytes_to_ndarray(b).ravel() for b in secagg[Key.MASKED_PARAMETERS][1:]])
            assert np.issubdtype(masked.dtype, np.integer) and masked.size == 96_938  # the CNN's entries
            assert masked.min() >= 0 and masked.max() < settings.modulus_range
            assert 0.45 < masked.mean() / settings.modulus_range < 0.55  # uniform masks
    assert masked_replies == 3 and survivors == 3
    # Assert 2: what the server learns is the weighted average (weights =
    # num-examples), to SecAgg+'s quantisation precision
    total = sum(n for _, n in updates.values())
    names = list(arrays.keys())
    for i, name in enumerate(names):
        expected = sum(u[name] * n for u, n in updates.values()) / total
        step = 2 * settings.clipping_range / settings.quantization_range
        assert np.abs(average[i] - expected).max() < 20 * step, name
    assert sorted(int(m["partition-id"]) for m in client_metrics.values()) == NODES


def test_secagg_run_gives_every_client_the_aggregate_and_learns(tracking_uri):
    # Prepare: spy on what the strategy's aggregate_train is given
    seen: list[list[Message]] = []
    original = FastFedAvg.aggregate_train  # what strategy=fedavg builds

    def spy(self, server_round, replies):
        replies = list(replies)
        seen.append(replies)
        return original(self, server_round, replies)

    cfg = compose_config(["num_rounds=2", "clients.num=3", "seed=1", "privacy=secagg"])
    FastFedAvg.aggregate_train = spy
    try:
        # Execute
        final = run_experiment(FakeGrid(NODES, stateful_clients(3)), cfg, tracking_uri)
    finally:
        FastFedAvg.aggregate_train = original
    # Assert: every "reply" the strategy sees holds the same (aggregate) model
    assert len(seen) == 2
    for replies in seen:
        models = [comp.tensors(r.content["arrays"]) for r in replies]
        assert len(models) == 3
        for other in models[1:]:
            assert all(np.array_equal(models[0][k], other[k]) for k in models[0])
    client, run = only_run(tracking_uri)
    assert history(client, run, "secagg_survivors") == [3, 3]
    assert history(client, run, "clients_replied") == [3, 3]
    assert final["test_accuracy"] > 0.5


def test_secagg_with_dp_sgd_counts_a_declining_client_with_weight_zero(tracking_uri):
    # Prepare: client 2's budget is smaller than one round costs
    cfg = compose_config(["num_rounds=1", "clients.num=3", "seed=1", "privacy=secagg",
                          "privacy.dpsgd.enabled=true", "privacy.dpsgd.client_budgets={2:0.01}"])
    # Execute
    run_experiment(FakeGrid(NODES, stateful_clients(3)), cfg, tracking_uri)
    # Assert
    client, run = only_run(tracking_uri)
    assert history(client, run, "clients_declined") == [1]
    assert history(client, run, "updates_applied") == [2]
    assert history(client, run, "epsilon_p2") == [0.0]
    assert history(client, run, "epsilon_p0")[0] > 0
    assert run.data.metrics["round_aggregated"] == 1


@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm"])
def test_secagg_composes_with_fedavg_family(strategy):
    assert compose_config(["privacy=secagg", f"strategy={strategy}"]).privacy.secagg.enabled
