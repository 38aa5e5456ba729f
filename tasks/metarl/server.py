"""The server side of federated DQN + FOMAML (``task.kind == metarl``).

Each round the clients train on their sites (:class:`tasks.metarl.task.MetaRLTask`)
and FedAvg averages; the server then deploys the global Q-network greedily on
every edge node of the *unseen* regime's twin (zero-shot, held-out seeds)
and logs return, latency, utilisation and SLO violations (``eval_*``).

After the last round (:meth:`MetaRLServer.report`), the adaptation study:

* online DQN from the global weights on the unseen regime for
  ``adapt_episodes`` episodes (every node acting, one shared replay), and
  the same from a random initialisation (``scratch``: a DQN trained only on
  the unseen regime); per-episode returns as ``adapt_return`` /
  ``scratch_return`` (step = episode) and steps to stable return
  (:func:`tasks.metarl.dqn.steps_to_stable`) as ``adapt_steps_to_stable``,
  ``scratch_steps_to_stable``;
* (``task.baselines``) the adapted networks deployed greedily on the held-out seeds
  (``adapted_*``, ``scratch_adapted_*``), next to static allocation (every
  node holds its initial replicas and placement: ``static_*``) and the
  threshold autoscaler (``heuristic_*``) on the same seeds.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from omegaconf import DictConfig

from tasks.base import ServerTask
from tasks.metarl.spec import MetaSpec
from tasks.metarl.task import FORECASTER_KEY, SPEC_KEY, train_flops
from tasks.rl.spec import forecaster_payload

EVAL_KEYS = ("return", "mean_latency_ms", "p95_ms", "gpu_util", "cpu_util", "slo_violation_rate", "fulfillment_rate",
             "energy_j_per_request")
HEADLINE = ("eval_return", "eval_mean_latency_ms", "eval_gpu_util", "train_return")
SHOWN = ("eval_return", "eval_mean_latency_ms", "eval_gpu_util", "train_return", "clients_replied", "round_wall_time_s")
ADAPT_SEED_OFFSET = 7_000  # the unseen site's twin seed while adapting: eval_seeds[0] + this (never evaluated on)


class MetaRLServer(ServerTask):
    headline = HEADLINE
    shown = SHOWN

    def __init__(self, cfg: DictConfig, tracking_uri: str) -> None:
        from tasks.metarl.dqn import build_qnet

        torch.set_num_threads(1)
        self.cfg = cfg
        self.spec = MetaSpec.from_config(cfg)
        self.forecaster = forecaster_payload(self.spec.base, tracking_uri)  # also installs it here
        self.num_clients = self.spec.base.num_clients
        self.model_name = "DQN (3 x 128)"
        self.client_sizes = [self.spec.steps_per_regime * len(self.spec.train_regimes)] * self.num_clients
        self.client_models = {}
        self.qnet = build_qnet(self.spec, seed=int(cfg.seed))

    def initial_arrays(self) -> ArrayRecord:
        return ArrayRecord(self.qnet.state_dict())

    def train_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {SPEC_KEY: self.spec.to_json()}
        if self.forecaster is not None:
            config[FORECASTER_KEY] = self.forecaster
        return config

    def model_costs(self):
        params = sum(p.numel() for p in self.qnet.parameters())
        steps = self.spec.steps_per_regime * len(self.spec.train_regimes)
        return train_flops(self.spec, self.qnet) / steps, params, 0

    def batch_size(self) -> int:
        return self.spec.dqn.batch_size

    def _qnet(self, arrays: ArrayRecord):
        qnet = copy.deepcopy(self.qnet)
        qnet.load_state_dict(arrays.to_torch_state_dict())
        return qnet.eval()

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        scores = deployed_scores(self.spec, self._qnet(arrays))
        return {f"eval_{k}": scores[k] for k in EVAL_KEYS}

    def log_inputs(self, tracker: Any) -> None:
        tracker.log_text(json.dumps(json.loads(self.spec.to_json()), indent=2), "config/metarl_spec.json")

    def report(self, tracker: Any, history: list[dict[str, Any]], final: ArrayRecord, run_name: str) -> dict[str, float]:
        from tasks.metarl.dqn import build_qnet

        scratch = build_qnet(self.spec, seed=int(self.cfg.seed) + 1) if self.spec.baselines else None
        study = adaptation_study(self.spec, self._qnet(final), scratch)
        curves = {key: study.pop(f"{key}_curve") for key in ("adapt", "scratch") if f"{key}_curve" in study}
        for episode in range(self.spec.adapt_episodes):
            tracker.log_metrics({f"{key}_return": curve[episode] for key, curve in curves.items()}, step=episode)
        tracker.log_text(json.dumps(study, indent=2, sort_keys=True), "adaptation/summary.json")
        return study


def deployed_scores(spec: MetaSpec, qnet, regime: str | None = None) -> dict[str, float]:
    """The Q-network greedy on every edge node of a regime's twin (default: the unseen one), held-out seeds."""
    from tasks.rl.deploy import evaluate_deployment
    from tasks.rl.spec import build_scenario

    rl = spec.regime(regime or spec.unseen_regime)
    nodes = build_scenario(rl).num_nodes
    scores, _ = evaluate_deployment(rl, {node: qnet for node in range(nodes)}, rl.eval_seeds)
    return scores


def baseline_scores(spec: MetaSpec, name: str) -> dict[str, float]:
    """Static allocation (hold the initial replicas) or the threshold autoscaler on every node, held-out seeds."""
    from edgesim.baselines import HoldPolicy, ThresholdAutoscaler
    from tasks.rl.deploy import run_controlled_episode
    from tasks.rl.spec import build_scenario

    rl = spec.regime(spec.unseen_regime)
    scenario = build_scenario(rl)
    controller = HoldPolicy() if name == "static" else ThresholdAutoscaler()
    runs = [run_controlled_episode(scenario, controller, int(seed)) for seed in rl.eval_seeds]
    return {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}


def adaptation_study(spec: MetaSpec, global_qnet, scratch_qnet=None) -> dict[str, Any]:
    """Adapt the global (and a fresh) Q-network to the unseen regime; deploy them; score the baselines
    (these three only with ``scratch_qnet``)."""
    from tasks.metarl.dqn import adapt, steps_to_stable
    from tasks.rl.spec import build_scenario

    rl = spec.regime(spec.unseen_regime)
    episode_steps = build_scenario(rl).episode_steps
    seed = int(rl.eval_seeds[0]) + ADAPT_SEED_OFFSET
    out: dict[str, Any] = {}
    nets = (("adapt", global_qnet),) + ((("scratch", scratch_qnet),) if scratch_qnet is not None else ())
    for prefix, qnet in nets:
        zero_shot = deployed_scores(spec, qnet)
        curve = adapt(qnet.train(), rl, spec.adapt_episodes, spec.dqn, seed)
        adapted = deployed_scores(spec, qnet.eval())
        out[f"{prefix}_curve"] = curve
        out[f"{prefix}_steps_to_stable"] = float(steps_to_stable(curve, episode_steps))
        out[f"{prefix}_first_return"] = float(curve[0])
        out[f"{prefix}_final_return"] = float(np.mean(curve[-5:]))
        label = "adapted" if prefix == "adapt" else "scratch_adapted"
        out.update({f"{label}_{k}": adapted[k] for k in EVAL_KEYS})
        out.update({f"{prefix}_zero_shot_{k}": zero_shot[k] for k in ("return", "mean_latency_ms", "gpu_util")})
    for name in ("static", "heuristic") if scratch_qnet is not None else ():
        scores = baseline_scores(spec, name)
        out.update({f"{name}_{k}": scores[k] for k in EVAL_KEYS})
    return out
