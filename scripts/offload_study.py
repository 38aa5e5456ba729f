"""Offload study: accuracy vs latency vs energy vs fraction offloaded as θ_c sweeps.

    python -m scripts.offload_study [--datasets mnist breastmnist] [--seeds 0 1 2] [--rounds 8]
        [--local-epochs 3] [--clients 10] [--rho mnist=10 breastmnist=1] [--load-profile low|medium|high]
        [--thetas 0.5 0.6 ... 0.99] [--repeats 3]
        [--experiment fedcontinuum-offload-study] [extra Hydra overrides ...]
    python -m scripts.offload_study --report PARENT_RUN_ID   # rebuild the tables and plots

Runs, per data set and seed (MNIST 5k long-tailed to ρ = 10; BreastMNIST
at its own 27/73 imbalance, ρ = 1: the long-tail subsampler makes class 0 the
head, which on BreastMNIST would invert the imbalance to benign 1 : 10),
two real Flower simulations of ``task=offload`` (through the launcher, one
SuperLink for the whole study): the hard-case cache on (the
task as configured) and off, at the same number of rounds. Every run ends
with its final study on the final edge and cloud models: edge-only,
cloud-only, confidence-gated and confidence + load-gated policies, θ_c over
``--thetas``, under no fault, 10 % and 20 % packet loss and a cloud outage
(``offload/grid.csv`` of each run). The study reads those grids from the
child runs: mean ± sd over seeds per data set, link scenario, policy and
θ_c, the trade-off plots (``report/offload_tradeoff_<data>.png``), the
closed loop with and without the cache (``report/closed_loop.png``), and
``report/offload_study.md``; all of it also goes to ``reports/``.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from rich.console import Console

from fl_server.experiments.tracking import PARENT_TAG, RunTracker, default_tracking_uri
from scripts.study_runs import close_parent, run_jobs

console = Console()
TASKS = {"mnist": "offload", "breastmnist": "offload-breastmnist"}
POLICY_TITLES = {"edge": "edge only", "cloud": "cloud only", "confidence": "confidence-gated",
                 "confidence+load": "confidence + load-gated"}
FAULT_TITLES = {"none": "no fault", "loss10": "10 % packet loss", "loss20": "20 % packet loss", "outage": "cloud outage"}
MEASURES = ("accuracy", "macro_f1", "latency_p50_ms", "latency_p95_ms", "energy_mj", "fraction", "hard_fraction",
            "listen_fraction", "outage_blocked", "slow_link_blocked", "failed_exchanges", "requests",
            "edge_acc_kept", "edge_acc_offloaded", "cloud_acc_offloaded")
CLOSED_LOOP = (("final_test_accuracy", "edge model accuracy"), ("final_test_macro_f1", "edge macro-F1"),
               ("final_test_weakest_class_recall", "edge weakest-class recall"),
               ("final_offload_accuracy", "served accuracy"), ("final_offload_fraction", "fraction offloaded"),
               ("final_offload_latency_p95_ms", "p95 latency (ms)"))


def jobs(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(label, Hydra overrides) of every job of the study."""
    thetas = "[" + ",".join(f"{t:g}" for t in args.thetas) + "]"
    out = []
    for data in args.datasets:
        for seed in args.seeds:
            for cache in ("on", "off"):
                label = f"{data}-s{seed}-cache-{cache}"
                out.append((label, [
                    f"task={TASKS[data]}", f"seed={seed}", f"num_rounds={args.rounds}", f"clients.num={args.clients}",
                    f"train.local_epochs={args.local_epochs}", f"partition.rho={args.rho.get(data, 1.0):g}",
                    f"task.hard_cases.enabled={'true' if cache == 'on' else 'false'}",
                    *([f"task.stream.load_profile={args.load_profile}"] if args.load_profile else []), f"task.thetas={thetas}",
                    f"task.final_repeats={args.repeats}", f"tracking.experiment={args.experiment}",
                    f"tracking.run_name=offload-study-{label}", *args.overrides,
                ]))
    return out


def run_study(args: argparse.Namespace, tracking_uri: str) -> str:
    """Run every job as a child of a new parent run; returns the parent's id."""
    parent = RunTracker(tracking_uri, experiment=args.experiment, run_name=f"offload study {time.strftime('%Y-%m-%d %H:%M')}",
                        tags={"fc.kind": "offload-study"})
    parent.log_params({"command": args.command, "datasets": " ".join(args.datasets), "seeds": " ".join(map(str, args.seeds)),
                       "num_rounds": args.rounds, "local_epochs": args.local_epochs, "clients": args.clients,
                       "rho": " ".join(f"{d}={r:g}" for d, r in args.rho.items()),
                       "load_profile": args.load_profile or "task default", "thetas": " ".join(f"{t:g}" for t in args.thetas),
                       "repeats": args.repeats})
    parent.flush()
    console.print(f"[bold]offload study[/bold] (MLflow parent run {parent.run_id})")
    started = time.perf_counter()
    outcomes = run_jobs(jobs(args), parent.run_id, tracking_uri, console)
    MlflowClient(tracking_uri).log_metric(parent.run_id, "study_wall_time_s", time.perf_counter() - started)
    report(parent.run_id, tracking_uri, command=args.command)
    close_parent(parent, outcomes)
    return parent.run_id


# ------------------------------------------------------------------- report
def child_runs(client: MlflowClient, parent_run_id: str) -> pd.DataFrame:
    """One row per finished child: data set, seed, cache arm, run id and final metrics."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'FINISHED'",
                              max_results=1000)
    return pd.DataFrame([{"run_id": r.info.run_id, "source": r.data.tags.get("source", ""), "seed": int(r.data.tags["seed"]),
                          "cache": r.data.tags.get("hard_cases", ""), **r.data.metrics} for r in runs])


def grids(client: MlflowClient, runs: pd.DataFrame) -> pd.DataFrame:
    """Every child's final study (``offload/grid.csv``), with its seed and cache arm."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run otherwise
    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        for _, run in runs.iterrows():
            path = client.download_artifacts(run["run_id"], "offload/grid.csv", tmp)
            frame = pd.read_csv(path)
            frames.append(frame.assign(seed=run["seed"], cache=run["cache"]))
    return pd.concat(frames, ignore_index=True)


def summarise(grid: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd over seeds per data set, link scenario, policy and θ_c (NaN θ: edge / cloud only)."""
    keys = ["source", "fault", "mode", "theta"]
    grid = grid.assign(theta=grid["theta"].fillna(-1.0))  # groupby drops NaN keys
    grouped = grid.groupby(keys, sort=False)
    table = grouped[list(MEASURES)].mean()
    sd = grouped[list(MEASURES)].std(ddof=1).fillna(0.0).add_suffix("_sd")
    table = table.join(sd).join(grouped.size().rename("seeds")).reset_index()
    table["theta"] = table["theta"].where(table["theta"] >= 0, np.nan)
    return table


def _pm(row: pd.Series, key: str, scale: float = 1.0, decimals: int = 3) -> str:
    return f"{scale * row[key]:.{decimals}f} ± {scale * row[key + '_sd']:.{decimals}f}"


def curve_table(table: pd.DataFrame, source: str, fault: str = "none") -> str:
    """Edge-only, cloud-only and both gated policies over θ_c, one link scenario."""
    lines = ["| policy | θ_c | accuracy | macro-F1 | p50 ms | p95 ms | energy mJ/req | offloaded | hard cases |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = table[(table["source"] == source) & (table["fault"] == fault)]
    for mode in POLICY_TITLES:
        for _, row in rows[rows["mode"] == mode].sort_values("theta").iterrows():
            theta = "–" if math.isnan(row["theta"]) else f"{row['theta']:g}"
            lines.append(f"| {POLICY_TITLES[mode]} | {theta} | {_pm(row, 'accuracy')} | {_pm(row, 'macro_f1')} "
                         f"| {_pm(row, 'latency_p50_ms', decimals=2)} | {_pm(row, 'latency_p95_ms', decimals=1)} "
                         f"| {_pm(row, 'energy_mj', decimals=2)} | {_pm(row, 'fraction')} | {_pm(row, 'hard_fraction')} |")
    return "\n".join(lines)


def fault_table(table: pd.DataFrame, source: str, theta: float) -> str:
    """Every policy (the gated ones at ``theta``) under every link scenario."""
    lines = ["| link | policy | accuracy | p95 ms | energy mJ/req | offloaded | listened | blocked: outage | "
             "blocked: slow link | failed exchanges |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows = table[table["source"] == source]
    grid = sorted(set(rows["theta"].dropna()))
    theta = min(grid, key=lambda t: abs(t - theta)) if grid else theta  # the configured θ_c, or the nearest swept
    for fault, title in FAULT_TITLES.items():
        for mode in POLICY_TITLES:
            pick = rows[(rows["fault"] == fault) & (rows["mode"] == mode)]
            if mode in ("confidence", "confidence+load"):
                pick = pick[np.isclose(pick["theta"], theta)]
            for _, row in pick.iterrows():
                requests = row["requests"]
                lines.append(f"| {title} | {POLICY_TITLES[mode]} | {_pm(row, 'accuracy')} "
                             f"| {_pm(row, 'latency_p95_ms', decimals=1)} | {_pm(row, 'energy_mj', decimals=2)} "
                             f"| {_pm(row, 'fraction')} | {_pm(row, 'listen_fraction')} "
                             f"| {row['outage_blocked'] / requests:.3f} | {row['slow_link_blocked'] / requests:.3f} "
                             f"| {row['failed_exchanges'] / requests:.3f} |")
    return "\n".join(lines)


def closed_loop_table(runs: pd.DataFrame) -> str:
    """Cache on vs off at the same rounds: mean ± sd over seeds and the paired difference."""
    lines = ["| data | measure (final round) | cache on | cache off | on − off (paired) |", "|---|---|---|---|---|"]
    for source, rows in runs.groupby("source"):
        on = rows[rows["cache"] == "on"].set_index("seed")
        off = rows[rows["cache"] == "off"].set_index("seed")
        seeds = on.index.intersection(off.index)
        for key, title in CLOSED_LOOP:
            if key not in rows:
                continue
            a, b = on.loc[seeds, key], off.loc[seeds, key]
            d = a - b
            lines.append(f"| {source} | {title} | {a.mean():.3f} ± {a.std(ddof=1):.3f} | {b.mean():.3f} ± {b.std(ddof=1):.3f} "
                         f"| {d.mean():+.3f} ± {d.std(ddof=1):.3f} ({(d > 0).sum()}/{len(d)} seeds > 0) |")
    return "\n".join(lines)


def cloud_table(runs: pd.DataFrame) -> str:
    lines = ["| data | cloud samples | cloud model accuracy | macro-F1 | weakest-class recall | edge model accuracy (cache on) |",
             "|---|---|---|---|---|---|"]
    for source, rows in runs.groupby("source"):
        on = rows[rows["cache"] == "on"]  # one run per seed (both arms share the seed's cloud model)
        cells = [f"{on[k].mean():.3f} ± {on[k].std(ddof=1):.3f}" for k in
                 ("cloud_test_accuracy", "cloud_test_macro_f1", "cloud_test_weakest_class_recall")]
        lines.append(f"| {source} | {on['data_cloud_samples'].mean():.0f} | " + " | ".join(cells)
                     + f" | {on['final_test_accuracy'].mean():.3f} ± {on['final_test_accuracy'].std(ddof=1):.3f} |")
    return "\n".join(lines)


def closed_loop_figure(client: MlflowClient, runs: pd.DataFrame):
    """Edge model accuracy and fraction offloaded per round, cache on vs off (mean ± sd over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = sorted(set(runs["source"]))
    fig, axes = plt.subplots(len(sources), 2, figsize=(10, 3.4 * len(sources)), squeeze=False)
    for i, source in enumerate(sources):
        for j, (key, label) in enumerate((("test_accuracy", "edge model accuracy (test)"),
                                          ("offload_fraction", "fraction offloaded (θ_c policy)"))):
            ax = axes[i, j]
            for cache in ("on", "off"):
                ids = runs[(runs["source"] == source) & (runs["cache"] == cache)]["run_id"]
                series = [[m.value for m in sorted(client.get_metric_history(r, key), key=lambda m: m.step)] for r in ids]
                if not series:
                    continue
                length = min(len(s) for s in series)
                values = np.array([s[:length] for s in series])
                ax.errorbar(range(length), values.mean(axis=0), yerr=values.std(axis=0, ddof=1) if len(values) > 1 else 0,
                            marker="o", ms=3, capsize=2, label=f"hard-case cache {cache}")
            ax.set_xlabel("round")
            ax.set_ylabel(label)
            ax.set_title(source, fontsize=9, loc="left")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def report(parent_run_id: str, tracking_uri: str, out: str = "reports", command: str | None = None) -> str:
    """Build, print and log (to the parent run and ``out/``) the tables and plots."""
    from tasks.offload.plots import tradeoff_figure

    client = MlflowClient(tracking_uri)
    runs = child_runs(client, parent_run_id)
    if runs.empty:
        console.print("no finished runs")
        return ""
    params = client.get_run(parent_run_id).data.params
    command = command or params.get("command", "python -m scripts.offload_study")
    theta = float(client.get_run(runs["run_id"].iloc[0]).data.params.get("task.policy.theta", 0.8))
    table = summarise(grids(client, runs[runs["cache"] == "on"]))
    seeds = ", ".join(f"{s} {n}" for s, n in runs[runs["cache"] == "on"].groupby("source")["seed"].nunique().items())
    parts = [f"# Offload study (MLflow parent run {parent_run_id}; seeds per data set: {seeds})",
             f"Command: `{command}`; tables: `python -m scripts.offload_study --report {parent_run_id}`. "
             "Every cell is mean ± sd over seeds of the final edge (federated CNN) and cloud (cnn-wide) models, "
             "serving every test sample as requests (hard-case cache on).",
             "## Cloud and edge models", cloud_table(runs)]
    for source in sorted(set(table["source"])):
        parts += [f"## {source}: θ_c sweep, no link fault", curve_table(table, source),
                  f"## {source}: link scenarios (gated policies at θ_c = {theta:g})", fault_table(table, source, theta)]
    parts += ["## Closed loop: hard-case cache on vs off at the same rounds", closed_loop_table(runs)]
    text = "\n\n".join(parts) + "\n"
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "offload_study.md").write_text(text)
    client.log_text(parent_run_id, text, "report/offload_study.md")
    figures = {f"offload_tradeoff_{source}.png": tradeoff_figure(table[table["source"] == source].to_dict("records"),
                                                                  f"{source}: mean ± sd over seeds")
               for source in sorted(set(table["source"]))}
    figures["closed_loop.png"] = closed_loop_figure(client, runs)
    for name, fig in figures.items():
        client.log_figure(parent_run_id, fig, f"report/{name}")
        fig.savefig(folder / name, dpi=110)
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    console.print(f"report: {folder / 'offload_study.md'} and {', '.join(str(folder / n) for n in figures)}")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.offload_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-epochs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rho", nargs="+", default=["mnist=10", "breastmnist=1"], metavar="DATA=RHO",
                        help="long-tail ratio n_max / n_min of the clients' pool per data set (default: mnist=10 breastmnist=1)")
    parser.add_argument("--load-profile", default=None, choices=("low", "medium", "high"),
                        help="co-located load of the edge devices (default: task.stream.load_profile, high)")
    parser.add_argument("--thetas", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])
    parser.add_argument("--repeats", type=int, default=3, help="requests per test sample in each run's final study")
    parser.add_argument("--experiment", default="fedcontinuum-offload-study")
    parser.add_argument("--tracking-uri", default=default_tracking_uri())
    parser.add_argument("--report", metavar="PARENT_RUN_ID", help="only rebuild the report of a finished study")
    parser.add_argument("overrides", nargs="*", help="further Hydra overrides for every job")
    args = parser.parse_args(argv)
    try:
        args.rho = {data: float(value) for data, _, value in (item.partition("=") for item in args.rho)}
    except ValueError:
        parser.error(f"--rho takes DATA=RHO pairs, e.g. mnist=10 breastmnist=1; got {' '.join(args.rho)}")
    given = sys.argv[1:] if argv is None else argv
    args.command = " ".join(["python -m scripts.offload_study", *(shlex.quote(a) for a in given)])
    if args.report:
        report(args.report, args.tracking_uri)
        return 0
    parent = run_study(args, args.tracking_uri)
    console.print(f"rebuild with: python -m scripts.offload_study --report {parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
