"""Build the configured strategy. FedAvg, FedAvgM and the robust aggregators
(FedMedian, FedTrimmedAvg, Krum / Multi-Krum) are Flower's own."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum, MultiKrum, Strategy
from omegaconf import DictConfig

from .ass import AccuracyStabilitySize
from .staleness_clustered import StalenessClustered
from .weighted_sum import FastFedAvg, FastFedAvgM


def build_strategy(
    cfg: DictConfig,
    public_per_class_accuracy: Callable[[ArrayRecord], np.ndarray] | None = None,
) -> Strategy:
    """Instantiate ``cfg.strategy`` with the sampling settings of ``cfg.clients``.

    The round driver offers strategies only the nodes that are online and not
    busy, and waits for the whole federation before round 1 itself, so
    ``min_available_nodes`` is the per-round minimum ``clients.min_train``.

    Parameters
    ----------
    cfg : DictConfig
        The composed config.
    public_per_class_accuracy : callable, optional
        Per-class accuracy of a model on the server's public validation set;
        required by ``ass``.
    """
    sampling = dict(
        fraction_train=float(cfg.clients.fraction_train),
        fraction_evaluate=float(cfg.clients.fraction_evaluate),
        min_train_nodes=int(cfg.clients.min_train),
        min_evaluate_nodes=int(cfg.clients.min_train) if cfg.clients.fraction_evaluate > 0 else 0,
        min_available_nodes=int(cfg.clients.min_train),
    )
    name = cfg.strategy.name
    # Flower's FedAvg / FedAvgM with only the averaging replaced (zero-copy reads,
    # blocked BLAS sums: strategies/weighted_sum.py, scripts/bench/aggregation.py)
    if name == "fedavg":
        return FastFedAvg(**sampling)
    if name == "fedavgm":
        return FastFedAvgM(
            **sampling,
            server_learning_rate=float(cfg.strategy.server_learning_rate),
            server_momentum=float(cfg.strategy.server_momentum),
        )
    if name == "ass":
        if public_per_class_accuracy is None:
            raise ValueError("strategy 'ass' needs the server's public validation evaluator")
        return AccuracyStabilitySize(
            evaluate_per_class=public_per_class_accuracy,
            alpha=float(cfg.strategy.alpha),
            beta=float(cfg.strategy.beta),
            gamma=float(cfg.strategy.gamma),
            floor=float(cfg.strategy.floor),
            **sampling,
        )
    if name == "staleness_clustered":
        sc = cfg.strategy
        return StalenessClustered(
            mixing=float(sc.mixing),
            discount=str(sc.discount),
            discount_a=float(sc.discount_a),
            discount_b=int(sc.discount_b),
            num_clusters=None if sc.num_clusters is None else int(sc.num_clusters),
            similarity_threshold=None if sc.similarity_threshold is None else float(sc.similarity_threshold),
            recluster_every=int(sc.recluster_every),
            server_momentum=float(sc.server_momentum),
            max_staleness=int(sc.max_staleness),
            sketch_dim=sc.get("sketch_dim"),
            seed=int(cfg.seed),
            **sampling,
        )
    robust = _robust_strategy(cfg, sampling)
    if robust is not None:
        return robust
    raise ValueError(f"unknown strategy '{name}'")


def _robust_strategy(cfg: DictConfig, sampling: dict) -> Strategy | None:
    """Flower's Byzantine-robust aggregators, for poisoned-update studies."""
    name = cfg.strategy.name
    if name == "fedmedian":
        return FedMedian(**sampling)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(**sampling, beta=float(cfg.strategy.beta))
    if name == "krum":
        f, m = int(cfg.strategy.num_malicious_nodes), int(cfg.strategy.num_nodes_to_select)
        if m == 1:
            return Krum(**sampling, num_malicious_nodes=f)
        return MultiKrum(**sampling, num_malicious_nodes=f, num_nodes_to_select=m)
    return None
