"""MA-FL study: heuristic, forecast-MPC, non-federated MARL and federated agents in the twin.

    .venv/bin/python -m scripts.rl_study [--algo ppo|qmix] [--seeds 0 1 2] [--arms mafl marl noshield nofc]
        [--rounds 6] [--steps 256] [--episode-s 288] [--clients 12]
        [--forecaster seasonal-naive|federated:<run id>] [extra Hydra overrides ...]

is one Hydra multirun of real Flower simulations (one job per arm x seed,
each on Ray, one MLflow parent run for the study)::

    python -m scripts.sweep --multirun task=ppo strategy=fedavgm +arm=mafl,marl,noshield,nofc seed=0,1,2 ...

The arms are the ``conf/arm`` group: ``mafl`` (the task as configured),
``marl`` (no aggregation), ``noshield``, ``nofc`` (no forecast in the
observations), ``vdn`` (QMIX only), ``ph`` (PPO personal head), and paper
001's control hierarchy (:mod:`edgesim.control`): ``ctl`` (ESA/COA
cadences, auction pricing, context modes), ``noprice``, ``costcap``,
``hybrid`` (ctl + the MPC's plan as an action prior); with ``ctl`` in the
sweep the report adds a Table-5-style table relative to ``ctl`` with the
control plane's CPU per twin step. Every job
ends by scoring its deployed agents under the paper-000 fault scenarios and
the heuristic / forecast-MPC baselines on its held-out seeds
(:mod:`tasks.rl.evaluation`), so the study report is a read of the
sweep's child runs. When the sweep ends its parent run gets the report:
paper-001 Tables 1-3 metrics (mean ± sd over seeds; bars in
``report/methods.png``), the Table 5 ablations as deltas against MA-FL with
rounds to 95 % of best, the paper-000 Table 3 fault scenarios (bars in
``report/fault_scenarios.png``), and learning curves
(``report/learning_curves.png``). The report alone, for any RL
sweep's parent run::

    .venv/bin/python -m scripts.rl_study --report PARENT_RUN_ID [MORE_PARENT_RUN_IDS ...]

(several parents: e.g. a later sweep that adds an arm; one set of tables).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.rl.evaluation import FAULTS

ARM_TITLES = {"heuristic": "Heuristic (HPA + FFD)", "mpc": "Forecast-only MPC", "mafl": "MA-FL (ours)",
              "marl": "Non-federated MARL", "mafl-noshield": "MA-FL, no shield", "mafl-nofc": "MA-FL, no forecaster",
              "mafl-vdn": "MA-FL, VDN mixer", "mafl-ph": "MA-FL, personal head",
              "mafl-ctl": "MA-FL + control hierarchy (ctl)", "mafl-ctl-noprice": "ctl, no pricing/auction",
              "mafl-ctl-costcap": "ctl, cost-cap mode", "mafl-ctl-hybrid": "ctl + MPC prior (hybrid)"}
ABLATIONS = (("marl", "No FL (MARL only)"), ("mafl-noshield", "No safety shield"), ("mafl-nofc", "No forecaster"),
             ("mafl-vdn", "VDN instead of QMIX"), ("mafl-ph", "Personal head"), ("mafl", "MA-FL (ours)"))
# paper 001's control hierarchy (+arm=ctl,noprice,costcap,hybrid): Table 5 rows relative to ctl
CONTROL_ABLATIONS = (("mafl-ctl-noprice", "No pricing/auction"), ("mafl-ctl-costcap", "Cost-cap mode"),
                     ("mafl-ctl-hybrid", "Hybrid RL + MPC prior"), ("mafl", "No hierarchy (MA-FL)"),
                     ("mafl-ctl", "ctl (cadences + pricing + modes)"))
PER_SERVED = ("energy_j_per_request", "cost_per_1k_usd", "p95_ms", "p99_ms")  # undefined when nothing was served
COLUMNS = (  # (key, title, scale, decimals)
    ("gpu_util", "GPU util. (%)", 100.0, 1), ("cpu_util", "CPU util. (%)", 100.0, 1),
    ("fragmentation", "Fragm. (%)", 100.0, 1), ("p95_ms", "p95 (ms)", 1.0, 0), ("p99_ms", "p99 (ms)", 1.0, 0),
    ("slo_violation_rate", "SLO viol. (%)", 100.0, 1), ("throughput_rps", "Thr. (req/s)", 1.0, 1),
    ("energy_j_per_request", "J/req", 1.0, 3), ("cost_per_1k_usd", "$/1k req", 1.0, 4),
    ("return", "Return", 1.0, 1), ("shield_interventions", "Shield int.", 1.0, 0),
)
CURVES = (("eval_return", "episode return"), ("eval_slo_violation_rate", "SLO violation rate"),
          ("eval_shield_interventions", "shield interventions"))
FAULT_ARMS = ("heuristic", "mafl", "marl", "mafl-ctl", "mafl-ctl-noprice", "mafl-ctl-costcap",
              "mafl-ctl-hybrid")  # rows of the fault table, where present
METHOD_BARS = (  # panels of report/methods.png: (key, label, scale)
    ("slo_violation_rate", "SLO violations (%)", 100.0), ("p95_ms", "p95 latency (ms)", 1.0),
    ("energy_j_per_request", "energy (J/request)", 1.0), ("cost_per_1k_usd", "cost ($ per 1k requests)", 1.0),
)


# ------------------------------------------------------------- the sweep


def study_overrides(args: argparse.Namespace) -> list[str]:
    """The Hydra multirun overrides of a study."""
    # seeds outermost: Hydra's sweeper varies the first override slowest, so a sweep cut short
    # still has every arm for the seeds it finished
    return [
        f"task={args.algo}", "strategy=fedavgm", f"seed={','.join(map(str, args.seeds))}", f"+arm={','.join(args.arms)}",
        f"clients.num={args.clients}", f"clients.min_train={args.clients}", f"num_rounds={args.rounds}",
        f"task.steps_per_round={args.steps}", f"task.episode_s={args.episode_s:g}",
        f"task.forecaster={args.forecaster}", f"tracking.experiment={args.experiment}",
        *args.overrides,
    ]  # fmt: skip


def newest_sweep_parent(uri: str, experiment: str, since_ms: int) -> str | None:
    """The parent run a sweep started after ``since_ms`` (the Hydra callback creates it)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"tags.`fc.kind` = 'sweep' and attributes.start_time >= {since_ms}",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


# ------------------------------------------------------------- the report


def is_rl_sweep(client, parent_run_id: str) -> bool:
    return not study_runs(client, parent_run_id, max_results=1).empty


def study_runs(client, parent_run_id: str, max_results: int = 10_000):
    """The finished RL child runs of a sweep: arm, seed, run id and all final metrics."""
    from fl_server.experiments.tracking import PARENT_TAG

    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.kind = 'rl' and attributes.status = 'FINISHED'",
                              max_results=max_results)
    return pd.DataFrame([{"arm": r.data.tags["arm"], "seed": r.data.tags.get("seed", ""), "run_id": r.info.run_id,
                          "algo": r.data.tags.get("algo", ""), **r.data.metrics} for r in runs])


def arm_results(runs) -> dict[str, list[dict[str, float]]]:
    """Per arm, one dict of Tables 1-3 metrics per seed; the baselines come from the MA-FL runs
    (same held-out seeds), or from every run when there is no MA-FL arm."""
    results: dict[str, list[dict[str, float]]] = {}
    source = runs[runs["arm"] == "mafl"] if (runs["arm"] == "mafl").any() else runs.drop_duplicates("seed")
    for baseline in ("heuristic", "mpc"):
        if f"baseline_{baseline}_return" in runs:
            results[baseline] = [{key: row.get(f"baseline_{baseline}_{key}", np.nan) for key, *_ in COLUMNS}
                                 for _, row in source.sort_values("seed").iterrows()]
    order = [a for a, _ in ABLATIONS[::-1]] + [a for a, _ in CONTROL_ABLATIONS[::-1] if a != "mafl"]
    for arm in [a for a in order if a in set(runs["arm"])] + sorted(set(runs["arm"]) - set(ARM_TITLES)):
        results[arm] = [{**{key: row.get(f"eval_{key}", np.nan) for key, *_ in COLUMNS},
                         "served": row.get("eval_served", np.nan), "control_cpu_us": row.get("eval_control_cpu_us", np.nan),
                         "rounds_to_95pct_best": row.get("final_rounds_to_95pct_best", np.nan)}
                        for _, row in runs[runs["arm"] == arm].sort_values("seed").iterrows()]
    return results


def served_values(runs: list[dict[str, float]], key: str, scale: float = 1.0) -> list[float]:
    """A per-request measure over the seeds that served something (an episode that served
    nothing has no J/request: the twin would divide by ~0); all seeds for other measures."""
    if key not in PER_SERVED:
        return [r[key] * scale for r in runs]
    return [r[key] * scale for r in runs if not r.get("served", np.nan) == 0]


def fault_results(runs) -> dict[str, list[dict[str, dict[str, float]]]]:
    """Per arm (heuristic, MA-FL, MARL), per seed, the Table 3 measures of each fault scenario."""
    out: dict[str, list] = {}
    source = runs[runs["arm"] == "mafl"] if (runs["arm"] == "mafl").any() else runs.drop_duplicates("seed")
    prefixes = [("heuristic", source, "baseline_heuristic_fault_")]
    prefixes += [(arm, runs[runs["arm"] == arm], "fault_") for arm in FAULT_ARMS[1:] if (runs["arm"] == arm).any()]
    for arm, rows, prefix in prefixes:
        if f"{prefix}none_completion" not in runs:
            continue
        out[arm] = [{name: {m: row.get(f"{prefix}{name}_{m}", np.nan)
                            for m in ("completion", "drift", "response_ms", "slo_violation_rate")} for name in FAULTS}
                    for _, row in rows.sort_values("seed").iterrows()]
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def main_table(results: dict[str, list[dict[str, float]]]) -> str:
    """Paper 001 Tables 1-3: mean ± sd over seeds, one row per method."""
    lines = ["| Method | " + " | ".join(t for _, t, _, _ in COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for arm, runs in results.items():
        cells = []
        for key, _, scale, decimals in COLUMNS:
            values = served_values(runs, key, scale)
            if not values:
                cells.append("–")  # nothing served in any seed
                continue
            m, s = mean_sd(values)
            cells.append(f"{m:.{decimals}f} ± {s:.{decimals}f}")
        lines.append(f"| {ARM_TITLES.get(arm, arm)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(results: dict[str, list[dict[str, float]]]) -> str:
    """Paper 001 Table 5: mean over seeds, as deltas against MA-FL."""
    if "mafl" not in results:
        return "_no MA-FL arm: nothing to compare against_"
    base = {k: np.mean([r[k] for r in results["mafl"]]) for k in ("p95_ms", "energy_j_per_request", "slo_violation_rate")}
    lines = ["| Variant | Δp95 vs MA-FL (ms) | ΔEnergy (J/req) | Violations (Δ% rel.) | Rounds to 95 % of best |",
             "|---|---|---|---|---|"]
    for arm, title in ABLATIONS:
        if arm not in results:
            continue
        runs = results[arm]
        d95 = np.mean([r["p95_ms"] for r in runs]) - base["p95_ms"]
        de = np.mean([r["energy_j_per_request"] for r in runs]) - base["energy_j_per_request"]
        viol = np.mean([r["slo_violation_rate"] for r in runs])
        rel = 100.0 * (viol / base["slo_violation_rate"] - 1.0) if base["slo_violation_rate"] > 0 else float("nan")
        r95 = mean_sd([r["rounds_to_95pct_best"] for r in runs])
        lines.append(f"| {title} | {d95:+.0f} | {de:+.3f} | {rel:+.0f} % | {r95[0]:.1f} ± {r95[1]:.1f} |")
    return "\n".join(lines)


def control_table(results: dict[str, list[dict[str, float]]]) -> str:
    """Paper 001 Table 5 for the control hierarchy: deltas against ctl, and the control plane's CPU
    per twin step (the policy's act + observations + auctions + MPC) with its ratio to MA-FL's."""
    if "mafl-ctl" not in results:
        return "_no ctl arm: nothing to compare against_"
    base = {k: np.mean(served_values(results["mafl-ctl"], k) or [np.nan])
            for k in ("p95_ms", "energy_j_per_request", "slo_violation_rate")}
    off_cpu = np.mean([r["control_cpu_us"] for r in results["mafl"]]) if "mafl" in results else np.nan
    lines = ["| Variant | Δp95 vs ctl (ms) | ΔEnergy (J/req) | Violations (Δ% rel.) | Rounds to 95 % of best "
             "| Control CPU (µs/step) | CPU vs MA-FL |", "|---|---|---|---|---|---|---|"]
    for arm, title in CONTROL_ABLATIONS:
        if arm not in results:
            continue
        runs = results[arm]
        p95, energy = (np.mean(served_values(runs, k) or [np.nan]) for k in ("p95_ms", "energy_j_per_request"))
        viol = np.mean([r["slo_violation_rate"] for r in runs])
        rel = 100.0 * (viol / base["slo_violation_rate"] - 1.0) if base["slo_violation_rate"] > 0 else float("nan")
        r95 = mean_sd([r["rounds_to_95pct_best"] for r in runs])
        cpu = np.mean([r["control_cpu_us"] for r in runs])
        d95 = "–" if np.isnan(p95) else f"{p95 - base['p95_ms']:+.0f}"
        de = "–" if np.isnan(energy) else f"{energy - base['energy_j_per_request']:+.3f}"
        lines.append(f"| {title} | {d95} | {de} | {rel:+.0f} % | {r95[0]:.1f} ± {r95[1]:.1f} | {cpu:.0f} "
                     f"| {cpu / off_cpu:.2f}x |")
    return "\n".join(lines)


def fault_table(faults: dict[str, list[dict[str, dict[str, float]]]]) -> str:
    """Paper 000 Table 3: mean ± sd over seeds per method and fault scenario."""
    lines = ["| Method | Fault | Task completion (%) | Policy drift (TV) | Response time (ms) | SLO viol. (%) |",
             "|---|---|---|---|---|---|"]
    for arm, per_seed in faults.items():
        for name in FAULTS:
            c = mean_sd([100 * s[name]["completion"] for s in per_seed])
            d = mean_sd([s[name]["drift"] for s in per_seed])
            r = mean_sd([s[name]["response_ms"] for s in per_seed])
            v = mean_sd([100 * s[name]["slo_violation_rate"] for s in per_seed])
            lines.append(f"| {ARM_TITLES.get(arm, arm)} | {name} | {c[0]:.2f} ± {c[1]:.2f} | {d[0]:.3f} ± {d[1]:.3f} "
                         f"| {r[0]:.0f} ± {r[1]:.0f} | {v[0]:.1f} ± {v[1]:.1f} |")
    return "\n".join(lines)


def learning_curves(client, runs) -> dict[str, dict[str, np.ndarray]]:
    """Per arm and curve, the per-round values (seeds x rounds) from the runs' metric histories."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for arm, rows in runs.groupby("arm"):
        out[arm] = {}
        for key, _ in CURVES:
            series = [[m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
                      for run_id in rows["run_id"]]
            rounds = min(len(s) for s in series)
            out[arm][key] = np.array([s[:rounds] for s in series])
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve_figure(curves: dict[str, dict[str, np.ndarray]]):
    """Per-round evaluation curves of every arm (mean over seeds)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(13, 3.6))
    for ax, (key, label) in zip(axes, CURVES):
        for arm, per_key in curves.items():
            values = per_key[key]
            ax.plot(values.mean(axis=0), marker="o", label=ARM_TITLES.get(arm, arm))
        ax.set_xlabel("round")
        ax.set_ylabel(f"{label} (mean over seeds)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def error_bars(stats: list[tuple[float, float]]) -> list[list[float]]:
    """± sd, but not below zero: none of the plotted measures can be negative."""
    return [[min(sd, mean) for mean, sd in stats], [sd for _, sd in stats]]


def methods_figure(results: dict[str, list[dict[str, float]]]):
    """Tables 1-3 as bars: one panel per headline metric, mean ± sd over seeds per method."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(METHOD_BARS), figsize=(14, 3.8))
    names = [ARM_TITLES.get(arm, arm) for arm in results]
    for ax, (key, label, scale) in zip(axes, METHOD_BARS):
        stats = [mean_sd([r[key] * scale for r in runs]) for runs in results.values()]
        ax.bar(range(len(stats)), [m for m, _ in stats], yerr=error_bars(stats), capsize=3, color="C0")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def faults_figure(faults: dict[str, list[dict[str, dict[str, float]]]]):
    """Table 3 as grouped bars: task completion and response time per fault scenario and method."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
    width = 0.8 / max(len(faults), 1)
    for ax, (measure, label, scale) in zip(axes, (("completion", "task completion (%)", 100.0),
                                                  ("response_ms", "mean response time (ms)", 1.0))):
        for i, (arm, per_seed) in enumerate(faults.items()):
            stats = [mean_sd([scale * s[name][measure] for s in per_seed]) for name in FAULTS]
            ax.bar([j + i * width for j in range(len(FAULTS))], [m for m, _ in stats], width,
                   yerr=error_bars(stats), capsize=2, label=ARM_TITLES.get(arm, arm))
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(FAULTS))], FAULTS)
        ax.set_xlabel("fault scenario")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def report(client, parent_run_ids: str | list[str]) -> str:
    """The study's markdown report from the RL child runs of one or more sweeps (e.g. a later sweep
    that adds an arm), logged (with the plot) to the first sweep's parent run."""
    parents = [parent_run_ids] if isinstance(parent_run_ids, str) else list(parent_run_ids)
    parent_run_id = parents[0]
    runs = pd.concat([study_runs(client, p) for p in parents], ignore_index=True)
    if runs.empty:
        return f"_no finished RL runs under parent {', '.join(parents)}_"
    results, faults = arm_results(runs), fault_results(runs)
    seeds = runs.groupby("arm")["seed"].nunique()
    text = "\n\n".join([
        f"# RL study ({', '.join(sorted(set(runs['algo'])))}; seeds per arm: "
        + ", ".join(f"{arm} {n}" for arm, n in seeds.items()) + f"; MLflow parent {', '.join(parents)})",
        "## Paper 001 Tables 1-3 (final deployed policies, held-out twin seeds)", main_table(results),
        "## Paper 001 Table 5 ablations", ablation_table(results),
        *(["## Paper 001 Table 5, control hierarchy (relative to ctl)", control_table(results)]
          if "mafl-ctl" in results else []),
        "## Paper 000 Table 3 fault scenarios", fault_table(faults),
    ])
    if len(parents) > 1:
        client.set_tag(parent_run_id, "fc.report_includes", " ".join(parents[1:]))
    client.log_text(parent_run_id, text, "report/rl_study.md")
    client.log_figure(parent_run_id, curve_figure(learning_curves(client, runs)), "report/learning_curves.png")
    client.log_figure(parent_run_id, methods_figure(results), "report/methods.png")
    if faults:
        client.log_figure(parent_run_id, faults_figure(faults), "report/fault_scenarios.png")
    return text


# ------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.rl_study", description=__doc__.splitlines()[0])
    parser.add_argument("--algo", default="ppo", choices=("ppo", "qmix"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=None, help="conf/arm names (default: mafl marl noshield nofc, "
                        "+ vdn for qmix)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=256, help="environment steps per client per round")
    parser.add_argument("--episode-s", type=float, default=288.0)
    parser.add_argument("--clients", type=int, default=None, help="default: 12 sites (ppo), 3 clusters (qmix)")
    parser.add_argument("--forecaster", default="seasonal-naive",
                        help="seasonal-naive | federated:<MLflow run id of a task=bitbrains run>")
    parser.add_argument("--experiment", default="fedcontinuum-rl-study")
    parser.add_argument("--report", metavar="PARENT_RUN_ID", nargs="+",
                        help="only write the report of RL sweeps (several: one table, logged to the first)")
    parser.add_argument("--out", default="reports")
    parser.add_argument("overrides", nargs="*", help="further Hydra overrides for every job")
    args = parser.parse_args(argv)

    from mlflow.tracking import MlflowClient

    from fl_server.experiments.config import default_tracking_uri

    uri = default_tracking_uri()
    parents = args.report
    if parents is None:
        args.arms = args.arms or (["mafl", "marl", "noshield", "nofc"] + (["vdn"] if args.algo == "qmix" else []))
        args.clients = args.clients or (12 if args.algo == "ppo" else 3)
        started_ms = int(time.time() * 1000)
        command = [sys.executable, "-m", "scripts.sweep", "--multirun", *study_overrides(args)]
        print("$", " ".join(command), flush=True)
        code = subprocess.call(command)  # the sweep's callback logs the report to its parent run
        parent = newest_sweep_parent(uri, args.experiment, started_ms)
        if parent is None:
            print(f"error: the sweep started no MLflow parent run (exit code {code})", file=sys.stderr)
            return code or 1
        parents = [parent]
    else:
        code = 0
    parent = parents[0]
    text = report(MlflowClient(uri), parents)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rl-study-{parent[:8]}.md").write_text(text + "\n")
    print(text)
    print(f"\nreport: {out / f'rl-study-{parent[:8]}.md'} (MLflow parent run {parent}, {uri})")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
