"""Privacy and compression study on the embedded MNIST 5k partitions.

    python -m scripts.privacy_study [--seeds 0 1 2] [--epsilons 1 3 8] [--rounds 10]
    python -m scripts.privacy_study --report PARENT_RUN_ID   # rebuild the table and plots

Runs, per seed, real Flower simulations (``flwr run`` through the launcher,
one SuperLink and one private Ray head for the whole study):

* accuracy vs epsilon: DP-SGD on every client (Opacus, target-epsilon mode:
  sigma chosen per client so the whole run spends epsilon, delta = 1e-5) for
  each epsilon, plus the non-private run (epsilon = inf);
* accuracy vs uplink bytes: top-k (10 %) + 8-bit + error feedback against
  full-precision updates (the non-private run doubles as "compression off").

Everything else is the default job (10 clients, IID, FedAvg, 1 local epoch of
batch 32, lr 0.05, momentum 0.9). MLflow gets one parent run (``fc.kind =
privacy-study``) with the jobs as children and, at the end,
``report/privacy_study.md``, ``report/accuracy_vs_epsilon.png`` and
``report/accuracy_vs_uplink_bytes.png``; the table is also printed and
written to ``reports/``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from rich.console import Console

from fl_server.experiments.tracking import PARENT_TAG, RunTracker, default_tracking_uri
from scripts.study_runs import close_parent, run_jobs

console = Console()
# Opacus's centralised MNIST example (60k images, delta = 1e-5), for comparison
OPACUS_ANCHOR = {"inf": 0.989, "3.0": 0.968, "1.2": 0.946}


def jobs(seeds: list[int], epsilons: list[float], rounds: int) -> list[tuple[str, list[str]]]:
    """(label, Hydra overrides) of every job in the study."""
    out = []
    for seed in seeds:
        common = [f"seed={seed}", f"num_rounds={rounds}"]
        out.append((f"eps-inf-s{seed}", [*common, "privacy=none", "compression=none"]))
        for eps in epsilons:
            out.append((f"eps-{eps:g}-s{seed}", [*common, "privacy=dpsgd", f"privacy.dpsgd.target_epsilon={eps:g}",
                                                "privacy.dpsgd.epsilon_budget=null"]))
        out.append((f"topk8-s{seed}", [*common, "privacy=none", "compression=topk8"]))
    return [(label, [*overrides, f"tracking.run_name=study-{label}"]) for label, overrides in out]


def run_study(seeds: list[int], epsilons: list[float], rounds: int, tracking_uri: str, shared_ray: bool = True) -> str:
    """Run every job as a child of a new parent run; returns the parent's id."""
    parent = RunTracker(tracking_uri, experiment="fedcontinuum", run_name=f"privacy study {time.strftime('%Y-%m-%d %H:%M')}",
                        tags={"fc.kind": "privacy-study"})
    parent.log_params({"seeds": " ".join(map(str, seeds)), "epsilons": " ".join(f"{e:g}" for e in epsilons),
                       "num_rounds": rounds})
    parent.flush()
    console.print(f"[bold]privacy study[/bold] (MLflow parent run {parent.run_id})")
    outcomes = run_jobs(jobs(seeds, epsilons, rounds), parent.run_id, tracking_uri, console)
    report(parent.run_id, tracking_uri)
    close_parent(parent, outcomes)
    return parent.run_id


# ------------------------------------------------------------------- report
def child_runs(client: MlflowClient, parent_run_id: str) -> pd.DataFrame:
    """One row per finished child: its arm, seed and final numbers."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                              max_results=1000)
    rows = []
    for run in runs:
        if run.info.status != "FINISHED":
            continue
        p, m = run.data.params, run.data.metrics
        dp = p.get("privacy.dpsgd.enabled") == "True"
        rows.append({
            "run_id": run.info.run_id,
            "seed": int(p["seed"]),
            "epsilon": float(p["privacy.dpsgd.target_epsilon"]) if dp else math.inf,
            "compression": p.get("compression.name", "none"),
            "accuracy": m.get("final_test_accuracy", np.nan),
            "epsilon_max": m.get("epsilon_max", np.nan),
            "uplink_mb": m.get("uplink_bytes_total", np.nan) / 1e6,
            "downlink_mb": m.get("downlink_bytes_total", np.nan) / 1e6,
            "wall_s": m.get("final_wall_time_s", np.nan),
        })
    return pd.DataFrame(rows)


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd over seeds per arm (epsilon, compression)."""
    grouped = runs.groupby(["compression", "epsilon"])
    table = grouped.size().rename("seeds").to_frame()
    for column in ("accuracy", "epsilon_max", "uplink_mb", "downlink_mb", "wall_s"):
        table[f"{column}_mean"] = grouped[column].mean()
        table[f"{column}_sd"] = grouped[column].std(ddof=1).fillna(0.0)
    return table.reset_index().sort_values(["compression", "epsilon"], ascending=[True, True])


def markdown(table: pd.DataFrame) -> str:
    """The study's table, with Opacus's centralised numbers beside it."""
    lines = [
        "| arm | target ε | measured ε (max over clients) | seeds | final accuracy | uplink MB (run) | downlink MB (run) |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, row in table.iterrows():
        arm = "DP-SGD" if np.isfinite(row["epsilon"]) else "no DP"
        if row["compression"] != "none":
            arm = f"{arm}, {row['compression']}"
        eps = "∞" if not np.isfinite(row["epsilon"]) else f"{row['epsilon']:g}"
        measured = "–" if not np.isfinite(row["epsilon"]) else f"{row['epsilon_max_mean']:.3f}"
        lines.append(
            f"| {arm} | {eps} | {measured} | {int(row['seeds'])} | {row['accuracy_mean']:.4f} ± {row['accuracy_sd']:.4f} "
            f"| {row['uplink_mb_mean']:.2f} | {row['downlink_mb_mean']:.2f} |"
        )
    lines += ["", "Opacus's centralised MNIST example (60k images, δ = 1e-5): "
              "98.9 % without DP, 96.8 % at ε = 3.0, 94.6 % at ε = 1.2."]
    return "\n".join(lines) + "\n"


def accuracy_vs_epsilon_figure(table: pd.DataFrame):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table[table["compression"] == "none"].sort_values("epsilon")
    finite = rows[np.isfinite(rows["epsilon"])]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(finite["epsilon"], finite["accuracy_mean"], yerr=finite["accuracy_sd"], marker="o",
                capsize=3, label="DP-SGD (Opacus), federated, 10 clients")
    inf = rows[~np.isfinite(rows["epsilon"])]
    if not inf.empty:
        ax.axhline(float(inf["accuracy_mean"].iloc[0]), color="grey", ls="--", label="no DP (ε = ∞)")
    ax.plot([1.2, 3.0], [0.946, 0.968], "k^", label="Opacus centralised MNIST (60k)")
    ax.axhline(0.989, color="k", ls=":", lw=0.8, label="Opacus centralised, no DP")
    ax.set_xscale("log")
    ax.set_xticks(sorted({*finite["epsilon"], 1.2}), [f"{e:g}" for e in sorted({*finite["epsilon"], 1.2})])
    ax.minorticks_off()
    ax.set_xlabel("ε (δ = 1e-5), per client, whole run")
    ax.set_ylabel("final test accuracy (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_vs_uplink_figure(client: MlflowClient, runs: pd.DataFrame):
    """Test accuracy against cumulative uplink bytes, round by round (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for compression, label in (("none", "float32 updates"), ("topk8", "top-10 % + 8 bit + error feedback")):
        arm = runs[(runs["compression"] == compression) & ~np.isfinite(runs["epsilon"])]
        if arm.empty:
            continue
        curves = [_curve(client, run_id) for run_id in arm["run_id"]]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        x = [np.mean([c[s][0] for c in curves]) / 1e6 for s in steps]
        y = [np.mean([c[s][1] for c in curves]) for s in steps]
        ax.plot(x, y, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink (MB, serialised payloads, all clients)")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _curve(client: MlflowClient, run_id: str) -> dict[int, tuple[float, float]]:
    uplink = {m.step: m.value for m in client.get_metric_history(run_id, "uplink_bytes_total")}
    accuracy = {m.step: m.value for m in client.get_metric_history(run_id, "test_accuracy")}
    return {s: (uplink[s], accuracy[s]) for s in uplink if s in accuracy}


def report(parent_run_id: str, tracking_uri: str, out: str = "reports") -> str:
    """Build, print and log (to the parent run and ``out/``) the table and plots."""
    client = MlflowClient(tracking_uri)
    runs = child_runs(client, parent_run_id)
    if runs.empty:
        console.print("no finished runs")
        return ""
    table = summarise(runs)
    text = markdown(table)
    figures = {"accuracy_vs_epsilon.png": accuracy_vs_epsilon_figure(table),
               "accuracy_vs_uplink_bytes.png": accuracy_vs_uplink_figure(client, runs)}
    client.log_text(parent_run_id, text, "report/privacy_study.md")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"privacy-study-{parent_run_id[:8]}.md").write_text(text)
    for name, fig in figures.items():
        client.log_figure(parent_run_id, fig, f"report/{name}")
        fig.savefig(folder / f"privacy-study-{parent_run_id[:8]}-{name}")
    console.print(text, markup=False, highlight=False)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.privacy_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tracking-uri", default=default_tracking_uri())
    parser.add_argument("--report", metavar="PARENT_RUN_ID", help="only rebuild the report of a finished study")
    parser.add_argument("--no-shared-ray", action="store_true",
                        help="every job starts its own Ray (default: one private Ray head for the whole study)")
    args = parser.parse_args(argv)
    if args.report:
        report(args.report, args.tracking_uri)
        return 0
    parent = run_study(args.seeds, args.epsilons, args.rounds, args.tracking_uri, shared_ray=not args.no_shared_ray)
    console.print(f"rebuild with: python -m scripts.privacy_study --report {parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
