"""Fault handling settings from the config, for the experiment.

* ``clients.min_replies`` / ``clients.round_retries`` go to the round driver,
  with a callback that records each round's client failures (one CSV per
  round, ``failures/round_<k>.csv``, beside the per-kind counts the driver
  adds to the round's metrics);
* ``faults.*`` becomes the fault plan sent to the clients (only when some
  fraction is non-zero, so an ordinary run's messages are unchanged).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from fl_common.faults import CONFIG_KEY, FaultPlan
from fl_server.engine.reply_checks import ClientFailure, failures_csv


def fault_plan(cfg: DictConfig) -> FaultPlan | None:
    """The configured fault injection, or None when it is off."""
    if "faults" not in cfg:
        return None
    plan = FaultPlan.from_config(cfg.faults, seed=int(cfg.seed))
    return plan if plan.active else None


def client_config(cfg: DictConfig) -> dict[str, str]:
    """Entries for the clients' ConfigRecord: the fault plan, if any."""
    plan = fault_plan(cfg)
    return {CONFIG_KEY: plan.to_json()} if plan else {}


def min_replies(cfg: DictConfig) -> int:
    """Usable updates a round needs (``clients.min_replies``, default ``clients.min_train``)."""
    value = cfg.clients.min_replies
    return int(cfg.clients.min_train) if value is None else int(value)


def driver_settings(cfg: DictConfig, tracker: Any) -> dict[str, Any]:
    """Keyword arguments for :class:`fl_server.engine.rounds.RoundDriver`.

    ``tracker`` is the run's :class:`fl_server.experiments.tracking.RunTracker` (anything
    with ``log_text(text, artifact_file)``).
    """

    def record(server_round: int, failures: list[ClientFailure]) -> None:
        tracker.log_text(failures_csv(failures), f"failures/round_{server_round:03d}.csv")

    return {
        "min_replies": min_replies(cfg),
        "round_retries": int(cfg.clients.round_retries),
        "on_failures": record,
    }
