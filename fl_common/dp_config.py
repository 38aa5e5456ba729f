"""DP-SGD's settings as they travel in the ConfigRecord (server writes, client reads).

Opacus itself runs only on the clients (:mod:`fl_clients.privacy`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

CENTRAL_MODE_KEY = "central-dp-mode"   # set by train_config: client-fixed | client-adaptive


@dataclass(frozen=True)
class DPSettings:
    """One client's DP-SGD settings.

    Parameters
    ----------
    noise_multiplier : float
        Noise sigma (>= 0); ignored in target mode.
    max_grad_norm : float
        Per-sample gradient clipping norm C (> 0).
    delta : float
        The delta of (epsilon, delta)-DP, in (0, 1).
    epsilon_budget : float or None
        This client's epsilon budget; None = no cap (target mode: the target).
    target_epsilon : float or None
        If set, sigma is chosen so that ``total_rounds`` rounds spend it.
    total_rounds : int
        Rounds in the run (target mode plans sigma for all of them).
    """

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    epsilon_budget: float | None = None
    target_epsilon: float | None = None
    total_rounds: int = 1

    @property
    def budget(self) -> float:
        """The epsilon this client may spend (inf = unlimited)."""
        if self.epsilon_budget is not None:
            return self.epsilon_budget
        return self.target_epsilon if self.target_epsilon is not None else math.inf


def client_config(dpsgd: Mapping, num_rounds: int) -> dict[str, float | int | str]:
    """ConfigRecord entries that switch DP-SGD on at the clients (server side)."""
    entries: dict[str, float | int | str] = {
        "dp-noise": float(dpsgd["noise_multiplier"]),
        "dp-clip": float(dpsgd["max_grad_norm"]),
        "dp-delta": float(dpsgd["delta"]),
        "dp-rounds": int(num_rounds),
    }
    if dpsgd.get("epsilon_budget") is not None:
        entries["dp-budget"] = float(dpsgd["epsilon_budget"])
    if dpsgd.get("target_epsilon") is not None:
        entries["dp-target-eps"] = float(dpsgd["target_epsilon"])
    if dpsgd.get("client_budgets"):
        entries["dp-client-budgets"] = json.dumps({str(k): float(v) for k, v in dpsgd["client_budgets"].items()})
    return entries


def settings_from_config(config: Mapping, partition_id: int) -> DPSettings | None:
    """This client's settings from its ConfigRecord; None when DP-SGD is off."""
    if "dp-noise" not in config:
        return None
    budget = float(config["dp-budget"]) if "dp-budget" in config else None
    overrides = json.loads(str(config.get("dp-client-budgets", "{}")))
    if str(partition_id) in overrides:
        budget = float(overrides[str(partition_id)])
    return DPSettings(
        noise_multiplier=float(config["dp-noise"]),
        max_grad_norm=float(config["dp-clip"]),
        delta=float(config["dp-delta"]),
        epsilon_budget=budget,
        target_epsilon=float(config["dp-target-eps"]) if "dp-target-eps" in config else None,
        total_rounds=int(config["dp-rounds"]),
    )
