"""Placement policies in the twin's inference slots, and their evaluation.

Per slot every edge site sends ``tasks_per_site`` tasks; a policy assigns
each to a server (an edge site or the cloud) within the capacities; the twin
(:class:`edgesim.inference.InferenceTwin`) charges delay, accuracy, compute,
bandwidth and energy at the slot's bandwidths. Policies:

* ``cdio``: CUCB (:mod:`tasks.cdio.cmab`) over base arms (site, predicted
  preference, server), started from the preference prediction's placement
  (Algorithm 1 step 1) and paying the prediction's pre-processing delay;
* ``rpp-only``: the prediction's placement alone (accuracy-sensitive and
  not delay-sensitive -> cloud, else the home edge), no learning;
* ``cdco-only``: CUCB over base arms (site, server), no prediction;
* ``all-edge`` / ``all-cloud``: the home edge / the cloud first;
* ``greedy-delay``: task by task, the server with the least nominal delay
  that has room;
* ``random``: a uniformly random assignment within the capacities;
* ``complexity-threshold``: the threshold policy of the image offloading
  task carried over (JAVP-like: the cloud for the most complex quintiles);
* ``oracle``: the best super-arm in hindsight of each slot (an upper bound).

Every policy's overflow beyond a server's capacity goes where its scores
rank next (the exact assignment oracle, :func:`tasks.cdio.cmab.best_assignment`),
and every assignment is checked against the capacities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgesim.inference import InferenceTwin, Requests
from tasks.cdio.cmab import CUCB, best_assignment, task_reward
from tasks.cdio.rpp import preference_class
from tasks.cdio.workload import Stream, requests_of

POLICIES = ("cdio", "rpp-only", "cdco-only", "all-edge", "all-cloud", "greedy-delay", "random", "complexity-threshold",
            "oracle")
USES_RPP = ("cdio", "rpp-only")
MEASURES = ("success_both", "success_accuracy", "success_delay", "accuracy", "delay_ms", "compute_tflop",
            "bandwidth_mb", "energy_j", "idle_energy_j", "reward", "regret")


@dataclass(frozen=True)
class PlacementSettings:
    slots: int
    tasks_per_site: int
    frames: int
    cost_weight: float       # reward of a met task: 1 - cost_weight x normalised cost
    phi: float               # eq. 8's weight of bandwidth against computing
    exploration: float       # CUCB's 1.5
    threshold_bin: int       # complexity-threshold: bins >= this go to the cloud
    rpp_s: float             # the prediction's pre-processing delay per task


def _slot_requests(streams: list[Stream], frames: int, slot: int, per_site: int) -> Requests:
    parts = [requests_of(s, frames, slice(slot * per_site, (slot + 1) * per_site)) for s in streams]
    return Requests(*(np.concatenate([getattr(p, f) for p in parts]) for f in Requests.__dataclass_fields__))


def _with_pre(out: dict[str, np.ndarray], requests: Requests, pre_s: float) -> dict[str, np.ndarray]:
    delayed = dict(out, delay_s=out["delay_s"] + pre_s)
    delayed["success_delay"] = delayed["delay_s"] <= requests.delay_req_s[:, None]
    return delayed


def rewards(out: dict[str, np.ndarray], settings: PlacementSettings) -> np.ndarray:
    """(K, M) reward of every task on every server (:func:`tasks.cdio.cmab.task_reward`)."""
    compute = out["compute_tflop"] / np.maximum(out["compute_tflop"].max(axis=1, keepdims=True), 1e-30)
    bandwidth = out["bandwidth_mb"] / np.maximum(out["bandwidth_mb"].max(axis=1, keepdims=True), 1e-30)
    cost = (compute + settings.phi * bandwidth) / (1 + settings.phi)
    return task_reward(out["success_accuracy"] & out["success_delay"], cost, settings.cost_weight)


def _home_scores(requests: Requests, num_servers: int, to_cloud: np.ndarray) -> np.ndarray:
    """Home edge 2 / other edges 1 / cloud 0, or the cloud 2 / home 1 / others 0 where ``to_cloud``."""
    k = len(requests)
    scores = np.ones((k, num_servers))
    scores[np.arange(k), requests.site] = 2.0
    scores[:, -1] = 0.0
    cloud_first = np.zeros((k, num_servers))
    cloud_first[np.arange(k), requests.site] = 1.0
    cloud_first[:, -1] = 2.0
    return np.where(to_cloud[:, None], cloud_first, scores)


def _greedy(values: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    left, out = capacity.copy(), np.empty(len(values), dtype=int)
    for i, row in enumerate(values):
        j = int(np.argmax(np.where(left > 0, row, -np.inf)))
        out[i], left[j] = j, left[j] - 1
    return out


class Policy:
    """One placement policy; ``choose`` then ``observe`` once per slot."""

    def __init__(self, name: str, twin: InferenceTwin, settings: PlacementSettings, seed: int) -> None:
        self.name, self.twin, self.settings = name, twin, settings
        self.rng = np.random.default_rng([seed, POLICIES.index(name), 29])
        sites, servers = twin.num_sites, len(twin.servers)
        self.bandit = None
        if name == "cdco-only":
            self.bandit = CUCB(sites, servers, settings.exploration)
        elif name == "cdio":
            prior = np.full((sites * 4, servers), 0.5)
            for site in range(sites):
                for pref in range(4):  # Algorithm 1 step 1: computing preference -> cloud, else the home edge
                    prior[site * 4 + pref, servers - 1 if pref == 2 else site] = 1.0
            self.bandit = CUCB(sites * 4, servers, settings.exploration, prior_means=prior)

    def types(self, requests: Requests, pref: np.ndarray) -> np.ndarray:
        return requests.site * 4 + pref if self.name == "cdio" else requests.site

    def choose(self, requests: Requests, pref: np.ndarray, nominal: dict, realised_reward: np.ndarray) -> np.ndarray:
        cap, m = self.twin.capacity, len(self.twin.servers)
        name = self.name
        if self.bandit is not None:
            return self.bandit.select(self.types(requests, pref), cap)
        if name == "oracle":
            return best_assignment(realised_reward, cap)
        if name == "greedy-delay":
            return _greedy(-nominal["delay_s"], cap)
        if name == "random":
            return best_assignment(self.rng.random((len(requests), m)), cap)
        to_cloud = {"all-edge": np.zeros(len(requests), bool), "all-cloud": np.ones(len(requests), bool),
                    "complexity-threshold": requests.complexity_bin >= self.settings.threshold_bin,
                    "rpp-only": pref == 2}[name]
        return best_assignment(_home_scores(requests, m, to_cloud), cap)

    def observe(self, requests: Requests, pref: np.ndarray, servers: np.ndarray, reward: np.ndarray) -> None:
        if self.bandit is not None:
            self.bandit.update(self.types(requests, pref), servers, reward)


def evaluate(twin: InferenceTwin, streams: list[Stream], predicted: list[np.ndarray], settings: PlacementSettings,
             policies: tuple[str, ...] = POLICIES, seed: int = 0) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Run every policy over ``settings.slots`` slots of ``streams``.

    Parameters
    ----------
    predicted : list of ndarray
        Per site, the preference prediction's (N, 2) probabilities for its stream.

    Returns
    -------
    summary : dict
        Policy -> mean per task of :data:`MEASURES` (regret: cumulative, per slot summed).
    regret : dict
        Policy -> cumulative regret after every slot.
    """
    need = settings.slots * settings.tasks_per_site
    if any(len(s) < need for s in streams):
        raise ValueError(f"the streams hold fewer than {need} tasks per site for {settings.slots} slots")
    agents = {name: Policy(name, twin, settings, seed) for name in policies}
    totals = {name: {key: 0.0 for key in MEASURES} for name in policies}
    curves = {name: np.zeros(settings.slots) for name in policies}
    per = settings.tasks_per_site
    for slot in range(settings.slots):
        requests = _slot_requests(streams, settings.frames, slot, per)
        pref = np.concatenate([preference_class(p[slot * per:(slot + 1) * per]) for p in predicted])
        plain = twin.outcomes(requests, slot)
        variants = {False: plain, True: _with_pre(plain, requests, settings.rpp_s)}
        reward_of = {pre: rewards(out, settings) for pre, out in variants.items()}
        nominal = twin.outcomes(requests)
        best = {pre: r[np.arange(len(requests)), best_assignment(r, twin.capacity)].sum() for pre, r in reward_of.items()}
        for name, agent in agents.items():
            pre = name in USES_RPP
            out, reward = variants[pre], reward_of[pre]
            servers = agent.choose(requests, pref, nominal, reward)
            twin.check_assignment(servers)
            got = reward[np.arange(len(requests)), servers]
            agent.observe(requests, pref, servers, got)
            _accumulate(totals[name], out, servers, got, twin)
            totals[name]["regret"] += best[pre] - got.sum()
            curves[name][slot] = totals[name]["regret"]
    tasks = settings.slots * len(streams) * per
    summary = {name: {key: (v if key == "regret" else v / tasks) for key, v in t.items()} for name, t in totals.items()}
    for t in summary.values():
        t["idle_energy_j"] *= tasks / settings.slots  # per slot, not per task
    return summary, curves


def _accumulate(total: dict[str, float], out: dict[str, np.ndarray], servers: np.ndarray, got: np.ndarray,
                twin: InferenceTwin) -> None:
    rows = np.arange(len(servers))
    pick = {key: out[key][rows, servers] for key in out}
    total["success_accuracy"] += pick["success_accuracy"].sum()
    total["success_delay"] += pick["success_delay"].sum()
    total["success_both"] += (pick["success_accuracy"] & pick["success_delay"]).sum()
    total["accuracy"] += pick["accuracy"].sum()
    total["delay_ms"] += 1000 * pick["delay_s"].sum()
    total["compute_tflop"] += pick["compute_tflop"].sum()
    total["bandwidth_mb"] += pick["bandwidth_mb"].sum()
    total["energy_j"] += pick["energy_j"].sum()
    total["idle_energy_j"] += twin.slot_idle_energy(servers, out["inference_s"])
    total["reward"] += got.sum()
