"""Server-side assembly of privacy and compression for one experiment.

``run_experiment`` calls these four functions; with the default config
(``privacy=none compression=none``) they change nothing but the byte
accounting: the clients' ConfigRecord gains no key, the strategy is not
wrapped and the round driver is the plain one.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from omegaconf import DictConfig

from fl_common import dp_config
from fl_common.compression import CompressionSettings
from fl_server.engine.comm import AccountingGrid
from fl_server.engine.rounds import RoundDriver


def client_config(cfg: DictConfig) -> dict[str, Any]:
    """ConfigRecord entries for DP-SGD, client-side central DP and compression
    (none of them by default: the default ConfigRecord stays as it was)."""
    entries: dict[str, Any] = {}
    if "privacy" in cfg and cfg.privacy.dpsgd.enabled:
        entries.update(dp_config.client_config(cfg.privacy.dpsgd, int(cfg.num_rounds)))
    if "privacy" in cfg and cfg.privacy.central.mode.startswith("client"):
        entries[dp_config.CENTRAL_MODE_KEY] = str(cfg.privacy.central.mode)
    settings = compression_settings(cfg)
    if settings is not None:
        entries.update(settings.to_config())
    return entries


def compression_settings(cfg: DictConfig) -> CompressionSettings | None:
    """The configured compression, or None when it is off."""
    if "compression" not in cfg or not cfg.compression.enabled:
        return None
    c = cfg.compression
    return CompressionSettings(
        k=float(c.k),
        bits=None if c.quantise_bits is None else int(c.quantise_bits),
        error_feedback=bool(c.error_feedback),
        downlink=bool(c.downlink),
    )


def accounting_grid(grid: Grid, cfg: DictConfig) -> AccountingGrid:
    """``grid`` with byte accounting, and compression when configured."""
    return AccountingGrid(grid, compression_settings(cfg))


def protect_strategy(strategy: Strategy, cfg: DictConfig) -> Strategy:
    """The strategy inside Flower's central-DP wrapper, if one is configured."""
    if "privacy" not in cfg:
        return strategy
    from strategies.central_dp import wrap_central_dp

    return wrap_central_dp(strategy, cfg)


def round_driver(cfg: DictConfig, client_sizes: list[int]) -> tuple[type[RoundDriver], dict[str, Any]]:
    """The driver class (SecAgg+ or plain) and its extra keyword arguments."""
    if "privacy" not in cfg or not cfg.privacy.secagg.enabled:
        return RoundDriver, {}
    from fl_server.engine.secagg import SecAggPlusRoundDriver, SecAggSettings

    settings = SecAggSettings.from_config(cfg.privacy.secagg, max_weight=float(max(client_sizes)))
    return SecAggPlusRoundDriver, {"secagg": settings}
