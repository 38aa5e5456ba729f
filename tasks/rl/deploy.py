"""Learned agents as twin controllers, and the evaluation episode of a deployed system.

Deployment (what the server scores each round): every client's agent drives
the nodes it trained on, at once, in one twin, on held-out seeds; nodes no
agent controls follow the background policy. PPO client ``k`` drives edge
node ``k``; QMIX client ``k`` drives the nodes of cluster ``k``. Actions are
greedy (argmax of the policy's logits or of the agents' Q-values).

:class:`LearnedController` has the :class:`edgesim.baselines.Policy`
interface, so learned agents and the heuristic / MPC baselines run through
the very same :func:`run_controlled_episode`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from torch import nn

from edgesim import Action, EdgeCloudTwin, Scenario
from edgesim.actions import discrete_menu
from edgesim.envs import Observer

from .spec import RLSpec, background_policy, build_scenario, control_config, edge_only_menu, forecast_fn, site_node


def controlled_nodes(spec: RLSpec, scenario: Scenario, client: int) -> np.ndarray:
    """Global indices of the nodes client ``client``'s agent drives (PPO: site ``client``'s node)."""
    if spec.algo == "ppo":
        return np.array([site_node(scenario, client)])
    return np.flatnonzero(scenario.nodes.cluster == client)


class LearnedController:
    """Drives the nodes of each agent with its greedy action; the rest with ``background``.

    Parameters
    ----------
    spec : RLSpec
    agents : dict
        ``{client: model}`` with a ``greedy(obs (n, d)) -> (n,)`` method
        (:class:`~tasks.rl.ppo.ActorCritic` or :class:`~tasks.rl.qmix.QMixLearner`).
    """

    def __init__(self, spec: RLSpec, agents: dict[int, nn.Module]) -> None:
        self.spec, self.agents = spec, agents
        self.background = background_policy(spec)

    def reset(self, twin: EdgeCloudTwin) -> None:
        self.observer = Observer(twin, forecast_fn(self.spec), self.spec.horizon, arrival_lags=4)
        self.observer.reset()
        self.background.reset(twin)
        self.menu, _ = discrete_menu(twin.scenario.shield.max_replica_step)
        if self.spec.edge_only:
            self.menu = edge_only_menu(self.menu)
        self.nodes = {c: controlled_nodes(self.spec, twin.scenario, c) for c in self.agents}
        self.action_counts = np.zeros(len(self.menu), dtype=np.int64)

    def act(self, twin: EdgeCloudTwin) -> np.ndarray:
        if twin.state.step > 0:
            self.observer.after_step()  # the step just taken: its arrivals into the lags
        obs = self.observer.observe()
        rows = np.array(self.background.act(twin), dtype=np.float64)
        for client, agent in self.agents.items():
            nodes = self.nodes[client]
            choice = agent.greedy(obs[nodes])
            rows[nodes] = self.menu[choice]
            self.action_counts += np.bincount(choice, minlength=len(self.menu))
        return rows

    def action_distribution(self) -> np.ndarray:
        """Frequency of each menu action over the episode (all controlled nodes)."""
        total = self.action_counts.sum()
        return self.action_counts / total if total else self.action_counts.astype(float)


def run_controlled_episode(scenario: Scenario, controller: Any, seed: int,
                           reward_nodes: np.ndarray | None = None, control=None,
                           forecaster=None, coa_policy=None) -> dict[str, float]:
    """One episode under ``controller``; the twin's summary plus ``return`` and ``control_cpu_us``.

    ``return`` sums, over steps, the mean reward of ``reward_nodes`` (all
    nodes if None), so agents and baselines are scored on the same nodes.
    ``control`` (an :class:`edgesim.control.ControlConfig`) runs the ESA/COA
    hierarchy in the twin (``forecaster``: its MPC's, hybrid mode; ``coa_policy``: the learned
    COA team's, with ``control.coa: qmix``).
    ``control_cpu_us`` is the control plane's CPU time per step (the
    controller's ``act``: agents' forward passes, observations, and the
    control layer's auctions and MPC), paper 001 Table 5's overhead.
    """
    from edgesim.control import ControlLayer

    layer = ControlLayer(control, forecaster, coa_policy) if control is not None and control.enabled else None
    twin = EdgeCloudTwin(scenario, control=layer)
    twin.reset(seed)
    controller.reset(twin)
    nodes = np.arange(twin.num_nodes) if reward_nodes is None else reward_nodes
    max_step = scenario.shield.max_replica_step
    total, act_s = 0.0, 0.0
    while not twin.done:
        started = time.process_time()
        rows = controller.act(twin)
        act_s += time.process_time() - started
        result = twin.step(Action.from_env(rows, max_step))
        total += float(result.reward[nodes].mean())
    summary = twin.summary()
    # the layer's own time inside twin.step (its auctions); its features ran inside act already
    cpu_s = act_s + (layer.before_step_cpu_s if layer is not None else 0.0)
    return {**summary, "return": total, "control_cpu_us": 1e6 * cpu_s / max(twin.state.step, 1)}


def evaluate_deployment(spec: RLSpec, agents: dict[int, nn.Module], seeds: tuple[int, ...] | list[int],
                        faults: str | None = None) -> tuple[dict[str, float], np.ndarray]:
    """Mean metrics over ``seeds`` of the deployed agents, and their action distribution."""
    scenario = build_scenario(spec, faults)
    nodes = np.concatenate([controlled_nodes(spec, scenario, c) for c in sorted(agents)])
    coa_policy = deployed_coa(spec, agents)
    runs, counts = [], 0
    for seed in seeds:
        controller = LearnedController(spec, agents)
        runs.append(run_controlled_episode(scenario, controller, int(seed), nodes, control_config(spec), forecast_fn(spec),
                                           coa_policy))
        counts = counts + controller.action_counts
    mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
    total = np.sum(counts)
    return mean, (counts / total if total else np.zeros_like(counts, dtype=float))


def deployed_coa(spec: RLSpec, agents: dict[int, nn.Module]):
    """The greedy learned COA team (``control.coa: qmix``), else None. It is the first client's:
    the team is federated and ``federated: false`` is refused with it, so every client holds the same."""
    from .coa import greedy_policy, uses_learned_coa

    if not uses_learned_coa(spec):
        return None
    return greedy_policy(agents[min(agents)].coa)


def policy_drift(p: np.ndarray, q: np.ndarray) -> float:
    """Total-variation distance between two action distributions, in [0, 1]."""
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())
