"""DQN + first-order MAML study (paper 002): adaptation to an unseen workload regime.

    python -m scripts.metarl_study [--seeds 0 1 2] [--rounds 4] [--clients 3] [--steps 400]
        [--meta-iterations 30] [--adapt-episodes 15] [--forecaster lstm|seasonal-naive|federated:<run id>]
        [--quick] [--experiment fedcontinuum-metarl-study] [extra Hydra overrides ...]
    python -m scripts.metarl_study --report PARENT_RUN_ID   # rebuild the tables and plots

Real Flower simulations (through the launcher, one MLflow parent run):

1. ``--forecaster lstm`` (default): one federated LSTM forecasting run on the
   Bitbrains traces (``task=bitbrains task.model=lstm task.horizon=3``), whose
   weights then fill every DQN observation's three forecast slots;
2. per seed and bandwidth (stable, and ±20 % fluctuating:
   ``devices.bandwidth_fluctuation=0.2``, paper 004 §4.1) two ``task=dqn``
   runs: FOMAML over the training regimes (``task.meta=true``) and the
   reactive DQN (``task.meta=false``: same DQN, data and TD steps, no
   meta-learning), both federated (FedAvg over edge sites).

Each run ends by adapting its global Q-network online to the unseen regime
(real Bitbrains VMs) and, for comparison, a DQN from a random initialisation
(``scratch``), then deploying the adapted networks greedily on held-out
seeds next to static allocation and the threshold autoscaler
(:mod:`tasks.metarl.server`). The report (``reports/metarl_study.md``,
plots ``reports/metarl_*.png``, also on the parent run): mean ± sd over
seeds of latency, utilisation, SLO violations, return and steps to stable
return, and the paper's three claims against what we measured.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from rich.console import Console

from fl_server.experiments.tracking import PARENT_TAG, RunTracker, default_tracking_uri
from scripts.study_runs import close_parent, run_jobs

console = Console()
BANDWIDTHS = {"stable": 0.0, "fluct": 0.2}  # paper 004 §4.1: ±20 % fluctuating bandwidth
LSTM_FORECASTER = ["task=bitbrains", "task.model=lstm", "task.horizon=3", "task.window=96", "task.season=48",
                   "num_rounds=3", "clients.num=4"]  # our choice: a small federated LSTM (2 x 64), 3 rounds
# (row title, metric prefix, which arm's runs): deployed after adapting to the unseen regime
METHODS = (("Static allocation", "static", "fomaml"), ("Threshold autoscaler", "heuristic", "fomaml"),
           ("DQN from scratch (unseen regime only)", "scratch_adapted", "fomaml"),
           ("Reactive DQN (federated, no meta)", "adapted", "reactive"),
           ("DQN + FOMAML (federated, ours)", "adapted", "fomaml"))
COLUMNS = (("mean_latency_ms", "mean latency (ms)", 1.0, 1), ("p95_ms", "p95 (ms)", 1.0, 0),
           ("gpu_util", "GPU util. (%)", 100.0, 1), ("slo_violation_rate", "SLO viol. (%)", 100.0, 1),
           ("fulfillment_rate", "served (%)", 100.0, 1), ("return", "return", 1.0, 1))
CURVES = (("adapt_return", "fomaml", "DQN + FOMAML init"), ("adapt_return", "reactive", "reactive DQN init"),
          ("scratch_return", "fomaml", "random init (scratch)"))
# paper 002 §5 (results): latency -10-12 % vs static, -8-10 % vs reactive RL; utilisation +15-20 % vs both
# (CPU / memory of edge and cloud; it does not say relative or points); convergence 50 % faster than reactive RL
PAPER = {"latency": "−10 to −12 %", "latency_reactive": "−8 to −10 %", "utilisation": "+15 to +20 %",
         "convergence": "50 % faster"}


def jobs(args: argparse.Namespace, forecaster: str) -> list[tuple[str, list[str]]]:
    """(label, Hydra overrides) of every DQN job."""
    planned = []
    for seed in args.seeds:
        for bandwidth, fluctuation in BANDWIDTHS.items():
            for arm, meta in (("fomaml", "true"), ("reactive", "false")):
                planned.append((f"{arm}-{bandwidth}-s{seed}", [
                    # task.baselines: scratch DQN, static allocation and the autoscaler once per seed (FOMAML runs)
                    "task=dqn", f"task.meta={meta}", f"task.baselines={meta}", f"seed={seed}",
                    f"devices.bandwidth_fluctuation={fluctuation}",
                    f"clients.num={args.clients}", f"clients.min_train={args.clients}", f"num_rounds={args.rounds}",
                    f"task.steps_per_regime={args.steps}", f"task.hyper.meta_iterations={args.meta_iterations}",
                    f"task.adapt_episodes={args.adapt_episodes}", f"task.episode_s={args.episode_s:g}",
                    f"task.forecaster={forecaster}", f"tracking.experiment={args.experiment}", *args.overrides]))
    return planned


def run_study(args: argparse.Namespace, tracking_uri: str) -> str:
    """The forecaster (if trained here), then every DQN job, as children of one parent run."""
    parent = RunTracker(tracking_uri, experiment=args.experiment, run_name=f"metarl study {time.strftime('%Y-%m-%d %H:%M')}",
                        tags={"fc.kind": "metarl-study"})
    parent.log_params({"command": args.command, "seeds": " ".join(map(str, args.seeds)), "num_rounds": args.rounds,
                       "clients": args.clients, "steps_per_regime": args.steps, "meta_iterations": args.meta_iterations,
                       "adapt_episodes": args.adapt_episodes, "episode_s": args.episode_s, "forecaster": args.forecaster})
    parent.flush()
    console.print(f"[bold]metarl study[/bold] (MLflow parent run {parent.run_id})")
    started = time.perf_counter()
    outcomes, forecaster = [], args.forecaster
    if args.forecaster == "lstm":
        trained = run_jobs([("lstm-forecaster", [*LSTM_FORECASTER, f"tracking.experiment={args.experiment}"])],
                           parent.run_id, tracking_uri, console)
        outcomes += trained
        if not trained[0].ok or not trained[0].mlflow_run_id:
            close_parent(parent, outcomes)
            raise SystemExit("the federated LSTM forecaster run failed; see its log (or use --forecaster seasonal-naive)")
        forecaster = f"federated:{trained[0].mlflow_run_id}"
        MlflowClient(tracking_uri).set_tag(parent.run_id, "forecaster", forecaster)
    outcomes += run_jobs(jobs(args, forecaster), parent.run_id, tracking_uri, console)
    MlflowClient(tracking_uri).log_metric(parent.run_id, "study_wall_time_s", time.perf_counter() - started)
    report(parent.run_id, tracking_uri, command=args.command, out=args.out)
    close_parent(parent, outcomes)
    return parent.run_id


# ------------------------------------------------------------------- report
def child_runs(client: MlflowClient, parent_run_id: str) -> pd.DataFrame:
    """One row per finished DQN child: arm, bandwidth, seed, run id and final metrics."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'FINISHED'",
                              max_results=1000)
    rows = [{"run_id": r.info.run_id, "arm": "fomaml" if r.data.tags.get("meta") == "true" else "reactive",
             "bandwidth": "fluct" if float(r.data.tags.get("bandwidth_fluctuation", 0)) > 0 else "stable",
             "seed": int(r.data.tags["seed"]), **r.data.metrics}
            for r in runs if r.data.tags.get("kind") == "metarl"]
    return pd.DataFrame(rows)


def mean_sd(values) -> tuple[float, float]:
    values = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if values.size == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def _cell(values, scale: float, decimals: int) -> str:
    mean, sd = mean_sd(np.asarray(values, dtype=float) * scale)
    return "–" if not np.isfinite(mean) else f"{mean:.{decimals}f} ± {sd:.{decimals}f}"


def methods_table(runs: pd.DataFrame, bandwidth: str) -> str:
    """Deployed on the unseen regime after adaptation, mean ± sd over seeds."""
    part = runs[runs["bandwidth"] == bandwidth]
    lines = ["| method | " + " | ".join(title for _, title, _, _ in COLUMNS) + " | steps to stable |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    for title, prefix, arm in METHODS:
        rows = part[part["arm"] == arm]
        cells = [_cell(rows.get(f"final_{prefix}_{key}", pd.Series(dtype=float)), scale, dec)
                 for key, _, scale, dec in COLUMNS]
        stable_key = {"scratch_adapted": "final_scratch_steps_to_stable", "adapted": "final_adapt_steps_to_stable"}
        stable = _cell(rows[stable_key[prefix]], 1.0, 0) if prefix in stable_key else "–"
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {stable} |")
    return "\n".join(lines)


def federation_table(runs: pd.DataFrame) -> str:
    """What the bandwidth changes: the rounds' virtual time (the FL links), per arm."""
    lines = ["| arm | bandwidth | round virtual time (s) | zero-shot return (unseen regime) | adapted return |",
             "|---|---|---|---|---|"]
    for arm in ("fomaml", "reactive"):
        for bandwidth in BANDWIDTHS:
            rows = runs[(runs["arm"] == arm) & (runs["bandwidth"] == bandwidth)]
            lines.append(f"| {arm} | {bandwidth} | {_cell(rows.get('round_virtual_s', pd.Series(dtype=float)), 1, 4)} | "
                         f"{_cell(rows['final_adapt_zero_shot_return'], 1, 1)} | {_cell(rows['final_adapted_return'], 1, 1)} |")
    return "\n".join(lines)


def paired_change(ours: pd.DataFrame, other: pd.DataFrame, key: str, relative: bool = True) -> str:
    """Mean ± sd over seeds of the per-seed change of ``key`` (ours vs other), % of other or points."""
    merged = ours[["seed", key]].merge(other[["seed", key]], on="seed", suffixes=("_ours", "_other"))
    a, b = merged[f"{key}_ours"].to_numpy(float), merged[f"{key}_other"].to_numpy(float)
    change = 100 * (a - b) / np.abs(b) if relative else 100 * (a - b)
    mean, sd = mean_sd(change)
    unit = "%" if relative else " pp"
    return "–" if not np.isfinite(mean) else f"{mean:+.1f} ± {sd:.1f}{unit}"


def claims_table(runs: pd.DataFrame, bandwidth: str) -> str:
    """Paper 002's claims next to our per-seed paired changes."""
    part = runs[runs["bandwidth"] == bandwidth]
    ours, reactive = part[part["arm"] == "fomaml"], part[part["arm"] == "reactive"]
    static = ours.assign(**{"final_adapted_mean_latency_ms": ours["final_static_mean_latency_ms"],
                            "final_adapted_gpu_util": ours["final_static_gpu_util"]})
    rows = [
        ("mean latency vs static allocation", PAPER["latency"],
         paired_change(ours, static, "final_adapted_mean_latency_ms")),
        ("mean latency vs reactive DQN", PAPER["latency_reactive"],
         paired_change(ours, reactive, "final_adapted_mean_latency_ms")),
        ("GPU utilisation vs static allocation", PAPER["utilisation"],
         paired_change(ours, static, "final_adapted_gpu_util", relative=False)),
        ("GPU utilisation vs reactive DQN", PAPER["utilisation"],
         paired_change(ours, reactive, "final_adapted_gpu_util", relative=False)),
        ("steps to stable return vs reactive DQN", PAPER["convergence"] + " (−50 %)",
         paired_change(ours, reactive, "final_adapt_steps_to_stable")),
        ("steps to stable return vs scratch DQN", "(not compared)",
         paired_change(ours, ours.assign(final_adapt_steps_to_stable=ours["final_scratch_steps_to_stable"]),
                       "final_adapt_steps_to_stable")),
    ]
    lines = ["| claim (DQN + FOMAML) | paper 002 | measured (paired by seed, mean ± sd) |", "|---|---|---|"]
    lines += [f"| {what} | {paper} | {ours_value} |" for what, paper, ours_value in rows]
    return "\n".join(lines)


def curves_of(client: MlflowClient, runs: pd.DataFrame, key: str, arm: str) -> list[list[float]]:
    """Each run's per-episode adaptation returns (``adapt_return`` / ``scratch_return``) of one arm."""
    out = [[m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
           for run_id in runs[runs["arm"] == arm]["run_id"]]
    return [curve for curve in out if curve]


def adaptation_table(client: MlflowClient, runs: pd.DataFrame, bandwidth: str, episode_steps: int) -> str:
    """Adaptation speed per initialisation, from the logged curves: jump-start, mean return over the
    adaptation episodes (area under the curve), steps to stable at 5 % and 10 %, final return."""
    from tasks.metarl.dqn import steps_to_stable

    part = runs[runs["bandwidth"] == bandwidth]
    lines = ["| initialisation | first-episode return | mean return over the episodes | steps to stable (5 %) | "
             "steps to stable (10 %) | last-5-episode return |", "|---|---|---|---|---|---|"]
    for key, arm, label in CURVES:
        curves = curves_of(client, part, key, arm)
        if not curves:
            continue
        cells = [_cell([c[0] for c in curves], 1, 1), _cell([np.mean(c) for c in curves], 1, 1),
                 _cell([steps_to_stable(c, episode_steps) for c in curves], 1, 0),
                 _cell([steps_to_stable(c, episode_steps, tolerance=0.1) for c in curves], 1, 0),
                 _cell([np.mean(c[-5:]) for c in curves], 1, 1)]
        lines.append(f"| {label} (n={len(curves)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def adaptation_curves(client: MlflowClient, runs: pd.DataFrame):
    """Return per adaptation episode on the unseen regime, mean ± sd over seeds (stable bandwidth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    part = runs[runs["bandwidth"] == "stable"]
    for key, arm, label in CURVES:
        curves = curves_of(client, part, key, arm)
        if not curves:
            continue
        length = min(len(c) for c in curves)
        values = np.array([c[:length] for c in curves])
        mean, sd = values.mean(0), values.std(0)
        episodes = np.arange(1, length + 1)
        ax.plot(episodes, mean, marker="o", label=f"{label} (n={len(curves)})")
        ax.fill_between(episodes, mean - sd, mean + sd, alpha=0.2)
    ax.set_xlabel("adaptation episode on the unseen regime (Bitbrains trace)")
    ax.set_ylabel("episode return")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def methods_figure(runs: pd.DataFrame):
    """Bars: mean latency and GPU utilisation per method and bandwidth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.38
    for ax, (key, label, scale) in zip(axes, (("mean_latency_ms", "mean latency (ms)", 1.0),
                                              ("gpu_util", "GPU utilisation (%)", 100.0))):
        for offset, bandwidth in zip((-width / 2, width / 2), BANDWIDTHS):
            part = runs[runs["bandwidth"] == bandwidth]
            stats = [mean_sd(part[part["arm"] == arm].get(f"final_{prefix}_{key}", pd.Series(dtype=float)) * scale)
                     for _, prefix, arm in METHODS]
            ax.bar(np.arange(len(METHODS)) + offset, [s[0] for s in stats], width, yerr=[s[1] for s in stats],
                   capsize=3, label=f"{bandwidth} bandwidth")
        ax.set_xticks(np.arange(len(METHODS)), [t.split(" (")[0] for t, _, _ in METHODS], rotation=20, ha="right")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    return fig


def report(parent_run_id: str, tracking_uri: str, out: str = "reports", command: str | None = None) -> str:
    """Build, print and log (to the parent run and ``out/``) the tables and plots."""
    client = MlflowClient(tracking_uri)
    runs = child_runs(client, parent_run_id)
    if runs.empty:
        console.print("no finished runs")
        return ""
    parent = client.get_run(parent_run_id)
    params = parent.data.params
    command = command or params.get("command", "python -m scripts.metarl_study")
    forecaster = parent.data.tags.get("forecaster", params.get("forecaster", ""))
    seeds = sorted(set(runs["seed"]))
    parts = [f"# DQN + first-order MAML study (MLflow parent run {parent_run_id}; seeds {', '.join(map(str, seeds))})",
             f"Command: `{command}`; tables: `python -m scripts.metarl_study --report {parent_run_id}`. "
             f"Forecaster in the observations: `{forecaster}`. Meta-training regimes: synthetic steady-low, "
             "diurnal-medium, bursty-high; unseen regime: Bitbrains trace. Cells: mean ± sd over seeds, the "
             "networks deployed greedily on every edge node of the unseen regime's twin (held-out seeds) after "
             f"{params.get('adapt_episodes', '?')} online DQN episodes there; baselines on the same seeds."]
    episode_steps = int(float(params.get("episode_s", 200)))  # twin steps of 1 s
    for bandwidth in BANDWIDTHS:
        parts += [f"## Unseen regime, {bandwidth} bandwidth", methods_table(runs, bandwidth),
                  f"## Adaptation speed on the unseen regime, {bandwidth} bandwidth "
                  f"({params.get('adapt_episodes', '?')} episodes of {episode_steps} steps, every edge node acting)",
                  adaptation_table(client, runs, bandwidth, episode_steps),
                  f"## Paper 002's claims vs measured, {bandwidth} bandwidth", claims_table(runs, bandwidth)]
    parts += ["## What the bandwidth changes", federation_table(runs)]
    text = "\n\n".join(parts) + "\n"
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metarl_study.md").write_text(text)
    client.log_text(parent_run_id, text, "report/metarl_study.md")
    figures = {"metarl_adaptation.png": adaptation_curves(client, runs), "metarl_methods.png": methods_figure(runs)}
    for name, fig in figures.items():
        client.log_figure(parent_run_id, fig, f"report/{name}")
        fig.savefig(folder / name, dpi=110)
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    console.print(f"report: {folder / 'metarl_study.md'} and {', '.join(str(folder / n) for n in figures)}")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.metarl_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400, help="environment steps per training regime, client and round")
    parser.add_argument("--meta-iterations", type=int, default=30)
    parser.add_argument("--adapt-episodes", type=int, default=15)
    parser.add_argument("--episode-s", type=float, default=200.0)
    parser.add_argument("--forecaster", default="lstm",
                        help="lstm (train a federated LSTM first) | seasonal-naive | federated:<MLflow run id>")
    parser.add_argument("--quick", action="store_true", help="one seed, tiny runs (tests)")
    parser.add_argument("--experiment", default="fedcontinuum-metarl-study")
    parser.add_argument("--tracking-uri", default=default_tracking_uri())
    parser.add_argument("--out", default="reports")
    parser.add_argument("--report", metavar="PARENT_RUN_ID", help="only rebuild the report of a finished study")
    parser.add_argument("overrides", nargs="*", help="further Hydra overrides for every DQN job")
    args = parser.parse_args(argv)
    if args.forecaster not in ("lstm", "seasonal-naive") and not args.forecaster.startswith("federated:"):
        parser.error(f"--forecaster {args.forecaster} is unknown: use lstm, seasonal-naive or federated:<MLflow run id>")
    if args.quick:
        args.seeds, args.rounds, args.clients, args.steps = args.seeds[:1], 1, 2, 128
        args.meta_iterations, args.adapt_episodes, args.episode_s = 2, 3, 60.0
        args.overrides = ["task.eval_seeds=[10000]", "task.hyper.batch_size=32", "task.hyper.adapt_warmup=200",
                          *args.overrides]
    given = sys.argv[1:] if argv is None else argv
    args.command = " ".join(["python -m scripts.metarl_study", *(shlex.quote(a) for a in given)])
    if args.report:
        report(args.report, args.tracking_uri, out=args.out)
        return 0
    parent = run_study(args, args.tracking_uri)
    console.print(f"rebuild with: python -m scripts.metarl_study --report {parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
