"""What the studies that submit their own jobs share: the jobs as child runs of
one parent on one SuperLink, and the parent's closing status."""

from __future__ import annotations

import time

from mlflow.tracking import MlflowClient
from rich.console import Console

from fl_server.experiments.config import ConfigError, compose_config
from fl_server.experiments.tracking import RunTracker
from fl_server.runtime.launch import JobOutcome, preflight, run_job, summary_table
from fl_server.runtime.superlink import LocalSuperLink


def run_jobs(planned: list[tuple[str, list[str]]], parent_run_id: str, tracking_uri: str,
             console: Console, ray_head: bool = False) -> list[JobOutcome]:
    """Run every ``(label, overrides)`` job as a child of ``parent_run_id`` on one
    SuperLink; an invalid config is reported and skipped. Prints the summary table.
    ``ray_head``: one private Ray head for all jobs (Ray's start-up paid once, as a sweep)."""
    outcomes: list[JobOutcome] = []
    started = time.perf_counter()
    with LocalSuperLink(ray_head=ray_head) as superlink:
        for number, (label, overrides) in enumerate(planned, start=1):
            console.print(f"[bold]job {number}/{len(planned)}[/bold] {label}  ({time.perf_counter() - started:.0f} s so far)")
            try:
                cfg = compose_config(overrides)
                preflight(cfg, superlink.cache_dir)
            except (ConfigError, ValueError) as err:
                console.print(f"[red]error:[/red] {label}: {err}")
                outcomes.append(JobOutcome(ok=False, status="invalid config", run_name=label, reason=str(err)))
                continue
            outcomes.append(run_job(cfg, overrides, superlink, tracking_uri=tracking_uri,
                                    parent_run_id=parent_run_id, console=console))
    console.print(summary_table(outcomes))
    return outcomes


def close_parent(parent: RunTracker, outcomes: list[JobOutcome]) -> None:
    """FINISHED, or FAILED with every failed job's status as the reason."""
    failed = [o for o in outcomes if not o.ok]
    client = MlflowClient(parent.tracking_uri)
    if failed:
        client.set_tag(parent.run_id, "fc.failure_reason", "; ".join(f"{o.run_name}: {o.status}" for o in failed)[:5000])
    parent.flush()
    client.set_terminated(parent.run_id, status="FAILED" if failed else "FINISHED")
