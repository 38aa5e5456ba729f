"""Per-job fixed cost: a sweep's jobs on one shared Ray vs separate launcher runs.

    python -m scripts.bench.sweep_startup [--jobs 6] [--rounds 1] [--clients 2] [--arms separate,sweep,sweep-own-ray]

The same ``--jobs`` tiny jobs (MNIST 5k, ``--clients`` clients, ``--rounds``
rounds, seeds 0..jobs-1) are run three ways, one after another, in one
invocation of this script:

* ``separate``: ``python -m fl_server.launch seed=k ...`` once per job (each
  its own Python, SuperLink and Ray), the way a user scripts single runs;
* ``sweep``: ``python -m scripts.sweep --multirun seed=0,...`` (one SuperLink
  and, by default, one private Ray head that every job's simulation joins);
* ``sweep-own-ray``: the same sweep with ``simulation.shared_ray=false`` (one
  SuperLink, but every job's simulation starts its own Ray, as before).

Every job appends its outcome (``FEDCONTINUUM_OUTCOME_LOG``) with its
timeline: when the job began, ``flwr run`` was launched and had started the
run, the ServerApp's process started (``flwr-simulation``), its ``main()``
was entered, the server had its data, model and round-0 evaluation, every
client's actor had answered the node-discovery query, the last round ended,
the ``flwr run`` stream ended and the final status was known. A job's
**fixed cost** is its whole time minus its rounds (discovery -> last round).
For ``separate`` the whole time is the command's (Python start-up and the
launcher's imports, the SuperLink stop and exit included); for the sweeps it
is from the job's start to the next job's start (Hydra's bookkeeping between
jobs included; the last job: to the sweep's exit minus its report).

The tree of the benchmarked command is sampled every 0.5 s (``/proc``): the
CPU seconds all its processes used per job (a measure that, unlike wall time,
does not depend much on what else runs on the machine), and how
long after a sweep job's end its ClientApp actor processes are gone shows
whether a finished job released its actors before the next one needed them
(Ray kills a job's actors when its driver, the job's ``flwr-simulation``, exits).

Prints one table of per-job fixed costs and one of where they go, and writes
everything (raw outcomes, samples) to ``outputs/bench/sweep_startup-<time>/``.
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
ARMS = ("separate", "sweep", "sweep-own-ray")
# (label, from mark, to mark) of a job's timeline; see the module docstring
PHASES = (
    ("command start-up (Python, launcher imports)", "command_start", "began_at"),
    ("config + data check + SuperLink start (+ Ray head)", "began_at", "submitted_at"),
    ("flwr run: CLI start, FAB, submit", "submitted_at", "started_at"),
    ("flwr-simulation process launched", "started_at", "process_start"),
    ("flwr-simulation + ServerApp imports", "process_start", "serverapp_main"),
    ("server set-up: config, data, model, round-0 eval", "serverapp_main", "round0_done"),
    ("Ray init/join + actors + ClientApp imports + QUERY", "round0_done", "nodes_discovered"),
    ("rounds (not fixed cost)", "nodes_discovered", "last_round_done"),
    ("run end: report, MLflow, Ray shutdown, stream end", "last_round_done", "ended_at"),
    ("status check (+ SuperLink stop, exit, Hydra)", "ended_at", "job_end"),
)
console = Console(width=200)  # tables are read from logs too


def job_overrides(rounds: int, clients: int) -> list[str]:
    return [f"num_rounds={rounds}", f"clients.num={clients}", "tracking.log_model=false", "checkpoint.enabled=false"]


def run_command(command: list[str], outcome_log: Path, env: dict[str, str],
                timeout_s: float) -> tuple[float, float, int, TreeSampler]:
    """Run ``command`` (own process group) with its tree sampled; returns (start, end, exit code, sampler)."""
    started = time.time()
    proc = subprocess.Popen(command, cwd=PROJECT_DIR, env={**env, OUTCOME_LOG_ENV: str(outcome_log)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    with TreeSampler(proc.pid) as sampler:
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.terminate()  # SIGTERM: the launcher / sweep stops what it started
            code = proc.wait(timeout=60)
    return started, time.time(), code, sampler


def read_outcomes(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def timelines(arm: str, outcomes: list[dict], starts: list[float], ends: list[float]) -> list[dict[str, float]]:
    """Per job: every mark of PHASES (epoch s)."""
    rows = []
    for k, o in enumerate(outcomes):
        row = {key: float(o[key]) for key in ("began_at", "submitted_at", "started_at", "ended_at", "settled_at")}
        row.update({key: float(v) for key, v in o.get("timeline", {}).items() if isinstance(v, (int, float))})
        row.setdefault("last_round_done", row.get("round1_done", float("nan")))
        if arm == "separate":
            row["command_start"], row["job_end"] = starts[k], ends[k]
        else:
            row["command_start"] = row["began_at"]
            row["job_end"] = outcomes[k + 1]["began_at"] if k + 1 < len(outcomes) else row["settled_at"]
        rows.append(row)
    return rows


def job_cpu_s(arm: str, rows: list[dict[str, float]], samplers: list[TreeSampler]) -> list[float]:
    """CPU seconds of every process of each job (its rounds included), from the sampled trees.

    ``separate``: one tree per job, the whole command; sweeps: the sweep's
    tree between the job's start and the next job's start (the last: its end)."""
    if arm == "separate":
        return [max((s.cpu_s for s in sampler.samples), default=float("nan")) for sampler in samplers]
    (sampler,) = samplers
    return [sampler.cpu_at(row["job_end"]) - sampler.cpu_at(row["command_start"]) for row in rows]


def fixed_cost(row: dict[str, float]) -> float:
    return (row["job_end"] - row["command_start"]) - (row["last_round_done"] - row["nodes_discovered"])


def actor_release_s(rows: list[dict[str, float]], sampler: TreeSampler) -> list[float]:
    """Per job but the last: seconds from the end of its run's stream until none of its
    ClientApp actor processes is alive (nan: still alive when the next job's actors came up)."""
    out = []
    for k in range(len(rows) - 1):
        after = [s for s in sampler.samples if s.at >= rows[k]["ended_at"]]
        gone = next((s.at for s in after if s.actors == 0), None)
        out.append(float("nan") if gone is None or gone > rows[k + 1]["nodes_discovered"] else gone - rows[k]["ended_at"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench.sweep_startup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per command, seconds")
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = set(arms) - set(ARMS)
    if unknown:
        console.print(f"[red]error:[/red] unknown arm(s) {', '.join(sorted(unknown))}: use {', '.join(ARMS)}")
        return 2
    out = OUT_DIR / f"sweep_startup-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    store = Path(tempfile.mkdtemp(prefix="fc-bench-mlflow-"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "COLUMNS": "200"}
    overrides = job_overrides(args.rounds, args.clients)
    seeds = list(range(args.jobs))
    results: dict[str, dict] = {}
    for arm in arms:
        log = out / f"{arm}.outcomes.jsonl"
        console.print(f"[bold]{arm}[/bold]: {args.jobs} jobs …")
        starts, ends, samples, codes, samplers = [], [], [], [], []
        began = time.time()
        if arm == "separate":
            for seed in seeds:
                s, e, code, sampler = run_command([sys.executable, "-m", "fl_server.launch", *overrides, f"seed={seed}"],
                                                  log, env, args.timeout)
                starts.append(s), ends.append(e), codes.append(code), samples.extend(sampler.samples)
                samplers.append(sampler)
            sweep_sampler = None
        else:
            command = [sys.executable, "-m", "scripts.sweep", "--multirun", *overrides,
                       "seed=" + ",".join(map(str, seeds)), f"hydra.sweep.dir={out / arm / 'multirun'}"]
            if arm == "sweep-own-ray":
                command.append("simulation.shared_ray=false")
            s, e, code, sweep_sampler = run_command(command, log, env, args.timeout)
            starts, ends, codes, samples, samplers = [s], [e], [code], sweep_sampler.samples, [sweep_sampler]
        outcomes = read_outcomes(log)
        rows = timelines(arm, outcomes, starts, ends)
        results[arm] = {
            "wall_s": time.time() - began, "exit_codes": codes, "ok": [o["ok"] for o in outcomes],
            "rows": rows, "fixed_s": [fixed_cost(r) for r in rows],
            "rounds_s": [r["last_round_done"] - r["nodes_discovered"] for r in rows],
            "cpu_s": job_cpu_s(arm, rows, samplers),
            "actor_release_s": actor_release_s(rows, sweep_sampler) if sweep_sampler else [],
            "peak_pss_mb": max((x.pss_mb for x in samples), default=float("nan")),
        }
        if arm != "separate":
            results[arm]["sweep_command_s"] = ends[0] - starts[0]
        console.print(f"  done in {results[arm]['wall_s']:.0f} s, exit {codes}, jobs ok {results[arm]['ok']}")
        (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
        (out / f"{arm}.samples.json").write_text(json.dumps([x.__dict__ for x in samples], default=float))
    report(results, args, out)
    return 0 if all(all(r["ok"]) and len(r["ok"]) == args.jobs for r in results.values()) else 1


def _mean(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.fmean(values) if values else float("nan")


def report(results: dict[str, dict], args, out: Path) -> None:
    table = Table(title=f"per-job fixed cost, {args.jobs} jobs of {args.rounds} round(s) x {args.clients} clients (s)",
                  title_justify="left")
    for column in ("arm", "job 1", "jobs 2..n (mean)", "min..max 2..n", "rounds (mean)", "whole arm",
                   "vs separate (jobs 2..n)", "CPU s per job 2..n (all processes)", "actors released (s after job end)",
                   "peak PSS MB"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    base = _mean(results.get("separate", {}).get("fixed_s", [float("nan")])[1:])
    lines = ["| arm | job 1 | jobs 2..n (mean) | min..max 2..n | rounds (mean) | whole arm | vs separate | "
             "CPU s per job 2..n | actors released (s after job end) | peak PSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, r in results.items():
        fixed, later = r["fixed_s"], r["fixed_s"][1:]
        cells = [arm, f"{fixed[0]:.1f}" if fixed else "-", f"{_mean(later):.1f}",
                 f"{min(later):.1f}..{max(later):.1f}" if later else "-", f"{_mean(r['rounds_s']):.1f}",
                 f"{r['wall_s']:.0f}", f"{_mean(later) / base:.2f}x" if base == base and later else "-",
                 f"{_mean(r.get('cpu_s', [float('nan')])[1:]):.1f}",
                 " ".join(f"{x:.1f}" for x in r["actor_release_s"]) or "-", f"{r['peak_pss_mb']:.0f}"]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    phases = Table(title="where a job's fixed cost goes (mean over jobs 2..n, s)", title_justify="left")
    phases.add_column("phase")
    for arm in results:
        phases.add_column(arm, justify="right")
    md = ["| phase | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for label, start, end in PHASES:
        cells = []
        for r in results.values():
            later = r["rows"][1:] or r["rows"]
            cells.append(f"{_mean([row.get(end, float('nan')) - row.get(start, float('nan')) for row in later]):.1f}")
        phases.add_row(label, *cells)
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    console.print(phases)
    text = "\n".join(lines) + "\n\n" + "\n".join(md) + "\n"
    (out / "report.md").write_text(text)
    console.print(f"raw data and report.md: {out}")


if __name__ == "__main__":
    sys.exit(main())
