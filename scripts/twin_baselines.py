"""Run the twin's baselines and print paper-001-style tables (mean +- sd over seeds).

    .venv/bin/python -m scripts.twin_baselines [--forecaster seasonal-naive|oracle|federated:<RUN_ID>]
        [--seeds 0 1 2] [--episode-s 21600] [--scenario bitbrains] [--no-mlflow]

Both baselines of :mod:`edgesim.baselines` (threshold autoscaler with FFD
bin packing; forecast-driven MPC) run on the Bitbrains-driven scenario
(``conf/twin/bitbrains.yaml``); when its trace directory is absent the
scenario falls back to the synthetic workload, with a note. Metrics follow
paper 001 Tables 1-3 plus paper 000's fulfillment rate and regional fairness
variance. Results go to MLflow (``fl_server.experiments.config.default_tracking_uri()``):
one parent run, one child run per baseline x seed, the table as a markdown
artifact.

The MPC's forecaster: ``seasonal-naive`` (default,
``tasks.forecast.training.seasonal_naive_forecast``, one-day season) or
``oracle`` (the true demand envelope) or ``federated:<MLflow run id>``: the
final global TCN/LSTM of a federated forecasting run (``make run
ARGS=task=bitbrains``), see :mod:`tasks.forecast.trained`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgesim import EdgeCloudTwin, load_scenario
from edgesim.baselines import ForecastMPC, ThresholdAutoscaler, oracle_fn, run_episode, seasonal_naive_fn
from edgesim.faults import rescale_faults
from edgesim.scenario import CONF_DIR, PROJECT_DIR

# (metric key, column title, scale, decimals); paper 001 Tables 1-3 order.
COLUMNS: tuple[tuple[str, str, float, int], ...] = (
    ("gpu_util", "GPU util. (%)", 100.0, 1),
    ("cpu_util", "CPU util. (%)", 100.0, 1),
    ("fragmentation", "Fragmentation (%)", 100.0, 1),
    ("p95_ms", "p95 (ms)", 1.0, 1),
    ("p99_ms", "p99 (ms)", 1.0, 1),
    ("slo_violation_rate", "SLO viol. (%)", 100.0, 2),
    ("throughput_rps", "Throughput (req/s)", 1.0, 1),
    ("energy_j_per_request", "Energy (J/req)", 1.0, 3),
    ("cost_per_1k_usd", "Cost / 1k req (USD)", 1.0, 4),
    ("fulfillment_rate", "Fulfillment (%)", 100.0, 2),
    ("fairness_variance", "Fairness var.", 1.0, 5),
)
HORIZON = 3  # MPC horizon in workload intervals (3 x 300 s)
SEASON = 288  # one day of 300-s intervals


def scenario_for(name: str, episode_s: float | None) -> tuple[Any, str]:
    """The scenario, falling back to the synthetic workload if its traces are missing."""
    import yaml

    overrides: dict[str, Any] = {}
    if episode_s is not None:
        overrides["episode_s"] = episode_s
    path = CONF_DIR / "twin" / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text()) if path.is_file() else {}
    workload = raw.get("workload", {})
    note = ""
    if workload.get("source") == "trace":
        trace_dir = Path(workload.get("trace_dir") or "")
        trace_dir = trace_dir if trace_dir.is_absolute() else PROJECT_DIR / trace_dir
        if not trace_dir.is_dir():
            note = f"note: trace directory {trace_dir} not found; using the synthetic workload instead"
            overrides["workload"] = {"source": "synthetic"}
    if episode_s is not None:  # keep the faults at the same relative times
        overrides["faults"] = rescale_faults(raw.get("faults") or [], episode_s / float(raw.get("episode_s", episode_s)))
    return load_scenario(name, overrides), note


def forecaster(name: str, twin: EdgeCloudTwin) -> Callable:
    if name == "oracle":
        return oracle_fn(twin, HORIZON)
    if name.startswith("federated:"):  # a trained federated forecaster from MLflow
        return _trained(name.split(":", 1)[1]).forecast_fn(HORIZON)
    return seasonal_naive_fn(HORIZON, SEASON)


_TRAINED: dict = {}


def _trained(run_id: str):
    """Load once per process (every seed's MPC reuses it)."""
    if run_id not in _TRAINED:
        from fl_server.experiments.config import default_tracking_uri
        from tasks.forecast.trained import load_from_mlflow

        _TRAINED[run_id] = load_from_mlflow(run_id, default_tracking_uri())
    return _TRAINED[run_id]


def forecaster_choice(value: str) -> str:
    """argparse type: seasonal-naive, oracle or federated:<MLflow run id>."""
    if value in ("seasonal-naive", "oracle") or (value.startswith("federated:") and len(value) > 10):
        return value
    raise argparse.ArgumentTypeError(
        f"{value!r}: use seasonal-naive, oracle or federated:<MLflow run id of a task=bitbrains run>")


def run_all(scenario, seeds: list[int], forecaster_name: str) -> dict[str, list[dict[str, float]]]:
    twin = EdgeCloudTwin(scenario)
    policies = {
        "Heuristic (HPA + FFD binpack)": lambda: ThresholdAutoscaler(),
        f"Forecast-only MPC ({forecaster_name})": lambda: ForecastMPC(forecaster(forecaster_name, twin), horizon=HORIZON),
    }
    results: dict[str, list[dict[str, float]]] = {}
    for name, make in policies.items():
        results[name] = []
        for seed in seeds:
            start = time.perf_counter()
            metrics = run_episode(twin, make(), seed=seed)
            metrics["wall_s"] = time.perf_counter() - start
            results[name].append(metrics)
            print(f"  {name}, seed {seed}: {scenario.episode_steps} steps in {metrics['wall_s']:.1f} s", flush=True)
    return results


def table(results: dict[str, list[dict[str, float]]]) -> str:
    """Markdown table of mean +- sd (sample sd over seeds)."""
    header = "| Method | " + " | ".join(title for _, title, _, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, runs in results.items():
        cells = []
        for key, _, scale, decimals in COLUMNS:
            values = np.array([run[key] for run in runs]) * scale
            sd = values.std(ddof=1) if len(values) > 1 else 0.0
            cells.append(f"{values.mean():.{decimals}f} ± {sd:.{decimals}f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def log_to_mlflow(results, scenario, seeds, forecaster_name, markdown, note, tracking_uri, experiment) -> str:
    from fl_server.experiments.tracking import RunTracker

    params = {
        "scenario": scenario.name,
        "workload_source": scenario.workload.source,
        "episode_s": scenario.episode_s,
        "step_s": scenario.step_s,
        "seeds": ",".join(map(str, seeds)),
        "forecaster": forecaster_name,
        "nodes": scenario.num_nodes,
        "clusters": len(scenario.clusters),
    }
    parent = RunTracker(tracking_uri, experiment, f"twin-baselines-{scenario.name}-{forecaster_name}",
                        tags={"kind": "twin-baselines"})
    parent.log_params(params)
    for name, runs in results.items():
        for seed, metrics in zip(seeds, runs):
            child = RunTracker(
                tracking_uri, experiment, f"{name} s{seed}", tags={"baseline": name, "seed": str(seed)},
                parent_run_id=parent.run_id,
            )  # fmt: skip
            child.log_params({**params, "baseline": name, "seed": seed})
            child.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)}, step=0)
            child.finish()
        means = {f"{_slug(name)}.{key}": float(np.mean([r[key] for r in runs])) for key, *_ in COLUMNS}
        parent.log_metrics(means, step=0)
    parent.log_text(f"{note}\n\n{markdown}\n" if note else markdown + "\n", "twin_baselines.md")
    parent.finish()
    return parent.run_id


def _slug(name: str) -> str:
    return "threshold" if name.startswith("Heuristic") else "mpc"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", default="bitbrains", help="conf/twin/<name>.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--forecaster", type=forecaster_choice, default="seasonal-naive",
                        help="seasonal-naive | oracle | federated:<MLflow run id> (a trained forecasting run)")
    parser.add_argument("--episode-s", type=float, default=None, help="override the episode length (s)")
    parser.add_argument("--tracking-uri", default=None, help="default: fl_server.experiments.config.default_tracking_uri()")
    parser.add_argument("--experiment", default="twin-baselines")
    parser.add_argument("--no-mlflow", action="store_true", help="print only")
    args = parser.parse_args(argv)
    scenario, note = scenario_for(args.scenario, args.episode_s)
    if note:
        print(note)
    print(
        f"scenario {scenario.name!r} ({scenario.workload.source} workload), {scenario.num_nodes} edge nodes in "
        f"{len(scenario.clusters)} clusters, {len(scenario.cloud_regions)} cloud regions, "
        f"{scenario.episode_s / 3600:g} h at {scenario.step_s:g} s steps, seeds {args.seeds}"
    )
    if args.forecaster.startswith("federated:"):
        try:
            _trained(args.forecaster.split(":", 1)[1])
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
    results = run_all(scenario, args.seeds, args.forecaster)
    markdown = table(results)
    print()
    print(markdown)
    if not args.no_mlflow:
        from fl_server.experiments.config import default_tracking_uri

        uri = args.tracking_uri or default_tracking_uri()
        run_id = log_to_mlflow(results, scenario, args.seeds, args.forecaster, markdown, note, uri, args.experiment)
        print(f"\nMLflow: parent run {run_id} in experiment {args.experiment!r} at {uri}")


if __name__ == "__main__":
    main()
