"""The offload task end to end: the real experiment skeleton and ClientApp behind
a fake Grid (no Ray), the config layer's errors, and the launcher's exit code."""

from __future__ import annotations

import csv
import io

import pytest
from mlflow.tracking import MlflowClient

from fl_server.experiments.config import ConfigError, compose_config
from tasks.offload.hard_cases import STATE_KEY
from tests.conftest import requires_breastmnist, run_in_process, run_module

SMALL = ["task=offload", "clients.num=3", "task.cloud_per_class=20", "task.cloud.epochs=2", "task.thetas=[0.5,0.9]",
         "task.final_repeats=1", "seed=1", "tracking.log_model=false"]


def run(tracking_uri, tmp_path, *overrides: str, rounds: int = 2):
    """One experiment; returns (per-round metric values, run id, the clients' Contexts)."""
    return run_in_process(tracking_uri, [*SMALL, *overrides, f"num_rounds={rounds}", f"checkpoint.dir={tmp_path / 'ckpt'}"])


def test_the_closed_loop_logs_offloading_per_round_and_caches_hard_cases_on_the_clients(tracking_uri, tmp_path):
    metrics, run_id, contexts = run(tracking_uri, tmp_path)
    # per round (0 = before training, 1, 2): the serving figures of the configured policy
    for key in ("offload_fraction", "offload_hard_cases", "offload_edge_acc_kept", "offload_edge_acc_offloaded",
                "offload_cloud_acc_offloaded", "offload_cloud_acc_kept", "offload_latency_p50_ms",
                "offload_latency_p95_ms", "offload_latency_p99_ms", "offload_energy_mj", "offload_accuracy"):
        assert len(metrics[key]) == 3, key
    assert metrics["offload_requests"] == [1000.0] * 3
    assert all(0 <= f <= 1 for f in metrics["offload_fraction"])
    assert metrics["offload_latency_p95_ms"][-1] >= metrics["offload_latency_p50_ms"][-1]
    assert metrics["cloud_test_accuracy"][0] > 0.5  # the cloud model, logged once
    # the cache: found in round 1 with the received model, weighed up in round 2
    assert metrics["hard_cases_used_fraction"][0] == 0 and metrics["hard_cases_found_fraction"][0] > 0
    assert metrics["hard_cases_used_fraction"][1] > 0
    for context in contexts.values():  # metadata in context.state, positions within the partition
        record = context.state[STATE_KEY]
        assert record["round"] == 2 and len(record["positions"]) == len(record["confidence"])
        assert set(record) == {"positions", "confidence", "predicted", "round"}  # no images
    # the final study on the final model: 4 link scenarios x (edge, cloud, 2 x 2 thresholds)
    client = MlflowClient(tracking_uri)
    text = open(client.download_artifacts(run_id, "offload/grid.csv", str(tmp_path))).read()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 4 * 6
    assert {r["fault"] for r in rows} == {"none", "loss10", "loss20", "outage"}
    outage = [r for r in rows if r["fault"] == "outage"]
    assert all(float(r["sent_during_outage"]) == 0 for r in outage)
    assert all(float(r["outage_blocked"]) > 0 for r in outage if r["mode"] == "cloud")
    edge_only = next(r for r in rows if r["mode"] == "edge" and r["fault"] == "none")
    assert float(edge_only["fraction"]) == 0 and float(edge_only["energy_mj"]) < 1.0
    artifacts = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/offload_tradeoff.png", "plots/offload_rounds.png"} <= artifacts


def test_without_the_cache_the_first_round_is_the_same_and_nothing_is_kept(tracking_uri, tmp_path):
    cached, _, _ = run(tracking_uri, tmp_path, rounds=1)
    plain, _, contexts = run(tracking_uri, tmp_path, "task.hard_cases.enabled=false", rounds=1)
    # round 1 trains on no cache in both arms (the cache of round 1 is used from round 2)
    assert plain["test_accuracy"] == cached["test_accuracy"]
    assert "hard_cases_found_fraction" not in plain
    assert all(STATE_KEY not in c.state for c in contexts.values())
    # the scoring pass is charged to the virtual clock
    assert cached["vc_compute_s"][0] > plain["vc_compute_s"][0]


def test_dp_sgd_trains_the_edge_model_once_the_cache_is_off(tracking_uri, tmp_path):
    metrics, _, _ = run(tracking_uri, tmp_path, "privacy=dpsgd", "task.hard_cases.enabled=false", rounds=1)
    assert metrics["epsilon_max"][0] > 0 and len(metrics["offload_fraction"]) == 2


def test_raw_hard_cases_reach_the_cloud_only_where_the_config_allows_it(tracking_uri, tmp_path):
    # Execute: the same job with and without the cloud store
    kept, _, _ = run(tracking_uri, tmp_path, rounds=2)
    stored, _, contexts = run(tracking_uri, tmp_path, "task.hard_cases.cloud_store=true", rounds=2)
    # Assert: round 1 trains alike; the raw cases add their bytes (8-bit pixels + labels, 785 B
    # a case) to the uplink and the cloud stores and fine-tunes on them; the clients still keep
    # only metadata, and the strategy averaged models only (same accuracy in round 1)
    assert stored["test_accuracy"][:2] == kept["test_accuracy"][:2]
    found = sum(len(c.state[STATE_KEY]["positions"]) for c in contexts.values())  # round 2's cases
    assert stored["cloud_store_samples"][-1] == found > 0
    extra = stored["uplink_bytes"][-1] - kept["uplink_bytes"][-1]
    assert 785 * found <= extra <= 785 * found + 3 * 2048  # + each record's framing
    assert "cloud_store_samples" not in kept
    assert stored["vc_up_bytes"][-1] > kept["vc_up_bytes"][-1]


def test_uploads_round_trip_as_8_bit_pixels():
    import numpy as np

    from tasks.offload.hard_cases import as_upload, from_upload

    images = np.array([[[[0.0, 1.0], [0.5, 0.2]]]], dtype=np.float32)
    x, y = from_upload(as_upload(images, np.array([7])))
    np.testing.assert_allclose(x, np.rint(images * 255) / 255, atol=1e-7)
    assert y.tolist() == [7] and x.dtype == np.float32


@requires_breastmnist
def test_breastmnist_runs_with_its_own_cloud_split(tracking_uri, tmp_path):
    metrics, _, _ = run(tracking_uri, tmp_path, "task=offload-breastmnist", "task.cloud_per_class=20", rounds=1)
    assert metrics["data_cloud_samples"] == [40.0]
    assert metrics["offload_requests"][0] == 156


@pytest.mark.parametrize(("overrides", "message"), [
    (["task.policy.theta=-0.5"], r"task.policy.theta=-0.5 is invalid: the confidence threshold θ_c must be a number >= 0"),
    (["task.policy.cpu_max=1.2"], r"task.policy.cpu_max=1.2 is invalid: a utilisation threshold lies in \(0, 1\]"),
    (["task.thetas=[0.5,-1]"], r"task.thetas has -1: every θ_c of the final study must be a number >= 0"),
    (["task.link.faults=loss50"], r"task.link.faults=loss50 is unknown: choose one of none, loss10, loss20, outage"),
    (["task.cloud.device=tpu"], r"task.cloud.device=tpu is unknown: choose one of cloud-cpu, cloud-gpu"),
    (["task.cloud_per_class=0"], r"task.cloud_per_class=0 is invalid: the cloud model needs its own data"),
    (["privacy=dpsgd"], r"task.hard_cases.enabled=true weighs hard cases up, which DP-SGD's"),
    (["task.hard_cases.enabled=false", "task.hard_cases.cloud_store=true"],
     r"task.hard_cases.cloud_store=true needs the cache: set task.hard_cases.enabled=true"),
    (["task.hard_cases.cloud_store=yes"], r"task.hard_cases.cloud_store=yes is invalid: use true or false"),
    (["task.cloud.finetune_epochs=0"], r"task.cloud.finetune_epochs=0 is invalid: use an integer >= 1"),
])
def test_bad_offload_settings_are_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(["task=offload", *overrides])


def test_the_launcher_refuses_a_bad_threshold_with_one_line_and_exit_2():
    result = run_module("fl_server.launch", "task=offload", "task.policy.theta=-1", timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: task.policy.theta=-1 is invalid")
