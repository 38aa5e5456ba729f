"""The fast aggregation paths (zero-copy reads, blocked BLAS sums, count
sketches for clustering) give the same numbers as the plain formulas.

No timing here: ``python -m scripts.bench.aggregation`` measures speed."""

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg, FedAvgM

from fl_server.experiments.config import ConfigError, compose_config
from strategies import build_strategy
from strategies.staleness_clustered import StalenessClustered, UpdateSketch, cluster_updates
from strategies.weighted_sum import (
    FastFedAvg,
    FastFedAvgM,
    add_scaled,
    aggregate_arrayrecords,
    all_finite,
    ndarray_view,
    weighted_sum,
)
from tests.fake_grid import FakeGrid, train_reply

RNG = np.random.default_rng(0)


def record(*layers):
    return ArrayRecord({f"l{i}": Array(np.asarray(layer)) for i, layer in enumerate(layers)})


# -- reading -----------------------------------------------------------------
@pytest.mark.parametrize("value", [
    RNG.standard_normal((3, 4)).astype(np.float32),
    np.asfortranarray(RNG.standard_normal((3, 4))),
    np.float64(2.5) * np.ones(()),
    np.zeros((0, 5), dtype=np.float32),
    np.arange(5),
    RNG.standard_normal(7).astype(np.float16),
    np.array([1 + 2j]),
    np.array([True, False]),
])
def test_views_equal_flowers_numpy_and_do_not_copy(value):
    array = Array(np.asarray(value))
    view, copy = ndarray_view(array), array.numpy()
    assert view.dtype == copy.dtype and view.shape == copy.shape
    np.testing.assert_array_equal(view, copy)
    assert not view.flags.owndata and not view.flags.writeable


def test_view_of_a_version_2_npy_payload():
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.arange(6.0).reshape(2, 3), version=(2, 0))
    array = Array(dtype="float64", shape=(2, 3), stype="numpy.ndarray", data=buffer.getvalue())
    np.testing.assert_array_equal(ndarray_view(array), [[0, 1, 2], [3, 4, 5]])


# -- summing -----------------------------------------------------------------
def test_weighted_sum_equals_the_float64_formula_to_float32_precision():
    # Prepare: 7 models with a big tensor (several accumulation blocks), a small one and an integer one
    models = [[RNG.standard_normal(600_000).astype(np.float32).reshape(600, 1000),
               RNG.standard_normal(10).astype(np.float32), np.arange(3) * (i + 1)] for i in range(7)]
    weights = RNG.random(7)
    # Execute
    summed = weighted_sum(models, weights, [np.float32, np.float32, np.int64])
    # Assert
    for i in range(3):
        expected = sum(w * m[i].astype(np.float64) for w, m in zip(weights, models))
        assert summed[i].dtype == models[0][i].dtype and summed[i].shape == models[0][i].shape
        np.testing.assert_allclose(summed[i], expected.astype(summed[i].dtype), rtol=1e-5, atol=1e-5)


def test_weighted_sum_hand_computed_and_zero_weights_left_out():
    a, b, c = [np.array([1.0, 2.0])], [np.array([3.0, 5.0])], [np.array([np.nan, 1.0])]
    # 0.25 * [1, 2] + 0.75 * [3, 5] = [2.5, 4.25]; c has weight 0 and is not read into the sum
    np.testing.assert_allclose(weighted_sum([a, b, c], [0.25, 0.75, 0.0])[0], [2.5, 4.25])


def test_weighted_sum_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in tensor 0"):
        weighted_sum([[np.zeros(3)], [np.zeros(4)]], [0.5, 0.5])


def test_add_scaled_in_place():
    out = np.array([1.0, 1.0], dtype=np.float32)
    add_scaled(out, np.array([2.0, 4.0], dtype=np.float64), -0.5)
    np.testing.assert_array_equal(out, [0.0, -1.0])


@pytest.mark.parametrize(("layers", "finite"), [
    ([np.ones(5, np.float32), np.arange(3)], True),
    ([np.array([1.0, np.nan], np.float32)], False),
    ([np.array([np.inf, 1.0])], False),
    ([np.array([-np.inf], np.float16)], False),
    ([np.full(4, 3e38, np.float32)], True),  # the sum of squares overflows; the values are finite
])
def test_all_finite(layers, finite):
    assert all_finite(layers) is finite


# -- Flower's FedAvg / FedAvgM, fast -------------------------------------------
def _replies(n=5):
    return [train_reply(record(RNG.standard_normal((300, 1000)).astype(np.float32),
                               RNG.standard_normal(4).astype(np.float32), np.array([i, 2 * i])),
                        int(RNG.integers(1, 100)), node_id=i + 1, train_loss=float(i))
            for i in range(n)]


def test_fast_fedavg_equals_flowers_fedavg():
    replies = _replies()
    expected, expected_metrics = FedAvg(min_available_nodes=1).aggregate_train(1, replies)
    got, metrics = FastFedAvg(min_available_nodes=1).aggregate_train(1, replies)
    assert list(got.keys()) == list(expected.keys())
    for key in expected:
        assert got[key].dtype == expected[key].dtype  # int tensors come back float64, as Flower's do
        np.testing.assert_allclose(got[key].numpy(), expected[key].numpy(), rtol=1e-5, atol=1e-6)
    assert dict(metrics) == pytest.approx(dict(expected_metrics))


ROUND_1, ROUND_2 = _replies(2), _replies(2)


def test_fast_fedavgm_equals_flowers_fedavgm_over_two_rounds():
    start = record(np.zeros((300, 1000), np.float32), np.zeros(4, np.float32), np.zeros(2))
    results = []
    for cls in (FedAvgM, FastFedAvgM):
        strategy, arrays = cls(server_momentum=0.9, min_available_nodes=2, min_train_nodes=2), start
        for server_round, replies in ((1, ROUND_1), (2, ROUND_2)):
            list(strategy.configure_train(server_round, arrays, ConfigRecord({}), FakeGrid([1, 2])))
            arrays, _ = strategy.aggregate_train(server_round, replies)
        results.append(arrays.to_numpy_ndarrays())
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_aggregate_arrayrecords_hand_computed():
    contents = [train_reply(record([1.0, 2.0]), 1).content, train_reply(record([3.0, 6.0]), 3).content]
    np.testing.assert_allclose(aggregate_arrayrecords(contents, "num-examples")["l0"].numpy(), [2.5, 5.0])


# -- staleness-aware aggregation on float32 models ----------------------------
def test_staleness_step_equals_the_delta_formula_with_two_bases_and_momentum():
    # Prepare: one cluster; round 1 sends w0, round 2 sends w1; in round 2 node 1 is fresh
    # (base w1, tau 0) and node 2 stale (base w0, tau 1); polynomial a=1: s(1) = 1/2
    strategy = StalenessClustered(discount="polynomial", discount_a=1.0, mixing=0.5, server_momentum=0.5,
                                  min_available_nodes=1, min_train_nodes=1)
    w0 = RNG.standard_normal(300_000).astype(np.float32)
    list(strategy.configure_train(1, record(w0), ConfigRecord({}), FakeGrid([1, 2])))
    m1 = w0 + 0.01 * RNG.standard_normal(w0.size).astype(np.float32)
    w1 = strategy.aggregate_train(1, [train_reply(record(m1), 10, node_id=1, **{"dispatch-round": 1})])[0]
    w1 = w1.to_numpy_ndarrays()[0]
    list(strategy.configure_train(2, record(w1), ConfigRecord({}), FakeGrid([1])))
    fresh = w1 + 0.01 * RNG.standard_normal(w0.size).astype(np.float32)
    stale = w0 + 0.01 * RNG.standard_normal(w0.size).astype(np.float32)
    # Execute
    w2, _ = strategy.aggregate_train(2, [
        train_reply(record(fresh), 30, node_id=1, **{"dispatch-round": 2, "staleness": 0}),
        train_reply(record(stale), 10, node_id=2, **{"dispatch-round": 1, "staleness": 1}),
    ])
    # Assert, in float64: round 1 step v1 = 0.5 (m1 - w0); w1 = w0 + v1
    v1 = 0.5 * (m1.astype(np.float64) - w0)
    np.testing.assert_allclose(w1, w0 + v1, atol=1e-6)
    # round 2 step = 0.75 * 0.5 * (fresh - w1) + 0.25 * 0.25 * (stale - w0); v2 = 0.5 v1 + step
    step = 0.375 * (fresh.astype(np.float64) - w1) + 0.0625 * (stale.astype(np.float64) - w0)
    np.testing.assert_allclose(w2.to_numpy_ndarrays()[0], w1 + 0.5 * v1 + step, atol=1e-6)


def test_without_clustering_no_per_node_copies_are_kept():
    strategy = StalenessClustered(min_available_nodes=1, min_train_nodes=1)
    list(strategy.configure_train(1, record(np.zeros(4)), ConfigRecord({}), FakeGrid([1])))
    strategy.aggregate_train(1, [train_reply(record(np.ones(4)), 1, node_id=1)])
    assert strategy.latest_update == {} and strategy.latest_model == {}


# -- sketches ------------------------------------------------------------------
def test_sketch_hand_computed():
    # 5 values into 2 buckets: j -> j mod 2, times the seeded sign s_j
    sketch = UpdateSketch(2, seed=3)
    s = sketch.signs(5)
    assert set(np.unique(s)) <= {-1.0, 1.0}
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0], dtype=np.float32)
    expected = [s[0] * 1 + s[2] * 3 + s[4] * 5, s[1] * 2 + s[3] * 4]
    np.testing.assert_allclose(sketch([x]), expected)
    # split into layers of odd sizes, and as a difference from a base: the same numbers
    np.testing.assert_allclose(sketch([x[:3].reshape(3, 1), x[3:]]), expected)
    np.testing.assert_allclose(sketch([x + 7], base=[np.full(5, 7.0, np.float32)]), expected)


def test_sketch_is_linear_and_keeps_inner_products_roughly():
    sketch = UpdateSketch(1024, seed=0)
    x, y = RNG.standard_normal((2, 200_003)).astype(np.float32)
    y = 0.6 * x + 0.8 * y  # cosine(x, y) ~ 0.6
    sx, sy = sketch([x]), sketch([y])
    np.testing.assert_allclose(sketch([x + 2 * y]), sx + 2 * sy, rtol=1e-4, atol=1e-3)
    cosine = np.dot(sx, sy) / np.linalg.norm(sx) / np.linalg.norm(sy)
    true = np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y)
    assert abs(cosine - true) < 0.15  # sd ~ 1/sqrt(1024) = 0.03


@pytest.mark.parametrize("bad", [0, 1, 2.5, True, "64"])
def test_bad_sketch_dims_are_refused(bad):
    with pytest.raises(ValueError, match=f"sketch_dim={bad} is invalid"):
        StalenessClustered(sketch_dim=bad)


@pytest.mark.parametrize("clustering", [dict(num_clusters=3), dict(similarity_threshold=0.5)])
def test_planted_clusters_are_recovered_from_sketches(clustering):
    """Three groups of three clients; group g's updates are multiples (1, 2, 5)
    of direction g, and the directions have disjoint supports (cosine exactly 0
    across groups, 1 within). The sketch is linear, so within a group the
    sketches stay exactly parallel; across groups their cosine is ~N(0, 1/64)."""
    size = 30_000
    directions = np.zeros((3, size), dtype=np.float32)
    for g in range(3):
        directions[g, g * 10_000:(g + 1) * 10_000] = RNG.standard_normal(10_000)
    strategy = StalenessClustered(**clustering, sketch_dim=64, recluster_every=1,
                                  min_available_nodes=1, min_train_nodes=1)
    nodes = list(range(1, 10))
    start = np.zeros(size, dtype=np.float32)
    list(strategy.configure_train(1, record(start[:12_345], start[12_345:]), ConfigRecord({}), FakeGrid(nodes)))
    replies = []
    for node in nodes:
        update = (1, 2, 5)[(node - 1) % 3] * directions[(node - 1) // 3]
        replies.append(train_reply(record(update[:12_345], update[12_345:]), 10, node_id=node,
                                   **{"dispatch-round": 1, "partition-id": node - 1}))
    _, metrics = strategy.aggregate_train(1, replies)
    sketches = np.stack([strategy.latest_update[n] for n in nodes])
    assert sketches.shape == (9, 64)
    unit = sketches / np.linalg.norm(sketches, axis=1, keepdims=True)
    across = [abs(unit[i] @ unit[j]) for i in range(9) for j in range(9) if i // 3 != j // 3]
    assert max(across) < 0.5
    assert metrics["num_clusters"] == 3
    found = [strategy.cluster_of[n] for n in nodes]
    assert [len(set(found[i:i + 3])) for i in (0, 3, 6)] == [1, 1, 1] and len(set(found)) == 3
    # each cluster's model is its members' mean model: (1 + 2 + 5) / 3 times its direction
    for g in range(3):
        model = np.concatenate(strategy.models[found[3 * g]])
        np.testing.assert_allclose(model, 8 / 3 * directions[g], rtol=1e-5, atol=1e-5)


def test_noisy_planted_clusters_are_recovered_from_sketches():
    # 4 planted directions in 20,000 dimensions, noise of the same norm: cosine 0.5 within, ~0 across
    directions = RNG.standard_normal((4, 20_000)).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    sketch = UpdateSketch(128, seed=1)
    labels = np.arange(200) % 4
    noise = RNG.standard_normal((200, 20_000)).astype(np.float32) / np.sqrt(20_000)
    sketches = np.stack([sketch([directions[g] + n]) for g, n in zip(labels, noise)])
    found = cluster_updates(sketches, 4, None, seed=0)
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(labels, found) == 1.0


# -- config --------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["1", "2.5", "true", "abc"])
def test_config_refuses_a_bad_sketch_dim_naming_it(bad):
    with pytest.raises(ConfigError, match=r"strategy.sketch_dim=.* is invalid: use an integer >= 2"):
        compose_config(["strategy=staleness_clustered", f"strategy.sketch_dim={bad}"])  # validates


def test_registry_passes_sketch_dim():
    strategy = build_strategy(compose_config(["strategy=staleness_clustered", "strategy.sketch_dim=64",
                                              "strategy.num_clusters=2", "clients.num=4"]))
    assert strategy.sketch.dim == 64
    assert build_strategy(compose_config(["strategy=staleness_clustered", "clients.num=4"])).sketch is None
