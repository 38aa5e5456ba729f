"""Per-client metrics of large federations: a fixed, nested sample and summaries over all."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from fl_common.per_client import sample_clients
from fl_server.engine.per_client import limit_per_client
from fl_server.experiments.config import compose_config
from fl_server.experiments.experiment import run_experiment
from tests.conftest import persistent_clients


def test_small_federations_report_every_client():
    assert sample_clients(100, 100) is None and sample_clients(5, None) is None
    metrics = {"epsilon_p0": 1.0, "epsilon_p1": 2.0, "test_accuracy": 0.5}
    assert limit_per_client(metrics, None) is metrics


def test_the_sample_is_fixed_sorted_and_nested():
    small, large = sample_clients(1000, 10), sample_clients(1000, 100)
    assert len(small) == 10 and len(large) == 100 and list(large) == sorted(large)
    assert set(small) <= set(large)
    assert sample_clients(1000, 10) == small  # the same every run, whatever the run's seed


def test_above_the_limit_only_sampled_clients_keep_their_keys_and_every_family_is_summarised():
    metrics = {f"ass_weight_p{p}": float(p) for p in range(5)} | {"cluster_p3": 1.0, "epsilon_mean": 7.0,
                                                                  "epsilon_p4": 9.0, "test_accuracy": 0.5}
    out = limit_per_client(metrics, {1, 3})
    assert {k for k in out if "_p" in k} == {"ass_weight_p1", "ass_weight_p3", "cluster_p3"}
    assert out["ass_weight_min"] == 0 and out["ass_weight_max"] == 4 and out["ass_weight_mean"] == pytest.approx(2)
    assert out["epsilon_mean"] == 7.0 and out["epsilon_max"] == 9.0  # an existing summary is kept
    assert out["test_accuracy"] == 0.5


def test_a_run_above_the_limit_logs_per_client_metrics_for_the_sample_only(tracking_uri, tmp_path):
    # Prepare: clustered aggregation reports cluster_p<id> for every client that replied
    cfg = compose_config(["clients.num=6", "num_rounds=1", "seed=1", "strategy=staleness_clustered",
                          "strategy.num_clusters=2", "tracking.per_client_limit=2", "tracking.log_model=false",
                          f"checkpoint.dir={tmp_path / 'ckpt'}"])
    grid, _ = persistent_clients(6)
    # Execute
    run_experiment(grid, cfg, tracking_uri)
    # Assert
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    logged = sorted(k for k in run.data.metrics if k.startswith("cluster_p"))
    assert logged == [f"cluster_p{p}" for p in sample_clients(6, 2)]
    assert {"cluster_min", "cluster_mean", "cluster_max"} <= set(run.data.metrics)
