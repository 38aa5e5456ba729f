"""Gymnasium (one edge site) and PettingZoo (one cluster, one agent per node) front ends.

Both wrap an :class:`~edgesim.twin.EdgeCloudTwin`. An agent controls one
edge node (paper 001's Edge Service Agent): its action is the six numbers of
:meth:`edgesim.actions.Action.from_env` (admission, placement weights
local / neighbour / cloud, replica delta, migrate), or an index into
:func:`edgesim.actions.discrete_menu` with ``discrete_actions=True``. Nodes
no agent controls follow ``background_policy`` (default: hold).

Observation of a node (float32, all bounded):

====================  ===========================================================
``queue``             queued requests / queue capacity
``replicas``          active replicas / slots per node
``pending``           replicas starting up / slots
``limit``             replicas the shield allows now / slots
``utilisation``       last step's served / active-replica capacity
``busy``              last step's served / full node capacity
``thermal_headroom``  (max_c - T) / (max_c - ambient)
``alive``             1 if the node is up
``arrivals[k]``       arrivals k+1 steps ago / (full rate x step_s), k < arrival_lags
``nb_queue``          mean ``queue`` of live neighbours
``nb_utilisation``    mean ``utilisation`` of live neighbours
``nb_free``           free replica slots of live neighbours / (slots x neighbours)
``cloud_up``          1 if the cluster's cloud region is up
``cloud_rtt``         current edge<->cloud RTT / 100 ms
``tod_sin, tod_cos``  phase of the day (workload clock from its first sample)
``forecast[h]``       forecast rate of interval h / full rate, h < horizon
====================  ===========================================================

The forecast slots hold ``forecast_fn(history)`` (see
:mod:`edgesim.baselines`), recomputed when a demand interval completes;
without a ``forecast_fn`` they repeat the last observed interval rate.
"""

from __future__ import annotations

from typing import Any, Callable

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from .actions import ENV_ACTION_SIZE, Action, discrete_menu
from .baselines import HoldPolicy, Policy, forecast_rates
from .control import ControlConfig, ControlLayer
from .errors import EdgeSimError
from .scenario import Scenario, load_scenario
from .twin import EdgeCloudTwin

DAY_S = 86_400.0
OBS_CAP = 50.0  # ratios (arrivals, forecasts over capacity) are clipped here

BASE_FEATURES = (
    "queue", "replicas", "pending", "limit", "utilisation", "busy", "thermal_headroom", "alive",
)  # fmt: skip
CONTEXT_FEATURES = ("nb_queue", "nb_utilisation", "nb_free", "cloud_up", "cloud_rtt", "tod_sin", "tod_cos")


def feature_names(arrival_lags: int, horizon: int) -> tuple[str, ...]:
    """Names of the observation vector's entries, in order."""
    return (
        BASE_FEATURES
        + tuple(f"arrivals[{k}]" for k in range(arrival_lags))
        + CONTEXT_FEATURES
        + tuple(f"forecast[{h}]" for h in range(horizon))
    )


class Observer:
    """Builds every node's observation from the twin, vectorised, once per step.

    Parameters
    ----------
    twin : EdgeCloudTwin
    forecast_fn : callable, optional
        ``history (N, L, 1) -> (N, H[, 1])`` requests/s.
    horizon : int
        Forecast slots per observation.
    arrival_lags : int
        Past steps of arrivals per observation.
    """

    def __init__(self, twin: EdgeCloudTwin, forecast_fn: Callable | None, horizon: int, arrival_lags: int) -> None:
        if horizon < 0 or arrival_lags < 1:
            raise EdgeSimError(f"need horizon >= 0 and arrival_lags >= 1, got {horizon}, {arrival_lags}")
        self.twin = twin
        self.forecast_fn = forecast_fn
        self.horizon = horizon
        self.arrival_lags = arrival_lags
        control = twin.control.feature_names if twin.control is not None else ()
        self.names = feature_names(arrival_lags, horizon) + control
        self.size = len(self.names)
        self.low = np.zeros(self.size, dtype=np.float32)
        self.high = np.ones(self.size, dtype=np.float32)
        self.high[self.size - len(control):] = OBS_CAP  # prices and allocations (edgesim.control)
        lags = slice(len(BASE_FEATURES), len(BASE_FEATURES) + arrival_lags)
        self.high[lags] = OBS_CAP
        tod = len(BASE_FEATURES) + arrival_lags + CONTEXT_FEATURES.index("tod_sin")
        self.low[tod : tod + 2] = -1.0
        forecast_end = self.size - len(control)
        self.high[forecast_end - horizon : forecast_end] = OBS_CAP
        rtt = len(BASE_FEATURES) + arrival_lags + CONTEXT_FEATURES.index("cloud_rtt")
        self.high[rtt] = OBS_CAP

    def reset(self) -> None:
        self.lags = np.zeros((self.twin.num_nodes, self.arrival_lags))
        self.forecast_version = -1
        self.forecast = np.zeros((self.twin.num_nodes, self.horizon))

    def after_step(self) -> None:
        """Record the last step's arrivals (call once per twin step)."""
        self.lags[:, 1:] = self.lags[:, :-1]
        self.lags[:, 0] = self.twin.state.last_arrivals

    def observe(self) -> np.ndarray:
        """Observations of all N nodes, (N, size) float32."""
        twin = self.twin
        s, sc, nodes = twin.state, twin.scenario, twin.nodes
        slots = float(sc.service.max_replicas_per_node)
        limit = twin.replica_limit()
        queue = s.queue_total / sc.service.queue_capacity
        thermal = sc.thermal
        base = np.stack(
            (
                queue,
                s.replicas / slots,
                s.pending_total / slots,
                limit / slots,
                s.last_util,
                s.last_busy,
                (thermal.max_c - s.temp_c) / (thermal.max_c - thermal.ambient_c),
                s.alive.astype(np.float64),
            ),
            axis=1,
        )
        arrivals = self.lags / (nodes.full_rate * twin.step_s)[:, None]
        context = self._context(queue, limit, slots)
        forecast = self._forecast() / nodes.full_rate[:, None]
        parts = (base, arrivals, context, forecast)
        if twin.control is not None:
            parts += (twin.control.features(twin),)
        obs = np.concatenate(parts, axis=1)
        return np.clip(obs, self.low, self.high).astype(np.float32)

    def _context(self, queue: np.ndarray, limit: np.ndarray, slots: float) -> np.ndarray:
        twin = self.twin
        s, nodes = twin.state, twin.nodes
        live = (nodes.neighbours & s.alive[None, :]).astype(np.float64)
        count = live.sum(axis=1)
        per = np.maximum(count, 1.0)
        free = np.maximum(limit - s.replicas - s.pending_total, 0)
        t = min(s.step, twin.scenario.episode_steps - 1)
        clock = (twin.workload.start_interval * twin.scenario.workload.interval_s + twin.time_s) / DAY_S * 2 * np.pi
        ones = np.ones(twin.num_nodes)
        return np.stack(
            (
                live @ queue / per,
                live @ s.last_util / per,
                live @ free / (slots * per),
                s.cloud_up[twin.shield.region_of_node].astype(np.float64),
                twin.rtt_cloud[t][nodes.cluster] / 0.1,
                ones * np.sin(clock),
                ones * np.cos(clock),
            ),
            axis=1,
        )

    def _forecast(self) -> np.ndarray:
        twin = self.twin
        if self.horizon == 0:
            return self.forecast
        if twin.history_version != self.forecast_version:
            if self.forecast_fn is None:
                last = twin.demand_history()[:, -1, 0]
                self.forecast = np.repeat(last[:, None], self.horizon, axis=1)
            else:
                self.forecast = forecast_rates(self.forecast_fn, twin, self.horizon)
            self.forecast_version = twin.history_version
        return self.forecast


def _make_twin(scenario: Scenario | str, control: ControlConfig | None = None,
               forecast_fn: Callable | None = None) -> EdgeCloudTwin:
    layer = ControlLayer(control, forecast_fn) if control is not None and control.enabled else None
    return EdgeCloudTwin(load_scenario(scenario) if isinstance(scenario, str) else scenario, control=layer)


def _action_space(discrete: bool, menu_size: int) -> spaces.Space:
    if discrete:
        return spaces.Discrete(menu_size)
    return spaces.Box(-1.0, 1.0, shape=(ENV_ACTION_SIZE,), dtype=np.float32)


class EdgeSiteEnv(gym.Env):
    """Gymnasium env: one agent controls one edge node ("site") of the twin.

    Parameters
    ----------
    scenario : Scenario or str
        A scenario, or the name of a ``conf/twin/*.yaml``.
    site : int
        Global index of the controlled node.
    forecast_fn : callable, optional
        Fills the forecast slots (see the module docstring).
    horizon : int
        Forecast slots.
    arrival_lags : int
        Past-arrival slots.
    background_policy : Policy, optional
        Drives the other nodes (default :class:`~edgesim.baselines.HoldPolicy`).
    discrete_actions : bool
        Use :func:`~edgesim.actions.discrete_menu` indices instead of the Box.
    control : ControlConfig, optional
        Paper 001's ESA/COA hierarchy (:mod:`edgesim.control`): the agent is
        an ESA; prices, allocations and the mode join the observation.

    Notes
    -----
    Reward: the node's twin reward (SLO misses, energy and cloud spend, each
    normalised to [0, 1] and weighted by ``scenario.reward``). Episodes never
    terminate; they are truncated after ``scenario.episode_steps``.
    ``reset(seed=s)`` seeds the twin with ``s`` (same as ``EdgeCloudTwin.reset(s)``).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        scenario: Scenario | str = "synthetic",
        site: int = 0,
        forecast_fn: Callable | None = None,
        horizon: int = 3,
        arrival_lags: int = 4,
        background_policy: Policy | None = None,
        discrete_actions: bool = False,
        control: ControlConfig | None = None,
    ) -> None:
        self.twin = _make_twin(scenario, control, forecast_fn)
        if not 0 <= site < self.twin.num_nodes:
            raise EdgeSimError(f"site={site} is not an edge node: use 0..{self.twin.num_nodes - 1}")
        self.site = site
        self.render_mode = None
        self.observer = Observer(self.twin, forecast_fn, horizon, arrival_lags)
        self.background = background_policy or HoldPolicy()
        self.menu, self.menu_names = discrete_menu(self.twin.scenario.shield.max_replica_step)
        self.discrete = discrete_actions
        self.observation_space = spaces.Box(self.observer.low, self.observer.high, dtype=np.float32)
        self.action_space = _action_space(discrete_actions, len(self.menu))

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        twin_seed = seed if seed is not None else int(self.np_random.integers(2**31 - 1))
        self.twin.reset(twin_seed)
        self.background.reset(self.twin)
        self.observer.reset()
        return self.observer.observe()[self.site], {"twin_seed": twin_seed}

    def step(self, action):
        rows = np.array(self.background.act(self.twin), dtype=np.float64)
        rows[self.site] = self.menu[int(action)] if self.discrete else np.asarray(action, dtype=np.float64)
        result = self.twin.step(Action.from_env(rows, self.twin.scenario.shield.max_replica_step))
        self.observer.after_step()
        obs = self.observer.observe()[self.site]
        info = {"shield_interventions": int(result.interventions.sum())}
        if result.truncated:
            info["episode"] = self.twin.summary()
        return obs, float(result.reward[self.site]), False, result.truncated, info


class ClusterParallelEnv(ParallelEnv):
    """PettingZoo parallel env: one agent per node of one edge cluster.

    Parameters
    ----------
    scenario : Scenario or str
    cluster : int
        Index of the controlled cluster; nodes of other clusters follow
        ``background_policy``.
    shared_reward : bool
        Every agent gets the cluster's mean node reward (cooperative, as
        QMIX/VDN expect); False gives each node its own.
    forecast_fn, horizon, arrival_lags, background_policy, discrete_actions, control
        As in :class:`EdgeSiteEnv`.

    Notes
    -----
    :meth:`state` concatenates all agents' observations (the global state a
    centralised critic or QMIX mixer takes).
    """

    metadata = {"name": "edgesim_cluster_v0", "render_modes": []}

    def __init__(
        self,
        scenario: Scenario | str = "synthetic",
        cluster: int = 0,
        forecast_fn: Callable | None = None,
        horizon: int = 3,
        arrival_lags: int = 4,
        background_policy: Policy | None = None,
        discrete_actions: bool = False,
        shared_reward: bool = True,
        control: ControlConfig | None = None,
    ) -> None:
        self.twin = _make_twin(scenario, control, forecast_fn)
        clusters = self.twin.scenario.clusters
        if not 0 <= cluster < len(clusters):
            raise EdgeSimError(f"cluster={cluster} does not exist: use 0..{len(clusters) - 1}")
        self.nodes = np.flatnonzero(self.twin.nodes.cluster == cluster)
        spec = clusters[cluster]
        self.possible_agents = [f"{spec.name}-n{k}-{profile}" for k, profile in enumerate(spec.nodes)]
        self.agent_node = dict(zip(self.possible_agents, self.nodes))
        self.agents: list[str] = []
        self.render_mode = None
        self.shared_reward = shared_reward
        self.observer = Observer(self.twin, forecast_fn, horizon, arrival_lags)
        self.background = background_policy or HoldPolicy()
        self.menu, self.menu_names = discrete_menu(self.twin.scenario.shield.max_replica_step)
        self.discrete = discrete_actions
        self._observation_space = spaces.Box(self.observer.low, self.observer.high, dtype=np.float32)
        self._action_space = _action_space(discrete_actions, len(self.menu))
        count = len(self.possible_agents)
        self.state_space = spaces.Box(np.tile(self.observer.low, count), np.tile(self.observer.high, count), dtype=np.float32)
        self._obs = None

    def observation_space(self, agent: str) -> spaces.Space:
        return self._observation_space  # one object for every agent

    def action_space(self, agent: str) -> spaces.Space:
        return self._action_space

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        elif not hasattr(self, "_rng"):
            self._rng = np.random.default_rng()
        twin_seed = seed if seed is not None else int(self._rng.integers(2**31 - 1))
        self.twin.reset(twin_seed)
        self.background.reset(self.twin)
        self.observer.reset()
        self.agents = list(self.possible_agents)
        self._obs = self.observer.observe()
        return self._agent_obs(), {agent: {"twin_seed": twin_seed} for agent in self.agents}

    def step(self, actions: dict[str, Any]):
        rows = np.array(self.background.act(self.twin), dtype=np.float64)
        for agent, action in actions.items():
            if agent not in self.agent_node:
                raise EdgeSimError(f"unknown agent {agent!r}: agents are {self.possible_agents}")
            rows[self.agent_node[agent]] = self.menu[int(action)] if self.discrete else np.asarray(action, dtype=np.float64)
        result = self.twin.step(Action.from_env(rows, self.twin.scenario.shield.max_replica_step))
        self.observer.after_step()
        self._obs = self.observer.observe()
        node_reward = result.reward[self.nodes]
        rewards = node_reward.mean() if self.shared_reward else None
        agents = self.agents
        observations = self._agent_obs()
        reward = {a: float(rewards if self.shared_reward else node_reward[k]) for k, a in enumerate(agents)}
        terminated = {a: False for a in agents}
        truncated = {a: result.truncated for a in agents}
        info = {a: {"shield_interventions": int(result.interventions.sum())} for a in agents}
        if result.truncated:
            summary = self.twin.summary()
            for a in agents:
                info[a]["episode"] = summary
            self.agents = []
        return observations, reward, terminated, truncated, info

    def _agent_obs(self) -> dict[str, np.ndarray]:
        return {agent: self._obs[self.agent_node[agent]] for agent in self.agents}

    def state(self) -> np.ndarray:
        """All agents' observations, concatenated in ``possible_agents`` order."""
        if self._obs is None:
            raise EdgeSimError("call reset() before state()")
        return self._obs[self.nodes].ravel()

    def observation_space_names(self) -> tuple[str, ...]:
        """Names of the observation entries (same for every agent)."""
        return self.observer.names


def register_envs() -> None:
    """Register ``edgesim/EdgeSite-v0`` with Gymnasium (idempotent)."""
    if "edgesim/EdgeSite-v0" not in gym.registry:
        gym.register(id="edgesim/EdgeSite-v0", entry_point="edgesim.envs:EdgeSiteEnv")


register_envs()
