"""Run one experiment on Flower's Deployment Engine, on this machine.

    python -m scripts.deploy_local [--supernodes N] [--insecure] [--verbose]
                                   [--compare-simulation] [--show-config] [HYDRA_OVERRIDE ...]
    make deploy-local ARGS="--supernodes 3 num_rounds=3"

What it does, in order:

1. composes and validates the config (bad input: exit 2, nothing started);
2. generates a CA and a server certificate for 127.0.0.1/localhost into the
   SuperLink's git-ignored state folder (``.flwr/superlink-<port>/certs``,
   removed on exit), unless ``--insecure``;
3. starts ``flower-superlink`` (Deployment Engine, HTTPS) and N
   ``flower-supernode`` processes, node ``i`` with node config
   ``partition-id=i num-partitions=N``, and waits until all are online;
4. submits the same ServerApp/ClientApp with ``flwr run`` and follows it like
   ``python -m fl_server.launch`` (progress, summary, final status from
   ``flwr list``: exit 0 only for ``finished:completed``);
5. stops exactly the processes it started (by their process groups).

``--compare-simulation`` then runs the same job on the Simulation Engine and
prints the round times of both.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from fl_server.experiments.config import compose_config, default_tracking_uri
from fl_server.runtime.deployment import LocalFederation
from fl_server.runtime.launch import JobOutcome, mlflow_ui_hint, preflight, run_job, summary_table
from fl_server.runtime.superlink import LocalSuperLink, SuperLinkError

ENGINE_TAG = "fc.engine"


def _with_supernodes(overrides: list[str], supernodes: int | None) -> list[str]:
    """One SuperNode per client: ``--supernodes N`` is ``clients.num=N``."""
    if supernodes is None:
        return overrides
    given = [o for o in overrides if o.split("=", 1)[0] == "clients.num"]
    if given and given[-1] != f"clients.num={supernodes}":
        raise ValueError(f"--supernodes {supernodes} contradicts {given[-1]}: one SuperNode per client")
    return overrides if given else [*overrides, f"clients.num={supernodes}"]


def run_deployment(cfg, overrides, *, tls: bool, tracking_uri: str, console: Console, verbose: bool) -> JobOutcome:
    """One run on a fresh local Deployment Engine federation, stopped afterwards."""
    federation = LocalFederation(int(cfg.clients.num), tls=tls)
    try:
        federation.spawn_superlink()  # boots while the data is checked
        preflight(cfg, federation.superlink.cache_dir)
        federation.start()
        security = (f"TLS, CA {federation.superlink.certificates.ca_cert}" if tls
                    else "[bold red]insecure (plaintext)[/bold red]")
        console.print(f"Deployment Engine: SuperLink {federation.superlink.address} ({security}), "
                      f"{federation.num_supernodes} SuperNodes online")
        return run_job(cfg, overrides, federation.superlink, tracking_uri=tracking_uri,
                       console=console, verbose=verbose)
    finally:
        federation.stop()


def run_simulation(cfg, overrides, *, tracking_uri: str, console: Console, verbose: bool) -> JobOutcome:
    """The same job on the Simulation Engine (as ``python -m fl_server.launch``)."""
    superlink = LocalSuperLink()
    try:
        superlink.spawn()
        preflight(cfg, superlink.cache_dir)
        superlink.wait_until_ready()
        return run_job(cfg, overrides, superlink, tracking_uri=tracking_uri, console=console, verbose=verbose)
    finally:
        superlink.stop()


def round_times(outcome: JobOutcome) -> list[float]:
    """Each round's wall time (configure → replies → aggregate → evaluate), from the progress markers."""
    return [float(r["round_wall_time_s"]) for r in outcome.rounds if r["round"] > 0 and "round_wall_time_s" in r]


def comparison_table(outcomes: dict[str, JobOutcome]) -> Table:
    """Round times per engine: round 1 (cold start) apart from the rest."""
    table = Table(title="round time: Deployment Engine vs Simulation Engine (same job)", title_justify="left")
    for column in ("engine", "status", "rounds", "round 1 s", "later rounds mean s", "later rounds median s",
                   "whole run s", "accuracy"):
        table.add_column(column, justify="left" if column in ("engine", "status") else "right")
    for engine, outcome in outcomes.items():
        times = round_times(outcome)
        later = times[1:]
        table.add_row(
            engine,
            "ok" if outcome.ok else outcome.status,
            str(len(times)),
            f"{times[0]:.2f}" if times else "-",
            f"{statistics.mean(later):.2f}" if later else "-",
            f"{statistics.median(later):.2f}" if later else "-",
            f"{outcome.wall_time_s:.1f}",
            f"{outcome.final.get('test_accuracy', float('nan')):.4f}",
        )
    return table


def _tag_engine(tracking_uri: str, outcome: JobOutcome, engine: str) -> None:
    """Tag the MLflow run with the engine it ran on (the ServerApp cannot tell)."""
    if not outcome.mlflow_run_id:
        return
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).set_tag(outcome.mlflow_run_id, ENGINE_TAG, engine)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.deploy_local",
        description="Run one experiment on Flower's Deployment Engine: a SuperLink and N SuperNodes "
        "as separate processes on loopback, TLS by default.",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. num_rounds=3 strategy=fedmedian")
    parser.add_argument("--supernodes", type=int, default=None,
                        help="number of SuperNodes (= clients.num; default: clients.num)")
    parser.add_argument("--insecure", action="store_true",
                        help="plaintext gRPC/HTTP instead of TLS (never across real networks)")
    parser.add_argument("--compare-simulation", action="store_true",
                        help="then run the same job on the Simulation Engine and compare round times")
    parser.add_argument("--verbose", action="store_true", help="echo Flower's full log")
    parser.add_argument("--show-config", action="store_true", help="print the composed config and exit")
    args = parser.parse_args(argv)
    console = Console()
    try:
        overrides = _with_supernodes(args.overrides, args.supernodes)
        cfg = compose_config(overrides)
    except ValueError as err:  # ConfigError and a contradicting --supernodes
        console.print(f"[bold red]error:[/bold red] {err}", highlight=False)
        return 2
    if args.show_config:
        console.print(OmegaConf.to_yaml(cfg), markup=False)
        return 0
    tracking_uri = default_tracking_uri()
    outcomes: dict[str, JobOutcome] = {}
    try:
        outcomes["deployment"] = run_deployment(cfg, overrides, tls=not args.insecure, tracking_uri=tracking_uri,
                                                console=console, verbose=args.verbose)
        if args.compare_simulation:
            outcomes["simulation"] = run_simulation(cfg, overrides, tracking_uri=tracking_uri,
                                                    console=console, verbose=args.verbose)
    except SuperLinkError as err:
        console.print(f"[bold red]error:[/bold red] {err}", highlight=False)
        return 1
    except ValueError as err:  # DataError from the preflight
        console.print(f"[bold red]error:[/bold red] {err}", highlight=False)
        return 2
    for engine, outcome in outcomes.items():
        _tag_engine(tracking_uri, outcome, engine)
    console.print(summary_table(list(outcomes.values())))
    if args.compare_simulation:
        console.print(comparison_table(outcomes))
    failed = [o for o in outcomes.values() if not o.ok]
    for outcome in failed:
        console.print(f"[bold red]run failed[/bold red] ({outcome.status}); last log lines:")
        console.print(outcome.reason, markup=False, highlight=False)
        console.print(f"full log: {outcome.log_path}")
    if not failed:
        console.print(f"MLflow: {mlflow_ui_hint(tracking_uri)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
