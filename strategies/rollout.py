"""Validated rollout (paper 001 §4.3): "a digital-twin replay validates
aggregated models … before rollout; if regressions are detected, the server
triggers rollbacks or mixes in a larger fraction of the previous stable model".

:class:`RolloutGuard` wraps any strategy, as Flower's DP wrappers do. When the
wrapped strategy returns a new global model, the guard scores it with the
task's validation replay (higher is better: public-validation accuracy for
image tasks, minus the MASE on a held-out trace window for forecasting, the
return of a twin episode for RL) and compares it with the last *stable*
model, the last one adopted that passed:

* no regression beyond the threshold: the candidate is adopted and becomes
  the stable model;
* a regression, ``mode="rollback"``: the stable model is kept (the round's
  aggregate is discarded);
* a regression, ``mode="mix"``: ``(1 - f) * candidate + f * stable`` is
  adopted; it becomes the stable model only if it passes itself.

A regression is ``stable_score - candidate_score > threshold``, with the
threshold scaled by ``|stable_score|`` when ``relative``. Per round:
``rollout_score`` (the candidate), ``rollout_stable_score``,
``rollout_adopted_score``, ``rollout_rejected`` / ``rollout_mixed`` (0/1)
and their running totals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from .sync import adopt

MODES = ("rollback", "mix")


def mix(candidate: ArrayRecord, stable: ArrayRecord, fraction: float) -> ArrayRecord:
    """``(1 - fraction) * candidate + fraction * stable`` per float tensor (others: the candidate's)."""
    out = {}
    for key in candidate.keys():
        new, old = candidate[key].numpy(), stable[key].numpy()
        if np.issubdtype(new.dtype, np.floating):
            value = (1 - fraction) * new.astype(np.float64) + fraction * old.astype(np.float64)
            out[key] = Array(np.asarray(value, dtype=new.dtype))
        else:
            out[key] = Array(np.array(new))
    return ArrayRecord(out)


class RolloutGuard(Strategy):
    """Validate every new global model before it is adopted (module docstring).

    Parameters
    ----------
    strategy : Strategy
        The wrapped strategy.
    score : callable
        ``ArrayRecord -> float``, higher is better (the task's validation replay).
    threshold : float
        Tolerated drop of the score, >= 0.
    relative : bool
        The threshold is a fraction of ``|stable score|``.
    mode : str
        ``rollback`` or ``mix``.
    mix_fraction : float
        f in (0, 1): the share of the stable model in a mix.
    """

    def __init__(self, strategy: Strategy, score: Callable[[ArrayRecord], float], threshold: float = 0.01,
                 relative: bool = True, mode: str = "rollback", mix_fraction: float = 0.5) -> None:
        if mode not in MODES:
            raise ValueError(f"rollout mode '{mode}' is unknown: use {' or '.join(MODES)}")
        if not threshold >= 0:
            raise ValueError(f"rollout threshold={threshold} must be >= 0")
        if not 0 < mix_fraction < 1:
            raise ValueError(f"rollout mix_fraction={mix_fraction} must lie in (0, 1)")
        self.strategy, self.score = strategy, score
        self.threshold, self.relative, self.mode, self.mix_fraction = threshold, relative, mode, mix_fraction
        self.stable: ArrayRecord | None = None
        self.stable_score: float | None = None
        self.current: ArrayRecord | None = None  # what the driver holds (the last adopted model)
        self.rejected_total = 0
        self.mixed_total = 0

    def __getattr__(self, name: str) -> Any:  # the wrapped strategy's extras (e.g. is_busy)
        if name in ("strategy", "state_dict", "load_state_dict"):  # checkpoints save the guard's own state
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def summary(self) -> None:
        log(INFO, "\t├──> rollout guard: %s, threshold %s%s, mix fraction %s", self.mode, self.threshold,
            " (relative)" if self.relative else "", self.mix_fraction)
        self.strategy.summary()

    def regressed(self, score: float) -> bool:
        """Whether ``score`` falls more than the threshold below the stable score."""
        limit = self.threshold * (abs(self.stable_score) if self.relative else 1.0)
        return bool(self.stable_score - score > limit or not np.isfinite(score))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.stable is None:  # the initial model is the first stable one
            self.stable, self.current = arrays, arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        out = MetricRecord(dict(metrics)) if metrics is not None else MetricRecord()
        out.update({"rollout_rejected": 0.0, "rollout_mixed": 0.0})
        if arrays is None or self.stable is None:
            return arrays, self._totals(out)
        if self.stable_score is None:
            self.stable_score = float(self.score(self.stable))
        candidate = float(self.score(arrays))
        out["rollout_score"], out["rollout_stable_score"] = candidate, self.stable_score
        adopted, adopted_score = arrays, candidate
        if not self.regressed(candidate):
            self.stable, self.stable_score = arrays, candidate
        elif self.mode == "rollback":
            log(WARNING, "rollout: round %s model scores %.4g against the stable %.4g: rolled back",
                server_round, candidate, self.stable_score)
            adopted, adopted_score = self.stable, self.stable_score
            out["rollout_rejected"] = 1.0
            self.rejected_total += 1
            adopt(self.strategy, adopted, reset_momentum=True)
        else:
            adopted = mix(arrays, self.stable, self.mix_fraction)
            adopted_score = float(self.score(adopted))
            log(WARNING, "rollout: round %s model scores %.4g against the stable %.4g: mixed in %.0f %% of the "
                "stable model (%.4g)", server_round, candidate, self.stable_score, 100 * self.mix_fraction, adopted_score)
            out["rollout_mixed"] = 1.0
            self.mixed_total += 1
            if not self.regressed(adopted_score):
                self.stable, self.stable_score = adopted, adopted_score
            adopt(self.strategy, adopted)
        out["rollout_adopted_score"] = adopted_score
        self.current = adopted
        return adopted, self._totals(out)

    def _totals(self, out: MetricRecord) -> MetricRecord:
        out["rollout_rejected_total"] = float(self.rejected_total)
        out["rollout_mixed_total"] = float(self.mixed_total)
        return out

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
