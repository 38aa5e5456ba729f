"""RunTracker against a real (temporary) MLflow SQLite store."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from fl_server.experiments.tracking import FAILURE_TAG, RunTracker, mark_failed


def test_queued_metrics_and_params_are_all_written_in_order(tracking_uri):
    created = []
    tracker = RunTracker(tracking_uri, "exp", "run", tags={"strategy": "fedavg"},
                         on_created=lambda run_id, exp_id: created.append(run_id))
    tracker.log_params({"a.b": 1, "c": "x"})
    for step in range(5):
        tracker.log_metrics({"acc": step / 10}, step=step)
    tracker.finish()
    run = MlflowClient(tracking_uri).get_run(tracker.run_id)
    assert created == [tracker.run_id]
    assert run.info.status == "FINISHED"
    assert run.data.params == {"a.b": "1", "c": "x"}
    assert run.data.tags["strategy"] == "fedavg"
    history = MlflowClient(tracking_uri).get_metric_history(tracker.run_id, "acc")
    assert [(m.step, m.value) for m in history] == [(s, s / 10) for s in range(5)]


def test_fail_keeps_what_was_logged(tracking_uri):
    tracker = RunTracker(tracking_uri, "exp", "run")
    tracker.log_metrics({"acc": 0.5}, step=1)
    tracker.fail("ValueError: boom")
    run = MlflowClient(tracking_uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[FAILURE_TAG] == "ValueError: boom"
    assert run.data.metrics["acc"] == 0.5


def test_a_failed_operation_makes_finish_raise_not_finish(tracking_uri):
    tracker = RunTracker(tracking_uri, "exp", "run")

    def broken_figure():
        raise RuntimeError("no figure")

    tracker.log_figure(broken_figure, "plots/x.png")
    with pytest.raises(RuntimeError, match="no figure"):
        tracker.finish()
    tracker.fail("RuntimeError: no figure")
    assert MlflowClient(tracking_uri).get_run(tracker.run_id).info.status == "FAILED"


def test_an_unusable_store_is_reported_when_the_run_is_needed():
    tracker = RunTracker("nosuchscheme://nowhere", "exp", "run")
    tracker.log_metrics({"acc": 1.0}, step=0)
    with pytest.raises(Exception, match="nosuchscheme"):
        tracker.run_id


def test_mark_failed_from_outside_leaves_ended_runs_alone(tracking_uri):
    running = RunTracker(tracking_uri, "exp", "running")
    running.flush()
    done = RunTracker(tracking_uri, "exp", "done")
    done.finish()
    mark_failed(tracking_uri, running.run_id, "killed")
    mark_failed(tracking_uri, done.run_id, "killed")
    client = MlflowClient(tracking_uri)
    assert client.get_run(running.run_id).info.status == "FAILED"
    assert client.get_run(done.run_id).info.status == "FINISHED"
