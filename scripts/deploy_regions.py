"""A regional tier as its own Flower SuperLink + ServerApp, on loopback.

    python -m scripts.deploy_regions --regions R --clients-per-region C [--insecure] [--port P]
                                     [--handoff-dir DIR] [--compare-simulation] [--verbose] [HYDRA_OVERRIDE ...]
    make deploy-regions ARGS="--regions 2 --clients-per-region 2 num_rounds=2"

The closest construction Flower 1.42 allows (README, "Deployment Engine: what
Flower allows"): no process can be a client of one SuperLink and a server of
another, so

* a global SuperLink with R *regional aggregator* SuperNodes (partition id =
  region, node config naming its region's SuperLink and the app to submit);
* per region a SuperLink with its C client SuperNodes, holding the global
  partitions ``r * C .. r * C + C - 1`` of ``clients.num = R * C`` (region-major);
* the global ServerApp (run-config ``tier=global``) sends each aggregator the
  global model; its ClientApp (``fl_clients/regional.py``) hands it over as a
  file, submits a run of the regional ServerApp (``tier=region``) to its
  region's SuperLink with ``flwr run … --stream``, waits, and replies with the
  regional model and example count it reads back from a file (a Flower run
  returns no payload to whoever submitted it).

The same ServerApp / ClientApp / launcher / Deployment Engine code as
``scripts/deploy_local.py``; every process is stopped by its process group at
the end (also on Ctrl-C or SIGTERM). Bad input: exit 2, nothing started.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from fl_common import regions as contract
from fl_datasets.federated import CACHE_ENV
from fl_server.experiments.config import ConfigError, compose_config, default_tracking_uri
from fl_server.runtime.deployment import LocalFederation
from fl_server.runtime.launch import JobOutcome, mlflow_ui_hint, preflight, run_job, stage_app, summary_table
from fl_server.runtime.superlink import FLWR_STATE_DIR, SuperLinkError, unwind_on_sigterm

# What a regional deployment does not compose with, and why (each refused with its fix).
_REFUSED = (
    # the other tasks' servers keep per-client state (personal heads, uploads, twin sites) keyed by partition,
    # which the global tier's clients (one per region) do not have: not built, so refused
    (lambda c: c.task.kind != "image",
     "task kind {v} is not built for a regional deployment: use an image task (task=mnist or task=breastmnist)",
     lambda c: c.task.kind),
    (lambda c: c.topology.name != "flat",
     "topology={v} is simulated inside one ServerApp; here the regions are real SuperLinks: leave topology at flat",
     lambda c: c.topology.name),
    (lambda c: c.privacy.name != "none",
     "privacy={v} is not composed with a regional deployment (the aggregators see every update): use privacy=none",
     lambda c: c.privacy.name),
    (lambda c: bool(c.compression.enabled),
     "compression={v} is not composed with a regional deployment (the aggregators reply with full models): "
     "use compression=none", lambda c: c.compression.name),
    (lambda c: c.checkpoint.resume is not None,
     "checkpoint.resume={v}: a regional deployment cannot be resumed (its regions' runs are not checkpointed)",
     lambda c: c.checkpoint.resume),
    (lambda c: c.devices.deadline_s is not None,
     "devices.deadline_s={v} is not composed with a regional deployment: leave it null",
     lambda c: c.devices.deadline_s),
    (lambda c: bool(c.devices.availability),
     "devices.availability={v} is not composed with a regional deployment: set it false",
     lambda c: c.devices.availability),
    (lambda c: float(c.clients.fraction_evaluate) > 0,
     "clients.fraction_evaluate={v}: the global tier's clients are aggregators, which hold no data: set it 0",
     lambda c: c.clients.fraction_evaluate),
    (lambda c: any(float(f) > 0 for f in _fault_fractions(c)),
     "faults.fraction.*={v}: fault injection is not composed with a regional deployment: leave every fraction 0",
     lambda c: [f for f in _fault_fractions(c) if float(f) > 0]),
)


def _fault_fractions(cfg: DictConfig) -> list[float]:
    values = []
    for value in cfg.faults.fraction.values():
        values += list(value) if OmegaConf.is_list(value) else [value]
    return values


def with_layout(overrides: list[str], layout: contract.RegionLayout) -> list[str]:
    """``clients.num`` is regions x clients per region (a contradicting one is refused)."""
    wanted = f"clients.num={layout.num_partitions}"
    given = [o for o in overrides if o.split("=", 1)[0] == "clients.num"]
    if given and given[-1] != wanted:
        raise ConfigError(f"--regions {layout.regions} --clients-per-region {layout.clients_per_region} contradicts "
                          f"{given[-1]}: clients.num is their product ({layout.num_partitions}); leave it out")
    return overrides if given else [*overrides, wanted]


def check_deployable(cfg: DictConfig, layout: contract.RegionLayout) -> None:
    """Refuse what a regional deployment does not compose with, one clear line each."""
    problems = [message.format(v=value(cfg)) for refused, message, value in _REFUSED if refused(cfg)]
    fewest = min(layout.regions, layout.clients_per_region)
    if int(cfg.clients.min_train) > fewest:
        problems.append(f"clients.min_train={cfg.clients.min_train} exceeds the smallest tier ({fewest} = min of "
                        f"--regions {layout.regions} and --clients-per-region {layout.clients_per_region}): "
                        f"set clients.min_train<={fewest}")
    if problems:
        raise ConfigError("\n".join(problems))


def compose(overrides: list[str], layout: contract.RegionLayout) -> tuple[list[str], DictConfig]:
    overrides = with_layout(overrides, layout)
    cfg = compose_config(overrides)
    check_deployable(cfg, layout)
    return overrides, cfg


class RegionalDeployment:
    """The global federation (aggregators) and one federation per region, started and stopped together."""

    def __init__(self, layout: contract.RegionLayout, handoff_dir: Path, *, tls: bool, port: int | None) -> None:
        self.layout = layout
        self.handoff_dir = handoff_dir
        self.apps: dict[int, Path] = {}
        self.global_tier = LocalFederation(layout.regions, tls=tls, port=port, node_config=self._aggregator_config)
        shared_cache = {CACHE_ENV: str(self.global_tier.superlink.cache_dir)}  # one split of the data
        self.regions = [
            LocalFederation(layout.clients_per_region, tls=tls, env=shared_cache,
                            partitions=layout.partitions(r), num_partitions=layout.num_partitions)
            for r in range(layout.regions)
        ]
        self.timings: dict[str, float] = {}

    def _aggregator_config(self, region: int) -> dict[str, str]:
        """Aggregator ``region``'s node config: its region's SuperLink connection and app."""
        return {contract.NODE_REGION_HOME: str(self.regions[region].superlink.home),
                contract.NODE_APP_DIR: str(self.apps[region])}

    @property
    def federations(self) -> list[LocalFederation]:
        return [self.global_tier, *self.regions]

    def spawn_superlinks(self) -> None:
        for federation in self.federations:
            federation.spawn_superlink()

    def start(self) -> None:
        """Every SuperNode, once its SuperLink answers; returns when all are online."""
        started = time.perf_counter()
        for region, federation in enumerate(self.regions):
            federation.spawn_supernodes()
            self.apps[region] = stage_app(federation.superlink.home / "app")
        self.global_tier.spawn_supernodes()
        for federation in self.federations:
            federation.wait_for_supernodes()
        self.timings["supernodes_online_s"] = time.perf_counter() - started

    def stop(self) -> None:
        """The aggregators first (their running `flwr run`, if any), then the regions."""
        for federation in self.federations:
            federation.stop()

    def describe(self) -> str:
        lines = [f"global SuperLink {self.global_tier.superlink.address}: {self.layout.regions} regional aggregators"]
        for region, federation in enumerate(self.regions):
            parts = self.layout.partitions(region)
            lines.append(f"region {region} SuperLink {federation.superlink.address}: partitions "
                         f"{parts.start}..{parts.stop - 1} of {self.layout.num_partitions}")
        return "\n".join(lines)


def tier_run_config(layout: contract.RegionLayout, handoff_dir: Path) -> dict[str, str]:
    return {contract.TIER: contract.TIER_GLOBAL, contract.REGIONS: str(layout.regions),
            contract.CLIENTS_PER_REGION: str(layout.clients_per_region), contract.HANDOFF_DIR: str(handoff_dir)}


def run_regions(cfg: DictConfig, overrides: list[str], layout: contract.RegionLayout, handoff_dir: Path, *,
                tls: bool, port: int | None, tracking_uri: str, console: Console,
                verbose: bool) -> tuple[JobOutcome, dict[str, float]]:
    """One global run over a fresh regional deployment, stopped afterwards."""
    began = time.perf_counter()
    unwind_on_sigterm()
    deployment = RegionalDeployment(layout, handoff_dir, tls=tls, port=port)
    try:
        deployment.spawn_superlinks()  # they boot while the data is checked
        preflight(cfg, deployment.global_tier.superlink.cache_dir)
        deployment.start()
        deployment.timings["startup_s"] = time.perf_counter() - began
        console.print(deployment.describe(), highlight=False)
        console.print(f"all {layout.regions + layout.num_partitions} SuperNodes online after "
                      f"{deployment.timings['startup_s']:.1f} s ({'TLS' if tls else 'insecure'})", highlight=False)
        outcome = run_job(cfg, overrides, deployment.global_tier.superlink, tracking_uri=tracking_uri,
                          console=console, verbose=verbose, extra_run_config=tier_run_config(layout, handoff_dir))
    finally:
        deployment.stop()
    deployment.timings["total_s"] = time.perf_counter() - began
    return outcome, deployment.timings


def hierarchical_overrides(overrides: list[str], layout: contract.RegionLayout) -> list[str]:
    """The same job in simulation: one cluster per region, the regions as the deployment's."""
    return [*overrides, "topology=hierarchical", f"topology.assign.num_clusters={layout.regions}",
            f"topology.assign.num_regions={layout.regions}"]


def run_hierarchical_simulation(overrides: list[str], layout: contract.RegionLayout, *, tracking_uri: str,
                                console: Console, verbose: bool) -> JobOutcome:
    from scripts.deploy_local import run_simulation

    sim_overrides = hierarchical_overrides(overrides, layout)
    return run_simulation(compose_config(sim_overrides), sim_overrides, tracking_uri=tracking_uri,
                          console=console, verbose=verbose)


def regional_metrics(tracking_uri: str, outcome: JobOutcome, layout: contract.RegionLayout) -> dict[str, list[float]]:
    """Per region, its runs' start-up and wall time per global round (from the global MLflow run)."""
    if not outcome.mlflow_run_id:
        return {}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = {}
    for region in range(layout.regions):
        for name in ("run_startup_s", "serverapp_start_s", "run_wall_s"):
            key = f"region{region}_{name}"
            history = sorted(client.get_metric_history(outcome.mlflow_run_id, key), key=lambda m: m.step)
            found[key] = [m.value for m in history]
    return found


def _round_times(outcome: JobOutcome) -> list[float]:
    return [float(r["round_wall_time_s"]) for r in outcome.rounds if r["round"] > 0 and "round_wall_time_s" in r]


def timing_table(outcome: JobOutcome, timings: dict[str, float], regional: dict[str, list[float]],
                 simulation: JobOutcome | None) -> Table:
    table = Table(title="regional deployment: wall times (s)", title_justify="left")
    for column in ("what", "deployment", "simulation (topology=hierarchical)"):
        table.add_column(column, justify="left" if column == "what" else "right")
    rounds = _round_times(outcome)
    sim_rounds = _round_times(simulation) if simulation else []

    def cell(values: list[float]) -> str:
        if not values:
            return "-"
        return " / ".join(f"{v:.1f}" for v in values)

    table.add_row("start-up: SuperLinks + SuperNodes online", f"{timings.get('startup_s', float('nan')):.1f}", "-")
    table.add_row("global run (`flwr run`)", f"{outcome.wall_time_s:.1f}",
                  f"{simulation.wall_time_s:.1f}" if simulation else "-")
    table.add_row("whole script", f"{timings.get('total_s', float('nan')):.1f}", "-")
    table.add_row("per global round", cell(rounds), cell(sim_rounds))
    if rounds:
        table.add_row("  mean", f"{statistics.mean(rounds):.1f}",
                      f"{statistics.mean(sim_rounds):.1f}" if sim_rounds else "-")
    for key, values in regional.items():
        table.add_row(f"  {key.replace('_', ' ')} per round", cell(values), "-")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.deploy_regions",
        description="A regional tier as its own Flower SuperLink + ServerApp: a global SuperLink with one regional "
        "aggregator SuperNode per region, and per region a SuperLink with its clients, on loopback.",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. num_rounds=2")
    parser.add_argument("--regions", type=int, default=2, help="number of regions (default 2)")
    parser.add_argument("--clients-per-region", type=int, default=2, help="client SuperNodes per region (default 2)")
    parser.add_argument("--insecure", action="store_true", help="plaintext instead of TLS (never across real networks)")
    parser.add_argument("--port", type=int, default=None, help="the global SuperLink's port (default: a free one)")
    parser.add_argument("--handoff-dir", type=Path, default=None,
                        help="keep the models handed between the tiers here (default: a temporary folder, removed)")
    parser.add_argument("--compare-simulation", action="store_true",
                        help="then run the same job in simulation with topology=hierarchical and compare wall times")
    parser.add_argument("--verbose", action="store_true", help="echo Flower's full log")
    args = parser.parse_args(argv)
    console = Console()
    try:
        layout = contract.RegionLayout(args.regions, args.clients_per_region)
        overrides, cfg = compose(args.overrides, layout)
    except ValueError as err:  # ConfigError, a bad --regions / --clients-per-region
        console.print(f"[bold red]error:[/bold red] {err}", highlight=False)
        return 2
    scratch = FLWR_STATE_DIR / f"regions-{uuid.uuid4().hex[:8]}"
    handoff_dir = (args.handoff_dir or scratch / "handoff").resolve()
    tracking_uri = default_tracking_uri()
    simulation = None
    try:
        outcome, timings = run_regions(cfg, overrides, layout, handoff_dir, tls=not args.insecure, port=args.port,
                                       tracking_uri=tracking_uri, console=console, verbose=args.verbose)
        if args.compare_simulation and outcome.ok:
            simulation = run_hierarchical_simulation(overrides, layout, tracking_uri=tracking_uri, console=console,
                                                     verbose=args.verbose)
    except SuperLinkError as err:
        console.print(f"[bold red]error:[/bold red] {err}", highlight=False)
        return 1
    except ValueError as err:  # DataError from the preflight
        console.print(f"[bold red]error:[/bold red] {err}", highlight=False)
        return 2
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    outcomes = [outcome] + ([simulation] if simulation else [])
    console.print(summary_table(outcomes))
    console.print(timing_table(outcome, timings, regional_metrics(tracking_uri, outcome, layout), simulation))
    failed = [o for o in outcomes if not o.ok]
    for o in failed:
        console.print(f"[bold red]run failed[/bold red] ({o.status}); last log lines:")
        console.print(o.reason, markup=False, highlight=False)
        console.print(f"full log: {o.log_path}; the regions' `flwr run` logs: {handoff_dir}/round-*/region-*/flwr-run.log"
                      + ("" if args.handoff_dir else " (removed: pass --handoff-dir to keep them)"))
    if not failed:
        console.print(f"MLflow: {mlflow_ui_hint(tracking_uri)} (regional runs: experiment "
                      f"'{cfg.tracking.experiment}-regions')")
        if args.handoff_dir:
            console.print(f"hand-off files: {handoff_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
