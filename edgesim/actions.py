"""The action interface shared by the twin, the envs, the shield and the baselines.

Per edge node (the ingress site of its users' requests) an action says:

* ``admit``: the fraction of this step's arrivals admitted (the rest is rejected);
* ``placement``: how the admitted requests split between the node itself,
  its cluster neighbours and the cluster's cloud region (a simplex row);
* ``replica_delta``: replicas to add (cold start) or remove on this node;
* ``migrate_to``: move one warm replica, with its share of the queue, to
  another node of the cluster (a node index, :data:`AUTO_TARGET` to let the
  shield pick the neighbour with the most free slots, or :data:`NO_MIGRATION`).

RL agents use the flat encoding of :func:`Action.from_env`: six numbers in
[-1, 1] per node, so that the Box is symmetric and normalised as PPO likes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NO_MIGRATION = -1
AUTO_TARGET = -2
ENV_ACTION_SIZE = 6  # admit, w_local, w_neighbour, w_cloud, replica_delta, migrate


@dataclass
class Action:
    """Actions of all N edge nodes as arrays (see the module docstring).

    Attributes
    ----------
    admit : (N,) float
    placement : (N, 3) float
        Columns: local, neighbour, cloud; rows need not be normalised.
    replica_delta : (N,) int
    migrate_to : (N,) int
    """

    admit: np.ndarray
    placement: np.ndarray
    replica_delta: np.ndarray
    migrate_to: np.ndarray

    @classmethod
    def hold(cls, num_nodes: int) -> "Action":
        """Admit everything, serve it locally, change nothing."""
        placement = np.zeros((num_nodes, 3))
        placement[:, 0] = 1.0
        return cls(
            admit=np.ones(num_nodes),
            placement=placement,
            replica_delta=np.zeros(num_nodes, dtype=np.int64),
            migrate_to=np.full(num_nodes, NO_MIGRATION, dtype=np.int64),
        )

    @classmethod
    def from_env(cls, rows: np.ndarray, max_replica_step: int) -> "Action":
        """Decode env actions, (N, 6) in [-1, 1].

        ``admit = (x0 + 1) / 2``; placement weights ``(x1..x3 + 1) / 2``
        (normalised by the shield; all zero means local);
        ``replica_delta = round(x4 * max_replica_step)``; ``x5 > 0`` asks for
        one migration to the best neighbour. Out-of-range values pass through
        so that the shield clips and counts them.
        """
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, ENV_ACTION_SIZE)
        delta = rows[:, 4] * max_replica_step
        if not np.isfinite(delta).all():  # NaN/inf would not survive the cast to int
            delta = np.clip(np.nan_to_num(delta), -1e9, 1e9)
        return cls(
            admit=(rows[:, 0] + 1.0) * 0.5,
            placement=(rows[:, 1:4] + 1.0) * 0.5,
            replica_delta=np.rint(delta).astype(np.int64),
            migrate_to=np.where(rows[:, 5] > 0, AUTO_TARGET, NO_MIGRATION),
        )


def encode_env_action(
    admit: np.ndarray,
    placement: np.ndarray,
    replica_delta: np.ndarray,
    migrate: np.ndarray,
    max_replica_step: int,
) -> np.ndarray:
    """The inverse of :meth:`Action.from_env`: (N, 6) rows in [-1, 1].

    Parameters
    ----------
    admit : (N,) float in [0, 1]
    placement : (N, 3) float, rows on the simplex
    replica_delta : (N,) int, |delta| <= max_replica_step
    migrate : (N,) bool
    max_replica_step : int
    """
    rows = np.empty((len(admit), ENV_ACTION_SIZE))
    rows[:, 0] = 2.0 * np.asarray(admit) - 1.0
    rows[:, 1:4] = 2.0 * np.asarray(placement) - 1.0
    rows[:, 4] = np.clip(np.asarray(replica_delta) / max_replica_step, -1.0, 1.0)
    rows[:, 5] = np.where(migrate, 1.0, -1.0)
    return rows


# A small discrete menu for value-based agents (QMIX, DQN): placement preset x
# replica delta, plus "migrate one replica" and "admit only half".
_PRESETS = {
    "local": (1.0, 0.0, 0.0),
    "local+neighbour": (0.5, 0.5, 0.0),
    "local+cloud": (0.5, 0.0, 0.5),
    "cloud": (0.0, 0.0, 1.0),
}


def discrete_menu(max_replica_step: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """Env-encoded rows of the discrete actions and their names, ((K, 6), K names)."""
    names, admit, placement, delta, migrate = [], [], [], [], []
    for preset, split in _PRESETS.items():
        for step in (-1, 0, 1):
            names.append(f"{preset}/replicas{step:+d}")
            admit.append(1.0), placement.append(split), delta.append(step), migrate.append(False)
    names += ["local/migrate", "local/admit-half"]
    admit += [1.0, 0.5]
    placement += [_PRESETS["local"], _PRESETS["local"]]
    delta += [0, 0]
    migrate += [True, False]
    rows = encode_env_action(np.array(admit), np.array(placement), np.array(delta), np.array(migrate), max_replica_step)
    return rows, tuple(names)
