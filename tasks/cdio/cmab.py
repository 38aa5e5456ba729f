"""Cross-domain collaborative optimisation as a combinatorial multi-armed
bandit (paper 004 §3.3, eqs. 8-10; CUCB of Chen et al. 2016, the paper's [4]).

Base arms are (task type, server) pairs; a super-arm assigns every task of
the slot to one server (constraint C3) with no server over its capacity.
The reward of a super-arm is the sum of its base arms' rewards, each in
[0, 1] (:func:`task_reward`). Each slot CUCB plays the super-arm that
maximises the sum of the base arms' UCB indices
``mean + sqrt(1.5 ln t / n)`` (unplayed arms: +inf, i.e. played first) and
updates the played base arms with what it observed.

The oracle is exact: with each server's capacity unrolled into that many
columns, the best super-arm is a rectangular assignment problem, solved by
SciPy's ``linear_sum_assignment`` (so eq. 10's alpha = beta = 1). The
per-slot regret (logged per step) is the best super-arm in hindsight of
the slot (the oracle on the realised rewards) minus the played one:
eq. 10 with alpha beta = 1, against the clairvoyant per-slot optimum
rather than one fixed super-arm (tasks differ per slot, so no fixed
super-arm exists); it upper-bounds the pseudo-regret.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

UNPLAYED = 1e6  # stands for +inf in the oracle (the solver needs finite costs)


def best_assignment(values: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """The super-arm maximising ``sum_i values[i, server_i]`` with at most
    ``capacity[j]`` tasks per server ``j``; returns each task's server.

    Parameters
    ----------
    values : ndarray (K, M)
        Value of every task on every server (``-inf``: not allowed).
    capacity : ndarray (M,)
        Whole numbers; their sum must reach K.
    """
    values = np.asarray(values, dtype=float)
    capacity = np.asarray(capacity, dtype=int)
    k, m = values.shape
    if capacity.shape != (m,) or (capacity < 0).any() or capacity.sum() < k:
        raise ValueError(f"capacities {capacity.tolist()} cannot hold {k} tasks on {m} servers: "
                         "give every server a whole number >= 0 with a sum >= the tasks")
    columns = np.repeat(np.arange(m), np.minimum(capacity, k))  # server of every unrolled column
    finite = np.where(np.isfinite(values), values, -UNPLAYED * 10)
    rows, cols = linear_sum_assignment(finite[:, columns], maximize=True)
    out = np.empty(k, dtype=int)
    out[rows] = columns[cols]
    return out


def task_reward(success: np.ndarray, cost: np.ndarray, cost_weight: float) -> np.ndarray:
    """Per task: 0 if a requirement is missed, else ``1 - cost_weight x cost`` with ``cost`` in [0, 1]
    (eq. 9's -E[U + phi B] once the constraints C1, C2 hold; success always beats failure when cost_weight < 1)."""
    return np.where(success, 1.0 - cost_weight * np.clip(cost, 0.0, 1.0), 0.0)


class CUCB:
    """Combinatorial UCB over ``num_types x num_servers`` base arms.

    Parameters
    ----------
    num_types, num_servers : int
    exploration : float
        The 1.5 of ``sqrt(1.5 ln t / n)`` (Chen et al. 2016).
    prior_means : ndarray (num_types, num_servers), optional
        One pseudo-observation per base arm (CDIO: the preference
        prediction's initial placement, Algorithm 1 step 1); without it
        every base arm is unplayed.
    """

    def __init__(self, num_types: int, num_servers: int, exploration: float = 1.5,
                 prior_means: np.ndarray | None = None) -> None:
        self.exploration = float(exploration)
        self.counts = np.zeros((num_types, num_servers))
        self.sums = np.zeros((num_types, num_servers))
        if prior_means is not None:
            self.counts += 1.0
            self.sums += np.asarray(prior_means, dtype=float)
        self.t = 0

    @property
    def means(self) -> np.ndarray:
        return np.divide(self.sums, self.counts, out=np.zeros_like(self.sums), where=self.counts > 0)

    def indices(self) -> np.ndarray:
        """UCB index of every base arm (:data:`UNPLAYED` where never played)."""
        bonus = np.sqrt(self.exploration * np.log(max(self.t, 1)) / np.maximum(self.counts, 1))
        return np.where(self.counts > 0, self.means + bonus, UNPLAYED)

    def select(self, types: np.ndarray, capacity: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
        """The super-arm for tasks of ``types`` (one server per task)."""
        self.t += 1
        values = self.indices()[types]
        if allowed is not None:
            values = np.where(allowed, values, -np.inf)
        return best_assignment(values, capacity)

    def update(self, types: np.ndarray, servers: np.ndarray, rewards: np.ndarray) -> None:
        """Semi-bandit feedback: every played base arm's reward."""
        np.add.at(self.counts, (types, servers), 1.0)
        np.add.at(self.sums, (types, servers), rewards)
