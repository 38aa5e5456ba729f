"""Run one experiment with ``flwr run`` on a local simulation, robustly.

    python -m fl_server.launch [HYDRA_OVERRIDE ...] [--verbose] [--show-config] [--profile]

What this adds around ``flwr run . --stream``:

* the config is composed and validated *before* anything starts, so bad input
  gives one clear error (exit 2) and no traceback;
* a SuperLink of our own (free port, project-local ``FLWR_HOME``), stopped by
  PID when we are done;
* the federation settings (``num-supernodes`` = ``clients.num``, CPUs per
  client) passed per run, from the same config;
* a progress bar and a summary table instead of Ray's log noise (the full log
  is kept in ``outputs/`` and attached to the MLflow run);
* the run's final status checked, since ``flwr run`` exits 0 even when the run
  failed: a failed run exits 1 and its MLflow run is marked FAILED.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fl_common.regions import run_config_args
from fl_server.experiments import progress
from fl_server.experiments.config import (
    PROJECT_DIR,
    ConfigError,
    compose_config,
    default_run_name,
    default_tracking_uri,
    join_overrides,
)
from fl_server.runtime.superlink import CONNECTION, LocalSuperLink, SuperLinkError

LOG_DIR = PROJECT_DIR / "outputs" / "launch"
# Set to a file: every finished job appends its outcome there as one JSON line
# (timings included); benchmarks and batch tooling read it.
OUTCOME_LOG_ENV = "FEDCONTINUUM_OUTCOME_LOG"
_RUN_ID = re.compile(r"Successfully started run (\d+)")
# What the Flower app consists of; nothing else goes into its FAB.
APP_PARTS = ("fl_server", "fl_clients", "fl_common", "tasks", "fl_datasets", "strategies", "conf", "edgesim")
APP_FILES = ("pyproject.toml", "README.md")


@dataclass
class JobOutcome:
    """What a launched run ended with."""

    ok: bool
    status: str
    run_name: str
    flower_run_id: int | None = None
    mlflow_run_id: str | None = None
    final: dict[str, float] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0
    log_path: Path | None = None
    reason: str = ""
    timeline: dict[str, float] = field(default_factory=dict)  # the ServerApp's start-up marks (epoch s)
    began_at: float = float("nan")  # epoch s: the job began (launcher: after its imports; sweep: Hydra job)
    submitted_at: float = float("nan")  # epoch s: `flwr run` launched
    started_at: float = float("nan")  # epoch s: "Successfully started run" seen
    ended_at: float = float("nan")  # epoch s: the `flwr run` stream ended
    settled_at: float = float("nan")  # epoch s: final status known

    def to_json(self) -> str:
        import dataclasses
        import json

        return json.dumps({**dataclasses.asdict(self), "log_path": str(self.log_path or "")}, default=str)


def preflight(cfg: DictConfig, cache_dir: Path | None = None) -> None:
    """Build the federated data once here, so bad data input fails before Ray
    starts; with ``cache_dir`` the split is saved for the run's processes."""
    import os

    from fl_datasets.federated import CACHE_ENV

    if cache_dir is not None:
        os.environ[CACHE_ENV] = str(cache_dir)
    if cfg.checkpoint.resume:
        from fl_server.engine.checkpoint import RunCheckpoints

        RunCheckpoints(cfg)  # CheckpointError: unknown run, corrupt file, changed config
    from tasks.registry import task_of

    task_of(cfg).prepare(cfg, default_tracking_uri())
    # The devices' memory check needs torch (~2 s to import here); the
    # ServerApp makes it before round 1 and fails the run with its message.


def stage_app(dest: Path) -> Path:
    """Copy the app's own files to ``dest`` for ``flwr run``.

    ``flwr run DIR`` walks all of DIR to build its FAB, the 6 GB ``.venv``
    included (~4.5 s here) before filtering; a staged copy of the few dozen
    files that make up the app builds in milliseconds and contains exactly
    the app.
    """
    import shutil

    if (dest / "pyproject.toml").exists():
        return dest
    ignore = shutil.ignore_patterns("__pycache__", "test_*.py", "*.pyc")
    for part in APP_PARTS:
        shutil.copytree(PROJECT_DIR / part, dest / part, ignore=ignore, dirs_exist_ok=True)
    for name in APP_FILES:
        shutil.copy2(PROJECT_DIR / name, dest / name)
    return dest


def federation_config(cfg: DictConfig) -> str:
    """The per-run ``--federation-config`` string, from the composed config."""
    return (
        f"num-supernodes={int(cfg.clients.num)} "
        f"client-resources-num-cpus={int(cfg.simulation.cpus_per_client)} "
        f"client-resources-num-gpus={float(cfg.simulation.gpus_per_client)} "
        'init-args-logging-level="error" init-args-log-to-driver=false'
    )


def run_config(overrides: list[str], tracking_uri: str, parent_run_id: str | None,
               extra: dict[str, str] | None = None) -> list[str]:
    """``--run-config`` arguments; one per key so values may contain spaces.

    ``extra``: more run-config keys (a regional deployment's tier, see
    :mod:`fl_common.regions`)."""
    values = {
        "overrides": join_overrides(overrides),
        "project-dir": str(PROJECT_DIR),
        "tracking-uri": tracking_uri,
        "parent-run-id": parent_run_id or "",
        **(extra or {}),
    }
    try:
        return run_config_args(values)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def run_job(
    cfg: DictConfig,
    overrides: list[str],
    superlink: LocalSuperLink,
    *,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    console: Console | None = None,
    verbose: bool = False,
    began_at: float | None = None,
    extra_run_config: dict[str, str] | None = None,
) -> JobOutcome:
    """Submit one run to ``superlink``, follow it to the end, check its status.

    ``began_at`` (epoch s) is when the job began, for its timings (default: now);
    ``extra_run_config``: more run-config keys (see :func:`run_config`)."""
    console = console or Console()
    tracking_uri = tracking_uri or default_tracking_uri()
    run_name = default_run_name(cfg)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{datetime.now():%Y%m%d-%H%M%S}-{run_name}.log"
    outcome = JobOutcome(ok=False, status="not started", run_name=run_name, log_path=log_path,
                         began_at=time.time() if began_at is None else began_at)
    command = superlink.flwr(
        "run",
        str(stage_app(superlink.home / "app")),
        CONNECTION,
        "--stream",
        # simulation settings; a Deployment Engine federation is its SuperNodes
        *(["--federation-config", federation_config(cfg)] if superlink.simulation else []),
        *run_config(overrides, tracking_uri, parent_run_id, extra_run_config),
    )
    started = time.perf_counter()
    outcome.submitted_at = time.time()
    try:
        with log_path.open("w") as log, _progress(console) as bar:
            task = bar.add_task(run_name, total=int(cfg.num_rounds), status="submitting…")
            proc = subprocess.Popen(
                command,
                env=superlink.env,
                cwd=PROJECT_DIR,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if verbose:
                    bar.console.print(line.rstrip(), markup=False, highlight=False)
                _follow(line, outcome, bar, task)
            proc.wait()
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C / SIGTERM: the caller stops the SuperLink, the run ends here
        if outcome.mlflow_run_id:
            try:
                from fl_server.experiments.tracking import mark_failed

                mark_failed(tracking_uri, outcome.mlflow_run_id, "interrupted (Ctrl-C or SIGTERM): the rounds logged so far "
                            "are kept; checkpoint.resume=<this run id> continues it")
            except Exception:  # noqa: BLE001 - stopping matters more than the record
                pass
        raise
    outcome.ended_at = time.time()
    outcome.wall_time_s = time.perf_counter() - started
    _settle(outcome, superlink, tracking_uri, proc.returncode)
    outcome.settled_at = time.time()
    record_outcome(outcome)
    return outcome


def record_outcome(outcome: JobOutcome) -> None:
    """Append ``outcome`` to ``$FEDCONTINUUM_OUTCOME_LOG`` (one JSON line), if set."""
    import os

    path = os.environ.get(OUTCOME_LOG_ENV)
    if path:
        with open(path, "a") as log:
            log.write(outcome.to_json() + "\n")


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _follow(line: str, outcome: JobOutcome, bar: Progress, task: Any) -> None:
    if outcome.flower_run_id is None and (match := _RUN_ID.search(line)):
        outcome.flower_run_id = int(match.group(1))
        outcome.started_at = time.time()
        bar.update(task, status="starting Ray…")
    event = progress.parse(line)
    if event is None:
        return
    kind = event.pop("kind")
    if kind == "start":
        outcome.mlflow_run_id = event.get("mlflow_run_id")
        bar.update(task, status="round 1 running")
    elif kind == "round":
        outcome.rounds.append(event)
        if event["round"] > 0:
            bar.update(task, completed=event["round"])
        bar.update(task, status=_headline(event))
    elif kind == "finished":
        outcome.final = {k: v for k, v in event.items() if k != "mlflow_run_id"}
    elif kind == "failed":
        outcome.reason = event.get("reason", "")
    elif kind == "timeline":
        outcome.timeline = event


def _headline(event: dict[str, Any]) -> str:
    if "eval_return" in event:  # RL agents in the twin
        return f"return {event['eval_return']:.2f}  SLO viol. {event.get('eval_slo_violation_rate', float('nan')):.3f}"
    if "test_mase" in event:  # forecasting
        return f"MASE {event['test_mase']:.3f}  MAE {event.get('test_mae', float('nan')):.3f}"
    if "fed_test_mase" in event:  # forecasting with personal heads: as the sites scored what they deploy
        return f"site MASE {event['fed_test_mase']:.3f}  MAE {event.get('fed_test_mae', float('nan')):.3f}"
    if "rpp_exact_acc" in event:  # CDIO: the preference predictor and the round's placement
        return f"RPP acc {event['rpp_exact_acc']:.3f}  CDIO success {event.get('cdio_success_both', float('nan')):.3f}"
    return (
        f"acc {event.get('test_accuracy', float('nan')):.3f}  "
        f"macro-F1 {event.get('test_macro_f1', float('nan')):.3f}"
    )


def _settle(outcome: JobOutcome, superlink: LocalSuperLink, tracking_uri: str, returncode: int) -> None:
    """Decide success from Flower's recorded status, never from the exit code."""
    if outcome.flower_run_id is None:
        outcome.status = f"flwr run exited {returncode} before starting a run"
        outcome.reason = outcome.reason or _tail(outcome.log_path)
    else:
        try:
            outcome.status = superlink.run_status(outcome.flower_run_id)
        except SuperLinkError as err:
            outcome.status = f"unknown ({err})"
    outcome.ok = outcome.status == "finished:completed" and bool(outcome.final)
    if not outcome.ok:
        outcome.reason = outcome.reason or _tail(outcome.log_path)
        if outcome.mlflow_run_id:
            # the log of a failed run belongs with it; a successful run's stays in outputs/
            from fl_server.experiments.tracking import attach_log, mark_failed

            mark_failed(tracking_uri, outcome.mlflow_run_id, f"{outcome.status}: {outcome.reason}")
            attach_log(tracking_uri, outcome.mlflow_run_id, outcome.log_path)


def _tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    kept = [l for l in path.read_text().splitlines() if l.strip()]
    return "\n".join(kept[-lines:])


def summary_table(outcomes: list[JobOutcome], tracking_uri: str | None = None) -> Table:
    """One row per run: the headline metrics people compare."""
    table = Table(title="fedcontinuum runs", title_justify="left")
    headline = _summary_columns(outcomes)
    for column in ("run", "status", *headline.keys(), "wall s", "MLflow run"):
        table.add_column(column, justify="right" if column not in ("run", "status", "MLflow run") else "left")
    for o in outcomes:
        f = o.final
        table.add_row(
            o.run_name,
            "[green]ok[/green]" if o.ok else f"[red]{o.status}[/red]",
            *(_fmt(f.get(key)) for key in headline.values()),
            f"{o.wall_time_s:.1f}",
            (o.mlflow_run_id or "-")[:12],
        )
    return table


def _summary_columns(outcomes: list[JobOutcome]) -> dict[str, str]:
    """The columns of the task whose headline metric the runs report (image by default)."""
    from tasks.registry import TASKS, get_task

    for kind in TASKS:
        columns = get_task(kind).summary_columns()
        if any(next(iter(columns.values())) in o.final for o in outcomes):
            return columns
    return get_task("image").summary_columns()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def resume_hint(cfg: DictConfig, overrides: list[str], outcome: JobOutcome) -> str | None:
    """How to continue a failed run from its last checkpoint, if it has one."""
    if not outcome.mlflow_run_id:
        return None
    path = Path(cfg.checkpoint.dir) / outcome.mlflow_run_id / "latest.pkl"
    if not path.is_file():
        return None
    kept = [o for o in overrides if not o.startswith("checkpoint.resume=")]
    return ("resume from its last completed round with:\n  python -m fl_server.launch "
            + " ".join([*kept, f"checkpoint.resume={outcome.mlflow_run_id}"]))


def mlflow_ui_hint(tracking_uri: str) -> str:
    from fl_server.experiments.mlflow_ui import hint

    return hint(tracking_uri)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fl_server.launch",
        description="Run one fedcontinuum experiment as a Flower simulation (flwr run).",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. strategy=fedavgm partition.rho=10")
    parser.add_argument("--verbose", action="store_true", help="echo Flower's and Ray's full log")
    parser.add_argument("--show-config", action="store_true", help="print the composed config and exit")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the ServerApp's run (= tracking.profile=true): MLflow artifacts "
                             "profile/server.pstats and profile/server_top.txt")
    args = parser.parse_args(argv)
    if args.profile:
        args.overrides = [o for o in args.overrides if not o.startswith("tracking.profile=")] + ["tracking.profile=true"]
    began_at = time.time()
    console = Console()
    try:
        cfg = compose_config(args.overrides)
        if args.show_config:
            console.print(OmegaConf.to_yaml(cfg), markup=False)
            return 0
    except ValueError as err:  # ConfigError and DataError
        console.print(f"[bold red]error:[/bold red] {err}", highlight=False)
        return 2
    tracking_uri = default_tracking_uri()
    superlink = LocalSuperLink()
    try:
        superlink.spawn()  # boots while the data is checked
        try:
            preflight(cfg, superlink.cache_dir)
        except ValueError as err:  # DataError: e.g. more clients than samples
            console.print(f"[bold red]error:[/bold red] {err}", highlight=False)
            return 2
        superlink.wait_until_ready()
        outcome = run_job(cfg, args.overrides, superlink, tracking_uri=tracking_uri, console=console, verbose=args.verbose,
                          began_at=began_at)
    except SuperLinkError as err:
        console.print(f"[bold red]error:[/bold red] {err}", highlight=False)
        return 1
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/bold red]: the SuperLink and its simulation are stopped; "
                      "MLflow keeps the rounds logged so far", highlight=False)
        return 130
    finally:
        superlink.stop()  # also on SIGTERM (superlink.unwind_on_sigterm)
    console.print(summary_table([outcome]))
    if not outcome.ok:
        console.print(f"[bold red]run failed[/bold red] ({outcome.status}); last log lines:")
        console.print(outcome.reason, markup=False, highlight=False)
        console.print(f"full log: {outcome.log_path}")
        hint = resume_hint(cfg, args.overrides, outcome)
        if hint:
            console.print(hint, markup=False, highlight=False)
        return 1
    console.print(f"MLflow: {mlflow_ui_hint(tracking_uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
