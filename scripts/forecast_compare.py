"""Federated, personalised, clustered, local-only and pooled forecasting against
every baseline, per horizon step.

    python -m scripts.forecast_compare                      # Bitbrains traces, 3 seeds, all arms
    python -m scripts.forecast_compare --seeds 0 --arms federated task=workload num_rounds=5
    python -m scripts.forecast_compare clients.num=20 'task.columns=[cpu_usage_pct,mem_usage_kb]'

The same forecaster (``task.model``, default the residual-on-persistence
quantile TCN) trained in several ways on the same sites, all scored on the
same per-site test tails (time-ordered splits, no leakage), mean over sites:

* **federated**: a real Flower simulation (FedAvg unless ``strategy=``),
  ``num_rounds`` x ``train.local_epochs`` epochs per site;
* **federated + fine-tuned**: the same run's final model, fine-tuned by each
  site for ``--finetune-epochs`` more epochs on its own windows (best
  validation epoch kept): these sites train that many epochs more;
* **FedPer** (``task.personal_head=true``): a shared trunk with a personal
  output layer per site that never leaves it;
* **clustered**: the staleness-aware clustered strategy with 2 clusters of
  sites by update similarity (``strategy=staleness_clustered``), each site
  deploying its cluster's model;
* **local-only**: one model per site on its own windows, same epochs;
* **pooled**: one model on every site's windows pooled, same epochs;
* baselines on the same windows: last value (persistence), seasonal-naive over
  a day and a week, a one-hour moving average and the validation-tuned ETS.

Federated arms are scored by the sites themselves (what each deploys);
results are mean ± sd over seeds. Per horizon step (5 min, 15 min, 30 min,
1 h at 300 s) a table gives MASE, MAE, sMAPE and the skill scores
``1 - MASE / MASE(last value)`` and ``1 - MASE / MASE(best baseline)``; a
probabilistic table gives the pinball loss and the 80 % interval coverage, a
site table the 1-h MASE per site, and a plot the skill against the horizon.
All go to one MLflow parent run (tag ``fc.kind=forecast-compare``) and to
``reports/forecast_compare/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import track

from fl_server.experiments.config import PROJECT_DIR, ConfigError, compose_config, default_tracking_uri
from fl_server.experiments.tracking import RunTracker

FEDERATED_ARMS = {  # arm -> the overrides that make it (on top of the user's)
    "federated": ["clients.fraction_evaluate=1.0"],
    "fedper": ["clients.fraction_evaluate=1.0", "task.personal_head=true"],
    "clustered": ["clients.fraction_evaluate=1.0", "strategy=staleness_clustered", "strategy.num_clusters=2"],
}
LOCAL_ARMS = ("local-only", "pooled")
ARMS = (*FEDERATED_ARMS, *LOCAL_ARMS)
LABELS = {"federated": "federated (FedAvg)", "federated-ft": "federated + fine-tuned", "fedper": "FedPer (personal heads)",
          "clustered": "clustered (2 clusters)", "local-only": "local-only", "pooled": "pooled (centralised)"}
BASELINE_LABELS = {"last_value": "last value (persistence)", "seasonal_naive": "seasonal-naive, 1 season",
                   "seasonal_naive_week": "seasonal-naive, 1 week", "moving_average": "moving average, 1 h",
                   "ets": "ETS (statsmodels, tuned on val)"}
PERSISTENCE = BASELINE_LABELS["last_value"]
SHARED_TRACES = PROJECT_DIR.parent / "shared" / "data" / "gwa-t-12-rnd" / "2013-8"
REPORTS = PROJECT_DIR / "reports" / "forecast_compare"
console = Console()
_SITE_TEST_METRIC = re.compile(r"site(?P<site>[^_]+)_test_(?P<metric>\w+)")

Scores = dict[str, float]  # metric -> value, overall (mean over sites)


def default_task() -> str:
    return "task=bitbrains" if SHARED_TRACES.is_dir() else "task=workload"


# ------------------------------------------------------------------ arms


def local_only(cfg: DictConfig, seed: int) -> dict[str, Scores]:
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


def pooled(cfg: DictConfig, seed: int) -> dict[str, Scores]:
    """One model on all sites' windows pooled; per-site test metrics."""
    from fl_datasets.forecast_data import ForecastSpec, build_forecast_data
    from tasks.forecast.server import _forecaster, score_sites
    from tasks.forecast.training import train_forecaster

    spec = ForecastSpec.from_config(cfg)
    data = build_forecast_data(spec)
    X = np.concatenate([s.train[0] for s in data.sites])
    Y = np.concatenate([s.train[1] for s in data.sites])
    model = _forecaster(cfg, spec, seed=seed)
    with console.status(f"pooled, seed {seed}: {len(X)} windows"):
        train_forecaster(model, X, Y, **_budget(cfg, seed))
    return score_sites(model, data, spec.season, "test")


def _budget(cfg: DictConfig, seed: int) -> dict[str, float | int]:
    """Same optimiser and the same passes over a site's data as a federated
    client makes over the whole run."""
    return {
        "epochs": epochs_per_site(cfg),
        "batch_size": int(cfg.task.optimizer.batch_size),
        "lr": float(cfg.task.optimizer.lr),
        "seed": seed,
    }


def epochs_per_site(cfg: DictConfig) -> int:
    return int(cfg.num_rounds) * int(cfg.train.local_epochs)


def federated(cfg: DictConfig, overrides: list[str], parent_run_id: str) -> tuple[dict, str]:
    """A real Flower simulation; the sites' own scores (``fed_test_*``, and
    ``fed_ft_test_*`` after fine-tuning) read back from MLflow."""
    from mlflow.tracking import MlflowClient

    from fl_server.runtime.launch import preflight, run_job
    from scripts.sweep_parent import shared_superlink

    superlink = shared_superlink(bool(cfg.simulation.shared_ray))  # one Ray for every seed's run
    preflight(cfg, superlink.cache_dir)
    outcome = run_job(cfg, overrides, superlink, parent_run_id=parent_run_id, console=console)
    if not outcome.ok:
        raise RuntimeError(f"federated run {outcome.run_name} failed: {outcome.status}\n{outcome.reason}")
    metrics = MlflowClient(default_tracking_uri()).get_run(outcome.mlflow_run_id).data.metrics
    return {**fed_scores(metrics), "sites": server_site_scores(metrics)}, outcome.mlflow_run_id


def fed_scores(metrics: dict[str, float]) -> dict[str, Scores]:
    """``{"deployed": ..., "fine-tuned": ...}`` from a run's latest metrics."""
    out: dict[str, Scores] = {}
    for name, prefix in (("deployed", "fed_test_"), ("fine-tuned", "fed_ft_test_")):
        scores = {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}
        if scores:
            out[name] = scores
    return out


def server_site_scores(metrics: dict[str, float]) -> dict[str, Scores]:
    """The server's per-site scores of the global model (``site<id>_test_<metric>``)."""
    per_site: dict[str, Scores] = {}
    for key, value in metrics.items():
        if match := _SITE_TEST_METRIC.fullmatch(key):
            per_site.setdefault(match["site"], {})[match["metric"]] = value
    return per_site


def baselines(cfg: DictConfig) -> tuple[dict[str, dict[str, Scores]], int]:
    """``{baseline label: {site: metrics}}`` and the grid step in seconds."""
    from fl_datasets.forecast_data import ForecastSpec, build_forecast_data
    from tasks.forecast.server import score_baselines

    spec = ForecastSpec.from_config(cfg)
    data = build_forecast_data(spec)
    levels = tuple(float(q) for q in cfg.task.quantiles) or (0.1, 0.5, 0.9)
    with console.status("baselines (ETS fits per site)"):
        scores = score_baselines(data, spec, "test", levels)
    labels = {**BASELINE_LABELS, "seasonal_naive": f"seasonal-naive, {horizon_label(spec.season, data.step_s)}"}
    return {labels[name]: per_site for name, per_site in scores.items()}, data.step_s


# ---------------------------------------------------------------- tables


def overall(per_site: dict[str, Scores]) -> Scores:
    """Mean over sites of every metric the sites share."""
    keys = set.intersection(*(set(s) for s in per_site.values()))
    return {k: float(np.mean([s[k] for s in per_site.values()])) for k in sorted(keys)}


def horizon_label(step: int, step_s: int) -> str:
    minutes = step * step_s / 60
    return f"{minutes / 60:g} h" if minutes >= 60 else f"{minutes:g} min"


def report_steps(horizon: int, step_s: int) -> list[int]:
    """The horizon steps tabulated: 5 min, 15 min, 30 min, 1 h (those within H), and H."""
    steps = {max(1, round(m * 60 / step_s)) for m in (5, 15, 30, 60)} | {horizon}
    return sorted(s for s in steps if s <= horizon)


def _cell(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "–"
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.{digits}f} ± {sd:.{digits}f}" if len(values) > 1 else f"{values[0]:.{digits}f}"


def is_baseline(method: str) -> bool:
    return method in BASELINE_LABELS.values() or method.startswith("seasonal-naive")


def best_baseline(results: dict[str, list[Scores]], key: str) -> tuple[str, float]:
    """The baseline with the lowest ``key`` (e.g. ``mase_h12``)."""
    candidates = {name: runs[0][key] for name, runs in results.items() if is_baseline(name)}
    name = min(candidates, key=candidates.get)
    return name, candidates[name]


def horizon_markdown(results: dict[str, list[Scores]], step: int, step_s: int, epochs: dict[str, int]) -> str:
    """One horizon step: MASE, MAE, sMAPE and both skill scores per method."""
    key = f"mase_h{step}"
    persistence = results[PERSISTENCE][0][key]
    best_name, best = best_baseline(results, key)
    lines = [f"**{horizon_label(step, step_s)} ahead (step {step})**; best baseline: {best_name}",
             "",
             "| method | seeds | epochs / site | MASE | MAE | sMAPE % | skill vs persistence | skill vs best baseline |",
             "|---|---|---|---|---|---|---|---|"]
    for method, runs in results.items():
        mase = [r[key] for r in runs]
        lines.append(
            f"| {method} | {len(runs)} | {epochs.get(method, '–')} | {_cell(mase)} | "
            f"{_cell([r[f'mae_h{step}'] for r in runs], 2)} | {_cell([r[f'smape_h{step}'] for r in runs], 1)} | "
            f"{_cell([1 - m / persistence for m in mase])} | {_cell([1 - m / best for m in mase])} |"
        )
    return "\n".join(lines) + "\n"


def overall_markdown(results: dict[str, list[Scores]]) -> str:
    """All steps together, with the probabilistic scores where a method has them."""
    lines = ["| method | seeds | MASE | MAE | RMSE | sMAPE % | pinball | 80 % coverage |",
             "|---|---|---|---|---|---|---|---|"]
    for method, runs in results.items():
        cells = [_cell([r.get(k, np.nan) for r in runs], d) for k, d in
                 (("mase", 3), ("mae", 2), ("rmse", 2), ("smape", 1), ("pinball", 3), ("coverage80", 3))]
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def site_markdown(sites: dict[str, list[dict[str, Scores]]], key: str) -> str:
    """Per-site ``key`` (e.g. ``mase_h12``), mean over seeds, one column per method."""
    methods = list(sites)
    names = list(sites[methods[-1]][0])  # the baselines, last, hold the sites in trace order
    lines = ["| site | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for site in names:
        cells = [f"{np.mean([r[site][key] for r in sites[m]]):.3f}" for m in methods]
        lines.append(f"| {site} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def persistence_verdict(results: dict[str, list[Scores]], sites: dict[str, list[dict[str, Scores]]],
                        steps: list[int], step_s: int) -> str:
    """Plain sentences: where persistence still wins (mean over seeds)."""
    trained = [m for m in results if not is_baseline(m)]
    lines = []
    for step in steps:
        key = f"mase_h{step}"
        lv = results[PERSISTENCE][0][key]
        losing = [m for m in trained if np.mean([r[key] for r in results[m]]) >= lv]
        best = min(trained, key=lambda m: np.mean([r[key] for r in results[m]]))
        best_mase = np.mean([r[key] for r in results[best]])
        verdict = (f"persistence still beats {', '.join(losing)}" if losing else "every trained method beats persistence")
        lines.append(f"* {horizon_label(step, step_s)}: last value MASE {lv:.3f}; best trained: {best} "
                     f"{best_mase:.3f}; {verdict}.")
    last = f"mase_h{steps[-1]}"
    if PERSISTENCE in sites:
        lv_sites = sites[PERSISTENCE][0]
        for method in (m for m in sites if not is_baseline(m)):
            wins = [s for s in lv_sites if lv_sites[s][last] <= np.mean([r[s][last] for r in sites[method]])]
            if wins:
                lines.append(f"* {method} at {horizon_label(steps[-1], step_s)}: persistence is as good or better on "
                             f"{len(wins)} of {len(lv_sites)} sites ({', '.join(wins)}).")
    return "\n".join(lines) + "\n"


def skill_figure(results: dict[str, list[Scores]], horizon: int, step_s: int):
    """Skill vs persistence against the horizon, mean ± sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, horizon + 1)
    persistence = np.array([results[PERSISTENCE][0][f"mase_h{h}"] for h in steps])
    skills = {m: np.array([[1 - r[f"mase_h{h}"] / p for h, p in zip(steps, persistence)] for r in runs])
              for m, runs in results.items() if m != PERSISTENCE}
    # the y range of the trained methods (and the baselines near them): a far-off one is only named
    near = [float(v.mean(axis=0).min()) for v in skills.values() if v.mean(axis=0).min() >= -0.6]
    low = min([0.0, *near]) - 0.05
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (method, skill) in enumerate(skills.items()):
        runs = results[method]
        baseline = is_baseline(method)
        minutes = steps * step_s / 60
        off = skill.mean(axis=0).max() < low
        ax.plot(minutes, skill.mean(axis=0), marker="" if baseline else "o", ls="--" if baseline else "-",
                color=f"C{i % 10}", label=method + (f" (below the chart, skill < {low:.2f})" if off else ""),
                lw=1 if baseline else 1.6)
        if len(runs) > 1:
            sd = skill.std(axis=0, ddof=1)
            ax.fill_between(minutes, skill.mean(axis=0) - sd, skill.mean(axis=0) + sd, color=f"C{i % 10}", alpha=0.15)
    ax.axhline(0.0, color="black", lw=0.8)
    top = max(0.05, max(float(v.mean(axis=0).max()) for v in skills.values()))
    ax.set_ylim(low, top + 0.05)
    ax.set_xlabel("horizon (minutes ahead)")
    ax.set_ylabel("skill = 1 - MASE / MASE(last value)")
    ax.set_title("skill against persistence per horizon step (mean over sites; > 0 beats persistence)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.forecast_compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. clients.num=20 task.model=lstm")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    parser.add_argument("--finetune-epochs", type=int, default=2,
                        help="local fine-tuning epochs after federation, scored as 'federated + fine-tuned' (0: none)")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if not any(o.startswith("task=") for o in overrides):
        overrides.insert(0, default_task())
    try:
        base = compose_config(overrides)
        if base.task.get("kind") != "forecast":
            raise ConfigError(f"task={base.task.name} is not a forecasting task: use task=bitbrains or task=workload")
        seeds = [int(s) for s in args.seeds.split(",")]
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        unknown = [a for a in arms if a not in ARMS]
        if unknown or not arms:
            raise ConfigError(f"--arms={args.arms}: unknown {unknown}; choose from {','.join(ARMS)}")
        if args.finetune_epochs < 0:
            raise ConfigError(f"--finetune-epochs={args.finetune_epochs}: use a whole number >= 0")
    except ValueError as err:  # ConfigError too, and int() of a bad seed
        console.print(f"[bold red]error:[/bold red] {err}", highlight=False)
        return 2
    return run(base, overrides, seeds, arms, args.finetune_epochs)


def run(base: DictConfig, overrides: list[str], seeds: list[int], arms: list[str], finetune_epochs: int) -> int:
    import torch

    # One intra-op thread, as each simulated client has: on a shared machine, several spinning
    # OpenMP threads per process slow the in-process arms down many times over.
    torch.set_num_threads(1)
    command = "python -m scripts.forecast_compare " + " ".join(
        [f"--seeds {','.join(map(str, seeds))}", f"--arms {','.join(arms)}", f"--finetune-epochs {finetune_epochs}",
         *overrides])
    parent = RunTracker(
        default_tracking_uri(), experiment=str(base.tracking.experiment),
        run_name=f"forecast-compare {time.strftime('%Y-%m-%d %H:%M:%S')}",
        tags={"fc.kind": "forecast-compare", "task": base.task.name, "model": base.task.model},
    )
    parent.log_params({"overrides": " ".join(overrides), "seeds": " ".join(map(str, seeds)),
                       "arms": " ".join(arms), "finetune_epochs": finetune_epochs, "command": command})
    parent.flush()
    results: dict[str, list[Scores]] = {}
    sites: dict[str, list[dict[str, Scores]]] = {}
    epochs: dict[str, int] = {}
    try:
        for seed in seeds:
            for arm in arms:
                seeded = [*overrides, f"seed={seed}"]
                if arm in FEDERATED_ARMS:
                    extra = list(FEDERATED_ARMS[arm])
                    if arm == "federated" and finetune_epochs:
                        extra.append(f"task.finetune_epochs={finetune_epochs}")
                    cfg = compose_config([*seeded, *extra])
                    scores, _ = federated(cfg, [*seeded, *extra], parent.run_id)
                    results.setdefault(LABELS[arm], []).append(scores["deployed"])
                    if arm == "federated":  # FedAvg deploys the global model: the server's per-site scores are its
                        sites.setdefault(LABELS[arm], []).append(scores["sites"])
                    epochs[LABELS[arm]] = epochs_per_site(cfg)
                    if "fine-tuned" in scores:
                        results.setdefault(LABELS["federated-ft"], []).append(scores["fine-tuned"])
                        epochs[LABELS["federated-ft"]] = epochs_per_site(cfg) + finetune_epochs
                    continue
                cfg = compose_config(seeded)
                started = time.perf_counter()
                per_site = (local_only if arm == "local-only" else pooled)(cfg, seed)
                results.setdefault(LABELS[arm], []).append(overall(per_site))
                sites.setdefault(LABELS[arm], []).append(per_site)
                epochs[LABELS[arm]] = epochs_per_site(cfg)
                _log_child(cfg, arm, seed, per_site, time.perf_counter() - started, parent.run_id)
        base_scores, step_s = baselines(base)
        for name, per_site in base_scores.items():
            results[name] = [overall(per_site)]  # deterministic: one "seed"
            sites[name] = [per_site]
        horizon = int(base.task.horizon)
        steps = report_steps(horizon, step_s)
        text = _report_text(results, sites, steps, step_s, epochs, command, base)
        out = _write_reports(text, results, horizon, step_s)  # first: pyplot imported in this thread
        parent.log_text(text, "report/summary.md")
        parent.log_text((out / "results.json").read_text(), "report/results.json")
        parent.log_figure(lambda: skill_figure(results, horizon, step_s), "report/skill_vs_horizon.png")
        parent.log_metrics({f"{_metric_name(m)}_mase_h{s}": float(np.mean([r[f'mase_h{s}'] for r in runs]))
                            for m, runs in results.items() for s in steps}, step=0)
        parent.finish()
    except BaseException as err:
        parent.fail(f"{type(err).__name__}: {err}")
        raise
    finally:
        from scripts.sweep_parent import _stop_superlink

        _stop_superlink()
    print(text)  # plain print: markdown must not be re-wrapped
    console.print(f"MLflow parent run {parent.run_id}; report in {out}")
    return 0


def _report_text(results, sites, steps, step_s, epochs, command, base) -> str:
    from fl_datasets.forecast_data import ForecastSpec, build_forecast_data

    data = build_forecast_data(ForecastSpec.from_config(base))
    parts = [f"# Forecasting study\n\n`{command}`\n\n{len(data.sites)} sites ({', '.join(data.site_ids())}), "
             f"columns {list(data.columns)}, W={base.task.window}, H={base.task.horizon} steps of {step_s} s, "
             f"model {base.task.model} (anchor {base.task.anchor}, quantiles {list(base.task.quantiles)}); "
             "test tail = the last "
             f"{100 * (1 - base.task.split.train - base.task.split.val):.0f} % of the series; mean over sites, "
             "mean ± sd over seeds.\n"]
    if data.left_out_note:
        parts.append(f"\n{data.left_out_note}\n")
    parts.append("\n## Where persistence still wins\n\n" + persistence_verdict(results, sites, steps, step_s))
    beside = f"\n`{command}`\n\n"  # the exact command beside each table
    for step in steps:
        parts.append("\n" + horizon_markdown(results, step, step_s, epochs) + beside)
    parts.append("\n## All horizon steps together (point and probabilistic)\n\n" + overall_markdown(results) + beside)
    parts.append(f"\n## MASE per site at {horizon_label(steps[-1], step_s)}\n\n"
                 + site_markdown(sites, f"mase_h{steps[-1]}") + beside)
    return "".join(parts)


def _write_reports(text: str, results, horizon: int, step_s: int) -> Path:
    import json

    out = REPORTS / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=1))  # every method's scores per seed
    fig = skill_figure(results, horizon, step_s)
    fig.savefig(out / "skill_vs_horizon.png", dpi=120)
    return out


def _metric_name(method: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in method.lower()).strip("_")


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
