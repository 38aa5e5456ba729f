"""Baseline controllers acting through the envs' action interface.

Paper 001 Tables 1-3 compare against "Heuristic (HPA/VPA + binpack)" and
"Forecast-Only MPC"; these are our versions of both. Each policy has
``reset(twin)`` and ``act(twin) -> (N, 6)`` env-encoded rows (the same rows
an RL agent emits through :class:`edgesim.envs.EdgeSiteEnv` or
:class:`edgesim.envs.ClusterParallelEnv`), so learned agents can be compared
with them one for one.

Forecasters are plain callables ``forecast_fn(history) -> forecast`` with
``history`` of shape (N, L, 1), per-interval mean arrival rates (requests/s)
oldest first (:meth:`EdgeCloudTwin.demand_history`), and a forecast of
shape (N, H, 1) or (N, H) for the current and next H - 1 intervals.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from .actions import Action, encode_env_action
from .errors import EdgeSimError
from .twin import EdgeCloudTwin

ForecastFn = Callable[[np.ndarray], np.ndarray]


class Policy(Protocol):
    def reset(self, twin: EdgeCloudTwin) -> None: ...

    def act(self, twin: EdgeCloudTwin) -> np.ndarray: ...


def run_episode(twin: EdgeCloudTwin, policy: Policy, seed: int | None = None) -> dict[str, float]:
    """Reset ``twin`` (with ``seed``), run ``policy`` to the end, return the episode metrics."""
    twin.reset(seed)
    policy.reset(twin)
    max_step = twin.scenario.shield.max_replica_step
    while not twin.done:
        twin.step(Action.from_env(policy.act(twin), max_step))
    return twin.summary()


# ---------------------------------------------------------------- forecasters


def seasonal_naive_fn(horizon: int, season: int = 288) -> ForecastFn:
    """Seasonal-naive forecaster (``tasks.forecast.training``); 288 x 300 s = one day."""
    from fl_datasets.naive_forecasts import seasonal_naive_forecast

    return lambda history: seasonal_naive_forecast(history, horizon, season)


def oracle_fn(twin: EdgeCloudTwin, horizon: int) -> ForecastFn:
    """The true demand envelope ahead (an upper bound for any forecaster)."""
    return lambda history: twin.oracle_forecast(horizon)


def forecast_rates(forecast_fn: ForecastFn, twin: EdgeCloudTwin, horizon: int) -> np.ndarray:
    """Call ``forecast_fn`` on the twin's history; (N, H) non-negative requests/s."""
    forecast = np.asarray(forecast_fn(twin.demand_history()), dtype=np.float64)
    if forecast.ndim == 3:
        forecast = forecast[..., 0]
    if forecast.ndim != 2 or forecast.shape[0] != twin.num_nodes or forecast.shape[1] < horizon:
        raise EdgeSimError(f"forecast_fn returned shape {forecast.shape}, expected ({twin.num_nodes}, >= {horizon}[, 1])")
    return np.maximum(forecast[:, :horizon], 0.0)


# ---------------------------------------------------------------- hold


class HoldPolicy:
    """Admit everything, serve it locally, never scale: the do-nothing baseline."""

    def reset(self, twin: EdgeCloudTwin) -> None:
        self.rows = encode_env_action(
            np.ones(twin.num_nodes),
            np.tile([1.0, 0.0, 0.0], (twin.num_nodes, 1)),
            np.zeros(twin.num_nodes),
            np.zeros(twin.num_nodes, dtype=bool),
            twin.scenario.shield.max_replica_step,
        )

    def act(self, twin: EdgeCloudTwin) -> np.ndarray:
        return self.rows


# ---------------------------------------------------------------- shared helpers


class _Controller:
    """Replans every ``replan_s``; holds the last plan in between."""

    def __init__(self, replan_s: float, demand_smoothing: float) -> None:
        self.replan_s = replan_s
        self.demand_smoothing = demand_smoothing

    def reset(self, twin: EdgeCloudTwin) -> None:
        self.replan_steps = max(1, round(self.replan_s / twin.step_s))
        self.demand = None
        self.plan = None  # (replica target, placement)

    def _observe(self, twin: EdgeCloudTwin) -> np.ndarray:
        """EMA of the arrival rate at each node (requests/s)."""
        rate = twin.state.last_arrivals / twin.step_s
        if self.demand is None or twin.state.step == 0:
            self.demand = rate.copy()
        else:
            self.demand += self.demand_smoothing * (rate - self.demand)
        return self.demand

    def _rows(self, twin: EdgeCloudTwin, target: np.ndarray, placement: np.ndarray) -> np.ndarray:
        s = twin.state
        step = twin.scenario.shield.max_replica_step
        delta = np.clip(target - s.replicas - s.pending_total, -step, step)
        return encode_env_action(np.ones(twin.num_nodes), placement, delta, np.zeros(twin.num_nodes, dtype=bool), step)

    def act(self, twin: EdgeCloudTwin) -> np.ndarray:
        demand = self._observe(twin)
        if self.plan is None or twin.state.step % self.replan_steps == 0:
            self.plan = self._plan(twin, demand)
        # Re-issued every step: a change larger than max_replica_step takes several.
        return self._rows(twin, *self.plan)

    def _plan(self, twin: EdgeCloudTwin, demand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(replica target (N,), placement (N, 3)) until the next replan."""
        raise NotImplementedError


# ---------------------------------------------------------------- heuristic


class ThresholdAutoscaler(_Controller):
    """HPA-style threshold autoscaling with first-fit-decreasing placement.

    Every ``replan_s`` (Kubernetes HPA syncs every 15 s):

    1. placement: per cluster, the nodes' smoothed demands are packed
       largest first (FFD) into the live nodes' capacity at the ``upper``
       threshold, each demand trying its own node first (locality), then the
       others in index order; what fits nowhere goes to the cloud (if up),
       else stays local;
    2. replicas: a node's utilisation at its packed load and current replicas
       outside [lower, upper] sets ``ceil(load / (replica rate x target))``
       replicas (HPA's rule), at least 1; scale-down waits
       ``scale_down_delay_s`` after the last scale-up (HPA stabilisation).

    Parameters
    ----------
    upper, lower, target : float
        Utilisation thresholds and the target HPA scales to.
    replan_s : float
    scale_down_delay_s : float
    demand_smoothing : float
        EMA weight of the newest arrival rate.
    """

    def __init__(
        self,
        upper: float = 0.8,
        lower: float = 0.3,
        target: float = 0.6,
        replan_s: float = 15.0,
        scale_down_delay_s: float = 60.0,
        demand_smoothing: float = 0.2,
    ) -> None:
        super().__init__(replan_s, demand_smoothing)
        if not 0 < lower < target < upper <= 1:
            raise EdgeSimError(f"need 0 < lower < target < upper <= 1, got lower={lower}, target={target}, upper={upper}")
        self.upper, self.lower, self.target = upper, lower, target
        self.scale_down_delay_s = scale_down_delay_s

    def reset(self, twin: EdgeCloudTwin) -> None:
        super().reset(twin)
        self.last_scale_up = np.full(twin.num_nodes, -np.inf)

    def _plan(self, twin: EdgeCloudTwin, demand: np.ndarray) -> np.ndarray:
        limit = twin.replica_limit()
        rate = twin.nodes.replica_rate
        bins = limit * rate * self.upper  # load each node may take at the upper threshold
        share, load = first_fit_decreasing(demand, bins, twin.nodes.cluster, twin.state.alive,
                                           twin.state.cloud_up[twin.shield.region_of_node])
        s = twin.state
        current = s.replicas + s.pending_total
        utilisation = np.divide(load, current * rate, out=np.full(twin.num_nodes, np.inf), where=current > 0)
        utilisation[(current == 0) & (load == 0)] = 0.0
        desired = np.ceil(load / (rate * self.target) - 1e-9).astype(np.int64)
        outside = (utilisation > self.upper) | (utilisation < self.lower)
        target = np.where(outside, desired, current)
        target = np.clip(np.maximum(target, 1) * s.alive, 0, limit)
        now = twin.time_s
        self.last_scale_up[target > current] = now
        waiting = (target < current) & (now - self.last_scale_up < self.scale_down_delay_s)
        target[waiting] = current[waiting]
        return target, share


def first_fit_decreasing(
    demand: np.ndarray, capacity: np.ndarray, cluster: np.ndarray, alive: np.ndarray, cloud_up: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pack each node's demand (an item) onto the nodes of its cluster (bins).

    Items go largest first; each tries its own node, then the cluster's other
    live nodes in index order, and takes the first with room for all of it.
    An item that fits nowhere fills what is left on its own node and sends
    the rest to the cloud if the cloud is up (else keeps it local).

    Returns
    -------
    placement : (N, 3) float
        Local / neighbour / cloud share of each node's demand.
    load : (N,) float
        Demand packed onto each node (requests/s).
    """
    n = len(demand)
    placement = np.zeros((n, 3))
    room = np.where(alive, capacity, 0.0).astype(np.float64)
    load = np.zeros(n)
    for item in np.argsort(-demand, kind="stable"):
        size = demand[item]
        if size <= 0:
            placement[item, 0 if alive[item] else 1] = 1.0
            continue
        same = np.flatnonzero(cluster == cluster[item])
        order = [item] + [j for j in same if j != item]
        home = next((j for j in order if alive[j] and room[j] >= size), None)
        if home is not None:
            room[home] -= size
            load[home] += size
            placement[item, 0 if home == item else 1] = 1.0
            continue
        kept = room[item] if alive[item] else 0.0
        rest = size - kept
        room[item] -= kept
        load[item] += kept
        if cloud_up[item]:
            placement[item] = (kept / size, 0.0, rest / size)
        elif alive[item]:
            placement[item, 0] = 1.0
            load[item] += rest
        else:
            placement[item, 1] = 1.0
    return placement, load


# ---------------------------------------------------------------- forecast MPC


class ForecastMPC(_Controller):
    """Forecast-driven model-predictive capacity planning, cluster by cluster.

    Every ``replan_s`` and whenever a demand interval completes, for each
    cluster, a small enumeration over a target utilisation ``u`` (in
    ``utilisations``) and a cloud share ``phi`` of the cluster's demand (in
    ``cloud_shares``; 0 while the region is down) is scored on the forecast
    rates of the next ``horizon`` intervals:

    * capacity: replica slots are taken most energy-efficient first
      (requests/s per W, i.e. big boards first: consolidation, as bin
      packing does) until they cover ``max_h (1 - phi) D_h / u``;
    * predicted SLO misses: every node carries load in proportion to its
      capacity; M/M/c tail P(late) = P(wait) exp(-c mu (1 - rho) slack) with
      P(wait) = rho^(sqrt(2(c+1)) - 1), all of it when rho >= 1; cloud
      requests miss with the chance that RTT (+ a retransmission timeout
      under packet loss) exceeds the SLO, or are lost twice;
    * + ``energy_weight`` x edge power (W) + ``cost_weight`` x cloud spend ($/s).

    Replica counts stay within what each node sustains at full load in
    thermal steady state (the horizon is long against the thermal time
    constant). The cheapest plan's replicas are applied (receding horizon). A node's
    own users are served locally up to its planned load; the rest of the
    edge share goes to its neighbours. The current interval is planned for
    at least the demand observed now (EMA of arrivals): the state feedback
    of receding-horizon control.

    Parameters
    ----------
    forecast_fn : callable
        ``history (N, L, 1) -> (N, H[, 1])``, see the module docstring.
    horizon : int
        Intervals scored (the forecast's first ``horizon`` values).
    energy_weight : float
        Missed requests/s that 1 W is worth.
    cost_weight : float
        Missed requests/s that 1 $/s of cloud spend is worth.
    utilisations, cloud_shares : tuple of float
        The enumerated plans.
    """

    def __init__(
        self,
        forecast_fn: ForecastFn,
        horizon: int = 3,
        energy_weight: float = 0.05,
        cost_weight: float = 2000.0,
        utilisations: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        cloud_shares: tuple[float, ...] = (0.0, 0.25, 0.5),
        replan_s: float = 15.0,
        demand_smoothing: float = 0.2,
    ) -> None:
        super().__init__(replan_s, demand_smoothing)
        if horizon < 1:
            raise EdgeSimError(f"horizon={horizon} must be >= 1 (forecast intervals to plan over)")
        self.forecast_fn = forecast_fn
        self.horizon = horizon
        self.energy_weight = energy_weight
        self.cost_weight = cost_weight
        self.utilisations = np.asarray(utilisations, dtype=np.float64)
        self.cloud_shares = np.asarray(cloud_shares, dtype=np.float64)

    def reset(self, twin: EdgeCloudTwin) -> None:
        super().reset(twin)
        self.forecast_version = -1
        self.forecast = None

    def act(self, twin: EdgeCloudTwin) -> np.ndarray:
        if twin.history_version != self.forecast_version:
            self.forecast = forecast_rates(self.forecast_fn, twin, self.horizon)
            self.forecast_version = twin.history_version
            self.plan = None  # a new forecast: replan now
        return super().act(twin)

    def _plan(self, twin: EdgeCloudTwin, demand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        nodes = twin.nodes
        # The horizon (minutes) is long against the thermal time constant, so
        # plan within the replicas a node can sustain at full load, not just
        # those the shield allows this step.
        limit = np.minimum(twin.replica_limit(), sustainable_replicas(twin.scenario))
        cloud_miss = self._cloud_miss_probability(twin)
        # State feedback: the current interval is planned for at least the
        # demand observed now (a forecast can only be corrected by replanning).
        rates = self.forecast.copy()
        rates[:, 0] = np.maximum(rates[:, 0], demand)
        target = np.zeros(twin.num_nodes, dtype=np.int64)
        placement = np.zeros((twin.num_nodes, 3))
        bounds = list(nodes.cluster_start) + [twin.num_nodes]
        for cluster, (first, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            members = slice(first, stop)
            cloud_up = bool(twin.state.cloud_up[nodes.region[cluster]])
            target[members], placement[members] = self._plan_cluster(
                twin, rates[members], limit[members], members, cloud_up, cloud_miss[first]
            )
        return target, placement

    def _plan_cluster(self, twin, rates, limit, members, cloud_up, cloud_miss):
        """Best (replicas, placement) of one cluster; see the class docstring."""
        sc, nodes = twin.scenario, twin.nodes
        slots_per_node = sc.service.max_replicas_per_node
        mu = nodes.replica_rate[members]
        dynamic_w = (nodes.active_w - nodes.idle_w)[members]
        n = len(mu)
        demand = rates.sum(axis=0)  # (H,)
        shares = self.cloud_shares if cloud_up else np.zeros(1)
        u, phi = (grid.ravel() for grid in np.meshgrid(self.utilisations, shares, indexing="ij"))
        edge = demand[None, :] * (1.0 - phi[:, None])  # (Q, H)
        replicas = _fill_slots(edge.max(axis=1) / u, limit, mu, mu / (dynamic_w / slots_per_node + 1e-12))  # (Q, n)
        capacity = replicas * mu  # (Q, n)
        total = capacity.sum(axis=1, keepdims=True)  # (Q, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            rho = np.where(total > 0, edge / total, np.inf)  # (Q, H)
            weight = np.where(total > 0, capacity / total, 0.0)  # share of the edge load per node
            exponent = np.sqrt(2.0 * (replicas + 1.0)) - 1.0
            r = np.minimum(rho, 1.0)[:, None, :]
            p_wait = r ** exponent[:, :, None]
            slack = np.maximum(twin.slo_s - 1.0 / mu, 0.0)[None, :, None]
            p_late = np.where(rho[:, None, :] < 1.0, p_wait * np.exp(-capacity[:, :, None] * (1.0 - r) * slack), 1.0)
        load = edge[:, None, :] * weight[:, :, None]  # (Q, n, H)
        misses = (load * p_late).sum(axis=1)  # (Q, H)
        busy = np.minimum(load / nodes.full_rate[members][None, :, None], (replicas / slots_per_node)[:, :, None])
        static = sc.power.replica_static_share
        power = (dynamic_w[None, :, None] * (static * replicas[:, :, None] / slots_per_node + (1 - static) * busy)).sum(axis=1)
        cloud = demand[None, :] * phi[:, None]
        score = misses + cloud * cloud_miss + self.energy_weight * power + self.cost_weight * cloud * twin.cloud_unit_cost
        best = int(score.sum(axis=1).argmin())
        planned = load[best].mean(axis=1)  # (n,) edge load each node is sized for
        own = rates.mean(axis=1)
        local = (1.0 - phi[best]) * np.minimum(1.0, np.divide(planned, own, out=np.ones(n), where=own > 0))
        placement = np.stack((local, 1.0 - phi[best] - local, np.full(n, phi[best])), axis=1)
        return replicas[best].astype(np.int64), placement

    def _cloud_miss_probability(self, twin: EdgeCloudTwin) -> np.ndarray:
        """Chance a cloud request misses the SLO or is lost, per node, from current RTTs and loss."""
        t = min(twin.state.step, twin.scenario.episode_steps - 1)
        rtt = twin.rtt_cloud[t][twin.nodes.cluster] + twin.transfer_s
        loss = twin.faults.packet_loss
        late_clean = rtt > twin.slo_s
        late_retry = rtt + twin.rto_s > twin.slo_s
        return (1 - loss) * late_clean + loss * (1 - loss) * late_retry + loss * loss


def sustainable_replicas(scenario) -> np.ndarray:
    """Replicas each node can run fully busy forever without passing ``max_c``, (N,).

    Steady state T = ambient + R P, so P <= (max_c - ambient) / R.
    """
    nodes, thermal = scenario.nodes, scenario.thermal
    per_slot_w = (nodes.active_w - nodes.idle_w) / scenario.service.max_replicas_per_node
    max_power = (thermal.max_c - thermal.ambient_c) / nodes.thermal_r
    with np.errstate(divide="ignore", invalid="ignore"):
        replicas = np.floor((max_power - nodes.idle_w) / per_slot_w + 1e-9)
    return np.clip(np.nan_to_num(replicas, nan=0.0, posinf=1e9), 0, nodes.slots).astype(np.int64)


def _fill_slots(needed: np.ndarray, limit: np.ndarray, slot_rate: np.ndarray, efficiency: np.ndarray) -> np.ndarray:
    """Replicas per node covering each ``needed`` capacity, best ``efficiency`` slots first.

    Parameters
    ----------
    needed : (Q,) requests/s per candidate plan
    limit : (n,) replicas allowed per node
    slot_rate : (n,) requests/s per replica
    efficiency : (n,) requests/s per W of a replica

    Returns
    -------
    (Q, n) float replica counts (all slots when ``needed`` exceeds them).
    """
    slot_node = np.repeat(np.arange(len(limit)), limit)
    if slot_node.size == 0:
        return np.zeros((len(needed), len(limit)))
    slot_node = slot_node[np.argsort(-efficiency[slot_node], kind="stable")]
    covered = np.cumsum(slot_rate[slot_node])
    taken = np.minimum(np.searchsorted(covered, needed - 1e-9) + 1, slot_node.size)
    chosen = np.arange(slot_node.size)[None, :] < taken[:, None]  # (Q, M)
    return chosen.astype(np.float64) @ np.eye(len(limit))[slot_node]


__all__ = [
    "ForecastMPC",
    "HoldPolicy",
    "Policy",
    "ThresholdAutoscaler",
    "first_fit_decreasing",
    "forecast_rates",
    "oracle_fn",
    "run_episode",
    "seasonal_naive_fn",
    "sustainable_replicas",
]
