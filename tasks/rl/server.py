"""The server side of federated RL (``task.kind == rl``): PPO edge sites or QMIX clusters in the twin.

Each round the clients train their agents in their own part of the twin
(:class:`tasks.rl.task.RLTask`) and the configured strategy aggregates
(FedAvgM in paper 001; staleness-aware clustered also works). The server then
deploys every site's policy at once in one twin, on held-out seeds, and logs
what the deployed system does: episode return, SLO violations, shield
interventions, p95/p99 latency, J/request, cost per 1k requests, utilisation,
fragmentation (``eval_*``), next to the clients' training curves
(``train_*``). "Deployed" follows the arm: the global model (MA-FL), the
global trunk with each site's personal head / local mixer, or each site's
own weights (``federated: false``, the non-federated MARL arm); the latter
two come from the clients' last replies.

After the last round, the deployed agents are scored under the paper-000
fault scenarios, next to the heuristic and forecast-MPC baselines on the
same seeds (:mod:`tasks.rl.evaluation`, ``task.final_study``).

Artifacts: the policy after every round (``policy/round_NNN.pt``), the
rounds table, learning curves. Every round is checkpointed
(:class:`fl_server.engine.checkpoint.RunCheckpoints`), so ``checkpoint.resume=<run id>``
continues an interrupted run.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from omegaconf import DictConfig

from tasks.base import ServerTask
from tasks.rl.spec import RLSpec, forecaster_payload
from tasks.rl.task import FORECASTER_KEY, SPEC_KEY, build_model, deployed_state, train_flops

# twin summary keys logged as eval_<key> every round (paper 001 Tables 1-3 + learning signals)
EVAL_KEYS = (
    "return", "slo_violation_rate", "shield_interventions", "p95_ms", "p99_ms", "mean_latency_ms",
    "throughput_rps", "energy_j_per_request", "cost_per_1k_usd", "gpu_util", "cpu_util", "fragmentation",
    "fulfillment_rate", "mean_power_w", "served", "cloud_share", "control_cpu_us", "fairness_variance", "jain_fairness",
    "satisfaction", "min_region_fulfillment",
    # paper 001's control hierarchy (task.control.enabled): COA figures of edgesim.control
    "coa_return", "coa_decisions", "control_clips", "coa_migrations",
)  # fmt: skip
HEADLINE = ("eval_return", "eval_slo_violation_rate", "eval_p95_ms", "eval_p99_ms", "eval_energy_j_per_request",
            "eval_cost_per_1k_usd", "eval_shield_interventions", "train_return")
VALIDATION_SEED_OFFSET = 5_000  # the rollout guard's twin episode: eval_seeds[0] + this
SHOWN = ("eval_return", "eval_slo_violation_rate", "eval_p95_ms", "train_return", "clients_replied", "round_wall_time_s")

class RLServer(ServerTask):
    """One RL run's server: deploys every site's policy in one twin each round."""

    headline = HEADLINE
    shown = SHOWN
    needs_client_models = True  # personal heads, local mixers and the MARL arm deploy the clients' own weights

    def __init__(self, cfg: DictConfig, tracking_uri: str) -> None:
        torch.set_num_threads(1)
        self.cfg = cfg
        self.spec = RLSpec.from_config(cfg)
        self.forecaster = forecaster_payload(self.spec, tracking_uri)  # also installs it for the evaluation
        self.num_clients = self.spec.num_clients
        self.model_name = f"{self.spec.algo} agent"
        self.client_sizes = [self.spec.steps_per_round] * self.num_clients
        self.client_models = {}
        self.model = build_model(self.spec, seed=int(cfg.seed))

    def initial_arrays(self) -> ArrayRecord:
        return ArrayRecord(self.model.state_dict())

    def train_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {SPEC_KEY: self.spec.to_json()}
        if self.forecaster is not None:
            config[FORECASTER_KEY] = self.forecaster
        return config

    def model_costs(self):
        spec, model = self.spec, self.model
        params = sum(p.numel() for p in model.parameters())
        flops = train_flops(spec, model) / max(spec.steps_per_round, 1)
        return flops, params, 0

    def batch_size(self) -> int:
        return 1

    def deployed_agents(self, global_state: dict) -> dict[int, Any]:
        """Every client's agent as that site would run it now."""
        agents = {}
        for client in range(self.spec.agent_sites):  # C-ML: the one model on every site it learnt from
            model = build_model(self.spec, client)
            model.load_state_dict(deployed_state(self.spec, global_state, self.client_models.get(client)))
            agents[client] = model.eval()
        return agents

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        from tasks.rl.deploy import evaluate_deployment

        scores, _ = evaluate_deployment(self.spec, self.deployed_agents(arrays.to_torch_state_dict()),
                                        self.spec.eval_seeds)
        return {f"eval_{k}": scores[k] for k in EVAL_KEYS if k in scores}

    def validation_score(self, arrays: ArrayRecord) -> float:
        """Return of one twin episode with every site's policy deployed, on a held-out
        seed (``VALIDATION_SEED_OFFSET`` past the first evaluation seed: neither the
        clients' training episodes nor the logged evaluation use it)."""
        from tasks.rl.deploy import evaluate_deployment

        seed = int(self.spec.eval_seeds[0]) + VALIDATION_SEED_OFFSET
        scores, _ = evaluate_deployment(self.spec, self.deployed_agents(arrays.to_torch_state_dict()), [seed])
        return float(scores["return"])

    def log_inputs(self, tracker: Any) -> None:
        tracker.log_text(json.dumps(json.loads(self.spec.to_json()), indent=2), "config/rl_spec.json")

    def after_round(self, server_round: int, arrays: ArrayRecord, tracker: Any) -> None:
        if server_round > 0 and self.cfg.tracking.log_model:  # the policy after every round
            tracker.log_torch_state(arrays.to_torch_state_dict(), f"policy/round_{server_round:03d}.pt")

    def report(self, tracker: Any, history: list[dict[str, Any]], final: ArrayRecord, run_name: str) -> dict[str, float]:
        from tasks.rl.evaluation import final_study

        tracker.log_figure(lambda: learning_curves(history, run_name), "plots/learning_curves.png")
        extra = {"rounds_to_95pct_best": float(rounds_to_fraction_of_best(
            [row.get("eval_return", np.nan) for row in history]))}
        if self.cfg.task.final_study:  # fault scenarios and baselines on the held-out seeds
            started = time.perf_counter()
            tracker.log_metrics(final_study(self.spec, self.deployed_agents(final.to_torch_state_dict()),
                                            baselines=bool(self.cfg.task.get("final_baselines", True))),
                                step=int(self.cfg.num_rounds))
            extra["final_study_s"] = time.perf_counter() - started
        return extra


def rounds_to_fraction_of_best(returns: list[float], fraction: float = 0.95) -> int:
    """First round whose return closes ``fraction`` of the gap from round 0 to the best round.

    Returns are negative costs, so "95 % of best" is read as 95 % of the
    improvement: ``r_k >= r_0 + 0.95 (max r - r_0)``. No improvement: round 0.
    """
    values = np.asarray(returns, dtype=float)
    if values.size == 0 or not np.isfinite(values).any():
        return 0
    values = np.where(np.isfinite(values), values, -np.inf)
    start, best = values[0], values.max()
    if not np.isfinite(start) or best <= start:
        return int(np.argmax(values))
    return int(np.argmax(values >= start + fraction * (best - start)))


def learning_curves(history: list[dict[str, Any]], title: str):
    """Return, SLO violations and shield interventions per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [row["round"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    panels = (
        (("eval_return", "deployed (held-out seeds)"), ("train_return", "clients' training episodes")),
        (("eval_slo_violation_rate", "deployed"), ("train_slo_violation_rate", "training")),
        (("eval_shield_interventions", "deployed"), ("train_shield_interventions", "training")),
    )
    for ax, curves, label in zip(axes, panels, ("episode return", "SLO violation rate", "shield interventions")):
        for key, name in curves:
            ax.plot(rounds, [row.get(key, np.nan) for row in history], marker="o", label=name)
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig
