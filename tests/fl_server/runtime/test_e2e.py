"""End to end through `flwr run` on a real SuperLink + Ray simulation.

Each simulation costs ~15 s of Ray start-up and ~1.5 GB, so the launcher run
is one session fixture shared by the assertions below.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fl_server.experiments.config import compose_config
from fl_server.runtime.launch import run_job
from fl_server.runtime.superlink import FLWR_STATE_DIR, LocalSuperLink, descendant_groups
from tests.conftest import PROJECT_DIR, sqlite_uri

pytestmark = pytest.mark.e2e


def test_launcher_run_completes_with_accuracy_above_chance(e2e_run):
    result, uri = e2e_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    accuracy = client.get_metric_history(run.info.run_id, "test_accuracy")
    assert [m.step for m in accuracy] == [0, 1, 2]  # initial model + 2 rounds
    assert accuracy[-1].value > 0.2  # 10 classes: chance is 0.1
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "clients_replied")] == [4, 4]
    assert not client.list_artifacts(run.info.run_id, "logs")  # logs are attached to failed runs only


def test_launcher_prints_progress_and_a_summary_not_ray_noise(e2e_run):
    result, _ = e2e_run
    assert "fedcontinuum runs" in result.stdout  # the summary table
    assert "2/2" in result.stdout  # the progress bar reached the last round
    assert "mlflow ui --backend-store-uri" in result.stdout
    assert "ray" not in result.stdout.lower().replace("array", "")


def test_superlink_and_its_children_are_stopped_by_pid():
    with LocalSuperLink() as superlink:
        pid, home = superlink.process.pid, superlink.home
        assert home.is_dir()
        os.kill(pid, 0)  # alive while in use
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole process group is gone
    assert not home.exists()  # its FLWR_HOME is cleaned up


def test_a_ray_head_starts_with_the_superlink_and_is_stopped_by_pid_with_its_temp_dir():
    with LocalSuperLink(ray_head=True) as superlink:
        head = superlink.ray
        assert head is not None and superlink.env["RAY_ADDRESS"] == head.address  # every simulation joins it
        temp = head.temp_dir
        assert temp.is_dir() and processes_mentioning(str(temp))  # GCS, raylet, ... run with its temp dir
        assert head.job_workers() == []  # no job yet: no actors
    assert not processes_mentioning(str(temp))  # all stopped ...
    assert not temp.exists()  # ... and its temp dir removed
    assert "RAY_ADDRESS" not in superlink.env


def test_a_terminated_launcher_stops_its_superlink_and_simulation(tmp_path):
    """SIGTERM (timeout, kill, a scheduler) must not orphan the SuperLink, the simulation or Ray."""
    # Prepare: a real launcher run; its SuperLink writes .flwr/superlink-<port>/superlink.pid
    before = set(FLWR_STATE_DIR.glob("superlink-*/superlink.pid"))
    launcher = subprocess.Popen([sys.executable, "-m", "fl_server.runtime.launch", "num_rounds=50", "clients.num=2"],
                                cwd=PROJECT_DIR, env={**os.environ, "MLFLOW_TRACKING_URI": sqlite_uri(tmp_path)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid = None
    try:  # whatever fails below, no launcher, SuperLink or simulation is left for the rest of the suite
        deadline = time.monotonic() + 60
        while not (new := set(FLWR_STATE_DIR.glob("superlink-*/superlink.pid")) - before) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert new, "the launcher started no SuperLink within 60 s"
        (pid_file,) = new
        pid, address = int(pid_file.read_text()), "127.0.0.1:" + pid_file.parent.name.removeprefix("superlink-")
        while not any("flwr-simulation" in c for c in processes_mentioning(address)) and time.monotonic() < deadline + 60:
            time.sleep(0.5)  # wait for the simulation: Flower starts it in a process session of its own
        assert processes_mentioning(address), "no flwr-simulation started within 120 s"
        # Execute
        launcher.send_signal(signal.SIGTERM)
        code = launcher.wait(timeout=60)
        # Assert: exit 128 + SIGTERM, the SuperLink's group gone, its FLWR_HOME removed, no simulation left
        assert code == 128 + signal.SIGTERM
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
        assert not pid_file.parent.exists()
        assert not processes_mentioning(address)
    finally:
        if launcher.poll() is None:  # SIGTERM first: it unwinds and stops what the launcher started
            launcher.terminate()
            try:
                launcher.wait(timeout=30)
            except subprocess.TimeoutExpired:
                launcher.kill()
        for victim in [] if pid is None else [pid, *descendant_groups(pid)]:
            try:
                os.killpg(victim, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command:
            found.append(command)
    return found


def test_a_failed_flower_run_is_reported_as_failed(tmp_path):
    """`flwr run` exits 0 when the run fails; the launcher must not believe it."""
    cfg = compose_config(["num_rounds=1", "clients.num=2"])
    with LocalSuperLink() as superlink:
        # overrides the ServerApp cannot compose: the run fails inside Flower
        outcome = run_job(cfg, ["strategy=nonexistent"], superlink, tracking_uri=f"sqlite:///{tmp_path}/m.db")
    assert not outcome.ok
    assert outcome.flower_run_id is not None
    assert outcome.status.startswith("finished:") and outcome.status != "finished:completed"
