"""The hierarchy study's table from a sweep's child runs in MLflow (hand-made runs, hand-computed figures)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fl_server.experiments.tracking import PARENT_TAG
from scripts.hierarchy_study import report, run_summary, study_runs, summarise, table, task_overrides


def log_run(client, experiment_id, parent, arm, seed, accuracy, backhaul_up, vt):
    run = client.create_run(experiment_id, tags={PARENT_TAG: parent, "topology": arm, "kind": "image",
                                                 "task": "mnist", "seed": str(seed)})
    rid = run.info.run_id
    for step, (acc, up, t) in enumerate(zip(accuracy, backhaul_up, vt)):
        client.log_metric(rid, "test_accuracy", acc, step=step)
        if step == 0:
            continue
        for key in ("lan_up_bytes", "lan_down_bytes", "regional_up_bytes", "regional_down_bytes", "backhaul_down_bytes"):
            client.log_metric(rid, key, 1e6, step=step)
        client.log_metric(rid, "backhaul_up_bytes", up, step=step)
        client.log_metric(rid, "virtual_time_s", t, step=step)
    client.set_terminated(rid)


@pytest.fixture
def store(tracking_uri):
    client = MlflowClient(tracking_uri)
    exp = client.create_experiment("h")
    parent = client.create_run(exp).info.run_id
    # flat: 4 MB up per round; 3 tiers: 1 MB; accuracy reaches 0.85 at round 2 (flat) / 3 (3-tier)
    for seed in (0, 1):
        log_run(client, exp, parent, "flat-network", seed, [0.1, 0.5, 0.86 + 0.02 * seed, 0.9], [4e6] * 4, [0, 1, 2, 3])
        log_run(client, exp, parent, "3-tier", seed, [0.1, 0.4, 0.8, 0.88], [1e6] * 4, [0, 0.5, 1.0, 1.5])
    return client, parent


def test_the_summary_of_one_run_is_hand_computed():
    history = {"test_accuracy": np.array([0.1, 0.5, 0.9]), "virtual_time_s": np.array([np.nan, 2.0, 4.0]),
               **{k: np.array([np.nan, 1.0, 2.0]) for k in ("lan_up_bytes", "lan_down_bytes", "regional_up_bytes",
                                                           "regional_down_bytes", "backhaul_up_bytes",
                                                           "backhaul_down_bytes")}}
    summary = run_summary(history, "image", target=0.8)
    assert summary["final"] == 0.9 and summary["backhaul_bytes"] == 6.0 and summary["uplink_all_bytes"] == 9.0
    assert summary["time_to_target_s"] == 4.0 and summary["backhaul_to_target_bytes"] == 6.0
    assert np.isnan(run_summary(history, "image", target=0.95)["time_to_target_s"])


def test_the_table_compares_every_topology_with_flat(store):
    client, parent = store
    results = summarise(client, study_runs(client, [parent]), {"image": 0.85})
    rows = {line.split(" | ")[1]: line.split(" | ") for line in table(results, {"image": 0.85}).splitlines()[2:]}
    flat, three = rows["flat (on the network)"], rows["3 tiers (clusters, regions)"]
    assert flat[2] == "accuracy 0.900 ± 0.000" and three[2] == "accuracy 0.880 ± 0.000"
    assert flat[4] == "12.00 ± 0.00" and three[4] == "3.00 ± 0.00"  # backhaul up: 3 rounds x 4 MB / 1 MB
    assert three[5] == "-75 %"
    # uplink over all links: flat 3 x (1 + 1 + 4) = 18 MB, 3 tiers 3 x (1 + 1 + 1) = 9 MB
    assert flat[6] == "18.00 ± 0.00" and three[7] == "-50 %"
    assert flat[8] == "2.00 ± 0.00" and three[8] == "1.50 ± 0.00"  # virtual s when 0.85 is first reached


def test_the_report_is_logged_to_the_parent_run(store, tmp_path):
    client, parent = store
    text = report(client, [parent], {"image": 0.85}, "python -m scripts.hierarchy_study", tmp_path)
    assert "| image | 3 tiers (clusters, regions) |" in text
    artifacts = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/hierarchy_study.md", "report/bytes_per_link.png"} <= artifacts
    assert len(list(tmp_path.glob("hierarchy-study-*.png"))) == 2


def test_the_sweep_overrides():
    args = argparse.Namespace(arms=["flat_network", "hierarchical"], seeds=[0, 1, 2], experiment="x", image_rounds=4,
                              image_target=0.8, forecast_rounds=3, overrides=["clients.num=6"])
    image = task_overrides("image", args)
    assert "topology=flat_network,hierarchical" in image and "seed=0,1,2" in image
    assert "partition=dirichlet" in image and "partition.alpha=0.1" in image and image[-1] == "clients.num=6"
    assert task_overrides("forecast", args)[0] in ("task=bitbrains", "task=workload")
