"""CDIO study (paper 004): success rates, compute, bandwidth, energy and delay
of CDIO, its ablations and the baselines, stable vs +-20 % fluctuating bandwidth.

    python -m scripts.cdio_study [--seeds 0 1 2] [--deployments v1 v2] [--rounds 5] [--sites 4]
        [--slots 1000] [--quick] [--experiment fedcontinuum-cdio-study] [--reports-dir reports]
        [extra Hydra overrides ...]
    python -m scripts.cdio_study --report PARENT_RUN_ID   # rebuild the tables and plots

Runs, per deployment (paper 004 Table 2's shape: the cloud's model ~6x (v1)
or ~12x (v2) the edge's parameters) and seed, one real Flower simulation of
``task=cdio`` (through the launcher, one SuperLink for the whole study): the
edge sites train the preference LSTM federated; after the last round each
run places ``--slots`` slots of requests with every policy under stable and
fluctuating bandwidth in the twin (``cdio/grid.csv``, ``cdio/regret.csv``).
The study reads those from the child runs: mean ± sd over seeds, the
ablation table next to paper 004 Table 4, plots, ``report/cdio_study.md``;
all of it also goes to ``reports/``. ``--quick``: 1 seed, v1, 2 rounds,
100 slots (a smoke test, about 1 min).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient
from rich.console import Console

from fl_server.experiments.tracking import PARENT_TAG, RunTracker, default_tracking_uri
from scripts.study_runs import close_parent, run_jobs

console = Console()
POLICY_ORDER = ("cdio", "rpp-only", "cdco-only", "all-edge", "all-cloud", "greedy-delay", "random",
                "complexity-threshold", "oracle")
COLUMNS = (("success_both", "success (acc & delay)", 100, 1), ("success_accuracy", "acc. met %", 100, 1),
           ("success_delay", "delay met %", 100, 1), ("accuracy", "accuracy %", 100, 2), ("delay_ms", "delay ms", 1, 1),
           ("compute_tflop", "compute GFLOP", 1000, 3), ("bandwidth_mb", "bandwidth KB", 1000, 1),
           ("energy_j", "energy mJ", 1000, 2), ("regret", "regret / slot", 1, 3))
# paper 004: Table 4 (averages; units as printed there) and §4.2's success rates
PAPER_TABLE4 = {"accuracy": (65.13, 61.37, 65.42), "delay": (297, 314, 245), "computing": (33.5, 30.8, 29.1),
                "bandwidth": (24.6, 22.4, 21.2), "energy": (14.1, 13.9, 11.6)}


def jobs(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(label, Hydra overrides) of every job of the study."""
    return [(f"{dep}-s{seed}", [
        "task=cdio", f"task.deployment={dep}", f"seed={seed}", f"num_rounds={args.rounds}", f"clients.num={args.sites}",
        f"task.placement.slots={args.slots}", f"tracking.experiment={args.experiment}",
        f"tracking.run_name=cdio-study-{dep}-s{seed}", *args.overrides]) for dep in args.deployments for seed in args.seeds]


def run_study(args: argparse.Namespace, tracking_uri: str) -> str:
    parent = RunTracker(tracking_uri, experiment=args.experiment, run_name=f"cdio study {time.strftime('%Y-%m-%d %H:%M')}",
                        tags={"fc.kind": "cdio-study"})
    parent.log_params({"command": args.command, "seeds": " ".join(map(str, args.seeds)),
                       "deployments": " ".join(args.deployments), "num_rounds": args.rounds, "sites": args.sites,
                       "slots": args.slots})
    parent.flush()
    console.print(f"[bold]CDIO study[/bold] (MLflow parent run {parent.run_id})")
    started = time.perf_counter()
    outcomes = run_jobs(jobs(args), parent.run_id, tracking_uri, console)
    MlflowClient(tracking_uri).log_metric(parent.run_id, "study_wall_time_s", time.perf_counter() - started)
    report(parent.run_id, tracking_uri, out=args.reports_dir, command=args.command)
    close_parent(parent, outcomes)
    return parent.run_id


# ------------------------------------------------------------------- report
def child_runs(client: MlflowClient, parent_run_id: str) -> pd.DataFrame:
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'FINISHED'",
                              max_results=1000)
    return pd.DataFrame([{"run_id": r.info.run_id, "seed": int(r.data.tags["seed"]),
                          "deployment": r.data.tags.get("deployment", ""), **r.data.metrics} for r in runs])


def artifacts(client: MlflowClient, runs: pd.DataFrame, name: str) -> pd.DataFrame:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        for _, run in runs.iterrows():
            frame = pd.read_csv(client.download_artifacts(run["run_id"], f"cdio/{name}", tmp))
            frames.append(frame.assign(seed=run["seed"], deployment=run["deployment"]))
    return pd.concat(frames, ignore_index=True)


def summarise(grid: pd.DataFrame, slots: int) -> pd.DataFrame:
    """Mean and sd over seeds per deployment, bandwidth and policy (regret per slot)."""
    grid = grid.assign(regret=grid["regret"] / slots)
    keys = [c for c, *_ in COLUMNS]
    mean = grid.groupby(["deployment", "bandwidth", "policy"])[keys].mean()
    sd = grid.groupby(["deployment", "bandwidth", "policy"])[keys].std(ddof=0).add_suffix("_sd")
    seeds = grid.groupby(["deployment", "bandwidth", "policy"])["seed"].nunique().rename("seeds")
    return pd.concat([mean, sd, seeds], axis=1).reset_index()


def _pm(row: pd.Series, key: str, scale: float, decimals: int) -> str:
    return f"{row[key] * scale:.{decimals}f} ± {row[key + '_sd'] * scale:.{decimals}f}"


def policy_table(table: pd.DataFrame, deployment: str, bandwidth: str) -> str:
    rows = table[(table["deployment"] == deployment) & (table["bandwidth"] == bandwidth)].set_index("policy")
    lines = ["| policy | " + " | ".join(title for _, title, *_ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for policy in POLICY_ORDER:
        if policy in rows.index:
            row = rows.loc[policy]
            lines.append(f"| {policy} | " + " | ".join(_pm(row, k, s, d) for k, _, s, d in COLUMNS) + " |")
    return "\n".join(lines)


def relative_table(table: pd.DataFrame) -> str:
    """CDIO's compute, bandwidth and energy relative to each baseline (paper 004: -20-40 %, -20-40 %, > -40 %)."""
    lines = ["| deployment | bandwidth | vs | compute | bandwidth | energy | success (pp) |", "|---|---|---|---|---|---|---|"]
    for (dep, bw), part in table.groupby(["deployment", "bandwidth"]):
        part = part.set_index("policy")
        cdio = part.loc["cdio"]
        for other in ("all-edge", "all-cloud", "greedy-delay", "random", "complexity-threshold"):
            base = part.loc[other]
            rel = [f"{100 * (cdio[k] / base[k] - 1):+.0f} %" for k in ("compute_tflop", "bandwidth_mb", "energy_j")]
            lines.append(f"| {dep} | {bw} | {other} | " + " | ".join(rel)
                         + f" | {100 * (cdio['success_both'] - base['success_both']):+.1f} |")
    return "\n".join(lines)


def ablation_table(table: pd.DataFrame) -> str:
    """Ours (all deployments and bandwidths averaged) next to paper 004 Table 4."""
    mean = table.groupby("policy")[["accuracy", "delay_ms", "compute_tflop", "bandwidth_mb", "energy_j",
                                    "success_both"]].mean()
    arms = ("rpp-only", "cdco-only", "cdio")
    ours = [("accuracy (%)", "accuracy", 100, 2), ("delay (ms)", "delay_ms", 1, 2),
            ("computing (GFLOP)", "compute_tflop", 1000, 3),
            ("bandwidth (KB)", "bandwidth_mb", 1000, 1), ("energy (mJ)", "energy_j", 1000, 2),
            ("success, acc & delay (%)", "success_both", 100, 1)]
    paper = {"accuracy (%)": "accuracy", "delay (ms)": "delay", "computing (GFLOP)": "computing",
             "bandwidth (KB)": "bandwidth", "energy (mJ)": "energy"}
    lines = ["| measure | ours RPP | ours CDCO | ours RPP+CDCO | paper RPP | paper CDCO | paper RPP+CDCO |",
             "|---|---|---|---|---|---|---|"]
    for title, key, scale, dec in ours:
        cells = [f"{mean.loc[a, key] * scale:.{dec}f}" for a in arms]
        ref = PAPER_TABLE4.get(paper.get(title, ""), ("–", "–", "–"))
        lines.append(f"| {title} | " + " | ".join(cells) + " | " + " | ".join(str(v) for v in ref) + " |")
    return "\n".join(lines)


def rpp_table(runs: pd.DataFrame) -> str:
    lines = ["| deployment | seeds | RPP exact-match accuracy | majority class | RPP BCE |", "|---|---|---|---|---|"]
    for dep, part in runs.groupby("deployment"):
        acc, maj, bce = (part[k] for k in ("final_rpp_exact_acc", "final_rpp_majority_acc", "final_rpp_bce"))
        lines.append(f"| {dep} | {len(part)} | {acc.mean():.3f} ± {acc.std(ddof=0):.3f} | "
                     f"{maj.mean():.3f} ± {maj.std(ddof=0):.3f} | {bce.mean():.3f} ± {bce.std(ddof=0):.3f} |")
    return "\n".join(lines)


def regret_figure(regret: pd.DataFrame):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted(set(zip(regret["deployment"], regret["bandwidth"])))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), sharey=True, squeeze=False)
    for ax, (dep, bw) in zip(axes[0], panels):
        part = regret[(regret["deployment"] == dep) & (regret["bandwidth"] == bw)]
        for policy in ("cdio", "cdco-only", "rpp-only", "greedy-delay", "random"):
            curve = part[part["policy"] == policy].groupby("slot")["cumulative_regret"]
            mean, sd = curve.mean(), curve.std(ddof=0).fillna(0)
            ax.plot(mean.index, mean.values, label=policy)
            ax.fill_between(mean.index, mean - sd, mean + sd, alpha=0.2)
        ax.set_title(f"{dep}, {bw} bandwidth", fontsize=9)
        ax.set_xlabel("slot")
    axes[0][0].set_ylabel("cumulative regret (mean ± sd over seeds)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def report(parent_run_id: str, tracking_uri: str, out: str = "reports", command: str | None = None) -> str:
    from tasks.cdio.plots import grid_figure

    client = MlflowClient(tracking_uri)
    runs = child_runs(client, parent_run_id)
    if runs.empty:
        console.print("no finished runs")
        return ""
    params = client.get_run(parent_run_id).data.params
    command = command or params.get("command", "python -m scripts.cdio_study")
    slots = int(params.get("slots", 1000))
    table = summarise(artifacts(client, runs, "grid.csv"), slots)
    regret = artifacts(client, runs, "regret.csv")
    parts = [f"# CDIO study (MLflow parent run {parent_run_id}; {runs['seed'].nunique()} seeds, {slots} slots per "
             f"evaluation, {int(params.get('sites', 4))} edge sites)",
             f"Command: `{command}`; tables: `python -m scripts.cdio_study --report {parent_run_id}`. Every cell is "
             "mean ± sd over seeds, per task (regret: per slot, against the best super-arm in hindsight of each slot).",
             "## Preference prediction (federated LSTM, held-out tasks)", rpp_table(runs)]
    for dep in sorted(set(table["deployment"])):
        for bw in ("stable", "fluctuating"):
            parts += [f"## {dep}, {bw} bandwidth", policy_table(table, dep, bw)]
    parts += ["## CDIO relative to the baselines (paper 004: compute and bandwidth -20-40 %, energy < -40 %)",
              relative_table(table),
              "## Ablation next to paper 004 Table 4 (ours: mean over deployments and bandwidths; the paper's units "
              "are its own, YOLOv5 on UA-DETRAC)", ablation_table(table)]
    text = "\n\n".join(parts) + "\n"
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cdio_study.md").write_text(text)
    client.log_text(parent_run_id, text, "report/cdio_study.md")
    figures = {"cdio_regret.png": regret_figure(regret)}
    for dep in sorted(set(table["deployment"])):
        part = table[table["deployment"] == dep]
        errors = {(r["bandwidth"], r["policy"], k): r[k + "_sd"] for r in part.to_dict("records") for k, *_ in COLUMNS}
        figures[f"cdio_policies_{dep}.png"] = grid_figure(part.to_dict("records"), f"{dep}: mean ± sd over seeds", errors)
    for name, fig in figures.items():
        client.log_figure(parent_run_id, fig, f"report/{name}")
        fig.savefig(folder / name, dpi=110)
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    console.print(f"report: {folder / 'cdio_study.md'} and {', '.join(str(folder / n) for n in figures)}")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.cdio_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--deployments", nargs="+", default=["v1", "v2"], choices=["v1", "v2"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sites", type=int, default=4, help="edge sites = clients (paper 004: 4 Jetson Xavier NX)")
    parser.add_argument("--slots", type=int, default=1000, help="placement slots per policy and bandwidth")
    parser.add_argument("--quick", action="store_true", help="1 seed, v1, 2 rounds, 100 slots")
    parser.add_argument("--experiment", default="fedcontinuum-cdio-study")
    parser.add_argument("--tracking-uri", default=default_tracking_uri())
    parser.add_argument("--report", metavar="PARENT_RUN_ID", help="only rebuild the report of a finished study")
    parser.add_argument("--reports-dir", default="reports", help="where the markdown and the plots go (default: reports)")
    parser.add_argument("overrides", nargs="*", help="further Hydra overrides for every job")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.deployments, args.rounds, args.slots = args.seeds[:1], ["v1"], 2, 100
    for name in ("rounds", "sites", "slots"):
        if getattr(args, name) < (2 if name == "sites" else 1):
            parser.error(f"--{name}={getattr(args, name)} is invalid: use a whole number >= {2 if name == 'sites' else 1}")
    given = sys.argv[1:] if argv is None else argv
    args.command = " ".join(["python -m scripts.cdio_study", *(shlex.quote(a) for a in given)])
    if args.report:
        report(args.report, args.tracking_uri, out=args.reports_dir)
        return 0
    parent = run_study(args, args.tracking_uri)
    console.print(f"rebuild with: python -m scripts.cdio_study --report {parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
