"""Partition properties on the real embedded MNIST 5k (and BreastMNIST)."""

from __future__ import annotations

import numpy as np
import pytest

from fl_datasets.federated import DataSpec, build_image_data
from fl_datasets.long_tail import long_tail_counts
from fl_datasets.partition import partition_pool
from fl_datasets.sources import DataError, load_medmnist_npz
from tests.conftest import BREASTMNIST, requires_breastmnist


def mnist_spec(**changes) -> DataSpec:
    base = dict(task="mnist", num_classes=10, num_clients=10, scheme="iid", rho=1.0,
                seed=0, test_per_class=100, public_val_per_class=20)
    base.update(changes)
    if base["scheme"] == "dirichlet":
        base.setdefault("alpha", 0.5)
    return DataSpec(**base)


def origins(data) -> list[np.ndarray]:
    return [c.origin for c in data.clients]


def test_long_tail_counts_hand_computed():
    # n_c = round(100 * 100^(-c/2)) for c = 0, 1, 2
    assert long_tail_counts(100, 3, 100.0).tolist() == [100, 10, 1]
    assert long_tail_counts(380, 10, 1.0).tolist() == [380] * 10


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
@pytest.mark.parametrize("rho", [1.0, 10.0, 100.0])
def test_sizes_sum_to_pool_and_rho_is_realised(scheme, rho):
    data = build_image_data(mnist_spec(scheme=scheme, rho=rho))
    totals = data.class_counts().sum(axis=0)
    # 5000 - 1000 test - 200 public val = 3800 = 380 per class before long-tail
    expected = long_tail_counts(380, 10, rho)
    assert totals.tolist() == expected.tolist()
    assert sum(data.client_sizes()) == expected.sum()
    assert totals.max() / totals.min() == pytest.approx(rho, rel=0.1)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_client_val_and_test_sets_are_disjoint(scheme):
    data = build_image_data(mnist_spec(scheme=scheme, rho=10.0))
    client_origin = np.concatenate(origins(data))
    assert len(np.unique(client_origin)) == len(client_origin)  # no sample twice
    assert not set(client_origin) & set(data.public_val.origin)
    assert not set(client_origin) & set(data.test.origin)
    assert not set(data.public_val.origin) & set(data.test.origin)


def test_public_validation_and_test_sets_are_class_balanced():
    data = build_image_data(mnist_spec(rho=100.0))
    assert np.bincount(data.public_val.y, minlength=10).tolist() == [20] * 10
    assert np.bincount(data.test.y, minlength=10).tolist() == [100] * 10


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_deterministic_per_seed(scheme):
    first = build_image_data(mnist_spec(scheme=scheme, rho=10.0, seed=3))
    build_image_data.cache_clear()
    again = build_image_data(mnist_spec(scheme=scheme, rho=10.0, seed=3))
    other = build_image_data(mnist_spec(scheme=scheme, rho=10.0, seed=4))
    for a, b in zip(origins(first), origins(again)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(origins(first), origins(other)))


def test_iid_sizes_are_equal_and_dirichlet_skews_labels():
    iid = build_image_data(mnist_spec())
    assert max(iid.client_sizes()) - min(iid.client_sizes()) <= 1

    def mean_label_share_of_top_class(data):
        counts = data.class_counts()
        return float(np.mean(counts.max(axis=1) / counts.sum(axis=1)))

    skewed = build_image_data(mnist_spec(scheme="dirichlet", alpha=0.1, min_partition_size=2))
    mild = build_image_data(mnist_spec(scheme="dirichlet", alpha=100.0))
    assert mean_label_share_of_top_class(skewed) > 0.4
    assert mean_label_share_of_top_class(mild) < 0.2


def test_more_clients_than_samples_is_a_clear_error():
    with pytest.raises(DataError, match="clients.num=5000 exceeds the 3800 training samples"):
        build_image_data(mnist_spec(num_clients=5000))


def test_unreachable_dirichlet_min_size_is_a_clear_error():
    with pytest.raises(DataError, match="raise partition.alpha"):
        partition_pool(np.repeat(np.arange(10), 10), "dirichlet", 50, seed=0, alpha=0.01, min_partition_size=2)


@requires_breastmnist
def test_breastmnist_loader_reads_the_real_file():
    splits = load_medmnist_npz(BREASTMNIST)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [546, 78, 156]
    assert splits["train"].x.shape[1:] == (1, 28, 28)
    assert 0.0 <= splits["train"].x.min() and splits["train"].x.max() <= 1.0
    assert set(np.unique(splits["train"].y)) == {0, 1}


@requires_breastmnist
def test_breastmnist_federated_split():
    spec = DataSpec(task="breastmnist", num_classes=2, num_clients=4, scheme="dirichlet",
                    rho=1.0, seed=0, alpha=0.5, min_partition_size=5, public_val_per_class=20,
                    path=str(BREASTMNIST))
    data = build_image_data(spec)
    assert sum(data.client_sizes()) == 546
    assert np.bincount(data.public_val.y).tolist() == [20, 20]
    assert len(data.test) == 156
    assert not set(data.public_val.origin) & set(np.concatenate(origins(data)))


def test_corrupt_npz_names_the_file(tmp_path):
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"this is not a zip archive")
    with pytest.raises(DataError, match="broken.npz is not a readable .npz"):
        load_medmnist_npz(bad)


def test_npz_missing_a_split_names_it(tmp_path):
    partial = tmp_path / "partial.npz"
    np.savez(partial, train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.zeros(2, np.uint8))
    with pytest.raises(DataError, match="lacks 'val_images' or 'val_labels'"):
        load_medmnist_npz(partial)


def test_split_is_shared_through_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDCONTINUUM_CACHE_DIR", str(tmp_path))
    spec = mnist_spec(scheme="dirichlet", rho=10.0, seed=7)
    build_image_data.cache_clear()
    first = build_image_data(spec)
    assert len(list(tmp_path.glob("split-*.npz"))) == 1
    build_image_data.cache_clear()
    again = build_image_data(spec)  # read back from the file
    for a, b in zip(origins(first), origins(again)):
        np.testing.assert_array_equal(a, b)
    monkeypatch.delenv("FEDCONTINUUM_CACHE_DIR")
    build_image_data.cache_clear()
    computed = build_image_data(spec)
    for a, b in zip(origins(first), origins(computed)):
        np.testing.assert_array_equal(a, b)
