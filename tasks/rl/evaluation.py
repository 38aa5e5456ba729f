"""What an RL run measures once its last round is done: fault scenarios and baselines.

Every RL run (``task.final_study: true``) ends by scoring, on the run's
held-out twin seeds (``task.eval_seeds``):

* its deployed agents under each paper-000 Table 3 fault scenario
  (:data:`FAULTS`): task completion rate, policy drift (total-variation
  distance between the action distribution under the fault and the
  fault-free one), mean response time and SLO violations, logged as
  ``fault_<scenario>_<measure>``;
* the heuristic (threshold autoscaler + FFD) and the forecast-MPC (with the
  run's forecaster) on the same seeds, as ``baseline_<name>_<metric>``, and
  the heuristic under each fault as ``baseline_heuristic_fault_<scenario>_<measure>``.

So each run of a Hydra multirun carries all its study figures, and a
study's tables (``scripts/rl_study.py``) are a read of the sweep's MLflow
child runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FAULTS = ("none", "node10", "node20", "outage30", "outage60", "loss10", "loss20")
BASELINES = ("heuristic", "mpc")
# twin summary keys of the baselines (paper 001 Tables 1-3)
BASELINE_KEYS = (
    "gpu_util", "cpu_util", "fragmentation", "p95_ms", "p99_ms", "slo_violation_rate", "throughput_rps",
    "energy_j_per_request", "cost_per_1k_usd", "return", "shield_interventions", "fulfillment_rate",
    "mean_latency_ms", "served", "control_cpu_us", "fairness_variance", "jain_fairness", "satisfaction",
    "min_region_fulfillment",
)  # fmt: skip
FAULT_MEASURES = ("completion", "drift", "response_ms", "slo_violation_rate", "fairness_variance")


def _mean(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}


def fault_measures(metrics: dict[str, float], drift: float) -> dict[str, float]:
    """One fault scenario's Table 3 measures from the twin's summary."""
    return {"completion": metrics["fulfillment_rate"], "drift": drift,
            "response_ms": metrics["mean_latency_ms"], "slo_violation_rate": metrics["slo_violation_rate"],
            "fairness_variance": metrics["fairness_variance"]}


def scored_scenarios(spec) -> tuple[str, ...]:
    """The Table 3 fault scenarios, plus the Table 4 density scenarios on a regions twin."""
    from tasks.rl.density import DENSITY_SCENARIOS
    from tasks.rl.spec import build_scenario

    return FAULTS + (tuple(DENSITY_SCENARIOS) if build_scenario(spec).regions is not None else ())


def agent_fault_study(spec, agents: dict[int, Any]) -> dict[str, dict[str, float]]:
    """The deployed agents under every scenario; drift is against the fault-free episode."""
    from tasks.rl.deploy import evaluate_deployment, policy_drift

    out, reference = {}, None
    for name in scored_scenarios(spec):
        metrics, distribution = evaluate_deployment(spec, agents, spec.eval_seeds, faults=name)
        reference = distribution if reference is None else reference
        out[name] = fault_measures(metrics, policy_drift(distribution, reference))
    return out


def baseline_controller(spec, name: str):
    """The heuristic, or the forecast-MPC with the run's forecaster (seasonal-naive when it has none)."""
    from edgesim.baselines import ForecastMPC, ThresholdAutoscaler, seasonal_naive_fn
    from tasks.rl.spec import FORECAST_HORIZON, FORECAST_SEASON, forecast_fn

    if name == "heuristic":
        return ThresholdAutoscaler()
    forecaster = forecast_fn(spec) or seasonal_naive_fn(FORECAST_HORIZON, FORECAST_SEASON)
    return ForecastMPC(forecaster, horizon=FORECAST_HORIZON)


def baseline_metrics(spec, name: str, faults: str | None = None) -> dict[str, float]:
    """A baseline driving every node, mean over the held-out seeds."""
    from tasks.rl.deploy import run_controlled_episode
    from tasks.rl.spec import build_scenario

    scenario = build_scenario(spec, faults)
    return _mean([run_controlled_episode(scenario, baseline_controller(spec, name), int(seed))
                  for seed in spec.eval_seeds])


def final_study(spec, agents: dict[int, Any], baselines: bool = True) -> dict[str, float]:
    """Every figure above as flat MLflow metric names (``baselines=False``: the agents' only;
    a study that scores the deterministic baselines once itself, as ``scripts.regions_study``)."""
    out: dict[str, float] = {}
    for name, measures in agent_fault_study(spec, agents).items():
        out.update({f"fault_{name}_{k}": v for k, v in measures.items()})
    return {**out, **baseline_study(spec)} if baselines else out


def baseline_study(spec) -> dict[str, float]:
    """The heuristic and the MPC on the spec's held-out seeds: fault-free, and (the heuristic;
    on a regions twin both) under every scored scenario."""
    from tasks.rl.spec import build_scenario

    out: dict[str, float] = {}
    for baseline in BASELINES:
        metrics = baseline_metrics(spec, baseline)
        out.update({f"baseline_{baseline}_{k}": metrics[k] for k in BASELINE_KEYS})
    regions = build_scenario(spec).regions is not None
    for name in scored_scenarios(spec):  # a baseline has no policy to drift
        for baseline in BASELINES if regions else ("heuristic",):  # paper 000's study scores the MPC too
            measures = fault_measures(baseline_metrics(spec, baseline, name), 0.0)
            out.update({f"baseline_{baseline}_fault_{name}_{k}": v for k, v in measures.items()})
    return out
