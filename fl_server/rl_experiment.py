"""The federated RL experiment (``task.kind == rl``): PPO edge sites or QMIX clusters in the twin.

Each round the clients train their agents in their own part of the twin
(:mod:`fl_clients.rl_client`) and the configured strategy aggregates
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
same seeds (:mod:`fl_server.rl_evaluation`, ``task.final_study``).

Artifacts: the policy after every round (``policy/round_NNN.pt``), the
rounds table, learning curves. Every round is checkpointed
(:class:`fl_server.checkpoint.RunCheckpoints`), so ``checkpoint.resume=<run id>``
continues an interrupted run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fl_server import progress
from fl_server.checkpoint import RunCheckpoints
from fl_server.rounds import GridWrapper, RoundDriver
from fl_server.tracking import RunTracker
from strategies import build_strategy

# twin summary keys logged as eval_<key> every round (paper 001 Tables 1-3 + learning signals)
EVAL_KEYS = (
    "return", "slo_violation_rate", "shield_interventions", "p95_ms", "p99_ms", "mean_latency_ms",
    "throughput_rps", "energy_j_per_request", "cost_per_1k_usd", "gpu_util", "cpu_util", "fragmentation",
    "fulfillment_rate", "mean_power_w",
)  # fmt: skip
HEADLINE = ("eval_return", "eval_slo_violation_rate", "eval_p95_ms", "eval_p99_ms", "eval_energy_j_per_request",
            "eval_cost_per_1k_usd", "eval_shield_interventions", "train_return")
SHOWN = ("eval_return", "eval_slo_violation_rate", "eval_p95_ms", "train_return", "clients_replied", "round_wall_time_s")


def rl_arm(cfg: DictConfig) -> str:
    """Short name of the study arm: mafl / marl, plus the ablations that differ from the default."""
    task = cfg.task
    parts = ["mafl" if task.federated else "marl"]
    if task.algo == "qmix" and task.get("mixer", "qmix") == "vdn":
        parts.append("vdn")
    if task.get("personal_head", False):
        parts.append("ph")
    if not task.shield:
        parts.append("noshield")
    if not task.use_forecast:
        parts.append("nofc")
    if task.faults != "default":
        parts.append(str(task.faults))
    return "-".join(parts)


def rl_tags(cfg: DictConfig) -> dict[str, str]:
    """Tags that let the MLflow UI (and scripts/rl_study.py) group RL runs."""
    task = cfg.task
    return {
        "task": task.name,
        "kind": "rl",
        "algo": task.algo,
        "arm": rl_arm(cfg),
        "federated": str(bool(task.federated)).lower(),
        "shield": str(bool(task.shield)).lower(),
        "use_forecast": str(bool(task.use_forecast)).lower(),
        "forecaster": str(task.get("forecaster", "seasonal-naive")) if task.use_forecast else "none",
        "faults": str(task.faults),
        "strategy": cfg.strategy.name,
        "clients": str(cfg.clients.num),
        "seed": str(cfg.seed),
    }


def rl_train_config(spec, forecaster: bytes | None = None) -> ConfigRecord:
    """The ConfigRecord every RL client receives (with the trained forecaster's bytes, if any)."""
    from fl_clients.rl_client import FORECASTER_KEY

    config = ConfigRecord({"rl-spec": spec.to_json(), "seed": int(spec.seed)})
    if forecaster is not None:
        config[FORECASTER_KEY] = forecaster
    return config


class ReplyRecorder(GridWrapper):
    """The Grid, keeping each partition's last trained weights (its training reply).

    The server needs them to evaluate what a site deploys when part or all of
    its model is local (personal head, local mixer, non-federated arm).
    """

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.latest: dict[int, dict[str, Any]] = {}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error() or reply.metadata.message_type != MessageType.TRAIN or "arrays" not in reply.content:
                continue
            partition = int(reply.content["metrics"]["partition-id"])
            self.latest[partition] = reply.content["arrays"].to_torch_state_dict()
        return replies


def build_model(spec, client: int = 0, seed: int | None = None):
    """The spec's agent (PPO actor-critic or QMIX learner for cluster ``client``)."""
    from fl_clients.rl import ppo, qmix

    if spec.algo == "ppo":
        return ppo.build_agent(spec, seed=seed)
    return qmix.build_learner(spec, seed=seed, cluster=client)


def deployed_agents(spec, global_state: dict, latest: dict[int, dict]) -> dict[int, Any]:
    """Every client's agent as that site would run it now."""
    from fl_clients.rl_client import deployed_state

    agents = {}
    for client in range(spec.num_clients):
        model = build_model(spec, client)
        model.load_state_dict(deployed_state(spec, global_state, latest.get(client)))
        agents[client] = model.eval()
    return agents


def run_rl_tracked(grid: Grid, cfg: DictConfig, tracker: RunTracker, run_name: str, checkpoints: RunCheckpoints) -> dict[str, float]:
    """Drive the federated RL rounds and record everything."""
    import torch

    from fl_clients.rl.deploy import evaluate_deployment
    from fl_clients.rl.spec import RLSpec, forecaster_payload
    from fl_server.experiment import _history_csv, checkpoint_then_log, driver_settings, start_tracking
    from fl_server.rl_evaluation import final_study

    started = time.perf_counter()
    torch.set_num_threads(1)
    history = start_tracking(cfg, tracker, checkpoints)
    spec = RLSpec.from_config(cfg)
    forecaster = forecaster_payload(spec, tracker.tracking_uri)  # also installs it for the server's evaluation
    if not checkpoints.resumed:
        tracker.log_text(json.dumps(json.loads(spec.to_json()), indent=2), "config/rl_spec.json")
    recorder = ReplyRecorder(grid)
    model = build_model(spec, seed=int(cfg.seed))

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        agents = deployed_agents(spec, arrays.to_torch_state_dict(), recorder.latest)
        scores, _ = evaluate_deployment(spec, agents, spec.eval_seeds)
        return {f"eval_{k}": scores[k] for k in EVAL_KEYS}

    def on_round(server_round: int, metrics: dict[str, float]) -> None:
        metrics = {**metrics, "elapsed_wall_time_s": time.perf_counter() - started}
        checkpoint_then_log(tracker, checkpoints, driver, history, server_round, metrics)
        if server_round > 0 and cfg.tracking.log_model:  # the policy after every round
            tracker.log_torch_state(driver.arrays.to_torch_state_dict(), f"policy/round_{server_round:03d}.pt")
        progress.emit("round", round=server_round, **{k: metrics[k] for k in SHOWN if k in metrics})

    driver = RoundDriver(
        strategy=build_strategy(cfg),
        grid=recorder,
        train_config=rl_train_config(spec, forecaster),
        evaluate_fn=evaluate_global,
        on_round=on_round,
        **driver_settings(cfg, tracker, spec.num_clients),  # incl. fault handling, as every task
    )
    final_arrays = checkpoints.run(driver, ArrayRecord(model.state_dict()), int(cfg.num_rounds))
    tracker.log_text(_history_csv(history), "metrics/rounds.csv")
    tracker.log_figure(lambda: learning_curves(history, run_name), "plots/learning_curves.png")
    if cfg.tracking.log_model:
        tracker.log_torch_state(final_arrays.to_torch_state_dict(), "model/final_state_dict.pt")
    final = {k: history[-1][k] for k in HEADLINE if k in history[-1]}
    final["rounds_to_95pct_best"] = float(rounds_to_fraction_of_best([row.get("eval_return", np.nan) for row in history]))
    if cfg.task.get("final_study", True):  # fault scenarios and baselines on the held-out seeds
        study_started = time.perf_counter()
        agents = deployed_agents(spec, final_arrays.to_torch_state_dict(), recorder.latest)
        tracker.log_metrics(final_study(spec, agents), step=int(cfg.num_rounds))
        final["final_study_s"] = time.perf_counter() - study_started
    final["wall_time_s"] = time.perf_counter() - started
    tracker.log_metrics({f"final_{k}": v for k, v in final.items()}, step=int(cfg.num_rounds))
    tracker.finish()
    progress.emit("finished", mlflow_run_id=tracker.run_id, **final)
    return final


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
