"""Build the configured strategy. FedAvg and FedAvgM are Flower's own."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, FedAvgM, Strategy
from omegaconf import DictConfig


def build_strategy(cfg: DictConfig) -> Strategy:
    """Instantiate ``cfg.strategy`` with the sampling settings of ``cfg.clients``.

    ``min_available_nodes`` is the whole federation, so round 1 never starts on
    a partly registered set of SuperNodes.
    """
    sampling = dict(
        fraction_train=float(cfg.clients.fraction_train),
        fraction_evaluate=float(cfg.clients.fraction_evaluate),
        min_train_nodes=int(cfg.clients.min_train),
        min_evaluate_nodes=int(cfg.clients.min_train) if cfg.clients.fraction_evaluate > 0 else 0,
        min_available_nodes=int(cfg.clients.num),
    )
    name = cfg.strategy.name
    if name == "fedavg":
        return FedAvg(**sampling)
    if name == "fedavgm":
        return FedAvgM(
            **sampling,
            server_learning_rate=float(cfg.strategy.server_learning_rate),
            server_momentum=float(cfg.strategy.server_momentum),
        )
    raise ValueError(f"unknown strategy '{name}'")
