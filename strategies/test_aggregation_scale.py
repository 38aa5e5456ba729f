"""The fast aggregation paths (zero-copy reads, blocked BLAS sums) give the
same numbers as the plain formulas.

No timing here: ``python -m scripts.bench.aggregation`` measures speed."""

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg, FedAvgM

from strategies.testing import FakeGrid, train_reply
from strategies.weighted_sum import (
    FastFedAvg,
    FastFedAvgM,
    add_scaled,
    aggregate_arrayrecords,
    all_finite,
    ndarray_view,
    weighted_sum,
)

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
