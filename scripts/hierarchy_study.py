"""Flat vs hierarchical aggregation: accuracy / MASE, backhaul bytes and virtual time to target.

    .venv/bin/python -m scripts.hierarchy_study [--tasks image forecast] [--seeds 0 1 2]
        [--arms flat_network two_tier hierarchical] [--image-rounds 8] [--forecast-rounds 5]
        [--image-target 0.85] [--forecast-target 0.6] [extra Hydra overrides for every job ...]
    .venv/bin/python -m scripts.hierarchy_study --report PARENT_RUN_ID [MORE ...]

Per task, one Hydra multirun of real Flower simulations (``scripts.sweep``: one
job per topology x seed, each on Ray, one MLflow parent run):

* image: MNIST 5k, 10 clients, Dirichlet alpha 0.1 label skew, FedAvg;
* forecast: the federated TCN on the 10 busiest shared Bitbrains VMs
  (``task=bitbrains``; the synthetic ``task=workload`` if the traces are absent).

The arms are ``conf/topology`` options on one network (3 clusters, 2 regions,
the links of ``conf/topology/flat.yaml``): ``flat_network`` (flat FedAvg: every
client update crosses LAN, regional link and backhaul), ``two_tier`` (cluster
aggregators) and ``hierarchical`` (cluster and regional aggregators), every
tier FedAvg with full participation. The report, read from the sweeps' child
runs (mean ± sd over seeds), goes to the first parent run
(``report/hierarchy_study.md``, ``report/*.png``) and to ``reports/``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ARMS = ("flat_network", "two_tier", "hierarchical")
ARM_LABELS = {"flat_network": "flat-network", "two_tier": "2-tier", "hierarchical": "3-tier"}
TITLES = {"flat-network": "flat (on the network)", "2-tier": "2 tiers (clusters)", "3-tier": "3 tiers (clusters, regions)"}
EXPERIMENT = "fedcontinuum-hierarchy-study"
SHARED_TRACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "gwa-t-12-rnd" / "2013-8"
# (headline metric, label, higher is better)
HEADLINE = {"image": ("test_accuracy", "accuracy", True), "forecast": ("test_mase", "MASE", False)}
BYTES = ("lan_up_bytes", "lan_down_bytes", "regional_up_bytes", "regional_down_bytes", "backhaul_up_bytes",
         "backhaul_down_bytes")


def task_overrides(task: str, args: argparse.Namespace) -> list[str]:
    """The multirun overrides of one task's sweep."""
    arms = ",".join(args.arms)
    seeds = ",".join(map(str, args.seeds))
    common = [f"topology={arms}", f"seed={seeds}", f"tracking.experiment={args.experiment}", "strategy=fedavg"]
    if task == "image":
        return ["task=mnist", "partition=dirichlet", "partition.alpha=0.1", f"num_rounds={args.image_rounds}",
                f"report.target_accuracy={args.image_target}", *common, *args.overrides]
    forecast = "task=bitbrains" if SHARED_TRACES.is_dir() else "task=workload"
    return [forecast, f"num_rounds={args.forecast_rounds}", *common, *args.overrides]


def newest_sweep_parent(uri: str, experiment: str, since_ms: int) -> str | None:
    from scripts.rl_study import newest_sweep_parent as newest

    return newest(uri, experiment, since_ms)


# ------------------------------------------------------------- reading the runs


def study_runs(client, parents: list[str]) -> pd.DataFrame:
    """One row per finished child run: task kind, arm, seed, run id, final metrics."""
    from fl_server.experiments.tracking import PARENT_TAG

    rows = []
    for parent_id in parents:
        parent = client.get_run(parent_id)
        runs = client.search_runs([parent.info.experiment_id],
                                  f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.status = 'FINISHED'",
                                  max_results=10_000)
        for run in runs:
            if "topology" not in run.data.tags:
                continue
            rows.append({"kind": run.data.tags.get("kind", ""), "task": run.data.tags.get("task", ""),
                         "arm": run.data.tags["topology"], "seed": run.data.tags.get("seed", ""),
                         "run_id": run.info.run_id, "parent": parent_id, **run.data.metrics})
    return pd.DataFrame(rows)


def histories(client, run_id: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Per-round values (index = round) of each metric."""
    out = {}
    for key in keys:
        points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        values = {m.step: m.value for m in points}
        rounds = max(values, default=-1) + 1
        out[key] = np.array([values.get(r, np.nan) for r in range(rounds)])
    return out


def run_summary(history: dict[str, np.ndarray], kind: str, target: float | None) -> dict[str, float]:
    """Final headline metric, bytes per link (sums over rounds), virtual time (to the target)."""
    metric, _, higher = HEADLINE[kind]
    values = history[metric]
    out = {"final": float(values[-1])}
    for key in BYTES:
        out[key] = float(np.nansum(history[key]))
    out["backhaul_bytes"] = out["backhaul_up_bytes"] + out["backhaul_down_bytes"]
    out["uplink_all_bytes"] = out["lan_up_bytes"] + out["regional_up_bytes"] + out["backhaul_up_bytes"]
    vt = history["virtual_time_s"]
    out["virtual_time_s"] = float(vt[-1])
    out["time_to_target_s"] = np.nan
    out["backhaul_to_target_bytes"] = np.nan
    if target is not None:
        reached = [r for r in range(1, len(values)) if (values[r] >= target if higher else values[r] <= target)]
        if reached:
            r = reached[0]
            out["time_to_target_s"] = float(vt[r])
            out["backhaul_to_target_bytes"] = float(np.nansum(history["backhaul_up_bytes"][: r + 1])
                                                    + np.nansum(history["backhaul_down_bytes"][: r + 1]))
    return out


def summarise(client, runs: pd.DataFrame, targets: dict[str, float | None]) -> dict[str, dict[str, list[dict]]]:
    """``{kind: {arm: [per-seed summary, ...]}}``."""
    out: dict[str, dict[str, list[dict]]] = {}
    keys = ("test_accuracy", "test_mase", "virtual_time_s", *BYTES)
    for _, row in runs.sort_values(["kind", "arm", "seed"]).iterrows():
        kind = row["kind"]
        if kind not in HEADLINE:
            continue
        history = histories(client, row["run_id"], keys)
        summary = run_summary(history, kind, targets.get(kind))
        summary["seed"] = row["seed"]
        out.setdefault(kind, {}).setdefault(row["arm"], []).append(summary)
    return out


def mean_sd(values) -> tuple[float, float]:
    values = np.asarray(list(values), dtype=float)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else 0.0


def _cell(values, decimals: int, scale: float = 1.0) -> str:
    values = [v * scale for v in values]
    m, s = mean_sd(values)
    reached = sum(np.isfinite(values))
    if not np.isfinite(m):
        return "not reached"
    suffix = f" ({reached}/{len(values)} seeds)" if reached < len(values) else ""
    return f"{m:.{decimals}f} ± {s:.{decimals}f}{suffix}"


def table(results: dict[str, dict[str, list[dict]]], targets: dict[str, float | None]) -> str:
    """One markdown table: a row per task and topology."""
    lines = ["| task | topology | final metric | backhaul MB (up + down) | backhaul up MB | Δ backhaul up vs flat "
             "| uplink MB, all links | Δ uplink vs flat | virtual s to target | backhaul MB to target | virtual s (run) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = [ARM_LABELS[a] for a in ARMS]
    for kind, per_arm in results.items():
        metric, label, _ = HEADLINE[kind]
        flat = per_arm.get("flat-network")
        base_up = mean_sd(r["backhaul_up_bytes"] for r in flat)[0] if flat else np.nan
        base_all = mean_sd(r["uplink_all_bytes"] for r in flat)[0] if flat else np.nan
        for arm in sorted(per_arm, key=lambda a: order.index(a) if a in order else len(order)):
            rows = per_arm[arm]
            up = mean_sd(r["backhaul_up_bytes"] for r in rows)[0]
            all_up = mean_sd(r["uplink_all_bytes"] for r in rows)[0]
            target = targets.get(kind)
            lines.append(
                f"| {kind} | {TITLES.get(arm, arm)} | {label} {_cell([r['final'] for r in rows], 3)} "
                f"| {_cell([r['backhaul_bytes'] for r in rows], 2, 1e-6)} "
                f"| {_cell([r['backhaul_up_bytes'] for r in rows], 2, 1e-6)} "
                f"| {100 * (up / base_up - 1):+.0f} % | {_cell([r['uplink_all_bytes'] for r in rows], 2, 1e-6)} "
                f"| {100 * (all_up / base_all - 1):+.0f} % "
                f"| {_cell([r['time_to_target_s'] for r in rows], 2) if target is not None else '–'} "
                f"| {_cell([r['backhaul_to_target_bytes'] for r in rows], 2, 1e-6) if target is not None else '–'} "
                f"| {_cell([r['virtual_time_s'] for r in rows], 2)} |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves(client, runs: pd.DataFrame) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """``{kind: {arm: {metric: seeds x rounds}}}`` for the plots."""
    out: dict = {}
    for (kind, arm), rows in runs.groupby(["kind", "arm"]):
        if kind not in HEADLINE:
            continue
        keys = (HEADLINE[kind][0], "virtual_time_s", "backhaul_up_bytes", "backhaul_down_bytes")
        series = [histories(client, run_id, keys) for run_id in rows["run_id"]]
        rounds = min(len(s[keys[0]]) for s in series)
        out.setdefault(kind, {})[arm] = {k: np.array([s[k][:rounds] if len(s[k]) >= rounds else
                                                      np.pad(s[k], (rounds - len(s[k]), 0), constant_values=0)
                                                      for s in series]) for k in keys}
    return out


def curve_figure(data: dict) -> object:
    """Headline metric against cumulative backhaul bytes and against virtual time, per task and arm."""
    plt = _pyplot()
    kinds = list(data)
    fig, axes = plt.subplots(len(kinds), 2, figsize=(11, 3.6 * len(kinds)), squeeze=False)
    for row, kind in enumerate(kinds):
        metric, label, _ = HEADLINE[kind]
        for arm in sorted(data[kind], key=lambda a: [ARM_LABELS[x] for x in ARMS].index(a) if a in ARM_LABELS.values() else 9):
            d = data[kind][arm]
            y = np.nanmean(d[metric], axis=0)
            backhaul = np.nancumsum(np.nan_to_num(d["backhaul_up_bytes"]) + np.nan_to_num(d["backhaul_down_bytes"]), axis=1)
            axes[row, 0].plot(backhaul.mean(axis=0) / 1e6, y, marker="o", label=TITLES.get(arm, arm))
            clock = np.nan_to_num(d["virtual_time_s"])  # round 0 (before training) has no virtual time: 0
            axes[row, 1].plot(clock.mean(axis=0), y, marker="o", label=TITLES.get(arm, arm))
        axes[row, 0].set_xlabel("cumulative backhaul MB (up + down)")
        axes[row, 1].set_xlabel("virtual time (s)")
        for ax in axes[row]:
            ax.set_ylabel(f"test {label} (mean over seeds)")
            ax.set_title(kind)
            ax.grid(alpha=0.3)
        axes[row, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def bytes_figure(results: dict[str, dict[str, list[dict]]]) -> object:
    """Bytes per link level and topology (mean over seeds, whole run)."""
    plt = _pyplot()
    kinds = list(results)
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 3.8), squeeze=False)
    levels = (("lan", "LAN"), ("regional", "regional"), ("backhaul", "backhaul"))
    for ax, kind in zip(axes[0], kinds):
        arms = [a for a in (ARM_LABELS[x] for x in ARMS) if a in results[kind]]
        width = 0.8 / len(levels)
        for i, (level, name) in enumerate(levels):
            means = [mean_sd(r[f"{level}_up_bytes"] + r[f"{level}_down_bytes"] for r in results[kind][a])[0] / 1e6
                     for a in arms]
            ax.bar([j + i * width for j in range(len(arms))], means, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(arms))], [TITLES[a] for a in arms], fontsize=7)
        ax.set_ylabel("MB (up + down), whole run")
        ax.set_title(kind)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def report(client, parents: list[str], targets: dict[str, float | None], command: str = "",
           out: Path | None = None) -> str:
    """The study's markdown table and plots from the child runs of ``parents``: logged to the first
    parent run and, with ``out``, written there too."""
    runs = study_runs(client, parents)
    if runs.empty:
        return f"_no finished hierarchy runs under parent(s) {', '.join(parents)}_"
    results = summarise(client, runs, targets)
    seeds = runs.groupby(["kind", "arm"])["seed"].nunique()
    text = "\n\n".join(filter(None, [
        f"# Hierarchy study (MLflow parent(s) {', '.join(parents)}; seeds per task and topology: "
        + ", ".join(f"{k}/{a} {n}" for (k, a), n in seeds.items()) + ")",
        f"Command: `{command}`" if command else "",
        "Targets: " + ", ".join(f"{k} {HEADLINE[k][1]} {'>=' if HEADLINE[k][2] else '<='} {t}"
                                for k, t in targets.items() if t is not None and k in results),
        table(results, targets),
    ]))
    first = parents[0]
    client.log_text(first, text, "report/hierarchy_study.md")
    figures = {"metric_vs_backhaul_and_time": curve_figure(curves(client, runs)), "bytes_per_link": bytes_figure(results)}
    for name, fig in figures.items():
        client.log_figure(first, fig, f"report/{name}.png")
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            fig.savefig(out / f"hierarchy-study-{first[:8]}-{name}.png", dpi=120)
    if len(parents) > 1:
        client.set_tag(first, "fc.report_includes", " ".join(parents[1:]))
    return text


# ------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.hierarchy_study", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["image", "forecast"], choices=tuple(HEADLINE))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--image-rounds", type=int, default=8)
    parser.add_argument("--forecast-rounds", type=int, default=5)
    parser.add_argument("--image-target", type=float, default=0.85, help="test accuracy (image)")
    parser.add_argument("--forecast-target", type=float, default=0.6, help="test MASE (forecast)")
    parser.add_argument("--experiment", default=EXPERIMENT)
    parser.add_argument("--report", metavar="PARENT_RUN_ID", nargs="+", help="only write the report of earlier sweeps")
    parser.add_argument("--out", default="reports")
    parser.add_argument("overrides", nargs="*", help="further Hydra overrides for every job")
    args = parser.parse_args(argv)

    from mlflow.tracking import MlflowClient

    from fl_server.experiments.config import default_tracking_uri

    uri = default_tracking_uri()
    targets = {"image": args.image_target, "forecast": args.forecast_target}
    command = "python -m scripts.hierarchy_study " + " ".join(argv if argv is not None else sys.argv[1:])
    parents, code = args.report, 0
    if parents is None:
        parents = []
        for task in args.tasks:
            started_ms = int(time.time() * 1000)
            sweep = [sys.executable, "-m", "scripts.sweep", "--multirun", *task_overrides(task, args)]
            print("$", " ".join(sweep), flush=True)
            code = subprocess.call(sweep) or code
            parent = newest_sweep_parent(uri, args.experiment, started_ms)
            if parent is None:
                print(f"error: the {task} sweep started no MLflow parent run (exit code {code})", file=sys.stderr)
                return code or 1
            parents.append(parent)
    out = Path(args.out)
    text = report(MlflowClient(uri), parents, targets, command.strip(), out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"hierarchy-study-{parents[0][:8]}.md"
    path.write_text(text + "\n")
    print(text)
    print(f"\nreport: {path} (MLflow parent run(s) {' '.join(parents)}, {uri})")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
