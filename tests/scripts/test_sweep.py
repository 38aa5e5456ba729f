"""A Hydra multirun of two configurations: one MLflow parent, two children.

The two configurations are the two new strategies (ASS and staleness-aware
clustered), 3 rounds each on a real Flower simulation, with device
availability and a round deadline so that stale updates occur."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_module, sqlite_uri

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
