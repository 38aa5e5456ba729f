"""Regions and fairness study (paper 000): six methods on the nine-region twin, Tables 3 and 4.

    .venv/bin/python -m scripts.regions_study [--seeds 0 1 2] [--rounds 5] [--steps 256] [--sites 9]
        [--episode-s 288] [--eval-seeds 10000 10001] [--experiment fedcontinuum-regions-study]
        [extra Hydra overrides for every job ...]
    .venv/bin/python -m scripts.regions_study --report PARENT_RUN_ID [MORE ...]   # rebuild the tables
    .venv/bin/python -m scripts.regions_study --per-region   # the baselines per region (paper 000 Figure 4)

One MLflow parent run; per seed four real Flower simulations (``task=ppo
twin=regions``, one PPO site per region, seasonal-naive forecast):

* ``mafl``: MA-FL, federated PPO (FedAvgM) on ``--sites`` sites;
* ``fair``: MA-FL + lambda, the same with paper 000's fairness term in the
  reward (eq. 11; lambda 1, Omega(t) = ``spread``; ``conf/arm/fair.yaml``);
* ``eml``: E-ML, edge-only agents, no federation, no cloud offload;
* ``cml``: C-ML, one centralised PPO learner (one client) pooling all the
  sites' experience, one model deployed on every site.

Every run scores its deployed agents on the held-out twin seeds, fault-free
and under each paper-000 Table 3 fault scenario and Table 4 edge-node
density (:mod:`tasks.rl.evaluation`). The heuristic (threshold autoscaler +
FFD) and the forecast-MPC (seasonal-naive) are deterministic on those seeds,
so the study scores them once, here, and logs them to the parent.

Tables (``report/regions_study.md`` on the parent, ``reports/regions-study-<id>.md``):
fulfillment, fairness variance, Jain's index, satisfaction, worst region;
Table 3 (node failure 10 / 20 %, cloud outage 30 / 60 min, packet loss);
Table 4 (density 10-50 %); mean ± sd over seeds.
"""

from __future__ import annotations

import argparse
import json
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
from tasks.rl.density import DENSITY_SCENARIOS
from tasks.rl.evaluation import FAULTS

console = Console()
ARMS = ("mafl", "fair", "eml", "cml")
ARM_TAGS = {"mafl": "mafl", "fair": "mafl-fair", "eml": "eml", "cml": "cml"}  # conf/arm name -> run tag `arm`
TITLES = {"heuristic": "Heuristic (HPA + FFD)", "mpc": "Forecast-MPC (seasonal-naive)", "cml": "C-ML (centralised PPO)",
          "eml": "E-ML (edge-only, no FL)", "mafl": "MA-FL", "mafl-fair": "MA-FL + λ (fairness, Ω spread)"}
ORDER = ("heuristic", "mpc", "cml", "eml", "mafl", "mafl-fair")
MAIN = (  # (twin summary key, title, scale, decimals)
    ("fulfillment_rate", "Fulfillment (%)", 100.0, 1), ("fairness_variance", "Fairness var. (×1e-3)", 1e3, 2),
    ("jain_fairness", "Jain", 1.0, 4), ("satisfaction", "Satisfaction", 1.0, 3),
    ("min_region_fulfillment", "Worst region (%)", 100.0, 1), ("mean_latency_ms", "Mean resp. (ms)", 1.0, 0),
    ("slo_violation_rate", "SLO viol. (%)", 100.0, 1), ("cost_per_1k_usd", "$/1k req", 1.0, 4),
)
TABLE3 = FAULTS  # none, node10, node20, outage30, outage60, loss10, loss20
TABLE4 = tuple(DENSITY_SCENARIOS)


# ------------------------------------------------------------------- the runs


def common_overrides(args: argparse.Namespace) -> list[str]:
    return ["task=ppo", "twin=regions", f"num_rounds={args.rounds}", f"task.steps_per_round={args.steps}",
            f"task.episode_s={args.episode_s:g}", f"task.eval_seeds=[{','.join(map(str, args.eval_seeds))}]",
            "task.final_baselines=false", f"tracking.experiment={args.experiment}", *args.overrides]


def jobs(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    planned = []
    for seed in args.seeds:
        for arm in args.arms:
            clients = ["clients.num=1", "clients.min_train=1", f"task.sites={args.sites}"] if arm == "cml" else [
                f"clients.num={args.sites}", f"clients.min_train={args.sites}"]
            planned.append((f"{arm}-s{seed}", [*common_overrides(args), f"+arm={arm}", f"seed={seed}", *clients]))
    return planned


def baseline_figures(args: argparse.Namespace) -> dict[str, float]:
    """The heuristic and the MPC on the study's held-out seeds, every scenario (they are deterministic)."""
    from fl_server.experiments.config import compose_config
    from tasks.rl.evaluation import baseline_study
    from tasks.rl.spec import RLSpec

    cfg = compose_config([*common_overrides(args), "+arm=mafl", f"clients.num={args.sites}",
                          f"clients.min_train={args.sites}"])
    return baseline_study(RLSpec.from_config(cfg))


def run_study(args: argparse.Namespace, tracking_uri: str) -> str:
    parent = RunTracker(tracking_uri, experiment=args.experiment,
                        run_name=f"regions study {time.strftime('%Y-%m-%d %H:%M')}", tags={"fc.kind": "regions-study"})
    parent.log_params({"command": args.command, "seeds": " ".join(map(str, args.seeds)), "num_rounds": args.rounds,
                       "steps_per_round": args.steps, "sites": args.sites, "episode_s": args.episode_s,
                       "eval_seeds": " ".join(map(str, args.eval_seeds)), "arms": " ".join(args.arms)})
    parent.flush()
    console.print(f"[bold]regions study[/bold] (MLflow parent run {parent.run_id})")
    started = time.perf_counter()
    client = MlflowClient(tracking_uri)
    baselines = baseline_figures(args)
    client.log_text(parent.run_id, json.dumps(baselines, indent=1, sort_keys=True), "baselines.json")
    console.print(f"baselines scored in {time.perf_counter() - started:.0f} s")
    outcomes = run_jobs(jobs(args), parent.run_id, tracking_uri, console, ray_head=True)
    client.log_metric(parent.run_id, "study_wall_time_s", time.perf_counter() - started)
    report(parent.run_id, tracking_uri, out=args.out)
    close_parent(parent, outcomes)
    return parent.run_id


# ------------------------------------------------------------------- report


def child_runs(client: MlflowClient, parent_run_id: str) -> pd.DataFrame:
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'FINISHED'",
                              max_results=1000)
    return pd.DataFrame([{"arm": r.data.tags.get("arm", ""), "seed": int(r.data.tags.get("seed", -1)),
                          "run_id": r.info.run_id, **r.data.metrics} for r in runs])


def method_rows(runs: pd.DataFrame, baselines: dict[str, float]) -> dict[str, list[dict[str, float]]]:
    """Per method, one dict per seed: ``<key>`` (fault-free, deployed) and ``<scenario>_<measure>``."""
    scenarios = [*TABLE3, *TABLE4]
    measures = ("completion", "drift", "response_ms", "slo_violation_rate", "fairness_variance")
    out: dict[str, list[dict[str, float]]] = {}
    for name in ("heuristic", "mpc"):  # one deterministic score (sd 0 over seeds by construction)
        row = {key: baselines.get(f"baseline_{name}_{key}", np.nan) for key, *_ in MAIN}
        row.update({f"{s}_{m}": baselines.get(f"baseline_{name}_fault_{s}_{m}", np.nan)
                    for s in scenarios for m in measures})
        out[name] = [row]
    for arm in ORDER[2:]:
        rows = runs[runs["arm"] == arm].sort_values("seed") if not runs.empty else runs
        if rows.empty:
            continue
        out[arm] = [{**{key: r.get(f"eval_{key}", np.nan) for key, *_ in MAIN},
                     **{f"{s}_{m}": r.get(f"fault_{s}_{m}", np.nan) for s in scenarios for m in measures}}
                    for _, r in rows.iterrows()]
    return out


def cell(values: list[float], scale: float, decimals: int) -> str:
    values = np.asarray(values, dtype=float) * scale
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.{decimals}f} ± {sd:.{decimals}f}"


def main_table(rows: dict[str, list[dict[str, float]]]) -> str:
    lines = ["| Method | seeds | " + " | ".join(t for _, t, _, _ in MAIN) + " |", "|---|---|" + "---|" * len(MAIN)]
    for arm, per_seed in rows.items():
        cells = [cell([r[key] for r in per_seed], scale, d) for key, _, scale, d in MAIN]
        lines.append(f"| {TITLES[arm]} | {len(per_seed)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scenario_table(rows: dict[str, list[dict[str, float]]], scenarios: tuple[str, ...], drift: bool) -> str:
    head = "| Method | Scenario | Task completion (%) | " + ("Policy drift (TV) | " if drift else "") + \
        "Mean response (ms) | SLO viol. (%) | Fairness var. (×1e-3) |"
    lines = [head, "|---|---|---|" + ("---|" if drift else "") + "---|---|---|"]
    for arm, per_seed in rows.items():
        for s in scenarios:
            values = [cell([r[f"{s}_completion"] for r in per_seed], 100.0, 2)]
            if drift:
                values.append(cell([r[f"{s}_drift"] for r in per_seed], 1.0, 3))
            values += [cell([r[f"{s}_response_ms"] for r in per_seed], 1.0, 0),
                       cell([r[f"{s}_slo_violation_rate"] for r in per_seed], 100.0, 1),
                       cell([r[f"{s}_fairness_variance"] for r in per_seed], 1e3, 2)]
            lines.append(f"| {TITLES[arm]} | {s} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def report(parent_run_ids: str | list[str], tracking_uri: str, out: str = "reports") -> str:
    """Build, print and log (to the first parent run and ``out/``) the study's tables; several
    parents (e.g. seeds run as separate studies) make one table, the baselines from the first."""
    parents = [parent_run_ids] if isinstance(parent_run_ids, str) else list(parent_run_ids)
    parent_run_id = parents[0]
    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    baselines = json.loads(Path(client.download_artifacts(parent_run_id, "baselines.json")).read_text())
    runs = pd.concat([child_runs(client, p) for p in parents], ignore_index=True)
    rows = method_rows(runs, baselines)
    seeds = sorted(set(runs["seed"])) if not runs.empty else []
    params = parent.data.params
    wall = parent.data.metrics.get("study_wall_time_s")
    text = "\n\n".join([
        f"# Regions and fairness study (paper 000; MLflow parent run(s) {', '.join(parents)}; seeds {seeds})",
        f"Command: `{params.get('command', '?')}`" + (f"; wall time {wall / 60:.1f} min" if wall else "")
        + f". Rebuild: `python -m scripts.regions_study --report {' '.join(parents)}`. Heuristic and MPC are "
        "deterministic on the held-out seeds: scored once (sd 0).",
        "## Nine regions under the twin file's faults (deployed policies, held-out twin seeds)",
        "conf/twin/regions.yaml's faults scaled to the episode: 10 % of the nodes fail at 1/3 of it, the cloud is "
        "down for its second half, 10 % edge-cloud packet loss. Fault-free: the `none` rows of Table 3.",
        main_table(rows),
        "## Paper 000 Table 3: faults", scenario_table(rows, TABLE3, drift=True),
        "## Paper 000 Table 4: edge-node density (demand fixed)", scenario_table(rows, TABLE4, drift=False),
    ])
    client.log_text(parent_run_id, text, "report/regions_study.md")
    path = Path(out) / f"regions-study-{parent_run_id[:8]}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(text)
    print(f"\nreport: {path} (MLflow parent run {parent_run_id}, {tracking_uri})")
    return text


def per_region_table(args: argparse.Namespace) -> str:
    """Per region (paper 000 Figure 4): fulfillment, mean response, satisfaction of the heuristic and
    the MPC, fault-free, mean over the held-out seeds (the learned agents log system-wide figures only)."""
    from edgesim import Action, EdgeCloudTwin
    from fl_server.experiments.config import compose_config
    from tasks.rl.evaluation import baseline_controller
    from tasks.rl.spec import RLSpec, build_scenario

    spec = RLSpec.from_config(compose_config([*common_overrides(args), f"clients.num={args.sites}", "task.faults=none"]))
    scenario = build_scenario(spec)
    lines = ["| Method | " + " | ".join(f"{r.name} ({r.tier}, {r.industry})" for r in scenario.regions.regions) + " |",
             "|---|" + "---|" * len(scenario.clusters)]
    for name in ("heuristic", "mpc"):
        measures = []
        for seed in args.eval_seeds:
            twin, controller = EdgeCloudTwin(scenario), baseline_controller(spec, name)
            twin.reset(seed)
            controller.reset(twin)
            while not twin.done:
                twin.step(Action.from_env(controller.act(twin), scenario.shield.max_replica_step))
            measures.append(twin.metrics.region_measures())
        mean = {k: np.mean([m[k] for m in measures], axis=0) for k in ("fulfillment", "response_s", "satisfaction")}
        lines.append(f"| {TITLES[name]} | " + " | ".join(
            f"{100 * f:.1f} % / {1e3 * t:.0f} ms / {s:.2f}"
            for f, t, s in zip(mean["fulfillment"], mean["response_s"], mean["satisfaction"])) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.regions_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=256, help="environment steps per site and round")
    parser.add_argument("--sites", type=int, default=9, help="PPO sites, dealt round-robin over the nine regions")
    parser.add_argument("--episode-s", type=float, default=288.0)
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[10000, 10001])
    parser.add_argument("--experiment", default="fedcontinuum-regions-study")
    parser.add_argument("--tracking-uri", default=default_tracking_uri())
    parser.add_argument("--out", default="reports")
    parser.add_argument("--report", metavar="PARENT_RUN_ID", nargs="+",
                        help="only rebuild the report of finished studies (several: one table, baselines of the first)")
    parser.add_argument("--per-region", action="store_true",
                        help="only print the baselines' per-region fulfillment / response / satisfaction")
    parser.add_argument("overrides", nargs="*", help="further Hydra overrides for every job")
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    args.command = " ".join(["python -m scripts.regions_study", *(shlex.quote(a) for a in given)])
    if args.report:
        report(args.report, args.tracking_uri, out=args.out)
        return 0
    if args.per_region:
        print(per_region_table(args))
        return 0
    parent = run_study(args, args.tracking_uri)
    console.print(f"rebuild with: python -m scripts.regions_study --report {parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
