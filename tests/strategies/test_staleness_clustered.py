"""Staleness-aware clustered aggregation on plain arrays (and one planted-
cluster test with real local training)."""

import numpy as np
import pytest
from flwr.app import ConfigRecord

from strategies.staleness_clustered import StalenessClustered, cluster_updates, staleness_discount
from tests.fake_grid import FakeGrid, arrays, train_reply


def reply(node, value, n, dispatched, tau, partition=None):
    extra = {"dispatch-round": dispatched, "staleness": tau}
    if partition is not None:
        extra["partition-id"] = partition
    return train_reply(arrays([float(value)]), n, node_id=node, **extra)


def send(strategy, server_round, nodes, global_value=0.0):
    return list(strategy.configure_train(server_round, arrays([global_value]), ConfigRecord({}), FakeGrid(nodes)))


def value(record):
    return float(record.to_numpy_ndarrays()[0][0])


@pytest.mark.parametrize(
    ("tau", "kind", "a", "b", "expected"),
    [
        (0, "constant", 0.5, 4, 1.0),
        (7, "constant", 0.5, 4, 1.0),
        (0, "polynomial", 0.5, 4, 1.0),
        (3, "polynomial", 0.5, 4, 0.5),  # (3 + 1) ** -0.5
        (1, "polynomial", 1.0, 4, 0.5),  # (1 + 1) ** -1
        (2, "hinge", 0.5, 2, 1.0),  # tau <= b
        (4, "hinge", 0.5, 2, 0.5),  # 1 / (0.5 * (4 - 2) + 1)
        (6, "hinge", 1.0, 2, 0.2),  # 1 / (1 * (6 - 2) + 1)
    ],
)
def test_staleness_discount_hand_computed(tau, kind, a, b, expected):
    assert staleness_discount(tau, kind, a, b) == pytest.approx(expected)


def test_fresh_updates_with_full_mixing_equal_fedavg():
    strategy = StalenessClustered(mixing=1.0, min_available_nodes=1, min_train_nodes=1)
    send(strategy, 1, [1, 2], global_value=1.0)
    # FedAvg of [0] (n=1) and [2] (n=3) = 1.5
    new, _ = strategy.aggregate_train(1, [reply(1, 0.0, 1, 1, 0), reply(2, 2.0, 3, 1, 0)])
    assert value(new) == pytest.approx(1.5)


def test_a_stale_update_moves_the_model_by_its_discounted_delta():
    # Prepare: polynomial a=1 -> s(2) = 1/3
    strategy = StalenessClustered(discount="polynomial", discount_a=1.0, min_available_nodes=1, min_train_nodes=1)
    send(strategy, 1, [1, 2])  # both start from [0]
    new, _ = strategy.aggregate_train(1, [reply(1, 2.0, 1, 1, 0)])  # node 2 is late
    assert value(new) == pytest.approx(2.0)
    send(strategy, 2, [1], global_value=value(new))
    new, _ = strategy.aggregate_train(2, [reply(1, 3.0, 1, 2, 0)])
    assert value(new) == pytest.approx(3.0)
    send(strategy, 3, [1], global_value=value(new))
    # Execute: node 1 fresh ([4] from [3]: delta 1); node 2 from round 1 ([2] from [0]: delta 2, tau 2)
    new, metrics = strategy.aggregate_train(3, [reply(1, 4.0, 1, 3, 0), reply(2, 2.0, 1, 1, 2)])
    # Assert: 3 + 0.5 * 1 * 1 + 0.5 * (1/3) * 2 = 3.8333
    assert value(new) == pytest.approx(3 + 0.5 + 1 / 3)
    assert metrics["mean_discount"] == pytest.approx((1 + 1 / 3) / 2)


def test_too_stale_updates_are_counted_not_applied():
    strategy = StalenessClustered(max_staleness=1, min_available_nodes=1, min_train_nodes=1)
    send(strategy, 1, [1])
    send(strategy, 2, [1])
    new, metrics = strategy.aggregate_train(5, [reply(1, 9.0, 1, 1, 4)])
    assert metrics["updates_expired"] == 1
    assert value(strategy._record(strategy.models[0])) == 0.0


def test_server_momentum_per_cluster_hand_computed():
    # beta 0.5: r1 step 1 -> v 1 -> w 1; r2 step 1 -> v 0.5 + 1 = 1.5 -> w 2.5
    strategy = StalenessClustered(server_momentum=0.5, min_available_nodes=1, min_train_nodes=1)
    send(strategy, 1, [1])
    new, _ = strategy.aggregate_train(1, [reply(1, 1.0, 1, 1, 0)])
    send(strategy, 2, [1], global_value=value(new))
    new, _ = strategy.aggregate_train(2, [reply(1, 2.0, 1, 2, 0)])
    assert value(new) == pytest.approx(2.5)


def test_cluster_updates_by_cosine_similarity():
    directions = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float)
    updates = np.repeat(directions, 3, axis=0) * np.array([1, 2, 5] * 3)[:, None]  # scale does not matter
    by_k = cluster_updates(updates, 3, None, seed=0)
    by_threshold = cluster_updates(updates, None, 0.5, seed=0)
    for labels in (by_k, by_threshold):
        assert len(set(labels)) == 3
        assert all(len(set(labels[i : i + 3])) == 1 for i in (0, 3, 6))


@pytest.mark.parametrize("bad", [dict(mixing=0), dict(mixing=1.5), dict(discount="exp"), dict(num_clusters=0),
                                 dict(num_clusters=2, similarity_threshold=0.5), dict(similarity_threshold=1.0),
                                 dict(recluster_every=0), dict(server_momentum=1.0), dict(discount_a=0)])
def test_bad_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        StalenessClustered(**bad)


def test_planted_clusters_of_label_permutations_are_recovered():
    """Three groups of three clients train the same CNN on MNIST with three
    different label permutations; clustering their updates must find them."""
    import torch
    from sklearn.metrics import adjusted_rand_score

    from fl_datasets.sources import LabelledImages, load_mnist_5k
    from tasks.image.models import build_model
    from tasks.image.training import train_local

    data = load_mnist_5k()
    rng = np.random.default_rng(0)
    permutations = [np.arange(10), rng.permutation(10), rng.permutation(10)]
    initial = build_model("cnn", 10, seed=0).state_dict()
    strategy = StalenessClustered(num_clusters=3, recluster_every=1, min_available_nodes=1, min_train_nodes=1)
    nodes = list(range(9))
    send(strategy, 1, nodes)  # registers the nodes; models are replaced below
    strategy.keys = list(initial)
    strategy.models = {0: [t.numpy().copy() for t in initial.values()]}
    strategy.sent = {(0, 1): strategy.models[0]}
    replies = []
    for node in nodes:
        group = node // 3
        idx = rng.choice(len(data), size=300, replace=False)
        part = LabelledImages(data.x[idx], permutations[group][data.y[idx]], data.origin[idx])
        model = build_model("cnn", 10)
        model.load_state_dict(initial)
        train_local(model, part, epochs=1, batch_size=32, lr=0.05, momentum=0.9, seed=node)
        record = arrays(*[t.detach().numpy() for t in model.state_dict().values()])
        replies.append(train_reply(record, 300, node_id=node, **{"dispatch-round": 1, "staleness": 0, "partition-id": node}))
    torch.set_num_threads(1)
    _, metrics = strategy.aggregate_train(1, replies)
    found = [strategy.cluster_of[n] for n in nodes]
    assert metrics["num_clusters"] == 3
    assert adjusted_rand_score([n // 3 for n in nodes], found) >= 0.9
    assert [metrics[f"cluster_p{n}"] for n in nodes] == found
