"""Tables and plots that compare the child runs of a sweep (from MLflow).

    python -m scripts.report PARENT_RUN_ID [--tracking-uri URI]

prints a markdown table (mean ± sd over seeds of final accuracy, macro-F1 and
weakest-class recall per strategy and imbalance setting) and writes it, with a
plot of accuracy against rho, to ``reports/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from fl_server.experiments.tracking import PARENT_TAG, default_tracking_uri

METRICS = {
    "final_test_accuracy": "accuracy",
    "final_test_macro_f1": "macro-F1",
    "final_test_weakest_class_recall": "weakest-class recall",
    # forecasting tasks (mean over sites); a sweep shows whichever its runs have
    "final_test_mase": "MASE",
    "final_test_mae": "MAE",
    "final_test_smape": "sMAPE %",
}
FINAL_COSTS = {"virtual_time_s": "virtual s", "energy_total_j": "energy J"}
TARGET_COLUMNS = {
    "rounds_to_target": "rounds to target",
    "virtual_s_to_target": "virtual s to target",
    "energy_j_to_target": "energy J to target",
}
GROUP_TAGS = ("task", "model", "strategy", "ass_abg", "partition", "alpha", "rho", "deadline", "availability")


def time_to_target(client: MlflowClient, run_id: str, target: float) -> dict[str, float]:
    """First round whose test accuracy reaches ``target``, with the virtual
    time and cumulative energy at that round (NaN if never reached)."""
    accuracy = sorted(client.get_metric_history(run_id, "test_accuracy"), key=lambda m: m.step)
    reached = next((m.step for m in accuracy if m.step > 0 and m.value >= target), None)
    if reached is None:
        return {"rounds_to_target": np.nan, "virtual_s_to_target": np.nan, "energy_j_to_target": np.nan}

    def at(metric: str) -> float:
        values = {m.step: m.value for m in client.get_metric_history(run_id, metric)}
        return values.get(reached, np.nan)

    return {
        "rounds_to_target": float(reached),
        "virtual_s_to_target": at("virtual_time_s"),
        "energy_j_to_target": at("energy_total_j"),
    }


def child_runs(client: MlflowClient, parent_run_id: str, target: float | None = None) -> pd.DataFrame:
    """One row per child run: its tags, status and final metrics (and, with
    ``target``, virtual time and energy to reach that test accuracy)."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
        max_results=10_000,
    )
    rows = []
    for run in runs:
        row = {tag: run.data.tags.get(tag, "") for tag in (*GROUP_TAGS, "seed")}
        row.update({"run_id": run.info.run_id, "status": run.info.status})
        row.update({k: run.data.metrics.get(k, np.nan) for k in (*METRICS, *FINAL_COSTS)})
        if target is not None:
            row.update(time_to_target(client, run.info.run_id, target))
        rows.append(row)
    return pd.DataFrame(rows)


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd over seeds of each final metric, per configuration."""
    if runs.empty:
        return pd.DataFrame()
    done = runs[runs["status"] == "FINISHED"]
    keys = [t for t in GROUP_TAGS if t in done and done[t].astype(bool).any()]
    if done.empty:
        return pd.DataFrame()
    grouped = done.groupby(keys, dropna=False)
    table = grouped.size().rename("runs").to_frame()
    columns = {**METRICS, **FINAL_COSTS, **{k: v for k, v in TARGET_COLUMNS.items() if k in done}}
    columns = {k: v for k, v in columns.items() if done[k].notna().any()}  # e.g. no accuracy when forecasting
    for metric, label in columns.items():
        mean, sd = grouped[metric].mean(), grouped[metric].std(ddof=1).fillna(0.0)
        digits = 4 if metric in METRICS else 2
        table[label] = [f"{m:.{digits}f} ± {s:.{digits}f}" for m, s in zip(mean, sd)]
        table[f"_{label}_mean"] = mean
    table = table.reset_index()
    if "rho" in table:
        table = table.assign(_rho=table["rho"].astype(float)).sort_values(
            [k for k in ("task", "partition", "alpha") if k in table] + ["_rho", "strategy"]
        )
    return table


def markdown(table: pd.DataFrame) -> str:
    """The summary as a GitHub markdown table."""
    if table.empty:
        return "_no finished runs_\n"
    shown = [c for c in table.columns if not c.startswith("_")]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(str(row[c]) for c in shown) + " |" for _, row in table.iterrows()]
    return "\n".join(lines) + "\n"


def accuracy_vs_rho_figure(table: pd.DataFrame, metric: str = "accuracy"):
    """Mean final ``metric`` against rho (log x), one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if not table.empty and "rho" in table:
        series = [c for c in ("strategy", "ass_abg", "alpha", "deadline") if c in table and table[c].astype(bool).any()]
        for keys, rows in table.groupby(series):
            rows = rows.sort_values("_rho")
            label = " ".join(str(k) for k in (keys if isinstance(keys, tuple) else (keys,)) if k)
            ax.plot(rows["_rho"], rows[f"_{metric}_mean"], marker="o", label=label)
        ax.set_xscale("log")
    ax.set_xlabel("imbalance ratio rho = n_max / n_min")
    ax.set_ylabel(f"final test {metric} (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.report", description=__doc__)
    parser.add_argument("parent_run_id")
    parser.add_argument("--tracking-uri", default=default_tracking_uri())
    parser.add_argument("--out", default="reports")
    parser.add_argument("--target-accuracy", type=float, default=None,
                        help="also report rounds, virtual time and energy to reach this test accuracy")
    args = parser.parse_args(argv)
    table = summarise(child_runs(MlflowClient(args.tracking_uri), args.parent_run_id, args.target_accuracy))
    text = markdown(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sweep-{args.parent_run_id[:8]}.md").write_text(text)
    accuracy_vs_rho_figure(table).savefig(out / f"sweep-{args.parent_run_id[:8]}-accuracy.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
