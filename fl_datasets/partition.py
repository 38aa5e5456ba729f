"""Split a labelled pool across clients with flwr-datasets partitioners.

The partitioners work on a ``datasets.Dataset``; we build one from local
arrays (labels plus the pool index), so nothing is fetched from the hub.
"""

from __future__ import annotations

import warnings

import numpy as np

from .sources import DataError


def partition_pool(
    labels: np.ndarray,
    scheme: str,
    num_partitions: int,
    seed: int,
    alpha: float | None = None,
    min_partition_size: int = 0,
) -> list[np.ndarray]:
    """Indices into ``labels`` for each of ``num_partitions`` clients.

    Parameters
    ----------
    labels : np.ndarray
        Class label of every pool sample.
    scheme : {"iid", "dirichlet"}
        ``iid``: a seeded shuffle cut into equal shards (IidPartitioner).
        ``dirichlet``: per-class proportions ~ Dir(alpha) (DirichletPartitioner).
    num_partitions : int
        Number of clients.
    seed : int
        Makes the split deterministic.
    alpha : float, optional
        Dirichlet concentration (> 0); required for ``dirichlet``.
    min_partition_size : int
        ``dirichlet`` only: resample until every client holds this many.

    Raises
    ------
    DataError
        If there are fewer samples than clients, or the Dirichlet sampler cannot
        meet ``min_partition_size``.
    """
    if num_partitions > len(labels):
        raise DataError(
            f"clients.num={num_partitions} exceeds the {len(labels)} training samples "
            "left after the hold-outs and the long-tail profile: use fewer clients "
            "or a smaller partition.rho"
        )
    # imported here: ~2 s, and processes that read a cached split never need it
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    rng = np.random.default_rng(seed)
    # IidPartitioner shards contiguously: shuffle first so shards are random.
    order = rng.permutation(len(labels)) if scheme == "iid" else np.arange(len(labels))
    pool = Dataset.from_dict({"label": labels[order].tolist(), "idx": order.tolist()})
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    else:
        raise DataError(f"unknown partition scheme '{scheme}': use iid or dirichlet")
    partitioner.dataset = pool
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # retries are reported by the error below
            parts = [
                np.asarray(partitioner.load_partition(pid)["idx"], dtype=np.int64)
                for pid in range(num_partitions)
            ]
    except ValueError as err:
        raise DataError(
            f"Dirichlet partition failed ({err}) for alpha={alpha}, "
            f"min_partition_size={min_partition_size}, {num_partitions} clients, "
            f"{len(labels)} samples: raise partition.alpha, lower "
            "partition.min_partition_size, or use fewer clients"
        ) from None
    return parts
