"""State shared by a sweep's jobs and its Hydra callback.

Kept apart from ``scripts/sweep.py``: run as ``python -m scripts.sweep`` that
module is ``__main__``, while Hydra imports the callback by its dotted name; a
second copy of the module would hold a second, empty, list of outcomes.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console

from fl_server.experiments.tracking import RunTracker, default_tracking_uri
from fl_server.runtime.launch import JobOutcome, summary_table
from fl_server.runtime.superlink import LocalSuperLink

PARENT_ENV = "FEDCONTINUUM_SWEEP_PARENT_RUN_ID"
console = Console()
_superlink: LocalSuperLink | None = None
outcomes: list[JobOutcome] = []


def shared_superlink(shared_ray: bool = True) -> LocalSuperLink:
    """One SuperLink for all jobs of this process, stopped at the end (also on
    Ctrl-C and SIGTERM: ``atexit``, see :func:`fl_server.runtime.superlink.unwind_on_sigterm`).

    With ``shared_ray`` (``simulation.shared_ray``, the default) it first
    starts a private Ray head that every job's simulation joins, so Ray's
    start-up is paid once per sweep; the first call decides.
    """
    global _superlink
    if _superlink is None:
        atexit.register(_stop_superlink)  # first: a Ctrl-C while Ray starts still stops it
        _superlink = LocalSuperLink(ray_head=shared_ray)
        try:
            _superlink.start()
        except BaseException:
            _stop_superlink()
            raise
        if _superlink.ray is not None:
            console.print(f"Ray head {_superlink.ray.address} started in {_superlink.ray.startup_s:.1f} s: "
                          "every job's simulation joins it (simulation.shared_ray=false: one Ray per job)")
    return _superlink


def _stop_superlink() -> None:
    global _superlink
    if _superlink is not None:
        _superlink.stop()
        _superlink = None


def interrupted(reason: str) -> None:
    """Mark the sweep's parent run FAILED with ``reason`` (the sweep stops; its end hook will not run)."""
    parent_run_id = os.environ.pop(PARENT_ENV, None)
    if parent_run_id:
        try:
            from fl_server.experiments.tracking import mark_failed

            mark_failed(default_tracking_uri(), parent_run_id, reason)
        except Exception:  # noqa: BLE001 - stopping matters more than the record
            pass


class SweepParentRun(Callback):
    """Hydra callback: an MLflow parent run around a ``--multirun`` sweep."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = " ".join(config.hydra.overrides.task)
        tracker = RunTracker(
            default_tracking_uri(),
            experiment=str(config.tracking.experiment),
            run_name=f"sweep {time.strftime('%Y-%m-%d %H:%M:%S')}",
            tags={"fc.kind": "sweep", "fc.sweep": sweep},
        )
        tracker.log_params({"sweep": sweep, "sweep_dir": str(config.hydra.sweep.dir)})
        tracker.flush()
        os.environ[PARENT_ENV] = tracker.run_id
        console.print(f"[bold]sweep[/bold] {sweep}  (MLflow parent run {tracker.run_id})")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _stop_superlink()
        parent_run_id = os.environ.pop(PARENT_ENV, None)
        console.print(summary_table(outcomes))
        failed = [o for o in outcomes if not o.ok]
        if parent_run_id:
            _finish_parent(parent_run_id, failed, config.report.target_accuracy)
        if failed:
            console.print(f"[bold red]{len(failed)} of {len(outcomes)} runs failed[/bold red]")
            sys.exit(1)


def _finish_parent(parent_run_id: str, failed: list[JobOutcome], target: float | None) -> None:
    from mlflow.tracking import MlflowClient

    from scripts.report import accuracy_vs_rho_figure, child_runs, markdown, summarise
    from scripts.rl_study import is_rl_sweep
    from scripts.rl_study import report as rl_report

    client = MlflowClient(default_tracking_uri())
    try:
        if is_rl_sweep(client, parent_run_id):  # RL agents: the study tables (paper 001 / 000)
            text = rl_report(client, parent_run_id)
        else:
            table = summarise(child_runs(client, parent_run_id, target))
            text = markdown(table)
            client.log_text(parent_run_id, text, "report/summary.md")
            client.log_figure(parent_run_id, accuracy_vs_rho_figure(table), "report/accuracy_vs_rho.png")
        console.print(text, markup=False, highlight=False)
    except Exception as err:  # the parent must still be closed with its status
        console.print(f"[yellow]warning:[/yellow] sweep report failed: {err}")
    if failed:
        reasons = "; ".join(f"{o.run_name}: {o.status}" for o in failed)
        client.set_tag(parent_run_id, "fc.failure_reason", reasons[:5000])
    client.set_terminated(parent_run_id, status="FAILED" if failed else "FINISHED")
