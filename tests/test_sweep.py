"""A Hydra multirun of two configurations: one MLflow parent, two children."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from .conftest import run_module, sqlite_uri

pytestmark = pytest.mark.e2e


def test_multirun_groups_children_under_one_parent(tmp_path):
    uri = sqlite_uri(tmp_path)
    result = run_module(
        "scripts.sweep",
        "--multirun",
        "num_rounds=1",
        "clients.num=2",
        "strategy=fedavg,fedavgm",
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
    assert sorted(c.data.tags["strategy"] for c in children) == ["fedavg", "fedavgm"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert parent.info.status == "FINISHED"
    assert "strategy=fedavg,fedavgm" in parent.data.tags["fc.sweep"]
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/summary.md", "report/accuracy_vs_rho.png"} <= report
    assert "fedavgm" in result.stdout  # the printed summary
