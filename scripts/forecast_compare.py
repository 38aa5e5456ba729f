"""Federated vs local-only vs centralised (pooled) workload forecasting.

    python -m scripts.forecast_compare                      # Bitbrains traces, 3 seeds
    python -m scripts.forecast_compare --seeds 0 task=workload num_rounds=5
    python -m scripts.forecast_compare strategy=fedavgm task.model=lstm

Three ways to train the same forecaster on the same sites, all scored on the
same per-site test tails (time-ordered splits, no leakage):

* **federated**: a real Flower simulation (``python -m fl_server.launch``
  machinery), ``num_rounds`` rounds x ``train.local_epochs`` epochs per site;
* **local-only**: one model per site trained on that site's windows alone,
  for the same number of epochs a federated client makes in total;
* **centralised**: one model on every site's windows pooled, same epochs.

Each arm and seed is an MLflow child run under one parent run (tag
``fc.kind=forecast-compare``) that receives a markdown table (mean ± sd over
seeds of the overall MAE, RMSE, sMAPE and MASE, next to the seasonal-naive and
last-value baselines), a per-site MASE table and a bar plot.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import numpy as np
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import track

from fl_server.experiments.config import PROJECT_DIR, ConfigError, compose_config, default_tracking_uri
from fl_server.experiments.tracking import RunTracker

ARMS = ("federated", "local-only", "centralised")
METRICS = ("mae", "rmse", "smape", "mase")
SHARED_TRACES = PROJECT_DIR.parent / "shared" / "data" / "gwa-t-12-rnd" / "2013-8"
console = Console()
_SITE_TEST_METRIC = re.compile(r"site(?P<site>[^_]+)_test_(?P<metric>mae|rmse|smape|mase)")


def default_task() -> str:
    return "task=bitbrains" if SHARED_TRACES.is_dir() else "task=workload"


def local_only(cfg: DictConfig, seed: int) -> dict[str, dict[str, float]]:
    """One model per site on its own windows; per-site test metrics."""
    from fl_datasets.forecast_data import ForecastSpec, build_forecast_data
    from tasks.forecast.server import _forecaster, score_sites
    from tasks.forecast.training import train_forecaster

    spec = ForecastSpec.from_config(cfg)
    data = build_forecast_data(spec)
    scores = {}
    for i, site in enumerate(track(data.sites, description=f"local-only, seed {seed}", console=console)):
        model = _forecaster(cfg, spec, seed=seed)  # the federated run's initial weights
        train_forecaster(model, *site.train, **_budget(cfg, seed * 1_000_003 + i))
        one = type(data)(sites=(site,), step_s=data.step_s, columns=data.columns)
        scores.update(score_sites(model, one, spec.season, "test"))
    return scores


def centralised(cfg: DictConfig, seed: int) -> dict[str, dict[str, float]]:
    """One model on all sites' windows pooled; per-site test metrics."""
    from fl_datasets.forecast_data import ForecastSpec, build_forecast_data
    from tasks.forecast.server import _forecaster, score_sites
    from tasks.forecast.training import train_forecaster

    spec = ForecastSpec.from_config(cfg)
    data = build_forecast_data(spec)
    X = np.concatenate([s.train[0] for s in data.sites])
    Y = np.concatenate([s.train[1] for s in data.sites])
    model = _forecaster(cfg, spec, seed=seed)
    with console.status(f"centralised, seed {seed}: {len(X)} windows"):
        train_forecaster(model, X, Y, **_budget(cfg, seed))
    return score_sites(model, data, spec.season, "test")


def _budget(cfg: DictConfig, seed: int) -> dict[str, float | int]:
    """Same optimiser and the same passes over a site's data as a federated
    client makes over the whole run."""
    return {
        "epochs": int(cfg.num_rounds) * int(cfg.train.local_epochs),
        "batch_size": int(cfg.task.optimizer.batch_size),
        "lr": float(cfg.task.optimizer.lr),
        "seed": seed,
    }


def federated(cfg: DictConfig, overrides: list[str], parent_run_id: str) -> tuple[dict[str, dict[str, float]], str]:
    """A real Flower simulation; per-site test metrics read back from MLflow."""
    from mlflow.tracking import MlflowClient

    from fl_server.runtime.launch import preflight, run_job
    from scripts.sweep_parent import shared_superlink

    superlink = shared_superlink(bool(cfg.simulation.shared_ray))  # one Ray for every seed's run
    preflight(cfg, superlink.cache_dir)
    outcome = run_job(cfg, overrides, superlink, parent_run_id=parent_run_id, console=console)
    if not outcome.ok:
        raise RuntimeError(f"federated run {outcome.run_name} failed: {outcome.status}\n{outcome.reason}")
    metrics = MlflowClient(default_tracking_uri()).get_run(outcome.mlflow_run_id).data.metrics
    per_site: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if match := _SITE_TEST_METRIC.fullmatch(key):
            per_site.setdefault(match["site"], {})[match["metric"]] = value
    return per_site, outcome.mlflow_run_id


def baselines(cfg: DictConfig) -> dict[str, dict[str, dict[str, float]]]:
    from fl_datasets.forecast_data import ForecastSpec, build_forecast_data
    from tasks.forecast.server import score_baselines

    spec = ForecastSpec.from_config(cfg)
    return score_baselines(build_forecast_data(spec), spec.season, "test")


def overall(per_site: dict[str, dict[str, float]]) -> dict[str, float]:
    return {m: float(np.mean([s[m] for s in per_site.values()])) for m in METRICS}


def summary_markdown(results: dict[str, list[dict[str, dict[str, float]]]]) -> str:
    """Mean ± sd over seeds of each arm's overall (mean-over-sites) metrics."""
    lines = ["| method | seeds | MAE | RMSE | sMAPE % | MASE |", "|---|---|---|---|---|---|"]
    for arm, runs in results.items():
        per_seed = [overall(r) for r in runs]
        cells = []
        for m in METRICS:
            values = np.array([r[m] for r in per_seed])
            sd = values.std(ddof=1) if len(values) > 1 else 0.0
            cells.append(f"{values.mean():.3f} ± {sd:.3f}")
        lines.append(f"| {arm} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def site_markdown(results: dict[str, list[dict[str, dict[str, float]]]]) -> str:
    """Per-site MASE, mean over seeds, one column per method."""
    arms = list(results)
    sites = list(results[arms[0]][0])
    lines = ["| site | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for site in sites:
        cells = [f"{np.mean([r[site]['mase'] for r in results[a]]):.3f}" for a in arms]
        lines.append(f"| {site} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_figure(results: dict[str, list[dict[str, dict[str, float]]]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results)
    means = [np.mean([overall(r)["mase"] for r in results[a]]) for a in arms]
    sds = [np.std([overall(r)["mase"] for r in results[a]], ddof=1) if len(results[a]) > 1 else 0 for a in arms]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(range(len(arms)), means, yerr=sds, capsize=4, color=["C0", "C1", "C2", "grey", "silver"][: len(arms)])
    ax.set_xticks(range(len(arms)), arms, rotation=15)
    ax.axhline(1.0, color="black", lw=0.8, ls=":")
    ax.set_ylabel("test MASE, mean over sites (lower is better)")
    ax.set_title("federated vs local-only vs centralised forecasting")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.forecast_compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. strategy=fedavgm task.model=lstm")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if not any(o.startswith("task=") for o in overrides):
        overrides.insert(0, default_task())
    try:
        base = compose_config(overrides)
        if base.task.get("kind") != "forecast":
            raise ConfigError(f"task={base.task.name} is not a forecasting task: use task=bitbrains or task=workload")
    except ValueError as err:
        console.print(f"[bold red]error:[/bold red] {err}", highlight=False)
        return 2
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        console.print(f"[bold red]error:[/bold red] --seeds={args.seeds}: use comma-separated integers, e.g. --seeds 0,1,2")
        return 2
    return run(base, overrides, seeds)


def run(base: DictConfig, overrides: list[str], seeds: list[int]) -> int:
    parent = RunTracker(
        default_tracking_uri(), experiment=str(base.tracking.experiment),
        run_name=f"forecast-compare {time.strftime('%Y-%m-%d %H:%M:%S')}",
        tags={"fc.kind": "forecast-compare", "task": base.task.name, "model": base.task.model},
    )
    parent.log_params({"overrides": " ".join(overrides), "seeds": " ".join(map(str, seeds))})
    parent.flush()
    results: dict[str, list] = {arm: [] for arm in ARMS}
    try:
        for seed in seeds:
            seeded = [*overrides, f"seed={seed}"]
            cfg = compose_config(seeded)
            fed, _ = federated(cfg, seeded, parent.run_id)
            results["federated"].append(fed)
            for arm, fit in (("local-only", local_only), ("centralised", centralised)):
                started = time.perf_counter()
                per_site = fit(cfg, seed)
                results[arm].append(per_site)
                _log_child(cfg, arm, seed, per_site, time.perf_counter() - started, parent.run_id)
        for name, per_site in baselines(base).items():
            results[name.replace("_", "-")] = [per_site]  # deterministic: one "seed"
        table, sites = summary_markdown(results), site_markdown(results)
        parent.log_text(table, "report/summary.md")
        parent.log_text(sites, "report/site_mase.md")
        parent.log_figure(lambda: bar_figure(results), "report/mase_by_method.png")
        parent.finish()
    except BaseException as err:
        parent.fail(f"{type(err).__name__}: {err}")
        raise
    finally:
        from scripts.sweep_parent import _stop_superlink

        _stop_superlink()
    print(table)  # plain print: markdown must not be re-wrapped
    print(sites)
    console.print(f"MLflow parent run {parent.run_id}")
    return 0


def _log_child(cfg: DictConfig, arm: str, seed: int, per_site, wall_s: float, parent_run_id: str) -> None:
    from tasks.forecast.server import flat_metrics

    child = RunTracker(
        default_tracking_uri(), experiment=str(cfg.tracking.experiment),
        run_name=f"{cfg.task.name}-{cfg.task.model}-{arm}-s{seed}", parent_run_id=parent_run_id,
        tags={"task": cfg.task.name, "kind": "forecast", "model": cfg.task.model, "method": arm, "seed": str(seed)},
    )
    metrics = flat_metrics(per_site, "test")
    child.log_metrics({**metrics, **{f"final_{k}": v for k, v in metrics.items() if k.startswith("test_")},
                       "wall_time_s": wall_s}, step=int(cfg.num_rounds))
    child.finish()


if __name__ == "__main__":
    sys.exit(main())
