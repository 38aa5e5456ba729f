"""Safety shield (paper 001 §4.1, §5.3): project any action onto the safe set.

"Feasible actions are projected through a safety shield ... before
execution." The twin runs every action through :meth:`SafetyShield.project`,
so no policy, learned or not, can:

* hold more replicas than a node has slots (compute slices that fit in its
  memory), or any on a failed node (rule ``capacity`` / ``failed_node``);
* provision more replicas than the node power cap and the GPU power cap
  allow at full load (``power``);
* provision more replicas than keep the node's temperature at or below
  ``max_c`` after this step even at full load (``thermal``);
* migrate more than ``migration_cap_per_min`` replicas per cluster in any
  60 s window (``migration_rate``; paper 001: 2/min per service);
* send the cloud more than ``cloud_margin`` x a region's capacity (predicted
  from last step's arrivals), or anything while it is down (``cloud_capacity``);
* route requests to a failed node or to neighbours that are all down (``failed_node``);
* pass malformed values: NaN, admission outside [0, 1], negative placement
  weights, a replica change beyond ``max_replica_step`` (``bounds``).

Every clipped (node, rule) pair counts as one intervention.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np

from .actions import AUTO_TARGET, NO_MIGRATION, Action
from .scenario import Scenario

# Direct ufunc reductions: ndarray.any()/all() add a Python-level wrapper per call.
_any = partial(np.logical_or.reduce, axis=None)
_all = partial(np.logical_and.reduce, axis=None)
_min = partial(np.minimum.reduce, axis=None)
_max = partial(np.maximum.reduce, axis=None)

RULES = ("bounds", "failed_node", "capacity", "power", "thermal", "migration_rate", "cloud_capacity")
BOUNDS, FAILED, CAPACITY, POWER, THERMAL, MIGRATION, CLOUD = range(len(RULES))


class SafetyShield:
    """Clips actions to the constraints of ``scenario``.

    Parameters
    ----------
    scenario : Scenario
        Supplies node slots, power and thermal parameters, caps and topology.
    """

    def __init__(self, scenario: Scenario) -> None:
        nodes = scenario.nodes
        self.scenario = scenario
        self.nodes = nodes
        self.max_step = scenario.shield.max_replica_step
        self.slots = nodes.slots
        self.dynamic_w = nodes.active_w - nodes.idle_w
        per_slot_w = self.dynamic_w / scenario.service.max_replicas_per_node
        # Worst-case power with r replicas: idle + r * per_slot_w (all busy).
        with np.errstate(divide="ignore", invalid="ignore"):
            node_cap = np.floor((scenario.power.node_cap_w - nodes.idle_w) / per_slot_w + 1e-9)
            gpu_cap = np.where(nodes.gpu, np.floor(scenario.power.gpu_cap_w / per_slot_w + 1e-9), np.inf)
        self.power_limit = np.clip(np.nan_to_num(np.minimum(node_cap, gpu_cap), posinf=1e9), 0, None).astype(np.int64)
        self.per_slot_w = per_slot_w
        # A profile with active_w == idle_w has no dynamic power: no thermal or power limit.
        self.inverse_slot_w = np.divide(1.0, per_slot_w, out=np.full_like(per_slot_w, 1e12), where=per_slot_w > 0)
        self.inverse_r = 1.0 / nodes.thermal_r
        thermal = scenario.thermal
        self.max_c = thermal.max_c
        self.ambient_c = thermal.ambient_c
        self.every_node_has_neighbours = bool(nodes.neighbours.any(axis=1).all())
        self.alpha = 1.0 - math.exp(-scenario.step_s / thermal.tau_s)
        # Below cool_c a node stays <= max_c this step even with every slot busy:
        # T + (ambient + R P_full - T) alpha <= max_c  <=>  T <= cool_c.
        settled_c = self.ambient_c + nodes.thermal_r * (nodes.idle_w + per_slot_w * self.slots)
        if self.alpha < 1.0:
            self.cool_c = (self.max_c - self.alpha * settled_c) / (1.0 - self.alpha)
        else:  # steps much longer than tau: T' does not depend on T
            self.cool_c = np.where(settled_c <= self.max_c, np.inf, -np.inf)
        self.region_of_node = nodes.region[nodes.cluster]
        self.num_regions = len(scenario.cloud_regions)
        self.cloud_step_capacity = scenario.cloud_rate * scenario.step_s * scenario.shield.cloud_margin
        self.smallest_cloud = float(self.cloud_step_capacity.min())
        self.num_nodes = len(nodes.cluster)
        self.migration_cap = int(scenario.shield.migration_cap_per_min)
        self.last_limit = self.slots.copy()  # replica limit of the last projection
        self.limit_changed = True
        self.no_migrations = np.full(len(nodes.cluster), NO_MIGRATION, dtype=np.int64)  # shared, read-only

    # ------------------------------------------------------------ limits
    def thermal_limit(self, temp_c: np.ndarray) -> np.ndarray:
        """Most replicas each node may run at full load this step and stay <= max_c, (N,).

        With T' = T + (ambient + R P - T) alpha, T' <= max_c needs
        P <= ((max_c - T) / alpha + T - ambient) / R.
        """
        max_power = ((self.max_c - temp_c) / self.alpha + temp_c - self.ambient_c) * self.inverse_r
        limit = np.floor((max_power - self.nodes.idle_w) * self.inverse_slot_w + 1e-9)
        return np.minimum(np.maximum(limit, 0.0), 1e9).astype(np.int64)

    def replica_limits(self, state) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(memory/slot limit, power limit, thermal limit) per node, (N,) each; 0 on failed nodes."""
        alive = state.alive
        if _all(state.temp_c <= self.cool_c):  # even full load cannot reach max_c this step
            thermal = self.slots
        else:
            thermal = self.thermal_limit(state.temp_c)
        if _all(alive):
            return self.slots, self.power_limit, thermal
        return self.slots * alive, self.power_limit * alive, thermal * alive

    def replica_limit(self, state) -> np.ndarray:
        """The binding replica limit per node, (N,)."""
        slots, power, thermal = self.replica_limits(state)
        return np.minimum(np.minimum(slots, power), thermal)

    # ------------------------------------------------------------ projection
    def project(self, action: Action, state) -> tuple[Action, np.ndarray]:
        """Clip ``action`` to the safe set given ``state``.

        Parameters
        ----------
        action : Action
            Proposed actions of all N edge nodes.
        state : TwinState
            Needs ``replicas``, ``pending_total``, ``alive``, ``temp_c``,
            ``cloud_up``, ``last_arrivals``, ``queue_total`` and
            ``migration_window_sum`` (see :class:`edgesim.twin.TwinState`).

        Returns
        -------
        safe_action : Action
            A new action; ``placement`` rows are normalised, ``migrate_to``
            holds resolved targets or :data:`NO_MIGRATION`.
        interventions : numpy.ndarray of int, shape (len(RULES),)
            Clipped (node, rule) pairs per rule, in :data:`RULES` order.
        """
        counts = np.zeros(len(RULES), dtype=np.int64)
        admit, placement, delta = self._bounds(action, counts)
        alive = state.alive
        placement = self._cloud(placement, admit, state, counts)
        if not (self.every_node_has_neighbours and bool(_all(alive))):
            live_neighbour = (self.nodes.neighbours & alive[None, :]).any(axis=1)
            placement = self._dead_routes(placement, alive, live_neighbour, counts)
        target, limit = self._replicas(delta, state, counts)
        replica_delta = target - state.replicas - state.pending_total
        migrate_to = self._migrations(action.migrate_to, target, limit, state, counts)
        safe = Action(admit=admit, placement=placement, replica_delta=replica_delta, migrate_to=migrate_to)
        return safe, counts

    def _bounds(self, action: Action, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # One reduction per check on the common (valid) path; NaN fails every comparison.
        admit = np.asarray(action.admit, dtype=np.float64)
        if not (_min(admit) >= 0.0 and _max(admit) <= 1.0):
            bad = ~((admit >= 0.0) & (admit <= 1.0))
            counts[BOUNDS] += int(bad.sum())
            admit = np.minimum(np.maximum(np.nan_to_num(admit, nan=1.0), 0.0), 1.0)
        placement = np.asarray(action.placement, dtype=np.float64)
        total = np.add.reduce(placement, axis=1)
        if not (_min(placement) >= 0.0 and _min(total) > 0.0 and _max(total) < np.inf):
            bad = ~((placement >= 0.0).all(axis=1) & (total > 0.0) & np.isfinite(total))
            counts[BOUNDS] += int(bad.sum())
            placement = np.maximum(np.nan_to_num(placement, nan=0.0, posinf=1.0, neginf=0.0), 0.0)
            placement[placement.sum(axis=1) <= 0.0] = (1.0, 0.0, 0.0)
            total = placement.sum(axis=1)
        placement = placement / total[:, None]
        delta = np.asarray(action.replica_delta, dtype=np.int64)
        if not (_max(delta) <= self.max_step and _min(delta) >= -self.max_step):
            counts[BOUNDS] += int((np.abs(delta) > self.max_step).sum())
            delta = np.minimum(np.maximum(delta, -self.max_step), self.max_step)
        return admit, placement, delta

    def _cloud(self, placement: np.ndarray, admit: np.ndarray, state, counts: np.ndarray) -> np.ndarray:
        """Scale cloud shares down to what each region can take; the rest stays local."""
        cloud_share = placement[:, 2]
        if not _any(cloud_share):
            return placement
        if _all(state.cloud_up) and np.add.reduce(state.last_arrivals) + self.num_nodes <= self.smallest_cloud:
            return placement  # every region could take all of last step's arrivals
        demand = np.maximum(state.last_arrivals, 1.0) * admit * cloud_share
        region_demand = np.bincount(self.region_of_node, weights=demand, minlength=self.num_regions)
        capacity = self.cloud_step_capacity * state.cloud_up
        over = region_demand > capacity
        if not _any(over):
            return placement
        factor = np.ones(self.num_regions)
        factor[over] = capacity[over] / region_demand[over]
        node_factor = factor[self.region_of_node]
        clipped = (node_factor < 1.0) & (cloud_share > 0.0)
        if _any(clipped):
            counts[CLOUD] += int(clipped.sum())
            placement = placement.copy()
            moved = cloud_share * (1.0 - node_factor)
            placement[:, 2] -= moved
            placement[:, 0] += moved
        return placement

    def _dead_routes(
        self, placement: np.ndarray, alive: np.ndarray, live_neighbour: np.ndarray, counts: np.ndarray
    ) -> np.ndarray:
        """Local share of a failed node goes to its neighbours; neighbour share
        with no live neighbour comes back home (if home is up)."""
        to_neighbours = ~alive & live_neighbour & (placement[:, 0] > 0.0)
        home = alive & ~live_neighbour & (placement[:, 1] > 0.0)
        if _any(to_neighbours) or _any(home):
            counts[FAILED] += int(to_neighbours.sum() + home.sum())
            placement = placement.copy()
            placement[to_neighbours, 1] += placement[to_neighbours, 0]
            placement[to_neighbours, 0] = 0.0
            placement[home, 0] += placement[home, 1]
            placement[home, 1] = 0.0
        return placement

    def _replicas(self, delta: np.ndarray, state, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Replica totals (active + pending) after clipping, and the limits used."""
        current = state.replicas + state.pending_total
        slots, power, thermal = self.replica_limits(state)
        limit = np.minimum(np.minimum(slots, power), thermal)
        self.limit_changed = bool(_any(limit != self.last_limit))
        self.last_limit = limit
        if not _any(delta):  # the common case: no change asked
            wanted = current
            clipped = current > limit
            if not _any(clipped):
                return current, limit
            target = np.minimum(current, limit)
        else:
            wanted = current + delta
            target = np.minimum(np.maximum(wanted, 0), limit)
            clipped = target != wanted
        if _any(clipped):
            # Attribute each clip to one rule: below zero, failed node, then
            # the binding limit (slots before power before heat).
            rule = np.where(
                wanted < 0, BOUNDS,
                np.where(~state.alive, FAILED, np.where(limit == slots, CAPACITY, np.where(limit == power, POWER, THERMAL))),
            )  # fmt: skip
            counts += np.bincount(rule[clipped], minlength=len(RULES))
        return target, limit

    def _migrations(self, requested: np.ndarray, target: np.ndarray, limit: np.ndarray, state, counts: np.ndarray) -> np.ndarray:
        """Resolve and check migrations one by one (few get through: 2 per minute per cluster)."""
        asked = np.asarray(requested) != NO_MIGRATION
        if not _any(asked):
            return self.no_migrations
        migrate_to = np.full(len(target), NO_MIGRATION, dtype=np.int64)
        budget = (self.migration_cap - np.asarray(state.migration_window_sum)).tolist()
        alive = state.alive
        cluster = self.nodes.cluster
        free = warm = None  # computed once a request gets past the cheap checks
        for source in np.flatnonzero(asked).tolist():
            # Cheap checks first: most requests die on the rate cap.
            if not alive[source]:
                counts[FAILED] += 1
                continue
            if budget[cluster[source]] < 1:
                counts[MIGRATION] += 1
                continue
            if free is None:
                free = limit - target  # slots left on each node after this step's scaling
                # A migrated replica must be a warm one: the twin removes starting-up
                # replicas before active ones, so min(active, total) stay active.
                warm = np.minimum(state.replicas, target)
            destination = int(requested[source])
            if destination == AUTO_TARGET:
                destination = self._best_neighbour(source, free, state)
            rule = self._migration_problem(source, destination, warm, free, state)
            if rule is not None:
                counts[rule] += 1
                continue
            migrate_to[source] = destination
            free[destination] -= 1
            warm[source] -= 1  # the destination's copy starts cold (pending)
            budget[cluster[source]] -= 1
        return migrate_to

    def _best_neighbour(self, source: int, free: np.ndarray, state) -> int:
        """The live neighbour with the most free slots (ties: shortest queue), or -1."""
        candidates = np.flatnonzero(self.nodes.neighbours[source] & state.alive & (free > 0))
        if candidates.size == 0:
            return NO_MIGRATION
        order = np.lexsort((state.queue_total[candidates], -free[candidates]))
        return int(candidates[order[0]])

    def _migration_problem(self, source: int, destination: int, warm, free, state) -> int | None:
        """The rule a migration from a live source, within the rate cap, breaks; None if safe."""
        if destination == NO_MIGRATION:
            return CAPACITY  # no neighbour has a free slot
        if not (0 <= destination < len(warm)) or not self.nodes.neighbours[source, destination]:
            return BOUNDS  # itself, another cluster, or not a node
        if not state.alive[destination]:
            return FAILED
        if free[destination] < 1 or warm[source] < 1:
            return CAPACITY
        return None
