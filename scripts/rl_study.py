"""MA-FL study: heuristic, forecast-MPC, non-federated MARL and federated PPO agents in the twin.

    .venv/bin/python -m scripts.rl_study [--seeds 0 1 2] [--rounds 5] [--steps 384]
        [--episode-s 288] [--clients 12] [--algo ppo] [--arms mafl marl noshield nofc]

Every learned arm is one federated run per seed, driven in this process
through :func:`fl_server.experiment.run_experiment` with the real ClientApp
handlers (clients keep their ``context.state`` across rounds, as Flower's
simulation does) so a study fits a 2-core machine; the same runs go through
real Flower simulations with Hydra multirun (one MLflow parent run per sweep)::

    .venv/bin/python -m scripts.sweep --multirun task=ppo strategy=fedavgm clients.num=12 \\
        task.federated=true,false seed=0,1,2

Here one MLflow parent run holds every arm's child runs, the paper-001
Tables 1-3 metrics (mean ± sd over seeds) of the final policies on held-out
seeds, the Table 5 ablations (no FL, no shield, no forecaster) as deltas
against MA-FL, rounds to 95 % of best, and paper-000 Table 3 fault scenarios
(task completion rate, policy drift against the fault-free episode, mean
response time) as markdown, plus a learning-curve plot.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
from flwr.app import Context, Message, MessageType, RecordDict

ARMS = {  # arm -> task overrides (strategy=fedavgm for all learned arms)
    "mafl": [],
    "marl": ["task.federated=false"],
    "noshield": ["task.shield=false"],
    "nofc": ["task.use_forecast=false"],
    "vdn": ["task.mixer=vdn"],  # --algo qmix only
}
ARM_TITLES = {"heuristic": "Heuristic (HPA + FFD)", "mpc": "Forecast-only MPC", "marl": "Non-federated MARL",
              "mafl": "MA-FL (ours)", "noshield": "MA-FL, no shield", "nofc": "MA-FL, no forecaster",
              "vdn": "MA-FL, VDN mixer"}
COLUMNS = (  # (key, title, scale, decimals)
    ("gpu_util", "GPU util. (%)", 100.0, 1), ("cpu_util", "CPU util. (%)", 100.0, 1),
    ("fragmentation", "Fragm. (%)", 100.0, 1), ("p95_ms", "p95 (ms)", 1.0, 0), ("p99_ms", "p99 (ms)", 1.0, 0),
    ("slo_violation_rate", "SLO viol. (%)", 100.0, 1), ("throughput_rps", "Thr. (req/s)", 1.0, 1),
    ("energy_j_per_request", "J/req", 1.0, 3), ("cost_per_1k_usd", "$/1k req", 1.0, 4),
    ("return", "Return", 1.0, 1), ("shield_interventions", "Shield int.", 1.0, 0),
)
FAULTS = ("none", "node10", "node20", "outage30", "outage60", "loss10", "loss20")


def in_process_grid(num_clients: int):
    """A FakeGrid whose replies come from the real ClientApp, one persistent Context per node."""
    from fl_clients import app as client_app
    from strategies.testing import FakeGrid

    contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": n, "num-partitions": num_clients},
                           state=RecordDict(), run_config={}) for n in range(num_clients)}

    def reply(message: Message) -> Message:
        context = contexts[message.metadata.dst_node_id]
        if message.metadata.message_type == MessageType.QUERY:
            return client_app.query(message, context)
        if message.metadata.message_type == MessageType.EVALUATE:
            return client_app.evaluate_local(message, context)
        return client_app.train(message, context)

    return FakeGrid(range(num_clients), reply)


def learned_run(arm: str, seed: int, args, uri: str, parent: str) -> tuple[dict, Any, dict]:
    """Train one arm x seed; returns (final eval metrics, spec, deployed agents)."""
    from fl_clients.rl.deploy import evaluate_deployment
    from fl_clients.rl.spec import RLSpec
    from fl_server.config import compose_config
    from fl_server.experiment import run_experiment
    from fl_server.rl_experiment import deployed_agents

    overrides = [f"task={args.algo}", "strategy=fedavgm", f"clients.num={args.clients}", f"clients.min_train={args.clients}",
                 f"num_rounds={args.rounds}", f"task.steps_per_round={args.steps}", f"task.episode_s={args.episode_s}",
                 f"seed={seed}", f"tracking.run_name={args.algo}-{arm}-s{seed}", "tracking.log_model=true",
                 f"tracking.experiment={args.experiment}",
                 # held-out twin seeds differ per study seed, so the baselines' sd is over episodes too
                 f"task.eval_seeds=[{10_000 + 100 * seed},{10_001 + 100 * seed}]", *ARMS[arm]]
    cfg = compose_config(overrides)
    grid = in_process_grid(args.clients)
    captured: dict[str, Any] = {}
    import fl_server.rl_experiment as rl_experiment

    original = rl_experiment.ReplyRecorder

    class Capturing(original):  # keep the run's recorder: the final deployed agents need the clients' weights
        def __init__(self, inner):
            super().__init__(inner)
            captured["recorder"] = self

    rl_experiment.ReplyRecorder = Capturing
    try:
        final = run_experiment(grid, cfg, uri, parent_run_id=parent)
    finally:
        rl_experiment.ReplyRecorder = original
    spec = RLSpec.from_config(cfg)
    history = _history(uri, args.experiment, f"{args.algo}-{arm}-s{seed}")
    final_state = history["final_state"]
    agents = deployed_agents(spec, final_state, captured["recorder"].latest)
    metrics, _ = evaluate_deployment(spec, agents, spec.eval_seeds)
    metrics["rounds_to_95pct_best"] = final["rounds_to_95pct_best"]
    return metrics, spec, {"agents": agents, "curve": history["curve"]}


def _history(uri: str, experiment: str, run_name: str) -> dict[str, Any]:
    """The run's learning curve and final global policy (from its MLflow artifact)."""
    import tempfile

    import torch
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    curve = {key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
             for key in ("eval_return", "eval_slo_violation_rate", "eval_shield_interventions")}
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run.info.run_id, "model/final_state_dict.pt", tmp)
        state = torch.load(path)
    return {"curve": curve, "final_state": state}


def baseline_runs(spec, name: str, faults: str | None = None) -> list[dict[str, float]]:
    """Heuristic or MPC on every node, on the spec's held-out seeds."""
    from edgesim.baselines import ForecastMPC, ThresholdAutoscaler, seasonal_naive_fn
    from fl_clients.rl.deploy import run_controlled_episode
    from fl_clients.rl.spec import FORECAST_HORIZON, FORECAST_SEASON, build_scenario

    scenario = build_scenario(spec, faults)
    runs = []
    for seed in spec.eval_seeds:
        policy = ThresholdAutoscaler() if name == "heuristic" else ForecastMPC(
            seasonal_naive_fn(FORECAST_HORIZON, FORECAST_SEASON), horizon=FORECAST_HORIZON)
        runs.append(run_controlled_episode(scenario, policy, int(seed)))
    return runs


def fault_study(spec, agents) -> dict[str, dict[str, float]]:
    """Completion rate, policy drift (vs fault-free) and response time per fault scenario."""
    from fl_clients.rl.deploy import evaluate_deployment, policy_drift

    out, reference = {}, None
    for faults in FAULTS:
        metrics, dist = evaluate_deployment(spec, agents, spec.eval_seeds, faults=faults)
        reference = dist if reference is None else reference
        out[faults] = {"completion": metrics["fulfillment_rate"], "drift": policy_drift(dist, reference),
                       "response_ms": metrics["mean_latency_ms"], "slo": metrics["slo_violation_rate"]}
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def main_table(results: dict[str, list[dict[str, float]]]) -> str:
    lines = ["| Method | " + " | ".join(t for _, t, _, _ in COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for arm, runs in results.items():
        cells = []
        for key, _, scale, decimals in COLUMNS:
            m, s = mean_sd([r[key] * scale for r in runs])
            cells.append(f"{m:.{decimals}f} ± {s:.{decimals}f}")
        lines.append(f"| {ARM_TITLES.get(arm, arm)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(results: dict[str, list[dict[str, float]]]) -> str:
    """Paper 001 Table 5: deltas against MA-FL (mean over seeds)."""
    base = {k: np.mean([r[k] for r in results["mafl"]]) for k in ("p95_ms", "energy_j_per_request", "slo_violation_rate")}
    lines = ["| Variant | Δp95 vs MA-FL (ms) | ΔEnergy (J/req) | Violations (Δ% rel.) | Rounds to 95 % of best |",
             "|---|---|---|---|---|"]
    for arm, title in (("marl", "No FL (MARL only)"), ("noshield", "No safety shield"), ("nofc", "No forecaster"),
                       ("vdn", "VDN instead of QMIX"), ("mafl", "MA-FL (ours)")):
        if arm not in results:
            continue
        runs = results[arm]
        d95 = np.mean([r["p95_ms"] for r in runs]) - base["p95_ms"]
        de = np.mean([r["energy_j_per_request"] for r in runs]) - base["energy_j_per_request"]
        viol = np.mean([r["slo_violation_rate"] for r in runs])
        rel = 100.0 * (viol / base["slo_violation_rate"] - 1.0) if base["slo_violation_rate"] > 0 else float("nan")
        r95 = mean_sd([r.get("rounds_to_95pct_best", np.nan) for r in runs])
        lines.append(f"| {title} | {d95:+.0f} | {de:+.3f} | {rel:+.0f} % | {r95[0]:.1f} ± {r95[1]:.1f} |")
    return "\n".join(lines)


def fault_table(faults: dict[str, list[dict[str, dict[str, float]]]]) -> str:
    lines = ["| Method | Fault | Task completion (%) | Policy drift (TV) | Response time (ms) | SLO viol. (%) |",
             "|---|---|---|---|---|---|"]
    for arm, per_seed in faults.items():
        for name in FAULTS:
            c = mean_sd([100 * s[name]["completion"] for s in per_seed])
            d = mean_sd([s[name]["drift"] for s in per_seed])
            r = mean_sd([s[name]["response_ms"] for s in per_seed])
            v = mean_sd([100 * s[name]["slo"] for s in per_seed])
            lines.append(f"| {ARM_TITLES.get(arm, arm)} | {name} | {c[0]:.2f} ± {c[1]:.2f} | {d[0]:.3f} ± {d[1]:.3f} "
                         f"| {r[0]:.0f} ± {r[1]:.0f} | {v[0]:.1f} ± {v[1]:.1f} |")
    return "\n".join(lines)


def curve_plot(curves: dict[str, list[dict[str, list[float]]]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    keys = (("eval_return", "episode return"), ("eval_slo_violation_rate", "SLO violation rate"),
            ("eval_shield_interventions", "shield interventions"))
    for ax, (key, label) in zip(axes, keys):
        for arm, per_seed in curves.items():
            values = np.array([c[key] for c in per_seed])
            ax.plot(values.mean(axis=0), marker="o", label=ARM_TITLES.get(arm, arm))
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=384)
    parser.add_argument("--episode-s", type=float, default=288.0)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--algo", default="ppo", choices=("ppo", "qmix"))
    parser.add_argument("--arms", nargs="+", default=["mafl", "marl", "noshield", "nofc"], choices=list(ARMS))
    parser.add_argument("--experiment", default="fedcontinuum-rl-study")
    args = parser.parse_args(argv)

    import torch

    from fl_server.config import default_tracking_uri
    from fl_server.tracking import RunTracker

    torch.set_num_threads(1)
    uri = default_tracking_uri()
    parent = RunTracker(uri, args.experiment, f"rl-study-{args.algo}-{time.strftime('%Y%m%d-%H%M%S')}",
                        tags={"fc.kind": "rl-study", "algo": args.algo})
    parent.log_params({k: str(v) for k, v in vars(args).items()})
    parent.flush()
    results: dict[str, list[dict[str, float]]] = {"heuristic": [], "mpc": []}
    curves: dict[str, list] = {}
    faults: dict[str, list] = {"heuristic": [], "mafl": []}
    started = time.perf_counter()
    for seed in args.seeds:
        for arm in args.arms:
            metrics, spec, extra = learned_run(arm, seed, args, uri, parent.run_id)
            results.setdefault(arm, []).append(metrics)
            curves.setdefault(arm, []).append(extra["curve"])
            print(f"[{time.perf_counter() - started:.0f} s] {arm} seed {seed}: return {metrics['return']:.2f} "
                  f"SLO viol {metrics['slo_violation_rate']:.3f} p95 {metrics['p95_ms']:.0f} ms", flush=True)
            if arm == "mafl":
                faults["mafl"].append(fault_study(spec, extra["agents"]))
                # the baselines on the same held-out seeds as this seed's agents
                for name in ("heuristic", "mpc"):
                    runs = baseline_runs(spec, name)
                    results[name].append({k: float(np.mean([r[k] for r in runs])) for k in runs[0]})
                faults["heuristic"].append(_baseline_faults(spec))
    text = "\n\n".join([
        f"# RL study ({args.algo}, {len(args.seeds)} seeds, {args.rounds} rounds x {args.steps} steps/client, "
        f"{args.clients} clients, episode {args.episode_s:g} s)",
        "## Paper 001 Tables 1-3 (final policies, held-out twin seeds)", main_table(results),
        "## Paper 001 Table 5 ablations", ablation_table(results),
        "## Paper 000 Table 3 fault scenarios", fault_table(faults),
    ])
    print(text)
    parent.log_text(text, "report/rl_study.md")
    parent.log_figure(lambda: curve_plot(curves), "plots/learning_curves.png")
    parent.log_metrics({f"{arm}.{k}": float(np.mean([r[k] for r in runs])) for arm, runs in results.items()
                        for k, *_ in COLUMNS}, step=0)
    parent.finish()
    print(f"MLflow parent run {parent.run_id} ({uri}), {time.perf_counter() - started:.0f} s")


def _baseline_faults(spec) -> dict[str, dict[str, float]]:
    """The heuristic under every fault scenario (policy drift: not defined for it, 0)."""
    out = {}
    for name in FAULTS:
        runs = baseline_runs(spec, "heuristic", faults=name)
        out[name] = {"completion": float(np.mean([r["fulfillment_rate"] for r in runs])), "drift": 0.0,
                     "response_ms": float(np.mean([r["mean_latency_ms"] for r in runs])),
                     "slo": float(np.mean([r["slo_violation_rate"] for r in runs]))}
    return out


if __name__ == "__main__":
    main()
