"""The edge-cloud digital twin: a vectorised fluid queueing model.

Each step of ``step_s`` seconds, for every edge node at once (numpy arrays,
no per-request loop):

1. faults: nodes and cloud regions go down or come back (their queues are lost);
2. the safety shield clips the action (:mod:`edgesim.shield`);
3. replicas change: removals are immediate, additions and migrated replicas
   serve after a cold start of ``startup_s``; a migration also moves the
   source's per-replica share of its queue;
4. arrivals (pre-drawn Poisson counts) are admitted or rejected, then split
   local / neighbour / cloud. Neighbour traffic is spread over the live
   neighbours in proportion to their spare capacity; cloud traffic goes to
   the cluster's region, which serves it at once (no cloud queue: a region
   has ~100x an edge cluster's capacity) unless it is down or full;
5. each node's FIFO queue, kept as cohorts by age in steps and by origin
   (local, from a neighbour), takes the inflow up to ``queue_capacity``
   (the excess is dropped) and serves ``replicas x replica rate x step_s``
   requests, oldest first; requests older than ``timeout_s`` are dropped;
6. latency of what was served: service time ``1 / replica rate`` + the wait
   of an M/M/c queue at this step's utilisation (Sakasegawa's approximation:
   P(wait) = rho^(sqrt(2(c+1)) - 1), exponential conditional wait of mean
   s / (c (1 - rho))), spread over 9 probability bins for the tails, + whole
   steps spent in the backlog + network RTT (with per-step jitter) and
   transfer time for neighbour and cloud requests + one retransmission
   timeout for cloud requests hit by packet loss (lost twice: dropped);
7. energy ``P = idle + (active - idle) (static x replicas/slots + (1 - static) x busy)``
   per live node, temperature relaxing towards ``ambient + R P``, cloud fees
   and egress.

Conservation holds exactly (to float rounding): every arrival is served,
dropped (with a reason) or still queued.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np

from .actions import NO_MIGRATION, Action
from .errors import EdgeSimError
from .fairness import SmoothedFulfillment, fairness_penalty
from .faults import FaultSchedule, build_fault_schedule
from .metrics import DROP_REASONS, EpisodeMetrics
from .scenario import Scenario
from .shield import RULES, SafetyShield
from .workload import Workload, build_workload

# Direct ufunc reductions: ndarray.any()/all() add a Python-level wrapper per call.
_any = partial(np.logical_or.reduce, axis=None)
_all = partial(np.logical_and.reduce, axis=None)
_min = partial(np.minimum.reduce, axis=None)

# Probability bins for the in-step wait distribution: fine in the tail so
# that p95/p99 come from their own bins.
WAIT_BIN_EDGES = np.array([0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0])
TINY = 1e-300  # x / max(y, TINY): 0 where y is 0 (x is then 0 too), no np.divide(where=)
WAIT_TABLE_STEPS = 4096  # grid of P(wait) for the bin-mean table
RHO_MAX = 0.98  # above this the fluid backlog, not the M/M/c formula, carries the wait
(REJECTED, OVERFLOW, TIMEOUT, FAILURE, NO_ROUTE, CLOUD_DOWN, PACKET_LOSS) = range(len(DROP_REASONS))


@dataclass
class TwinState:
    """Everything that changes during an episode (arrays over the N edge nodes).

    Attributes
    ----------
    step : int
        Steps taken so far.
    replicas : (N,) int
        Active (serving) replicas.
    pending : (N, D) int
        Replicas starting up; column 0 becomes active next step.
    queue : (N, A, 2) float
        Queued requests by age in steps (0 = arrived this step) and origin
        (0 = the node's own users, 1 = a neighbour or a migration).
    alive : (N,) bool
        Node up during the current (or, between steps, the last) step.
    temp_c : (N,) float
    cloud_up : (R,) bool
    last_arrivals, last_served, last_busy, last_util : (N,) float
        Last step's arrivals at each node (its users), requests served by the
        node, busy fraction of the node's full capacity, and utilisation of
        its active replicas.
    migration_window : (C, W) int
        Migrations per cluster over the last 60 s (ring of steps).
    pending_total, queue_total, migration_window_sum
        Row sums of ``pending``, ``queue`` and ``migration_window``, kept
        up to date for the shield and the observers.
    """

    step: int
    replicas: np.ndarray
    pending: np.ndarray
    queue: np.ndarray
    alive: np.ndarray
    temp_c: np.ndarray
    cloud_up: np.ndarray
    last_arrivals: np.ndarray
    last_served: np.ndarray
    last_busy: np.ndarray
    last_util: np.ndarray
    migration_window: np.ndarray
    pending_total: np.ndarray
    queue_total: np.ndarray
    migration_window_sum: np.ndarray


class StepResult:
    """What one step did.

    Attributes
    ----------
    reward : (N,) float
        Per-node reward in [-(w_slo + w_energy + w_cost), 0] (computed on
        first access: controllers that never read it do not pay for it).
    interventions : (len(RULES),) int
        Shield clips this step, per rule.
    truncated : bool
        The episode has reached ``episode_steps``.
    arrivals, served, dropped, late : float
        Totals this step (served counts edge and cloud), computed on access.
    """

    __slots__ = ("interventions", "truncated", "_twin", "_parts", "_reward")

    def __init__(self, twin: "EdgeCloudTwin", interventions: np.ndarray, truncated: bool, parts: tuple) -> None:
        self.interventions = interventions
        self.truncated = truncated
        self._twin = twin
        # arrivals, served at nodes, served in the cloud, drops by reason, late,
        # neighbour inflow, drops per node, energy per node
        self._parts = parts
        self._reward = None

    @property
    def reward(self) -> np.ndarray:
        if self._reward is None:
            arrivals, served_node, cloud_served, _, late, neigh_in, node_drops, energy, penalty = self._parts
            twin = self._twin
            if twin.control is None:
                self._reward = twin._reward(arrivals, neigh_in, node_drops, late, energy, served_node, cloud_served,
                                            penalty)
            else:  # the control layer weighs the terms by the current mode and charges prices; fairness as without it
                terms = twin.reward_terms(arrivals, neigh_in, node_drops, late, energy, served_node, cloud_served)
                self._reward = twin.control.reward(twin, terms) - penalty
        return self._reward

    @property
    def reward_terms(self) -> np.ndarray:
        """(N, 3) unweighted reward terms: SLO miss rate, energy / full power, cloud share."""
        arrivals, served_node, cloud_served, _, late, neigh_in, node_drops, energy, _ = self._parts
        return self._twin.reward_terms(arrivals, neigh_in, node_drops, late, energy, served_node, cloud_served)

    @property
    def arrivals(self) -> float:
        return float(self._parts[0].sum())

    @property
    def served(self) -> float:
        return float(self._parts[1].sum() + self._parts[2].sum())

    @property
    def dropped(self) -> float:
        return float(self._parts[3].sum())

    @property
    def late(self) -> float:
        return float(self._parts[4].sum())


class EdgeCloudTwin:
    """Digital twin of edge clusters and cloud regions (see the module docstring).

    Parameters
    ----------
    scenario : Scenario
        A validated scenario.
    seed : int, optional
        Seed of the first :meth:`reset` (default 0); same seed and same
        actions give the same trajectory.
    workload : Workload, optional
        Use this demand instead of building it from the scenario and seed
        (e.g. to replay one demand under several seeds of faults).
    control : edgesim.control.ControlLayer, optional
        Paper 001's ESA/COA hierarchy: rewrites each action to the COA's
        allocations before the shield, and weighs the reward by the context
        mode with internal prices (None: the plain twin).
    """

    def __init__(self, scenario: Scenario, seed: int | None = None, workload: Workload | None = None,
                 control=None) -> None:
        self.scenario = scenario
        self.nodes = scenario.nodes
        self.shield = SafetyShield(scenario)
        self._fixed_workload = workload
        self._constants()
        self.control = control
        if control is not None:
            control.attach(self)
        self.reset(seed)

    # ------------------------------------------------------------ set-up
    def _constants(self) -> None:
        sc, nodes = self.scenario, self.nodes
        self.num_nodes = sc.num_nodes
        self.num_clusters = len(sc.clusters)
        self.num_regions = len(sc.cloud_regions)
        self.step_s = sc.step_s
        self.slo_s = sc.slo_ms / 1e3
        self.max_slots = sc.service.max_replicas_per_node
        self.replica_step_capacity = nodes.replica_rate * sc.step_s
        self.full_step_capacity = nodes.full_rate * sc.step_s
        self.service_s = 1.0 / nodes.replica_rate
        self.dynamic_w = nodes.active_w - nodes.idle_w
        self.thermal_alpha = 1.0 - math.exp(-sc.step_s / sc.thermal.tau_s)
        self.cpu_share = np.where(nodes.gpu, sc.service.host_cpu_share, 1.0)
        self.neighbour_mask = nodes.neighbours.astype(np.float64)
        self.region_of_node = nodes.region[nodes.cluster]
        self.age_s = np.arange(sc.max_age_steps) * sc.step_s
        self.bin_width = np.diff(WAIT_BIN_EDGES)
        self.bin_low = WAIT_BIN_EDGES[:-1]
        self.bin_high = WAIT_BIN_EDGES[1:]
        grid = np.linspace(0.0, 1.0, WAIT_TABLE_STEPS + 1)
        table = _exponential_bin_means(grid, np.ones_like(grid), self.bin_low, self.bin_high, self.bin_width)
        self._wait_table = table[:-1]
        self._wait_table_step = np.diff(table, axis=0)
        # M/M/c by replica count c (0 serves nothing; treated as 1 to stay finite)
        servers = np.maximum(np.arange(self.max_slots + 1), 1).astype(np.float64)
        self._servers = servers
        self._wait_exponent = np.sqrt(2.0 * (servers + 1.0)) - 1.0
        net = sc.network
        payload_s = (net.request_kb + net.response_kb) * 8.0 / (net.bandwidth_mbps * 1e3)
        self.transfer_s = payload_s
        self.rto_s = net.rto_ms / 1e3
        # Cloud regions: service time of one replica slice, servers, energy per request.
        cloud_profiles = [sc.profiles[r.profile] for r in sc.cloud_regions]
        self.cloud_step_capacity = sc.cloud_rate * sc.step_s
        self._smallest_cloud = float(self.cloud_step_capacity.min())
        self.cloud_servers = np.array([r.instances * self.max_slots for r in sc.cloud_regions], dtype=np.float64)
        self.cloud_service_s = self.cloud_servers / sc.cloud_rate
        self.cloud_energy_per_request = np.array(
            [p.active_w / sc.node_rate(r.profile) for p, r in zip(cloud_profiles, sc.cloud_regions)]
        )
        self.cloud_unit_cost = sc.cost.per_cloud_request_usd + net.response_kb / 1e6 * sc.cost.per_gb_egress_usd
        self.migration_window_steps = max(1, math.ceil(60.0 / sc.step_s - 1e-9))
        self.interval_steps = round(sc.workload.interval_s / sc.step_s)
        self.queue_capacity = sc.service.queue_capacity
        self.ambient_c = sc.thermal.ambient_c
        self.reward_slo = sc.reward.slo
        self.reward_energy_per_j = sc.reward.energy / (nodes.active_w * sc.step_s)  # energy term in [0, 1]
        self.reward_cost = sc.reward.cost
        self._zeros = np.zeros(self.num_nodes)
        self._zero_counts = np.zeros(self.num_nodes, dtype=np.int64)  # shared; only ever replaced, not written
        self._fixed = np.empty((self.num_nodes, 2))  # latency without queueing, by origin
        self._fixed[:, 0] = self.service_s
        self.neighbour_fixed_s = self.service_s + self.transfer_s
        static = sc.power.replica_static_share
        self._static_w_per_replica = self.dynamic_w * static / self.max_slots
        self._busy_w = self.dynamic_w * (1.0 - static)
        self._cloud_exponent = np.sqrt(2.0 * (self.cloud_servers + 1.0)) - 1.0
        self._cloud_mean_wait_unit = self.cloud_service_s / self.cloud_servers
        self._hold = Action.hold(self.num_nodes)
        fairness = sc.fairness
        self._fairness_on = fairness is not None and fairness.enabled
        self._response_ref_s = (fairness.response_ref_ms if fairness and fairness.response_ref_ms else sc.slo_ms) / 1e3
        self._redundancy_ref = fairness.redundancy_ref if fairness else 0.2

    def reset(self, seed: int | None = None) -> TwinState:
        """Start a new episode; all randomness is drawn here from ``seed``."""
        sc, n = self.scenario, self.num_nodes
        self.seed = 0 if seed is None else int(seed)
        self.workload = self._fixed_workload or build_workload(sc, self.seed)
        self.arrivals = np.ascontiguousarray(
            self.workload.arrivals(np.random.default_rng([self.seed, 2]), sc.episode_steps, sc.step_s, sc.workload.poisson).T
        )
        self._draw_network(np.random.default_rng([self.seed, 3]))
        self.faults: FaultSchedule = build_fault_schedule(sc, np.random.default_rng([self.seed, 4]))
        start = np.full(n, sc.service.initial_replicas, dtype=np.int64)
        self.state = TwinState(
            step=0,
            replicas=np.minimum(start, self.shield.replica_limit(_Initial(n, sc.thermal.ambient_c))),
            pending=np.zeros((n, sc.startup_steps), dtype=np.int64),
            queue=np.zeros((n, sc.max_age_steps, 2)),
            alive=np.ones(n, dtype=bool),
            temp_c=np.full(n, sc.thermal.ambient_c),
            cloud_up=np.ones(self.num_regions, dtype=bool),
            last_arrivals=np.zeros(n),
            last_served=np.zeros(n),
            last_busy=np.zeros(n),
            last_util=np.zeros(n),
            migration_window=np.zeros((self.num_clusters, self.migration_window_steps), dtype=np.int64),
            pending_total=np.zeros(n, dtype=np.int64),
            queue_total=np.zeros(n),
            migration_window_sum=np.zeros(self.num_clusters, dtype=np.int64),
        )
        self.metrics = EpisodeMetrics(
            cluster_start=self.nodes.cluster_start,
            gpu=self.nodes.gpu,
            cpu_share=self.cpu_share,
            rule_names=RULES,
            step_s=sc.step_s,
            cloud_unit_cost_usd=self.cloud_unit_cost,
            response_gb=sc.network.response_kb / 1e6,
        )
        self.metrics.response_ref_s, self.metrics.redundancy_ref = self._response_ref_s, self._redundancy_ref
        if self._fairness_on:
            self._smoothed = SmoothedFulfillment(self.num_clusters, sc.step_s, sc.fairness.window_s)
        self._history = self.workload.history()
        self._interval_arrivals = np.zeros(n)
        self.history_version = 0
        self.shield.last_limit = self.shield.replica_limit(self.state)
        self._backlog = False  # some queue holds requests older than one step
        self._all_alive = True
        self._slots_changed = True  # replicas or pending changed: fragmentation to recompute
        self._fragmentation = 0.0
        if self.control is not None:
            self.control.reset(self)
        return self.state

    def _draw_network(self, rng: np.random.Generator) -> None:
        """Base RTT per link for the episode, times a jitter factor per step (seconds)."""
        sc, net = self.scenario, self.scenario.network
        steps = sc.episode_steps
        intra_base = rng.uniform(*net.intra_cluster_rtt_ms, size=self.num_nodes) / 1e3
        cloud_base = rng.uniform(*net.edge_cloud_rtt_ms, size=self.num_clusters) / 1e3
        self.rtt_intra = intra_base * rng.uniform(1.0, net.jitter_max, size=(steps, self.num_nodes))
        self.rtt_cloud = cloud_base * rng.uniform(1.0, net.jitter_max, size=(steps, self.num_clusters))
        # Cloud latency without queueing, per step and ingress node: RTT + transfer + service.
        self._cloud_fixed_s = (
            self.rtt_cloud[:, self.nodes.cluster] + self.transfer_s + self.cloud_service_s[self.region_of_node]
        )

    # ------------------------------------------------------------ queries
    @property
    def done(self) -> bool:
        return self.state.step >= self.scenario.episode_steps

    @property
    def time_s(self) -> float:
        """Simulated seconds since the episode started."""
        return self.state.step * self.step_s

    @property
    def interval_index(self) -> int:
        """Workload interval (0-based, within the episode) the next step falls in."""
        return self.state.step // self.interval_steps

    def demand_history(self) -> np.ndarray:
        """Per-interval mean arrival rate (requests/s) per node, oldest first, (N, L, 1).

        Before the episode: the demand envelope; during it: observed arrivals.
        The input of a ``forecast_fn`` (a copy: forecasters may scribble on it).
        """
        return self._history[:, :, None].copy()

    def oracle_forecast(self, horizon: int) -> np.ndarray:
        """True envelope of the current and next ``horizon - 1`` intervals, (N, H)."""
        return self.workload.oracle(self.interval_index, horizon)

    def replica_limit(self) -> np.ndarray:
        """Replicas the shield would allow on each node now, (N,)."""
        return self.shield.replica_limit(self.state)

    def summary(self) -> dict[str, float]:
        """Episode metrics so far (see :mod:`edgesim.metrics`)."""
        self.metrics.queued = float(self.state.queue.sum())
        out = self.metrics.summary()
        if self.control is not None:
            out.update(self.control.summary())
        return out

    # ------------------------------------------------------------ the step
    # Hot path: every line below runs once per step on arrays of N (~12)
    # numbers, so the cost is the count of numpy calls, not their size. Hence
    # fast paths (no backlog, all nodes up, no cloud traffic) and divisions by
    # max(x, TINY) instead of np.divide(..., where=...).
    def step(self, action: Action | None = None) -> StepResult:
        """Advance one step under ``action`` (None: admit all, serve locally, no change)."""
        s = self.state
        t = s.step
        if t >= self.scenario.episode_steps:
            raise EdgeSimError(f"the episode ended after {t} steps: call reset() before step()")
        if action is None:
            action = self._hold
        elif np.shape(action.admit) != (self.num_nodes,):
            raise EdgeSimError(
                f"action covers {np.shape(action.admit)} nodes, the scenario has {self.num_nodes}: "
                "give one entry per edge node"
            )
        drops = np.zeros(len(DROP_REASONS))
        node_drops = self._faults(t, drops)
        if self.control is not None:  # the COA's allocations bind the ESAs' actions
            action = self.control.before_step(self, action)
        safe, interventions = self.shield.project(action, s)
        self._scale(safe)
        arrivals = self.arrivals[t]
        local, neigh_in, cloud, route_drops = self._route(arrivals, safe, drops)
        node_drops += route_drops
        node_drops += self._enqueue(local, neigh_in, drops)
        capacity = s.replicas * self.replica_step_capacity
        fresh, backlog = self._serve(capacity)
        late, served_node = self._latency(fresh, backlog, capacity, t)
        node_drops += self._expire(drops)
        cloud_served, cloud_late, cloud_drops = self._cloud(cloud, t, drops)
        node_drops += cloud_drops
        late += cloud_late
        energy = self._power(served_node)
        self._account(arrivals, served_node, cloud_served, drops, late, energy, interventions)
        self.metrics.provisioned += capacity
        penalty = self._fairness_penalty(arrivals, served_node + cloud_served, t) if self._fairness_on else 0.0
        self._remember(arrivals, served_node, capacity)
        s.step = t + 1
        return StepResult(
            self, interventions, s.step >= self.scenario.episode_steps,
            (arrivals, served_node, cloud_served, drops, late, neigh_in, node_drops, energy, penalty),
        )  # fmt: skip

    def _fairness_penalty(self, arrivals: np.ndarray, served: np.ndarray, t: int) -> float:
        """Paper 000 eq. 11's fairness term for this step (:func:`edgesim.fairness.fairness_penalty`)."""
        starts = self.nodes.cluster_start
        smoothed = self._smoothed.update(np.add.reduceat(served, starts), np.add.reduceat(arrivals, starts))
        return fairness_penalty(self.scenario.fairness, (t + 1) * self.step_s, smoothed)

    # 1. faults
    def _faults(self, t: int, drops: np.ndarray) -> np.ndarray:
        """Apply this step's node and cloud status; a failing node loses its queue and replicas."""
        s = self.state
        alive = self.faults.node_up[t]
        per_node = np.zeros(self.num_nodes)
        if self.faults.node_changes[t]:
            self._slots_changed = True
            failing = s.alive & ~alive
            lost = s.queue[failing].sum(axis=(1, 2))
            per_node[failing] = lost
            drops[FAILURE] += lost.sum()
            s.queue[failing] = 0.0
            s.replicas[failing] = 0
            s.pending[failing] = 0
            s.pending_total = np.add.reduce(s.pending, axis=1)
            s.queue_total = np.add.reduce(s.queue.reshape(self.num_nodes, -1), axis=1)
        s.alive = alive
        self._all_alive = self.faults.all_up[t]
        s.cloud_up = self.faults.cloud_up[t]
        return per_node

    # 3. replicas
    def _scale(self, safe: Action) -> None:
        s = self.state
        delta = safe.replica_delta
        has_pending = s.pending.shape[1] > 0
        if _any(delta):
            self._slots_changed = True
            grow = np.maximum(delta, 0)
            cut = np.maximum(-delta, 0)
            if has_pending and _any(cut):
                # Cancel cold starts first, newest first, then stop active replicas.
                newest_first = s.pending[:, ::-1]
                before = np.cumsum(newest_first, axis=1) - newest_first
                take = np.minimum(np.maximum(cut[:, None] - before, 0), newest_first)
                newest_first -= take  # a view: writes through to s.pending
                cut = cut - np.add.reduce(take, axis=1)
            s.replicas -= cut
            if has_pending:
                s.pending[:, -1] += grow
            else:
                s.replicas += grow
            self.metrics.replica_churn += int(np.abs(delta).sum())
        migrating = safe.migrate_to != NO_MIGRATION
        column = s.step % self.migration_window_steps
        if _any(migrating) or _any(s.migration_window[:, column]):
            self._slots_changed = True
            sources = np.flatnonzero(migrating)
            for source in sources:
                self._migrate(int(source), int(safe.migrate_to[source]))
            s.migration_window[:, column] = np.bincount(self.nodes.cluster[sources], minlength=self.num_clusters)
            s.migration_window_sum = s.migration_window.sum(axis=1)
        if has_pending and _any(s.pending):
            s.replicas += s.pending[:, 0]
            s.pending[:, :-1] = s.pending[:, 1:]
            s.pending[:, -1] = 0
            s.pending_total = np.add.reduce(s.pending, axis=1)
        elif has_pending:
            s.pending_total = self._zero_counts

    def _migrate(self, source: int, destination: int) -> None:
        """Move one warm replica to ``destination``, with the source's per-replica
        share of its queue (as much of it as the destination's queue has room for)."""
        s = self.state
        moved = s.queue[source] / s.replicas[source]
        amount = moved.sum()
        room = max(self.queue_capacity - s.queue_total[destination], 0.0)
        if amount > room:
            moved *= room / amount
            amount = room
        s.queue[source] -= moved
        s.queue[destination, :, 1] += moved.sum(axis=1)  # they now come from a neighbour
        s.queue_total[source] -= amount
        s.queue_total[destination] += amount
        s.replicas[source] -= 1
        if s.pending.shape[1]:
            s.pending[destination, -1] += 1
        else:
            s.replicas[destination] += 1
        self.metrics.migrations += 1
        self._backlog = True  # moved requests keep their age

    # 4. arrivals and routing
    def _route(self, arrivals: np.ndarray, safe: Action, drops: np.ndarray):
        """Admission and the local / neighbour / cloud split; returns
        (local, neighbour inflow, cloud, per-node drops)."""
        s = self.state
        admitted = arrivals * safe.admit
        rejected = arrivals - admitted
        drops[REJECTED] += np.add.reduce(rejected)
        flows = admitted[:, None] * safe.placement
        local = flows[:, 0]
        per_node = rejected
        if not self._all_alive:
            up_local = local * s.alive
            dead_local = local - up_local  # failed node, no live neighbour to take over
            drops[FAILURE] += np.add.reduce(dead_local)
            per_node = per_node + dead_local
            local = up_local
        neigh_out = flows[:, 1]
        if _any(neigh_out):
            neigh_in, stranded = self._spread(neigh_out, local)
            if _any(stranded):
                drops[NO_ROUTE] += stranded.sum()
                per_node = per_node + stranded
        else:
            neigh_in = self._zeros
        return local, neigh_in, flows[:, 2], per_node

    def _spread(self, neigh_out: np.ndarray, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Neighbour traffic over live neighbours, in proportion to spare capacity.

        A small share by capacity (and a tiny uniform one) keeps the split
        defined when no neighbour has spare capacity.
        """
        s = self.state
        capacity = s.replicas * self.replica_step_capacity
        weight = np.maximum(capacity - local - s.queue_total, 0.0) + (1e-3 * capacity + 1e-9)
        if not self._all_alive:
            weight = weight * s.alive
        matrix = self.neighbour_mask * weight
        row = np.add.reduce(matrix, axis=1)
        share = neigh_out / np.maximum(row, TINY)  # a zero row gets no traffic: matrix row is 0
        if self._all_alive and self.shield.every_node_has_neighbours:
            return share @ matrix, self._zeros
        return share @ matrix, neigh_out * (row <= 0.0)

    # 5. queues
    def _enqueue(self, local: np.ndarray, remote: np.ndarray, drops: np.ndarray) -> np.ndarray:
        """New requests join age 0, up to the queue capacity; the excess is dropped."""
        s = self.state
        incoming = local + remote
        space = np.maximum(self.queue_capacity - s.queue_total, 0.0)
        overflow = np.maximum(incoming - space, 0.0)
        if _any(overflow):
            keep = np.minimum(space / np.maximum(incoming, TINY), 1.0)
            local, remote = local * keep, remote * keep
            drops[OVERFLOW] += overflow.sum()
        s.queue[:, 0, 0] = local
        s.queue[:, 0, 1] = remote
        return overflow

    def _serve(self, capacity: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """FIFO service, oldest cohort first.

        Returns the requests served in the step they arrived, (N, 2), and
        those served from the backlog, (N, A-1, 2) or None if there is none.
        """
        queue = self.state.queue
        if not self._backlog:  # only this step's arrivals are queued
            fresh = queue[:, 0, :]
            total = fresh[:, 0] + fresh[:, 1]
            fraction = np.minimum(capacity / np.maximum(total, TINY), 1.0)
            served = fresh * fraction[:, None]
            fresh -= served
            return served, None
        by_age = queue[:, :, 0] + queue[:, :, 1]
        oldest_first = by_age[:, ::-1]
        ahead = np.cumsum(oldest_first, axis=1) - oldest_first
        served_age = np.minimum(np.maximum(capacity[:, None] - ahead, 0.0), oldest_first)[:, ::-1]
        served = queue * (served_age / np.maximum(by_age, TINY))[:, :, None]
        queue -= served
        return served[:, 0, :], served[:, 1:, :]

    def _expire(self, drops: np.ndarray) -> np.ndarray:
        """Drop the oldest cohort (timed out), age the rest by one step."""
        s = self.state
        queue = s.queue
        if not self._backlog:  # only age 0 can hold requests
            if queue.shape[1] == 1:
                expired = queue[:, 0, 0] + queue[:, 0, 1]
                queue[:, 0, :] = 0.0
                if _any(expired):
                    drops[TIMEOUT] += expired.sum()
                s.queue_total = self._zeros.copy()
                return expired
            left = queue[:, 0, :]
            queue[:, 1, :] = left
            s.queue_total = left[:, 0] + left[:, 1]
            left[:] = 0.0
            self._backlog = bool(_any(s.queue_total))
            return self._zeros
        expired = queue[:, -1, 0] + queue[:, -1, 1]
        if _any(expired):
            drops[TIMEOUT] += expired.sum()
        queue[:, 1:, :] = queue[:, :-1, :]
        queue[:, 0, :] = 0.0
        s.queue_total = np.add.reduce(queue.reshape(self.num_nodes, -1), axis=1)
        self._backlog = bool(_any(s.queue_total))
        return expired

    # 6. latency
    def _latency(
        self, fresh: np.ndarray, backlog: np.ndarray | None, capacity: np.ndarray, t: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Latency of the requests served at edge nodes; late and served counts per node.

        The late count is exact for the model: P(latency > SLO) =
        P(wait > slack) = P exp(-slack / m) for requests served in the step
        they arrived; the histogram gets the 9 bin means per batch. Requests
        served from the backlog waited whole steps (age x step_s).
        """
        served_node = fresh[:, 0] + fresh[:, 1]
        if backlog is not None:
            served_node = served_node + np.add.reduce(backlog.reshape(self.num_nodes, -1), axis=1)
        if not _any(served_node):
            return np.zeros(self.num_nodes), served_node
        p_wait, mean_wait = self._wait(served_node, capacity)
        points = self._wait_points(p_wait) * mean_wait[:, None]  # (N, K)
        # Origin axis: 0 = own users (no network), 1 = from a neighbour (RTT + transfer).
        fixed = self._fixed  # (N, 2) latency without queueing
        np.add(self.neighbour_fixed_s, self.rtt_intra[t], out=fixed[:, 1])
        slack = self.slo_s - fixed
        if _min(slack) >= 0.0:
            p_late = p_wait[:, None] * np.exp(-slack / mean_wait[:, None])
        else:  # service time + network alone miss the SLO
            p_late = np.where(slack >= 0.0, p_wait[:, None] * np.exp(-np.maximum(slack, 0.0) / mean_wait[:, None]), 1.0)
        late = np.add.reduce(fresh * p_late, axis=1)
        latency, weight = fixed[:, :, None] + points[:, None, :], fresh[:, :, None] * self.bin_width
        self.metrics.latency.add(latency.ravel(), weight.ravel())
        self.metrics.latency_sum_s += np.add.reduce((latency * weight).reshape(self.num_nodes, -1), axis=1)
        if backlog is not None:
            aged = self.age_s[1:, None] + fixed[:, None, :]  # (N, A-1, 2)
            late += np.add.reduce((backlog * (aged > self.slo_s)).reshape(self.num_nodes, -1), axis=1)
            self.metrics.latency.add(aged.ravel(), backlog.ravel())
            self.metrics.latency_sum_s += np.add.reduce((aged * backlog).reshape(self.num_nodes, -1), axis=1)
        return late, served_node

    def _wait(self, served: np.ndarray, capacity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """M/M/c wait of this step per node: P(wait > 0) and the conditional mean m (s).

        Sakasegawa's approximation: P = rho^(sqrt(2(c+1)) - 1) (exact for
        c = 1), m = s / (c (1 - rho)); rho is capped at RHO_MAX because the
        fluid backlog carries the wait of an overloaded node.
        """
        replicas = self.state.replicas
        rho = np.minimum(served / np.maximum(capacity, TINY), RHO_MAX)
        return rho ** self._wait_exponent[replicas], self.service_s / (self._servers[replicas] * (1.0 - rho))

    def _wait_points(self, p_wait: np.ndarray) -> np.ndarray:
        """Mean wait inside each probability bin per unit of m, (N, K).

        Bin means (not midpoints) keep the overall mean exact:
        sum_k width_k w_k = P m. Per unit of m they depend on P only, so they
        come from a table, linearly interpolated (which keeps the sum exact:
        it is linear in P). P < 1 because rho <= RHO_MAX.
        """
        position = p_wait * WAIT_TABLE_STEPS
        index = position.astype(np.int64)
        return self._wait_table[index] + self._wait_table_step[index] * (position - index)[:, None]

    def _cloud(self, cloud: np.ndarray, t: int, drops: np.ndarray):
        """Serve the cloud share at the clusters' regions; served, late and dropped per node."""
        if not _any(cloud):
            return self._zeros, self._zeros, self._zeros
        s = self.state
        region = self.region_of_node
        if _all(s.cloud_up) and np.add.reduce(cloud) <= self._smallest_cloud:
            over = False  # any one region could take it all
        else:
            demand = np.bincount(region, weights=cloud, minlength=self.num_regions)
            capacity = self.cloud_step_capacity * s.cloud_up
            over = _any(demand > capacity)
        if over:
            accept = np.minimum(capacity / np.maximum(demand, TINY), 1.0)
            accepted = cloud * accept[region]
            unavailable = cloud - accepted
            drops[CLOUD_DOWN] += np.add.reduce(unavailable)
        else:
            accepted, unavailable = cloud, self._zeros
        loss = self.faults.packet_loss
        lost = accepted * (loss * loss)  # lost on the first try and on the retransmission
        retried = accepted * (loss * (1.0 - loss))
        served = accepted - lost
        if loss:
            drops[PACKET_LOSS] += np.add.reduce(lost)
        served_region = np.bincount(region, weights=served, minlength=self.num_regions)
        rho = np.minimum(served_region / self.cloud_step_capacity, RHO_MAX)
        wait = rho**self._cloud_exponent * self._cloud_mean_wait_unit / (1.0 - rho)
        base = self._cloud_fixed_s[t] + wait[region]
        retry = base + self.rto_s
        self.metrics.latency.add(base, served - retried)
        self.metrics.latency_sum_s += base * (served - retried)
        if loss:
            self.metrics.latency.add(retry, retried)
            self.metrics.latency_sum_s += retry * retried
        late = (served - retried) * (base > self.slo_s) + retried * (retry > self.slo_s)
        self.metrics.energy_cloud_j += float(served_region @ self.cloud_energy_per_request)
        return served, late, unavailable + lost

    # 7. power, heat, reward, bookkeeping
    def _power(self, served_node: np.ndarray) -> np.ndarray:
        """Energy per node this step (J); updates the temperature."""
        s = self.state
        busy = served_node / self.full_step_capacity
        power = (self.nodes.idle_w + self._static_w_per_replica * s.replicas + self._busy_w * busy) * s.alive
        s.temp_c += (self.ambient_c + self.nodes.thermal_r * power - s.temp_c) * self.thermal_alpha
        s.last_busy = busy
        return power * self.step_s

    def reward_terms(self, arrivals, neigh_in, drops, late, energy, served_node, cloud_served) -> np.ndarray:
        """(N, 3) terms of :meth:`_reward` before weighting: miss rate, P / P_active, cloud share."""
        finished = np.maximum(served_node + cloud_served + drops, 1.0)
        return np.stack((
            (drops + late) / finished,
            energy / (self.nodes.active_w * self.step_s),
            cloud_served / np.maximum(arrivals + neigh_in, 1.0),
        ), axis=1)

    def _reward(self, arrivals, neigh_in, drops, late, energy, served_node, cloud_served, penalty=0.0) -> np.ndarray:
        """Per-node reward: -(w_slo x miss rate + w_energy x P / P_active + w_cost x cloud share
        + the fairness term lambda(t) 4 Var_j(F_j(t)), shared by every node; paper 000 eq. 11).

        The miss rate is over the requests that left this node or its users
        this step (served here or in the cloud, or dropped), so it stays in [0, 1].
        """
        finished = np.maximum(served_node + cloud_served + drops, 1.0)
        cost_term = cloud_served / np.maximum(arrivals + neigh_in, 1.0)  # vs. sending everything there
        return -(self.reward_slo * (drops + late) / finished + self.reward_energy_per_j * energy + self.reward_cost * cost_term
                 + penalty)

    def _account(self, arrivals, served_node, cloud_served, drops, late, energy, interventions) -> None:
        m, s = self.metrics, self.state
        m.steps += 1
        m.arrived += arrivals
        m.served_edge += served_node
        m.served_cloud += cloud_served
        m.late += late
        m.dropped += drops
        m.energy_edge_j += energy
        m.busy += s.last_busy if self._all_alive else s.last_busy * s.alive
        m.alive_steps += s.alive
        m.interventions += interventions
        if self._slots_changed or self.shield.limit_changed:
            self._fragmentation = self._external_fragmentation()
            self._slots_changed = False
        m.fragmentation += self._fragmentation
        m.fragmentation_samples += self.num_clusters

    def _external_fragmentation(self) -> float:
        """Sum over clusters of 1 - largest free block / total free replica capacity (0 if none free)."""
        s = self.state
        free = np.maximum(self.shield.last_limit - s.replicas - s.pending_total, 0) * self.nodes.replica_rate
        starts = self.nodes.cluster_start
        total = np.add.reduceat(free, starts)
        return float(np.add.reduce((total - np.maximum.reduceat(free, starts)) / np.maximum(total, TINY)))

    def _remember(self, arrivals: np.ndarray, served_node: np.ndarray, capacity: np.ndarray) -> None:
        """Last-step telemetry and the per-interval demand history for forecasters."""
        s = self.state
        s.last_arrivals = arrivals
        s.last_served = served_node
        s.last_util = served_node / np.maximum(capacity, TINY)
        self._interval_arrivals += arrivals
        if (s.step + 1) % self.interval_steps == 0:
            rate = self._interval_arrivals / (self.interval_steps * self.step_s)
            self._history = np.concatenate((self._history[:, 1:], rate[:, None]), axis=1)
            self._interval_arrivals = np.zeros(self.num_nodes)
            self.history_version += 1


class _Initial:
    """The bits of a state the shield needs before the first step."""

    def __init__(self, num_nodes: int, ambient_c: float) -> None:
        self.alive = np.ones(num_nodes, dtype=bool)
        self.temp_c = np.full(num_nodes, ambient_c)


def _exponential_bin_means(
    p_wait: np.ndarray, mean_wait: np.ndarray, low: np.ndarray, high: np.ndarray, width: np.ndarray
) -> np.ndarray:
    """Mean of the wait's quantile function over each probability bin, (N, K).

    Quantile: Q(u) = 0 for u <= 1 - P, else -m ln(1 - v) with v = (u - 1 + P) / P.
    Over a bin [a, b]: (P m / (b - a)) (G(v_b) - G(v_a)), G(v) = v + (1 - v) ln(1 - v).
    """
    p = p_wait[:, None]
    safe_p = np.maximum(p, 1e-300)
    start = 1.0 - p
    v_low = np.clip((low[None, :] - start) / safe_p, 0.0, 1.0)
    v_high = np.clip((high[None, :] - start) / safe_p, 0.0, 1.0)
    return (p * mean_wait[:, None] / width[None, :]) * (_g(v_high) - _g(v_low))


def _g(v: np.ndarray) -> np.ndarray:
    rest = 1.0 - v
    return v + rest * np.log(np.maximum(rest, 1e-300))
