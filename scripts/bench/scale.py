"""Peak memory and round time at 10 -> 100 -> 1,000 virtual clients.

    python -m scripts.bench.scale [--quick] [--tasks mnist,workload] [--sizes 10,100,1000] [--rounds 20]

For each task and federation size, one real launcher run (``python -m
fl_server.launch``: its own SuperLink, ``flwr-simulation`` and Ray) with
``clients.num=N clients.fraction_train=0.1`` (at least ``clients.min_train``
= 2 clients per round) for ``--rounds`` rounds:

* ``mnist``: MNIST 5k, IID (3,800 pool images: ~4 per client at 1,000);
* ``workload``: the forecaster (TCN) on synthetic sites, one site per client,
  with ``task.train_stride=32 task.eval_sites=50`` (CPU budget; ``--overrides``
  adds or replaces overrides for every run).

While it runs, the launcher's whole process tree (SuperLink, SuperExec,
``flwr-simulation`` with the ServerApp, Ray's GCS / raylet / agents and
workers, the ClientApp actors) is sampled every 0.5 s from ``/proc``: RSS
summed over the tree, and PSS (``/proc/<pid>/smaps_rollup``), which splits
shared pages (torch's libraries, Ray's object store) among the processes
that map them, so it is what the tree really costs. Per round: the
ServerApp's ``round_wall_time_s`` (sampling, the clients' training through
Ray, screening, aggregation, server-side evaluation), mean over rounds 2..R
(round 1 is the same work, but its clients' actors are still warming up).
``discover_partitions_s`` is the QUERY round before round 1 (every client's
actor answers once). Also counted: the MLflow metric series the run logged.

``--quick`` runs 10 and 100 clients only. Prints the table and the growth
factors, and writes ``report.md``, ``scale.png`` (matplotlib) and the raw
data to ``outputs/bench/scale-<time>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fl_server.experiments.config import PROJECT_DIR
from fl_server.runtime.launch import OUTCOME_LOG_ENV
from scripts.bench.proctree import TreeSampler

OUT_DIR = PROJECT_DIR / "outputs" / "bench"
TASKS = {
    "mnist": ["task=mnist", "partition=iid"],
    # CPU budget of a 2-core machine: every 32nd training window (~180 per site
    # instead of ~720) and 50 sites scored per round (default 200); see the README
    "workload": ["task=workload", "task.train_stride=32", "task.eval_sites=50"],
}
console = Console(width=200)  # tables are read from logs too


def run_one(task: str, clients: int, rounds: int, fraction: float, env: dict[str, str], out: Path,
            timeout_s: float, extra: list[str] = ()) -> dict:
    """One launcher run with its process tree sampled; its measurements."""
    log = out / f"{task}-{clients}.outcome.jsonl"
    overrides = [*TASKS[task], f"clients.num={clients}", f"clients.fraction_train={fraction}",
                 f"num_rounds={rounds}", "tracking.log_model=false", "checkpoint.enabled=false",
                 f"tracking.run_name=scale-{task}-{clients}"]
    replaced = {o.split("=", 1)[0] for o in extra}  # --overrides replace the task's bench settings
    overrides = [o for o in overrides if o.split("=", 1)[0] not in replaced] + list(extra)
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "fl_server.launch", *overrides], cwd=PROJECT_DIR,
                            env={**env, OUTCOME_LOG_ENV: str(log)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    with TreeSampler(proc.pid) as sampler:
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.terminate()  # the launcher stops its SuperLink, simulation and Ray on SIGTERM
            code = proc.wait(timeout=120)
    wall = time.time() - started
    outcome = json.loads(log.read_text().splitlines()[-1]) if log.exists() and log.read_text().strip() else {}
    peak = sampler.peak("pss_mb")
    peak_rss = sampler.peak("rss_mb")
    result = {
        "task": task, "clients": clients, "exit": code, "ok": bool(outcome.get("ok")), "wall_s": wall,
        "status": outcome.get("status", "no outcome"), "mlflow_run_id": outcome.get("mlflow_run_id"),
        "peak_pss_mb": peak.pss_mb if peak else float("nan"),
        "peak_rss_mb": peak_rss.rss_mb if peak_rss else float("nan"),
        "peak_by_role_pss_mb": peak.by_role if peak else {},
        "max_processes": max((s.processes for s in sampler.samples), default=0),
        "samples": [s.__dict__ for s in sampler.samples],
    }
    result.update(_from_mlflow(env["MLFLOW_TRACKING_URI"], result["mlflow_run_id"]))
    return result


def _from_mlflow(uri: str, run_id: str | None) -> dict:
    """Per-round times and the number of metric series, from the run's MLflow record."""
    if not run_id:
        return {}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    rounds = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "round_wall_time_s"))
    sampled = [m.value for m in client.get_metric_history(run_id, "clients_sampled")]
    later = [v for step, v in rounds if step >= 2] or [v for _, v in rounds]
    return {
        "round_s": [v for _, v in rounds],
        "round_mean_s": statistics.fmean(later) if later else float("nan"),
        "round_median_s": statistics.median(later) if later else float("nan"),
        "round1_s": rounds[0][1] if rounds else float("nan"),
        "discover_s": run.data.metrics.get("discover_partitions_s", float("nan")),
        "sampled_per_round": statistics.fmean(sampled) if sampled else float("nan"),
        "metric_series": len(run.data.metrics),
        "final": {k: v for k, v in run.data.metrics.items() if k.startswith("final_")},
    }


def growth(rows: list[dict], key: str) -> str:
    """``a -> b (xk)`` between consecutive sizes of one task."""
    parts = []
    for before, after in zip(rows, rows[1:]):
        ratio = after[key] / before[key] if before.get(key) else float("nan")
        parts.append(f"{before['clients']}->{after['clients']}: x{ratio:.2f}")
    return ", ".join(parts)


def report(results: list[dict], out: Path, rounds: int) -> str:
    table = Table(title=f"scale: {rounds} rounds, 10 % of the clients per round (>= 2)", title_justify="left")
    header = ["task", "clients", "sampled/round", "ok", "peak PSS MB", "peak RSS MB", "round s (mean r2..)",
              "s per sampled client", "round 1 s", "discovery s", "whole run s", "MLflow series"]
    for column in header:
        table.add_column(column, justify="left" if column in ("task", "ok") else "right")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r["task"], str(r["clients"]), f"{r.get('sampled_per_round', float('nan')):.0f}",
                 "yes" if r["ok"] else f"no ({r['status']})", f"{r['peak_pss_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
                 f"{r.get('round_mean_s', float('nan')):.2f}",
                 f"{r.get('round_mean_s', float('nan')) / r.get('sampled_per_round', float('nan')):.3f}",
                 f"{r.get('round1_s', float('nan')):.2f}",
                 f"{r.get('discover_s', float('nan')):.1f}", f"{r['wall_s']:.0f}", str(r.get("metric_series", "-"))]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    text = "\n".join(lines) + "\n\n"
    for task in dict.fromkeys(r["task"] for r in results):
        rows = [r for r in results if r["task"] == task and r["ok"]]
        if len(rows) > 1:
            text += (f"* {task}: peak PSS {growth(rows, 'peak_pss_mb')}; round time {growth(rows, 'round_mean_s')}; "
                     f"discovery {growth(rows, 'discover_s')}\n")
    peak_roles = "\n".join(
        f"* {r['task']} {r['clients']}: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(
            r["peak_by_role_pss_mb"].items(), key=lambda kv: -kv[1])) for r in results)
    text += "\nPSS (MB) by process at the peak:\n" + peak_roles + "\n"
    console.print(text, markup=False, highlight=False)
    (out / "report.md").write_text(text)
    _plot(results, out / "scale.png", rounds)
    return text


def _plot(results: list[dict], path: Path, rounds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, wall) = plt.subplots(1, 2, figsize=(10, 4))
    for task in dict.fromkeys(r["task"] for r in results):
        rows = [r for r in results if r["task"] == task and r["ok"]]
        if not rows:
            continue
        sizes = [r["clients"] for r in rows]
        (line,) = mem.plot(sizes, [r["peak_pss_mb"] / 1024 for r in rows], marker="o", label=f"{task} PSS")
        mem.plot(sizes, [r["peak_rss_mb"] / 1024 for r in rows], marker=".", ls=":", color=line.get_color(),
                 label=f"{task} RSS (sums shared pages per process)")
        wall.plot(sizes, [r["round_mean_s"] for r in rows], marker="o", color=line.get_color(), label=task)
    for ax in (mem, wall):
        ax.set_xscale("log")
        ax.set_xlabel("virtual clients (10 % sampled per round)")
        ax.grid(alpha=0.3)
        ax.legend()
    mem.set_ylabel("peak memory of the process tree (GiB)")
    wall.set_ylabel(f"wall time per round, mean of rounds 2..{rounds} (s)")
    fig.suptitle("fedcontinuum at 10 -> 1,000 virtual clients (2 shared CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 and 100 clients only")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--timeout", type=float, default=3600.0, help="per run, seconds")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides for every run")
    parser.add_argument("--report", metavar="DIR", help="only rebuild the table and plot from DIR/results.json")
    args = parser.parse_args(argv)
    if args.report:
        results = json.loads((Path(args.report) / "results.json").read_text())
        report(results, Path(args.report), args.rounds)
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes = [s for s in sizes if s <= 100]
    tasks = [t for t in args.tasks.split(",") if t]
    if set(tasks) - set(TASKS):
        console.print(f"[red]error:[/red] --tasks: choose from {', '.join(TASKS)}")
        return 2
    out = OUT_DIR / f"scale-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    store = Path(tempfile.mkdtemp(prefix="fc-bench-mlflow-"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "COLUMNS": "200"}
    results = []
    for task in tasks:
        for clients in sizes:
            console.print(f"[bold]{task}[/bold] clients.num={clients} …")
            result = run_one(task, clients, args.rounds, args.fraction, env, out, args.timeout, args.overrides)
            console.print(f"  {'ok' if result['ok'] else 'FAILED: ' + result['status']}, {result['wall_s']:.0f} s, "
                          f"peak PSS {result['peak_pss_mb']:.0f} MB")
            results.append(result)
            (out / "results.json").write_text(json.dumps(results, default=float))
    report(results, out, args.rounds)
    console.print(f"raw data: {out}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
