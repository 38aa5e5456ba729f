"""Regional fairness (paper 000 §3.3 and §4.3): the measures and the reward term.

Line numbers refer to ``../shared/papers/000_881f782ef59aed0b.txt``.

Measures, per episode and region j (an edge cluster; :mod:`edgesim.regions`):

* fulfillment rate ``F_j = A_j / D_j``: requests served over requests that
  arrived, paper 000's "ratio of actual supply to ... demand" (eq. 11, l. 166);
* fairness variance ``Var_j(F_j)``, the ``Var(R_j)`` term of eq. 11. The
  paper's ``R_j`` is a composite indicator score (eq. 10, l. 162) of economic
  data the twin does not have; we use the fulfillment rate (our choice);
* Jain's index ``(sum F_j)^2 / (J sum F_j^2)`` of the same numbers (1 = equal);
* satisfaction ``S_j = 0.4 Norm(A_j) + 0.3 Norm(1/T_j) + 0.3 Norm(1/R_j)``
  (l. 227), with A_j the fulfillment rate, T_j the mean response time and
  R_j the redundancy rate (provisioned edge capacity left idle). The paper
  does not say how it normalises; a min-max over regions (its eq. 9) would
  make satisfaction relative within one run, useless across methods, so we
  use fixed references (our choice): ``Norm(1/x) = min(1, x_ref / x)``, i.e.
  a region answering within ``response_ref_ms`` on average, or idling at most
  ``redundancy_ref`` of its capacity, scores 1 on that term.

The reward term (eq. 11 and l. 168-170): every node's reward gets
``- lambda(t) * 4 * Var_j(F_j(t))``, with ``F_j(t)`` each region's
fulfillment smoothed over ``window_s`` (exponential average) and 4 x Var in
[0, 1] (fulfillments lie in [0, 1], so their variance is at most 1/4), like
the twin's other reward terms. ``lambda(t) = Omega(t)``:

* ``constant``: ``lambda``;
* ``spread``: ``lambda * min(1, sd_j(F_j(t)) / spread_ref)``: the penalty
  grows with how far the regions drift apart, the paper's "according to the
  fluctuation degree of resources between regions" (l. 166);
* ``ramp``: ``lambda * min(1, t / ramp_s)``: no penalty while the smoothed
  fulfillments are still settling.

Pure numpy; bad settings are one :class:`EdgeSimError` naming the value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import EdgeSimError, no_unknown_keys

OMEGA_SCHEDULES = ("constant", "spread", "ramp")
SATISFACTION_WEIGHTS = (0.4, 0.3, 0.3)  # paper 000 l. 227: arrival rate, 1/response time, 1/redundancy


@dataclass(frozen=True)
class FairnessSpec:
    """The ``twin.fairness`` section (see the module docstring)."""

    lam: float = 0.0
    omega: str = "constant"
    window_s: float = 60.0
    spread_ref: float = 0.1
    ramp_s: float = 60.0
    response_ref_ms: float | None = None  # None: the twin's SLO
    redundancy_ref: float = 0.2

    @property
    def enabled(self) -> bool:
        return self.lam > 0


_KEYS = ("lambda", "omega", "window_s", "spread_ref", "ramp_s", "response_ref_ms", "redundancy_ref")


def parse_fairness(config: Any) -> FairnessSpec:
    """Validate ``twin.fairness`` (None or a mapping with the keys above)."""
    config = {} if config is None else config
    if not isinstance(config, Mapping):
        raise EdgeSimError(f"twin.fairness={config!r} must be a mapping, e.g. {{lambda: 1.0, omega: spread}}")
    no_unknown_keys(config, tuple(_KEYS), "twin.fairness")
    lam = config.get("lambda", 0.0)
    if not _finite(lam) or not 0.0 <= lam <= 1.0:
        raise EdgeSimError(f"twin.fairness.lambda={lam!r} is outside [0, 1]: paper 000 (l. 168) weighs "
                           "fairness with lambda in [0, 1]; use e.g. 0 (off) or 1")
    omega = config.get("omega", "constant")
    if omega not in OMEGA_SCHEDULES:
        raise EdgeSimError(f"twin.fairness.omega={omega!r} is an unknown Omega(t) schedule: "
                           f"use one of {list(OMEGA_SCHEDULES)}")
    values = {}
    for key in ("window_s", "spread_ref", "ramp_s", "response_ref_ms", "redundancy_ref"):
        value = config.get(key, getattr(FairnessSpec, key))
        if key == "response_ref_ms" and value is None:
            continue
        if not _finite(value) or value <= 0:
            raise EdgeSimError(f"twin.fairness.{key}={value!r} must be a number > 0")
        values[key] = float(value)
    return FairnessSpec(lam=float(lam), omega=omega, **values)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------ measures


def fulfillment(served: np.ndarray, arrived: np.ndarray) -> np.ndarray:
    """``A_j / D_j`` per region; 1 where nothing arrived (no demand left unmet)."""
    served, arrived = np.asarray(served, dtype=float), np.asarray(arrived, dtype=float)
    return np.divide(served, arrived, out=np.ones_like(served), where=arrived > 0)


def fairness_variance(values: np.ndarray) -> float:
    """Population variance over regions (eq. 11's Var term)."""
    return float(np.var(np.asarray(values, dtype=float)))


def jain_index(values: np.ndarray) -> float:
    """Jain's fairness index ``(sum x)^2 / (n sum x^2)`` in [1/n, 1]; 1 when all are zero."""
    values = np.asarray(values, dtype=float)
    squares = float((values**2).sum())
    return float(values.sum() ** 2 / (len(values) * squares)) if squares > 0 else 1.0


def inverse_score(values: np.ndarray, reference: float) -> np.ndarray:
    """``Norm(1/x) = min(1, reference / x)``: 1 at or below the reference (x = 0 included)."""
    values = np.asarray(values, dtype=float)
    return np.minimum(1.0, np.divide(reference, values, out=np.ones_like(values), where=values > 0))


def satisfaction(fulfilled: np.ndarray, response_s: np.ndarray, redundancy: np.ndarray,
                 response_ref_s: float, redundancy_ref: float) -> np.ndarray:
    """Per-region satisfaction ``S_j`` (l. 227), in [0, 1]."""
    w_arrival, w_response, w_redundancy = SATISFACTION_WEIGHTS
    return (w_arrival * np.clip(np.asarray(fulfilled, dtype=float), 0.0, 1.0)
            + w_response * inverse_score(response_s, response_ref_s)
            + w_redundancy * inverse_score(redundancy, redundancy_ref))


# ------------------------------------------------------------------ reward term


def omega(spec: FairnessSpec, time_s: float, smoothed: np.ndarray) -> float:
    """``lambda(t) = Omega(t)`` for the schedule of ``spec``."""
    if spec.omega == "spread":
        return spec.lam * min(1.0, float(np.std(smoothed)) / spec.spread_ref)
    if spec.omega == "ramp":
        return spec.lam * min(1.0, time_s / spec.ramp_s)
    return spec.lam


def fairness_penalty(spec: FairnessSpec, time_s: float, smoothed: np.ndarray) -> float:
    """The reward term every node pays: ``lambda(t) * 4 * Var_j(F_j(t))``, in [0, lambda]."""
    return omega(spec, time_s, smoothed) * 4.0 * fairness_variance(smoothed)


class SmoothedFulfillment:
    """Each region's fulfillment, exponentially averaged over ``window_s``.

    Starts at 1 (no unmet demand yet); a step with no arrivals in a region
    leaves its value unchanged.
    """

    def __init__(self, regions: int, step_s: float, window_s: float) -> None:
        self.alpha = min(1.0, step_s / window_s)
        self.values = np.ones(regions)

    def update(self, served: np.ndarray, arrived: np.ndarray) -> np.ndarray:
        step = np.minimum(fulfillment(served, arrived), 1.0)  # a backlog served late can push a step past 1
        self.values = np.where(np.asarray(arrived) > 0, self.values + self.alpha * (step - self.values), self.values)
        return self.values
