"""Central differential privacy with Flower's strategy wrappers.

``privacy.central.mode`` picks one of Flower's four wrappers
(``flwr.serverapp.strategy``) around the configured strategy:

==================  ================================================  ==========================
mode                wrapper                                           client side
==================  ================================================  ==========================
server-fixed        DifferentialPrivacyServerSideFixedClipping        nothing
server-adaptive     DifferentialPrivacyServerSideAdaptiveClipping     nothing
client-fixed        DifferentialPrivacyClientSideFixedClipping        Flower's fixedclipping_mod
client-adaptive     DifferentialPrivacyClientSideAdaptiveClipping     Flower's adaptiveclipping_mod
==================  ================================================  ==========================

The client-side wrappers put the clipping norm into every training message's
config; our ClientApp runs Flower's mod only then
(:func:`fl_clients.privacy.central_clipping_mod`). :class:`CentralDP`
forwards everything to the wrapper and adds, per round, the clipping norm
used and the standard deviation of the noise added to the aggregate, so both
reach MLflow with the round's metrics.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import compute_stdv
from omegaconf import DictConfig


def nominal_sample_size(cfg: DictConfig) -> int:
    """Clients a round samples, as Flower's FedAvg computes it (the DP noise
    is calibrated to it: std = sigma * clip / m)."""
    return max(int(cfg.clients.num * cfg.clients.fraction_train), int(cfg.clients.min_train))


def wrap_central_dp(strategy: Strategy, cfg: DictConfig) -> Strategy:
    """``strategy`` wrapped as ``cfg.privacy.central`` says (unchanged for mode none)."""
    central = cfg.privacy.central
    if central.mode == "none":
        return strategy
    m = nominal_sample_size(cfg)
    # Flower's wrappers draw their noise from numpy's global RNG: seed it so a
    # seed reproduces a run, as run_experiment seeds `random` for sampling
    np.random.seed(int(cfg.seed))
    if central.mode in ("server-fixed", "client-fixed"):
        cls = DifferentialPrivacyServerSideFixedClipping if central.mode == "server-fixed" \
            else DifferentialPrivacyClientSideFixedClipping
        wrapper = cls(strategy, float(central.noise_multiplier), float(central.clipping_norm), m)
    else:
        cls = DifferentialPrivacyServerSideAdaptiveClipping if central.mode == "server-adaptive" \
            else DifferentialPrivacyClientSideAdaptiveClipping
        stddev = central.clipped_count_stddev
        wrapper = cls(
            strategy, float(central.noise_multiplier), m,
            initial_clipping_norm=float(central.clipping_norm),
            target_clipped_quantile=float(central.target_clipped_quantile),
            clip_norm_lr=float(central.clip_norm_lr),
            clipped_count_stddev=None if stddev is None else float(stddev),
        )
    return CentralDP(wrapper)


class CentralDP(Strategy):
    """Forwards to one of Flower's DP wrappers and reports its parameters.

    Adds to each round's train metrics ``central_dp_clip_norm`` (the norm
    updates were clipped to), ``central_dp_noise_std`` (the noise's standard
    deviation on the aggregate, ``compute_stdv`` as Flower adds it) and
    ``central_dp_noise_multiplier`` (for adaptive clipping Flower derives it
    from the configured one and the clipped-count noise).
    """

    def __init__(self, wrapper: Strategy) -> None:
        super().__init__()
        self.wrapper = wrapper

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.wrapper.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if not any(not r.has_error() for r in replies):
            return None, None  # nobody trained (adaptive clipping would divide by zero)
        clip_used = float(self.wrapper.clipping_norm)
        arrays, metrics = self.wrapper.aggregate_train(server_round, replies)
        if arrays is not None:
            metrics = MetricRecord(dict(metrics or {}))
            metrics["central_dp_clip_norm"] = clip_used
            metrics["central_dp_noise_multiplier"] = float(self.wrapper.noise_multiplier)
            metrics["central_dp_noise_std"] = float(compute_stdv(
                self.wrapper.noise_multiplier, self.wrapper.clipping_norm, self.wrapper.num_sampled_clients
            ))
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.wrapper.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.wrapper.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.wrapper.summary()
