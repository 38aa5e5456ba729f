"""The federated view of an image task: client partitions, the server's public
validation set and the test set, built once per process and cached.

Flower re-creates simulated clients every round; the partitions are pure
functions of a :class:`DataSpec`, so each Ray worker builds them on first use
and serves every later client and round from its cache.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

from .holdout import balanced_holdout
from .long_tail import long_tail_indices
from .partition import partition_pool
from .sources import DataError, LabelledImages, load_medmnist_npz, load_mnist_5k


@dataclass(frozen=True)
class DataSpec:
    """Everything that determines the federated data; hashable, JSON-able."""

    task: str
    num_classes: int
    num_clients: int
    scheme: str
    rho: float
    seed: int
    alpha: float | None = None
    min_partition_size: int = 0
    test_per_class: int = 0
    public_val_per_class: int = 20
    path: str | None = None

    @classmethod
    def from_config(cls, cfg) -> "DataSpec":
        """Build from a composed fedcontinuum config (``DictConfig``)."""
        part = cfg.partition
        return cls(
            task=str(cfg.task.name),
            num_classes=int(cfg.task.num_classes),
            num_clients=int(cfg.clients.num),
            scheme=str(part.name),
            rho=float(part.rho),
            seed=int(cfg.seed),
            alpha=float(part.alpha) if "alpha" in part else None,
            min_partition_size=int(part.get("min_partition_size", 0)),
            test_per_class=int(cfg.task.get("test_per_class", 0)),
            public_val_per_class=int(cfg.task.public_val_per_class),
            path=str(cfg.task.path) if cfg.task.get("path") else None,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DataSpec":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class FederatedImageData:
    """Client partitions plus the server-held sets; all disjoint."""

    clients: tuple[LabelledImages, ...]
    public_val: LabelledImages
    test: LabelledImages
    num_classes: int

    def client_sizes(self) -> list[int]:
        return [len(c) for c in self.clients]

    def class_counts(self) -> np.ndarray:
        """``(num_clients, num_classes)`` label histogram."""
        return np.stack(
            [np.bincount(c.y, minlength=self.num_classes) for c in self.clients]
        )


def _sources(spec: DataSpec, rng: np.random.Generator) -> tuple[LabelledImages, LabelledImages, LabelledImages]:
    """(pool, public validation, test) before long-tail subsampling."""
    if spec.task == "mnist":
        data = load_mnist_5k()
        test_idx, rest = balanced_holdout(data.y, spec.test_per_class, rng, "test")
        remaining = data.take(rest)
        val_idx, pool_idx = balanced_holdout(
            remaining.y, spec.public_val_per_class, rng, "public val"
        )
        return remaining.take(pool_idx), remaining.take(val_idx), data.take(test_idx)
    if spec.task == "breastmnist":
        if spec.path is None:
            raise DataError("task.path is not set: point it at a MedMNIST .npz")
        splits = load_medmnist_npz(spec.path)
        val_idx, _ = balanced_holdout(
            splits["val"].y, spec.public_val_per_class, rng, "public val"
        )
        return splits["train"], splits["val"].take(val_idx), splits["test"]
    raise DataError(f"unknown task '{spec.task}': use mnist or breastmnist")


@lru_cache(maxsize=4)
def build_image_data(spec: DataSpec) -> FederatedImageData:
    """Load, hold out, long-tail-subsample and partition; cached per process."""
    rng = np.random.default_rng(spec.seed)
    pool, public_val, test = _sources(spec, rng)
    found = int(pool.y.max()) + 1 if len(pool) else 0
    if found > spec.num_classes:
        raise DataError(
            f"the {spec.task} data has {found} classes but task.num_classes="
            f"{spec.num_classes}: set task.num_classes={found}"
        )
    if spec.rho > 1:
        pool = pool.take(long_tail_indices(pool.y, spec.rho, rng))
    parts = partition_pool(
        pool.y,
        spec.scheme,
        spec.num_clients,
        seed=spec.seed,
        alpha=spec.alpha,
        min_partition_size=spec.min_partition_size,
    )
    return FederatedImageData(
        clients=tuple(pool.take(idx) for idx in parts),
        public_val=public_val,
        test=test,
        num_classes=spec.num_classes,
    )
