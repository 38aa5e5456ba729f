"""Paper 001's control hierarchy in the twin: ESA and COA cadences, congestion prices, modes, MPC prior.

Paper 001 §4.2: "Edge Service Agents (ESAs) acting at sub-second cadence and
Cluster Orchestrator Agents (COAs) acting every few seconds ... COAs resolve
conflicts via auction-style allocators that price scarce resources (GPU
slices, bandwidth reservations) using congestion signals"; §5.3: ESAs every
250 ms, COAs every 3 s. Here the ESA acts every twin step (``step_s``, 1 s in
``conf/twin/*.yaml``) and the COA every ``coa_every`` steps (3 by default:
3 s, as the paper's COA). A :class:`ControlLayer` plugged into
:class:`~edgesim.twin.EdgeCloudTwin` (``control=``) does, every step:

1. **ESA decisions** (every step, the agents' actions): admission, replica
   micro-scaling and the local / neighbour / cloud split. Migration is not
   an ESA decision any more: an ESA's migrate bit is ignored.
2. **COA decisions** (steps ``0, k, 2k, ...``), per cluster:

   * the ESAs' intents become bids (:mod:`edgesim.auction`): a node asks
     for the replica slices its action targets and for the edge->cloud Mbps
     its cloud share needs (at last step's arrivals); its per-unit value is
     its predicted backlog pressure, ``(queue + last arrivals) / capacity
     of its current replicas`` (paper 001: ESAs exchange "predicted
     backlog");
   * a uniform-price auction clears each resource: the cluster's slice
     budget (``slice_share`` x its nodes' slots: the per-cluster energy
     budget of §5.3, our choice 0.75) and its edge->cloud link
     (``link_mbps``, default the twin's ``network.bandwidth_mbps``); with
     ``pricing: false`` (Table 5's "no pricing" ablation) the same
     capacities are rationed in proportion to what was asked, at price 0;
   * cluster placement: one replica migrates from the least to the most
     pressured node when the hot one is overloaded (pressure >= 1), the
     donor at most half busy and their pressures differ by more than
     ``migrate_gap``, within the shield's 2/min cap.

   With ``coa: qmix`` a learned COA team (:mod:`tasks.rl.coa`) picks, per
   cluster, one row of :data:`COA_MENU` at each decision instead of the
   rule's constants: the slice budget share, the link share and whether the
   rebalancing migration runs; the auctions then clear the bids against
   those capacities (see :meth:`ControlLayer.coa_capacities`).

   The allocations hold until the next COA step: in between, the COA
   rewrites any ESA action that asks for more slices (a scale-up beyond the
   allocation becomes a hold; a node above it scales down) or more cloud
   Mbps (the excess is served locally) than it holds. Each rewrite counts
   as one ``control_clips``.
3. **Rewards.** The ESA reward is the mode's weighted sum of the twin's
   three terms minus ``price_weight`` (lambda) x what the node pays:
   ``slice price x slices held / slots + link price x Mbps used / its fair
   link share`` (capped at 1). The COA's reward per decision is its
   cluster's mean ESA reward (before prices: payments are internal
   transfers) over the ``k`` steps, minus ``migration_cost`` per migration.
   Both are reported in :meth:`ControlLayer.summary` (``coa_return``).
4. **Modes** (:mod:`edgesim.modes`): the weights at each step come from the
   :class:`~edgesim.modes.ModePlan`.
5. **Hybrid RL + MPC** (``hybrid: true``, paper 001 §4.1 "search-over-policy"
   and §4.4 "a small beam of MPC rollouts"): a
   :class:`~edgesim.baselines.ForecastMPC` plans every step; its plan is
   turned into the nearest discrete-menu action and shown to the policy as
   a one-hot, which the RL agents add (x ``prior_weight``) to their logits
   or Q-values: a prior the policy can learn to override.

Observation features appended after the base ones (:data:`FEATURES`):
the two prices, the two allocations (slices / slots, Mbps / fair share),
the steps until the next COA decision / k, the mode one-hot and, in hybrid
mode, the MPC proposal one-hot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Any, Callable

import numpy as np

from .actions import NO_MIGRATION, Action, discrete_menu
from .auction import proportional_share, uniform_price
from .errors import EdgeSimError
from .modes import ModePlan, mode_names

OBS_CAP = 50.0  # as edgesim.envs: ratios are clipped here
FEATURES = ("price_slice", "price_link", "alloc_slice", "alloc_link", "coa_phase")
COAS = ("rule", "qmix")
# The learned COA's discrete menu, one row per action: (slice budget share of the cluster's slots,
# share of its edge->cloud link, rebalancing migration on). Our choice: 0.75 is the rule's budget
# (control.slice_share's default), 0.5 a tight energy budget, 1.0 no cap; a half link reserves
# bandwidth and cuts cloud spend; migration off spares the migration charge and the cold start.
# The rule under default settings is row (0.75, 1.0, True), so the learned COA can always do what it does.
COA_MENU = tuple((share, link, migrate) for share in (0.5, 0.75, 1.0) for link in (0.5, 1.0) for migrate in (False, True))


@dataclass(frozen=True)
class ControlConfig:
    """The ``control:`` block of an RL task (``conf/task/ppo.yaml``); see the module docstring.

    Attributes
    ----------
    enabled : bool
    coa_every : int
        COA cadence k in twin steps (>= 1).
    pricing : bool
        Uniform-price auctions (True) or proportional rationing without prices.
    mode : str
        A mode of ``conf/control/modes.yaml``, ``random`` or ``schedule``.
    schedule : list of dict
        ``[{at: <fraction>, mode: <name>}, ...]`` for ``mode: schedule``.
    price_weight : float
        lambda: weight of the internal payments in the ESA reward (>= 0).
    slice_share : float
        Share of a cluster's replica slots its COA may hand out, in (0, 1].
    link_mbps : float, optional
        Edge->cloud link capacity per cluster (None: ``network.bandwidth_mbps``).
    reserve : float
        Reserve price of both auctions (>= 0).
    migrate_gap : float
        Pressure difference above which the COA migrates a replica (>= 0).
    migration_cost : float
        COA reward charge per migration (>= 0).
    hybrid : bool
        Show the forecast-MPC's plan to the policy as an action prior.
    prior_weight : float
        beta: logit / Q bonus of the MPC's action (>= 0; used by the agents).
    coa : str
        ``rule`` (the fixed COA above) or ``qmix`` (a learned COA team picks :data:`COA_MENU` rows).
    """

    enabled: bool = False
    coa_every: int = 3
    pricing: bool = True
    mode: str = "balanced"
    schedule: tuple = ()
    price_weight: float = 0.2
    slice_share: float = 0.75
    link_mbps: float | None = None
    reserve: float = 0.0
    migrate_gap: float = 1.0
    migration_cost: float = 0.05
    hybrid: bool = False
    prior_weight: float = 2.0
    coa: str = "rule"

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, where: str = "task.control") -> "ControlConfig":
        """Validated config; any bad value is one :class:`EdgeSimError` naming it and the fix."""
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise EdgeSimError(f"{where}.{unknown[0]} is unknown: valid keys are {', '.join(sorted(known))}")
        for key in ("enabled", "pricing", "hybrid"):
            if key in raw and not isinstance(raw[key], bool):
                raise EdgeSimError(f"{where}.{key}={raw[key]} is invalid: use true or false")
        k = raw.get("coa_every", cls.coa_every)
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
            raise EdgeSimError(f"{where}.coa_every={k} is invalid: the COA cadence is a whole number of twin steps >= 1 "
                               "(3 = every 3 s at step_s 1, paper 001 §5.3)")
        for key, low, high in (("price_weight", 0, None), ("reserve", 0, None), ("migrate_gap", 0, None),
                               ("migration_cost", 0, None), ("prior_weight", 0, None), ("slice_share", 0, 1)):
            value = raw.get(key, getattr(cls, key))
            ok = _is_number(value) and value >= low and (high is None or value <= high) and (key != "slice_share" or value > 0)
            if not ok:
                span = "in (0, 1]" if high else ">= 0"
                hint = " (lambda, the weight of internal prices in the ESA reward)" if key == "price_weight" else ""
                raise EdgeSimError(f"{where}.{key}={value} is invalid: use a number {span}{hint}")
        coa = raw.get("coa", cls.coa)
        if coa not in COAS:
            raise EdgeSimError(f"{where}.coa={coa} is invalid: use rule or qmix")
        if coa == "qmix" and not raw.get("enabled", cls.enabled):
            raise EdgeSimError(f"{where}.coa=qmix needs {where}.enabled=true: the learned COA is part of the hierarchy")
        link = raw.get("link_mbps")
        if link is not None and not (_is_number(link) and link > 0):
            raise EdgeSimError(f"{where}.link_mbps={link} is invalid: use Mbps > 0, or null for the twin's bandwidth_mbps")
        schedule = tuple(dict(e) if isinstance(e, dict) else e for e in (raw.get("schedule") or ()))
        config = cls(**{**raw, "schedule": schedule})
        ModePlan(config.mode, list(schedule), where)  # validates mode and schedule
        return config


class ControlLayer:
    """The ESA/COA hierarchy of one twin (see the module docstring).

    Parameters
    ----------
    config : ControlConfig
    forecast_fn : callable, optional
        The MPC's forecaster in hybrid mode (default: seasonal-naive over one day).
    coa_policy : callable, optional
        With ``coa: qmix``: ``coa_policy(obs, reward) -> (C,) COA_MENU indices``, called once per COA
        decision with :meth:`coa_observation` (C, D) and the per-cluster COA reward of the window
        that just ended ((C,), None at an episode's first decision). May be set after construction.
    """

    def __init__(self, config: ControlConfig, forecast_fn: Callable | None = None,
                 coa_policy: Callable | None = None) -> None:
        if not config.enabled:
            raise EdgeSimError("ControlLayer needs control.enabled=true")
        self.config = config
        self.plan = ModePlan(config.mode, list(config.schedule))
        self.forecast_fn = forecast_fn
        self.coa_policy = coa_policy
        # control-plane CPU time (process time) of this layer: inside twin.step, and building features
        self.before_step_cpu_s = 0.0
        self.features_cpu_s = 0.0

    # ------------------------------------------------------------ set-up
    def attach(self, twin) -> None:
        """Constants of ``twin`` (called once by the twin's constructor)."""
        sc, nodes = twin.scenario, twin.nodes
        self.k = self.config.coa_every
        self.num_nodes = twin.num_nodes
        self.cluster = nodes.cluster
        self.members = [np.flatnonzero(nodes.cluster == c) for c in range(twin.num_clusters)]
        self.slots = nodes.slots.astype(np.float64)
        self.slice_capacity = np.array([np.floor(self.config.slice_share * self.slots[m].sum() + 1e-9) for m in self.members])
        link = self.config.link_mbps if self.config.link_mbps is not None else sc.network.bandwidth_mbps
        self.link_capacity = np.full(twin.num_clusters, float(link))
        self.fair_link = self.link_capacity[self.cluster] / np.array([len(self.members[c]) for c in self.cluster])
        # what each COA_MENU row hands out per cluster, (C, actions): the same floor as the rule's budget
        cluster_slots = np.array([self.slots[m].sum() for m in self.members])
        self.menu_slices = np.floor(np.outer(cluster_slots, [row[0] for row in COA_MENU]) + 1e-9)
        self.menu_links = np.outer(self.link_capacity, [row[1] for row in COA_MENU])
        self.mbit_per_request = sc.network.request_kb * 8.0 / 1e3
        self.max_step = sc.shield.max_replica_step
        self.migration_cap = sc.shield.migration_cap_per_min
        self.menu, _ = discrete_menu(self.max_step)
        self.num_modes = len(mode_names())
        self.mpc = None
        if self.config.hybrid:
            from .baselines import ForecastMPC, seasonal_naive_fn  # baselines import the twin: not at module level

            self.mpc = ForecastMPC(self.forecast_fn or seasonal_naive_fn(3), horizon=3)

    @property
    def feature_names(self) -> tuple[str, ...]:
        names = FEATURES + tuple(f"mode[{m}]" for m in mode_names())
        if self.config.hybrid:
            names += tuple(f"mpc[{k}]" for k in range(len(self.menu)))
        return names

    def reset(self, twin) -> None:
        """A new episode (called by the twin's reset)."""
        n, clusters = self.num_nodes, len(self.members)
        self.plan.reset(twin.seed, twin.scenario.episode_steps)
        self.slice_alloc = self.slots.copy()  # before the first COA decision: no restriction
        self.link_alloc = self.fair_link.copy()
        self.price_slice = np.zeros(clusters)
        self.price_link = np.zeros(clusters)
        self.payments = np.zeros(n)
        self.coa_steps: list[int] = []
        self.coa_return = np.zeros(clusters)
        self._coa_window = np.zeros(clusters)  # ESA rewards summed since the last COA decision
        self._migrations = np.zeros(clusters)
        self.slice_budget = self.slice_capacity.copy()  # what the auctions clear against (the rule: fixed)
        self.link_budget = self.link_capacity.copy()
        self.coa_actions = np.full(clusters, -1, dtype=np.int64)  # the learned COA's last menu rows
        self.clips = 0
        self.migrations = 0
        self._proposal_step = -1
        self.proposal = np.zeros(n, dtype=np.int64)
        if self.mpc is not None:
            self.mpc.reset(twin)

    # ------------------------------------------------------------ the step
    def before_step(self, twin, action: Action) -> Action:
        """The action the twin executes: the ESAs' action, cut to the COA's allocations."""
        started = time.process_time()
        s = twin.state
        held = s.replicas + s.pending_total
        requested = np.maximum(held + action.replica_delta, 0)
        placement = np.asarray(action.placement, dtype=np.float64)
        total = placement.sum(axis=1)
        cloud_share = np.divide(placement[:, 2], total, out=np.zeros(self.num_nodes), where=total > 0)
        expected = np.maximum(s.last_arrivals, 1.0) * np.clip(action.admit, 0.0, 1.0)
        cloud_mbps = expected * cloud_share * self.mbit_per_request / twin.step_s
        migrate_to = np.full(self.num_nodes, NO_MIGRATION, dtype=np.int64)  # migration is the COA's
        if s.step % self.k == 0:
            self._coa_decide(twin, requested, cloud_mbps, held, migrate_to)
        target = np.minimum(requested, np.floor(self.slice_alloc + 1e-9).astype(np.int64))
        delta = np.clip(target - held, -self.max_step, self.max_step)
        over_link = cloud_mbps > self.link_alloc + 1e-9
        self.clips += int((target < requested).sum() + over_link.sum())
        if over_link.any():
            keep = np.divide(self.link_alloc, cloud_mbps, out=np.ones(self.num_nodes), where=cloud_mbps > 0)
            cut = np.where(over_link, cloud_share * (1.0 - keep), 0.0)
            placement = np.divide(placement, total[:, None], out=np.tile([1.0, 0.0, 0.0], (self.num_nodes, 1)),
                                  where=total[:, None] > 0)
            placement[:, 2] -= cut
            placement[:, 0] += cut  # the excess is served locally
            cloud_mbps = np.minimum(cloud_mbps, self.link_alloc)
        self.payments = self._payments(held + delta, cloud_mbps)
        self.before_step_cpu_s += time.process_time() - started
        return Action(admit=action.admit, placement=placement, replica_delta=delta, migrate_to=migrate_to)

    def _coa_decide(self, twin, requested, cloud_mbps, held, migrate_to) -> None:
        """Every k steps: clear both auctions per cluster and pick one rebalancing migration."""
        s = twin.state
        step = s.step
        reward = None
        if self.coa_steps:  # the COA reward of the decision that ends now
            reward = self._coa_window / self.k - self.config.migration_cost * self._migrations
            self.coa_return += reward
        migrate = self._coa_choose(twin, reward)
        self._coa_window[:] = 0.0
        self._migrations[:] = 0.0
        self.coa_steps.append(step)
        value = self.pressure(twin)
        limit = twin.replica_limit()
        for c, members in enumerate(self.members):
            slices = self._clear(requested[members].astype(np.float64), value[members], self.slice_budget[c])
            link = self._clear(cloud_mbps[members], value[members], self.link_budget[c])
            self.slice_alloc[members] = whole_slices(slices.allocation, self.slice_budget[c])
            self.link_alloc[members] = link.allocation
            self.price_slice[c], self.price_link[c] = slices.price, link.price
            if migrate[c]:
                self._rebalance(c, members, value, held, s, migrate_to, limit)

    def _coa_choose(self, twin, reward) -> np.ndarray:
        """The capacities of this decision (``slice_budget``, ``link_budget``) and, per cluster,
        whether the rebalancing migration runs: the rule's constants, or the learned COA's rows."""
        if self.config.coa == "rule":
            return np.ones(len(self.members), dtype=bool)
        if self.coa_policy is None:
            raise EdgeSimError("task.control.coa=qmix needs a COA policy: set ControlLayer.coa_policy "
                               "(tasks.rl.coa attaches the learned team)")
        actions = np.asarray(self.coa_policy(self.coa_observation(twin), reward), dtype=np.int64)
        return self.coa_capacities(actions)

    def coa_capacities(self, actions: np.ndarray) -> np.ndarray:
        """Apply one :data:`COA_MENU` row per cluster: the auctions' slice and link capacities
        until the next decision; returns the per-cluster migration switch."""
        clusters = len(self.members)
        if actions.shape != (clusters,) or (actions < 0).any() or (actions >= len(COA_MENU)).any():
            raise EdgeSimError(f"the COA policy gave {actions.tolist()}: one COA_MENU index in 0..{len(COA_MENU) - 1} "
                               f"per cluster ({clusters})")
        self.coa_actions = actions.copy()
        rows = np.arange(clusters)
        self.slice_budget = self.menu_slices[rows, actions]
        self.link_budget = self.menu_links[rows, actions]
        return np.array([COA_MENU[a][2] for a in actions], dtype=bool)

    def _clear(self, quantity, value, capacity):
        if self.config.pricing:
            return uniform_price(quantity, value, capacity, self.config.reserve)
        return proportional_share(quantity, capacity)

    def _rebalance(self, c, members, value, held, s, migrate_to, limit) -> None:
        """One migration, least to most pressured node, only where it can help and pass the shield:
        the hot node is overloaded (pressure >= 1) and has a free slot, the donor is at most half
        busy (pressure <= 0.5) and keeps a warm replica, the cluster's migration budget (shield, 2/min) has room."""
        if s.migration_window_sum[c] >= self.migration_cap:
            return
        live = members[s.alive[members]]
        donors = live[s.replicas[live] >= 2]
        if live.size < 2 or donors.size == 0:
            return
        hot = live[np.argmax(value[live])]
        cold = donors[np.argmin(value[donors])]
        helps = value[hot] >= 1.0 and value[cold] <= 0.5 and value[hot] - value[cold] > self.config.migrate_gap
        if hot == cold or not helps or held[hot] >= limit[hot]:
            return
        migrate_to[cold] = hot
        # The slice moves with the replica.
        self.slice_alloc[cold] = max(self.slice_alloc[cold] - 1.0, 0.0)
        self.slice_alloc[hot] += 1.0
        self._migrations[c] += 1
        self.migrations += 1

    def pressure(self, twin) -> np.ndarray:
        """Each ESA's bid value: (queue + last arrivals) / capacity of its current replicas, capped."""
        s = twin.state
        capacity = np.maximum(s.replicas, 1) * twin.replica_step_capacity
        return np.minimum((s.queue_total + s.last_arrivals) / capacity, OBS_CAP)

    def _payments(self, slices, cloud_mbps) -> np.ndarray:
        if not self.config.pricing:
            return np.zeros(self.num_nodes)
        link_use = np.minimum(cloud_mbps / self.fair_link, 1.0)
        return self.price_slice[self.cluster] * slices / self.slots + self.price_link[self.cluster] * link_use

    # ------------------------------------------------------------ rewards and observations
    def reward(self, twin, terms: np.ndarray) -> np.ndarray:
        """ESA reward from the twin's (N, 3) terms at the step just taken (see the module docstring)."""
        step = twin.state.step - 1
        base = -(terms @ self.plan.weights_at(step))
        cluster_mean = np.bincount(self.cluster, weights=base) / np.bincount(self.cluster)
        self._coa_window += cluster_mean
        return base - self.config.price_weight * self.payments

    def features(self, twin) -> np.ndarray:
        """(N, F) observation features (see :attr:`feature_names`), in [0, OBS_CAP]."""
        started = time.process_time()
        s = twin.state
        phase = np.full(self.num_nodes, ((-s.step) % self.k) / self.k)
        mode = np.zeros((self.num_nodes, self.num_modes))
        mode[:, self.plan.index(min(s.step, twin.scenario.episode_steps - 1))] = 1.0
        columns = [
            self.price_slice[self.cluster], self.price_link[self.cluster],
            self.slice_alloc / self.slots, self.link_alloc / self.fair_link, phase,
        ]
        parts = [np.stack(columns, axis=1), mode]
        if self.mpc is not None:
            parts.append(self.mpc_proposal(twin))
        out = np.minimum(np.concatenate(parts, axis=1), OBS_CAP)
        self.features_cpu_s += time.process_time() - started
        return out

    def mpc_proposal(self, twin) -> np.ndarray:
        """(N, K) one-hot of the menu action nearest to the MPC's plan (computed once per step)."""
        if self._proposal_step != twin.state.step:
            rows = np.asarray(self.mpc.act(twin), dtype=np.float64)
            distance = ((rows[:, None, :] - self.menu[None, :, :]) ** 2).sum(axis=2)
            self.proposal = distance.argmin(axis=1)
            self._proposal_step = twin.state.step
        return np.eye(len(self.menu))[self.proposal]

    def coa_observation(self, twin) -> np.ndarray:
        """(C, 6 + modes) per-cluster view of a COA: mean utilisation and queue, slice and link
        demand / capacity at the last clearing, both prices, the mode one-hot."""
        s = twin.state
        queue = s.queue_total / twin.scenario.service.queue_capacity
        rows = []
        # over the rule's budget (not the learned COA's latest choice): one fixed reference whatever it chose;
        # a budget of 0 slices (tiny clusters) counts as 1, so the ratio stays finite
        for c, m in enumerate(self.members):
            rows.append([s.last_util[m].mean(), queue[m].mean(), self.slice_alloc[m].sum() / max(self.slice_capacity[c], 1.0),
                         self.link_alloc[m].sum() / self.link_capacity[c], self.price_slice[c], self.price_link[c]])
        mode = np.zeros((len(self.members), self.num_modes))
        mode[:, self.plan.index(min(s.step, twin.scenario.episode_steps - 1))] = 1.0
        return np.minimum(np.concatenate([np.array(rows), mode], axis=1), OBS_CAP)

    def summary(self) -> dict[str, float]:
        """Episode figures of the control layer (merged into the twin's summary)."""
        # the decision still running counts with the steps it has had
        pending = self._coa_window / self.k - self.config.migration_cost * self._migrations if self.coa_steps else 0.0
        return {
            "coa_decisions": float(len(self.coa_steps)),
            "coa_return": float((self.coa_return + pending).mean()),
            "control_clips": float(self.clips),
            "coa_migrations": float(self.migrations),
            "control_cpu_s": float(self.before_step_cpu_s + self.features_cpu_s),
        }


def whole_slices(allocation: np.ndarray, capacity: float) -> np.ndarray:
    """Whole slices from a divisible allocation, at most ``capacity`` in all (largest remainder:
    floors first, then one more slice to the largest fractional parts, first bidder first on ties)."""
    floors = np.floor(allocation + 1e-9)
    remainder = allocation - floors
    left = int(np.floor(capacity + 1e-9) - floors.sum())
    order = np.argsort(-remainder, kind="stable")
    extra = order[:max(left, 0)]
    floors[extra[remainder[extra] > 1e-9]] += 1.0
    return floors


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


__all__ = ["COAS", "COA_MENU", "FEATURES", "ControlConfig", "ControlLayer", "whole_slices"]
