"""A Hydra multirun of two configurations: one MLflow parent, two children.

The two configurations are the two new strategies (ASS and staleness-aware
clustered), 3 rounds each on a real Flower simulation, with device
availability and a round deadline so that stale updates occur."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fl_server.runtime.superlink import descendants
from tests.conftest import PROJECT_DIR, run_module, sqlite_uri

pytestmark = pytest.mark.e2e


def test_multirun_groups_children_under_one_parent(tmp_path):
    uri = sqlite_uri(tmp_path)
    result = run_module(
        "scripts.sweep",
        "--multirun",
        "num_rounds=3",
        "clients.num=4",
        "devices.availability=true",
        "devices.deadline_s=0.09",
        "strategy=ass,staleness_clustered",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("fc.kind") == "sweep"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2
    assert sorted(c.data.tags["strategy"] for c in children) == ["ass", "staleness_clustered"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert parent.info.status == "FINISHED"
    assert "strategy=ass,staleness_clustered" in parent.data.tags["fc.sweep"]
    for child in children:
        history = client.get_metric_history(child.info.run_id, "test_accuracy")
        assert [m.step for m in history] == [0, 1, 2, 3]
        assert len(client.get_metric_history(child.info.run_id, "virtual_time_s")) == 3
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/summary.md", "report/accuracy_vs_rho.png"} <= report
    assert "staleness_clustered" in result.stdout  # the printed summary


def _commands(pids) -> dict[int, str]:
    found = {}
    for pid in pids:
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            pass
    return found


def test_a_terminated_sweep_stops_its_superlink_ray_head_simulation_and_actors(tmp_path):
    """SIGTERM (timeout, kill, a scheduler) in the middle of a shared-Ray sweep job leaves nothing running."""
    # Prepare: a sweep whose first job runs long enough to be caught mid-run
    sweep = subprocess.Popen(
        [sys.executable, "-m", "scripts.sweep", "--multirun", "num_rounds=200", "clients.num=2", "seed=0,1",
         f"hydra.sweep.dir={tmp_path / 'multirun'}"],
        cwd=PROJECT_DIR, env={**os.environ, "MLFLOW_TRACKING_URI": sqlite_uri(tmp_path)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            started = _commands(descendants(sweep.pid))
            if any(c.startswith("ray::ClientAppActor") for c in started.values()):
                break  # the job's actors run in the sweep's Ray head
            time.sleep(0.5)
        assert any("ray start --head" in c for c in started.values()), started
        assert any("flwr-simulation" in c for c in started.values()), started
        assert any(c.startswith("ray::ClientAppActor") for c in started.values()), started
        (head,) = [pid for pid, c in started.items() if "ray start --head" in c]
        under_head = descendants(head)
        assert any(c.startswith("ray::ClientAppActor") for c in _commands(under_head).values())  # it joined the head
        assert not any("gcs_server" in c for pid, c in started.items() if pid not in under_head)  # and has no Ray of its own
        client = MlflowClient(sqlite_uri(tmp_path))
        while len(client.search_runs([e.experiment_id for e in client.search_experiments()])) < 2:
            assert time.monotonic() < deadline + 60, "the job's MLflow run was not created"
            time.sleep(0.5)
        time.sleep(2)  # the launcher reads the job's run id from the streamed log
        # Execute
        sweep.send_signal(signal.SIGTERM)
        code = sweep.wait(timeout=90)
        # Assert: exit 128 + SIGTERM; none of the processes it had started lives on
        assert code == 128 + signal.SIGTERM
        time.sleep(1)
        alive = {pid: c for pid, c in _commands(started).items() if c == started[pid]}
        assert not alive, alive
        # the sweep's parent and the interrupted job: FAILED, with why
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert runs and all(r.info.status == "FAILED" and "interrupted" in r.data.tags["fc.failure_reason"] for r in runs)
    finally:
        if sweep.poll() is None:
            sweep.kill()
        for pid, command in _commands(started).items():
            if command == started.get(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
