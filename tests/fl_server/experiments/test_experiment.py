"""The ServerApp's experiment logic with real clients' code, real training and a
real MLflow store, driven through a fake Grid (no Ray): fast and exact."""

from __future__ import annotations

import pstats
from pathlib import Path

import pytest
from flwr.app import Context, Error, Message, MessageType, RecordDict
from mlflow.tracking import MlflowClient

from fl_clients import app as client_app
from fl_server.experiments.config import compose_config
from fl_server.experiments.experiment import run_experiment
from tests.conftest import persistent_clients
from tests.fake_grid import FakeGrid

FAST = ["num_rounds=2", "clients.num=4", "seed=1"]


def in_process_client(fail_nodes: set[int] = frozenset(), crash_round: int | None = None, node_offset: int = 0):
    """Reply as the real ClientApp would; partition id = node id - node_offset."""

    def reply(message: Message) -> Message:
        node = message.metadata.dst_node_id
        partition = node - node_offset
        context = Context(run_id=1, node_id=node, node_config={"partition-id": partition, "num-partitions": 4},
                          state=RecordDict(), run_config={})
        if message.metadata.message_type == MessageType.QUERY:
            return client_app.query(message, context)
        server_round = int(message.content["config"]["server-round"])
        if crash_round is not None and server_round == crash_round:
            raise RuntimeError("the grid went away")
        if partition in fail_nodes:
            return Message(Error(code=1, reason="simulated client crash"), reply_to=message)
        return client_app.train(message, context)

    return reply


def only_run(uri: str):
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return client, runs[0]


def test_experiment_logs_every_round_params_and_artifacts(tracking_uri):
    # Prepare
    cfg = compose_config(FAST)
    # Execute
    final = run_experiment(FakeGrid(range(4), in_process_client()), cfg, tracking_uri)
    # Assert
    client, run = only_run(tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["strategy.name"] == "fedavg"
    assert run.data.params["clients.num"] == "4"
    history = client.get_metric_history(run.info.run_id, "test_accuracy")
    assert [m.step for m in history] == [0, 1, 2]
    assert history[-1].value == pytest.approx(final["test_accuracy"])
    assert final["test_accuracy"] > 0.3  # chance is 0.1
    for key in ("train_loss", "test_macro_f1", "test_weakest_class_recall", "round_wall_time_s",
                "clients_replied", "clients_failed", "test_recall_class_9"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)][-1] == 2, key
    assert client.get_metric_history(run.info.run_id, "clients_replied")[-1].value == 4
    artifacts = {a.path for d in ("plots", "model", "metrics", "data")
                 for a in client.list_artifacts(run.info.run_id, d)}
    assert {"plots/accuracy_vs_round.png", "model/final_state_dict.pt",
            "metrics/rounds.csv", "data/client_class_counts.csv"} <= artifacts
    assert run.data.tags["strategy"] == "fedavg" and run.data.tags["rho"] == "1"
    assert not client.list_artifacts(run.info.run_id, "profile")  # tracking.profile is off by default


def test_tracking_profile_logs_a_pstats_profile_of_the_serverapp_run(tracking_uri, tmp_path):
    # Prepare: the real ClientApp behind a fake Grid, 1 round, profiling on
    cfg = compose_config(["num_rounds=1", "clients.num=2", "seed=1", "tracking.profile=true",
                          "tracking.log_model=false", f"checkpoint.dir={tmp_path / 'ckpt'}"])
    grid, _ = persistent_clients(2)
    # Execute
    run_experiment(grid, cfg, tracking_uri)
    # Assert: both artefacts, a loadable pstats file covering the rounds, a readable summary
    client, run = only_run(tracking_uri)
    assert run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "profile")} == {
        "profile/server.pstats", "profile/server_top.txt"}
    local = Path(client.download_artifacts(run.info.run_id, "profile", str(tmp_path)))
    stats = pstats.Stats(str(local / "server.pstats"))
    assert {"run_round", "discover_partitions"} <= {name for (_, _, name) in stats.stats}
    top = (local / "server_top.txt").read_text()
    assert "by cumulative time" in top and "by own time" in top and "run_round" in top


def test_failed_clients_are_counted_and_the_round_goes_on(tracking_uri):
    cfg = compose_config(FAST)
    run_experiment(FakeGrid(range(4), in_process_client(fail_nodes={2})), cfg, tracking_uri)
    client, run = only_run(tracking_uri)
    assert run.info.status == "FINISHED"
    failed = client.get_metric_history(run.info.run_id, "clients_failed")
    assert [m.value for m in failed] == [1.0, 1.0]
    assert client.get_metric_history(run.info.run_id, "clients_replied")[-1].value == 3


def test_a_crash_marks_the_run_failed_and_keeps_what_was_logged(tracking_uri):
    cfg = compose_config(FAST)
    with pytest.raises(RuntimeError, match="the grid went away"):
        run_experiment(FakeGrid(range(4), in_process_client(crash_round=2)), cfg, tracking_uri)
    client, run = only_run(tracking_uri)
    assert run.info.status == "FAILED"
    assert "RuntimeError: the grid went away" in run.data.tags["fc.failure_reason"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")] == [0, 1]


def test_same_seed_same_result(tracking_uri, tmp_path):
    cfg = compose_config(FAST)
    first = run_experiment(FakeGrid(range(4), in_process_client()), cfg, tracking_uri)
    again = run_experiment(FakeGrid(range(4), in_process_client()), cfg, f"sqlite:///{tmp_path / 'b.db'}")
    assert first["test_accuracy"] == again["test_accuracy"]
    assert first["train_loss"] == again["train_loss"]


def test_ass_strategy_scores_clients_on_the_public_set_and_logs_weights(tracking_uri):
    cfg = compose_config([*FAST, "strategy=ass", "partition=dirichlet", "partition.alpha=0.5"])
    final = run_experiment(FakeGrid(range(4), in_process_client()), cfg, tracking_uri)
    client, run = only_run(tracking_uri)
    assert run.info.status == "FINISHED" and run.data.tags["ass_abg"] == "1/1/1"
    weights = [run.data.metrics[f"ass_weight_p{p}"] for p in range(4)]
    assert sum(weights) == pytest.approx(1.0)
    assert len(client.get_metric_history(run.info.run_id, "ass_weight_p0")) == 2  # every round
    assert final["test_accuracy"] > 0.2


def test_virtual_clock_availability_and_deadline_are_tracked(tracking_uri):
    cfg = compose_config([*FAST, "num_rounds=3", "devices.availability=true", "devices.deadline_s=0.09"])
    run_experiment(FakeGrid(range(4), in_process_client()), cfg, tracking_uri)
    client, run = only_run(tracking_uri)
    assert run.info.status == "FINISHED"
    times = [m.value for m in client.get_metric_history(run.info.run_id, "virtual_time_s")]
    assert len(times) == 3 and times == sorted(times) and times[0] > 0
    assert client.get_metric_history(run.info.run_id, "energy_total_j")[-1].value > 0
    assert "data/client_devices.csv" in {a.path for a in client.list_artifacts(run.info.run_id, "data")}


def test_staleness_clustered_with_deadline_and_clusters(tracking_uri):
    cfg = compose_config([*FAST, "num_rounds=3", "strategy=staleness_clustered", "strategy.num_clusters=2",
                          "strategy.recluster_every=1", "partition=dirichlet", "partition.alpha=0.1",
                          "partition.min_partition_size=2", "devices.deadline_s=0.09"])
    final = run_experiment(FakeGrid(range(4), in_process_client()), cfg, tracking_uri)
    client, run = only_run(tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["num_clusters"] == 2
    assignments = {k: v for k, v in run.data.metrics.items() if k.startswith("cluster_p")}
    assert len(assignments) >= 2 and set(assignments.values()) == {0.0, 1.0}
    assert "cluster0_test_accuracy" in run.data.metrics and "cluster1_test_accuracy" in run.data.metrics
    assert 0 <= final["test_accuracy"] <= 1


def test_partial_participation_is_reproducible_whatever_the_node_ids(tracking_uri, tmp_path):
    """Simulated node ids are random per run; the sampled partitions must not be."""
    cfg = compose_config([*FAST, "clients.fraction_train=0.5"])
    first = run_experiment(FakeGrid(range(4), in_process_client()), cfg, tracking_uri)
    shifted = FakeGrid([907, 905, 906, 904], in_process_client(node_offset=904))
    again = run_experiment(shifted, cfg, f"sqlite:///{tmp_path / 'b.db'}")
    assert first["test_accuracy"] == again["test_accuracy"]
    assert first["train_loss"] == again["train_loss"]


def test_a_device_that_cannot_hold_model_and_batch_fails_the_run_with_its_reason(tracking_uri):
    from edgesim.devices import ProfileError

    cfg = compose_config([*FAST, "devices.profiles.jetson-nano.memory_gb=0.001"])
    with pytest.raises(ProfileError, match="profile 'jetson-nano' has 0.001 GB"):
        run_experiment(FakeGrid(range(4), in_process_client()), cfg, tracking_uri)
    _, run = only_run(tracking_uri)
    assert run.info.status == "FAILED"
    assert "lower train.batch_size or drop the profile" in run.data.tags["fc.failure_reason"]
