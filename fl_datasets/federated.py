"""The federated view of an image task: client partitions, the server's public
validation set and the test set, built once per process and cached.

Flower re-creates simulated clients every round; the partitions are pure
functions of a :class:`DataSpec`, so each Ray worker builds them on first use
and serves every later client and round from its cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .holdout import balanced_holdout
from .long_tail import long_tail_indices
from .partition import partition_pool
from .sources import CACHE_ENV, DataError, LabelledImages, load_medmnist_npz, load_mnist_5k

__all__ = ["CACHE_ENV", "DataSpec", "FederatedImageData", "build_image_data"]


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
    cloud_per_class: int = 0

    @classmethod
    def from_config(cls, cfg) -> "DataSpec":
        """Build from a composed fedcontinuum config (``DictConfig``).

        ``task.source`` names the data set where the task's name does not
        (e.g. ``task=offload`` on MNIST); ``task.cloud_per_class`` carves a
        cloud-held set out of the pool.
        """
        part = cfg.partition
        return cls(
            task=str(cfg.task.get("source") or cfg.task.name),
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
            cloud_per_class=int(cfg.task.get("cloud_per_class", 0)),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DataSpec":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class FederatedImageData:
    """Client partitions plus the server-held sets; all disjoint.

    ``cloud`` is the cloud's own class-balanced set (``cloud_per_class`` of
    every class, held out of the pool before the long tail); empty unless asked for.
    """

    clients: tuple[LabelledImages, ...]
    public_val: LabelledImages
    test: LabelledImages
    num_classes: int
    cloud: LabelledImages | None = None

    def client_sizes(self) -> list[int]:
        return [len(c) for c in self.clients]

    def class_counts(self) -> np.ndarray:
        """``(num_clients, num_classes)`` label histogram."""
        return np.stack(
            [np.bincount(c.y, minlength=self.num_classes) for c in self.clients]
        )


def _source(spec: DataSpec) -> tuple[LabelledImages, dict[str, np.ndarray]]:
    """All samples of the task in one array, and its published splits (if any).

    ``origin`` indexes into this array, so any subset is an index array.
    """
    if spec.task == "mnist":
        data = load_mnist_5k()
        return data, {"all": data.origin}
    if spec.task == "breastmnist":
        if spec.path is None:
            raise DataError("task.path is not set: point it at a MedMNIST .npz")
        splits = load_medmnist_npz(spec.path)
        joined = LabelledImages(
            np.concatenate([splits[s].x for s in ("train", "val", "test")]),
            np.concatenate([splits[s].y for s in ("train", "val", "test")]),
            np.concatenate([splits[s].origin for s in ("train", "val", "test")]),
        )
        return joined, {s: splits[s].origin for s in ("train", "val", "test")}
    raise DataError(f"unknown task '{spec.task}': use mnist or breastmnist")


def _split_indices(spec: DataSpec, source: LabelledImages, splits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Index arrays (into ``source``) of the test set, public validation set,
    the cloud's set (if asked for) and every client's partition."""
    rng = np.random.default_rng(spec.seed)
    y = source.y
    if "all" in splits:  # no published split: hold out test, then validation
        test_pos, rest_pos = balanced_holdout(y, spec.test_per_class, rng, "test")
        val_pos, pool_pos = balanced_holdout(y[rest_pos], spec.public_val_per_class, rng, "public val")
        test, public_val, pool = test_pos, rest_pos[val_pos], rest_pos[pool_pos]
    else:
        val_pos, _ = balanced_holdout(y[splits["val"]], spec.public_val_per_class, rng, "public val")
        test, public_val, pool = splits["test"], splits["val"][val_pos], splits["train"]
    found = int(y.max()) + 1 if len(y) else 0
    if found > spec.num_classes:
        raise DataError(
            f"the {spec.task} data has {found} classes but task.num_classes="
            f"{spec.num_classes}: set task.num_classes={found}"
        )
    cloud = pool[:0]
    if spec.cloud_per_class > 0:  # after the other hold-outs: specs without it keep their splits
        cloud_pos, pool_pos = balanced_holdout(y[pool], spec.cloud_per_class, rng, "cloud")
        cloud, pool = pool[cloud_pos], pool[pool_pos]
    if spec.rho > 1:
        pool = pool[long_tail_indices(y[pool], spec.rho, rng)]
    parts = partition_pool(
        y[pool],
        spec.scheme,
        spec.num_clients,
        seed=spec.seed,
        alpha=spec.alpha,
        min_partition_size=spec.min_partition_size,
    )
    indices = {"test": test, "public_val": public_val, "cloud": cloud}
    indices.update({f"client_{i}": pool[part] for i, part in enumerate(parts)})
    return indices


def _cached_split_indices(spec: DataSpec, source: LabelledImages, splits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """:func:`_split_indices`, shared between processes through a cache file.

    The launcher points ``FEDCONTINUUM_CACHE_DIR`` at a folder that the
    launcher, the ServerApp and every Ray worker can read: the split is then
    computed once per job (the launcher's pre-flight check does it) instead of
    once per process, and workers skip importing flwr-datasets (~2 s each).
    Without the variable (plain ``flwr run``, other machines) each process
    computes it; the result is the same, as it is a pure function of the spec.
    """
    cache_dir = os.environ.get(CACHE_ENV)
    if not cache_dir:
        return _split_indices(spec, source, splits)
    path = Path(cache_dir) / f"split-{_spec_digest(spec)}.npz"
    if path.exists():
        with np.load(path) as cached:
            return {key: cached[key] for key in cached.files}
    indices = _split_indices(spec, source, splits)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
        np.savez(tmp, **indices)
    os.replace(tmp.name, path)  # atomic: readers never see a partial file
    return indices


def _spec_digest(spec: DataSpec) -> str:
    from importlib.metadata import version

    text = spec.to_json() + version("flwr-datasets")
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@lru_cache(maxsize=4)
def build_image_data(spec: DataSpec) -> FederatedImageData:
    """Load, hold out, long-tail-subsample and partition; cached per process."""
    source, splits = _source(spec)
    indices = _cached_split_indices(spec, source, splits)
    return FederatedImageData(
        clients=tuple(source.take(indices[f"client_{i}"]) for i in range(spec.num_clients)),
        public_val=source.take(indices["public_val"]),
        test=source.take(indices["test"]),
        num_classes=spec.num_classes,
        cloud=source.take(indices["cloud"]) if len(indices.get("cloud", ())) else None,
    )
