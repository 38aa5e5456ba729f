"""Topology and rollout config: the assignment, one clear error for a bad tree, and
in-process experiments (the real ClientApp behind a fake Grid) for every task."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from fl_common import protocol
from fl_server.experiments.config import ConfigError, compose_config
from fl_server.experiments.experiment import run_experiment
from fl_server.experiments.topology import assignment, label
from strategies import hierarchical
from tests.conftest import persistent_clients
from tests.test_task_matrix import TASKS

EXPLICIT = ["topology=hierarchical", "topology.assign.by=explicit"]


def test_the_default_is_flat_and_changes_nothing():
    cfg = compose_config([])
    assert cfg.topology.name == "flat" and not cfg.rollout.enabled and label(cfg) == "flat"


def test_blocks_assign_contiguous_clusters_and_regions():
    cfg = compose_config(["topology=hierarchical", "clients.num=10"])
    cluster_of, region_of = assignment(cfg)
    assert [cluster_of[p] for p in range(10)] == ["c0"] * 4 + ["c1"] * 3 + ["c2"] * 3
    assert region_of == {"c0": "r0", "c1": "r0", "c2": "r1"}
    assert label(cfg) == "3-tier"
    assert label(compose_config(["topology=two_tier"])) == "2-tier"
    assert label(compose_config(["topology=flat_network"])) == "flat-network"


def test_explicit_lists_and_explicit_regions():
    cfg = compose_config([*EXPLICIT, "clients.num=4", "topology.assign.clusters={a:[0,3],b:[1,2]}",
                          "topology.assign.regions={eu:[a],us:[b]}"])
    assert assignment(cfg) == ({0: "a", 3: "a", 1: "b", 2: "b"}, {"a": "eu", "b": "us"})


def test_assignment_by_device_profile():
    cfg = compose_config(["topology=hierarchical", "topology.assign.by=device", "topology.assign.num_regions=1"])
    cluster_of, _ = assignment(cfg)
    from edgesim.devices import Fleet

    devices = Fleet.from_config(cfg.devices).assign(cfg.clients.num, cfg.seed)
    assert cluster_of == dict(enumerate(devices))


def test_assignment_by_the_twins_clusters_and_regions():
    # PPO: client i drives twin node i; bitbrains twin: edge-a, edge-b (cloud-eu), edge-c (cloud-us), 4 nodes each
    cfg = compose_config(["task=ppo", "clients.num=12", "clients.min_train=2", "topology=hierarchical",
                          "topology.assign.by=twin"])
    cluster_of, region_of = assignment(cfg)
    assert [cluster_of[p] for p in (0, 4, 8)] == ["edge-a", "edge-b", "edge-c"]
    assert region_of == {"edge-a": "cloud-eu", "edge-b": "cloud-eu", "edge-c": "cloud-us"}
    qmix = compose_config(["task=qmix", "clients.num=3", "topology=hierarchical", "topology.assign.by=twin"])
    assert assignment(qmix)[0] == {0: "edge-a", 1: "edge-b", 2: "edge-c"}


@pytest.mark.parametrize(("overrides", "message"), [
    # a client in two clusters
    ([*EXPLICIT, "clients.num=3", "topology.assign.clusters={a:[0,1],b:[1,2]}"],
     r"^partition 1 is in two clusters, a and b: give every client one cluster$"),
    # an empty region
    ([*EXPLICIT, "clients.num=2", "topology.assign.clusters={a:[0],b:[1]}", "topology.assign.regions={eu:[a,b],us:[]}"],
     r"^topology.assign.regions.us is empty: every region needs at least one cluster$"),
    (["topology=hierarchical", "clients.num=4", "topology.assign.num_clusters=2", "topology.assign.num_regions=3"],
     r"topology.assign.num_regions=3 is invalid: .* more regions than clusters would leave a region empty"),
    # a cycle
    ([*EXPLICIT, "clients.num=2", "topology.assign.clusters={a:[0,1]}", "topology.assign.regions={eu:[us],us:[eu]}"],
     r"^the topology has a cycle: eu -> us -> eu; the assignment must be a tree"),
    ([*EXPLICIT, "clients.num=3", "topology.assign.clusters={a:[0,1]}"], r"partition\(s\) 2 are in no cluster"),
    ([*EXPLICIT, "clients.num=2", "topology.assign.clusters={a:[0,1]}", "topology.assign.regions={eu:[b]}"],
     r"topology.assign.regions.eu lists 'b', which is no cluster: the clusters are a"),
    ([*EXPLICIT, "clients.num=2", "topology.assign.clusters={a:[0],b:[1]}", "topology.assign.regions={eu:[a,b],us:[b]}"],
     r"cluster b is in two regions, eu and us"),
    (["topology=hierarchical", "topology.assign.num_clusters=11"], r"num_clusters=11 is invalid: .*clients.num=10"),
    # the rules
    (["topology=hierarchical", "topology.rules.cluster.strategy.name=fedfancy"],
     r"topology.rules.cluster.strategy.name=fedfancy is unknown: choose one of ass, fedavg"),
    (["topology=hierarchical", "topology.rules.region.strategy.name=fedavgm",
      "+topology.rules.region.strategy.server_momentum=1.5"],
     r"topology.rules.region.strategy.server_momentum=1.5 is invalid: use a value in \[0, 1\)"),
    (["topology=hierarchical", "+topology.rules.cluster.strategy.momentum=0.5"],
     r"topology.rules.cluster.strategy.momentum is unknown for fedavg"),
    (["task=workload", "topology=hierarchical", "topology.rules.cluster.strategy.name=ass"],
     r"topology.rules.cluster.strategy.name=ass weighs by per-class accuracy"),
    (["topology=hierarchical", "topology.rules.region.period=2", "topology.rules.global.period=3"],
     r"topology.rules.global.period=3 is invalid: it must be a multiple of topology.rules.region.period=2"),
    (["topology=hierarchical", "topology.rules.cluster.period=2"], r"the cluster tier aggregates its clients every round"),
    (["topology=hierarchical", "topology.rules.global.fraction=0"], r"topology.rules.global.fraction=0 is invalid"),
    (["topology=hierarchical", "topology.rules.region.deadline_s=-1"], r"topology.rules.region.deadline_s=-1 is invalid"),
    (["topology=hierarchical", "topology.tiers=[region,cluster]"], r"list the aggregating tiers bottom-up"),
    (["topology=hierarchical", "topology.links.backhaul.bandwidth_mbps=0"],
     r"topology.links.backhaul.bandwidth_mbps=0 is invalid"),
    (["topology=hierarchical", "topology.assign.by=geo"], r"topology.assign.by=geo is unknown"),
    # what a hierarchy cannot take
    (["topology=hierarchical", "devices.deadline_s=1"], r"use topology.rules.cluster.deadline_s"),
    (["topology=hierarchical", "clients.fraction_train=0.5"], r"use topology.rules.<tier>.fraction"),
    (["topology=hierarchical", "privacy=secagg"], r"privacy=secagg does not compose with topology=hierarchical"),
    (["topology=hierarchical", "strategy=staleness_clustered", "strategy.num_clusters=2"], r"keeps several global models"),
    (["topology=flat_network", "topology.rules.global.period=2"], r"is invalid with topology.tiers=\[\]"),
    # rollout
    (["rollout=mix", "rollout.mix_fraction=1.5"], r"rollout.mix_fraction=1.5 is invalid"),
    (["rollout=rollback", "rollout.mode=undo"], r"rollout.mode=undo is unknown: use rollback or mix"),
    (["topology=sideways"], r"unknown topology 'sideways': choose one of flat, flat_network, hierarchical, two_tier"),
])
def test_a_bad_topology_is_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message) as caught:
        compose_config(overrides)
    assert "\n" not in str(caught.value)


def test_the_strategy_and_the_protocol_agree_on_the_wire_stamps():
    assert (hierarchical.WIRE_UP_BYTES, hierarchical.WIRE_DOWN_BYTES) == (protocol.WIRE_UP_BYTES, protocol.WIRE_DOWN_BYTES)


# ------------------------------------------------------------------ in-process experiments
def run(tracking_uri, tmp_path, *overrides: str, rounds: int = 2) -> tuple[dict[str, list[float]], dict[str, str]]:
    cfg = compose_config([*overrides, f"num_rounds={rounds}", "seed=1", f"checkpoint.dir={tmp_path / 'ckpt'}",
                          "tracking.log_model=false"])
    grid, _ = persistent_clients(int(cfg.clients.num))
    run_experiment(grid, cfg, tracking_uri)
    client = MlflowClient(tracking_uri)
    (latest, *_) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                      order_by=["attributes.start_time DESC"])
    assert latest.info.status == "FINISHED"
    metrics = {key: [m.value for m in sorted(client.get_metric_history(latest.info.run_id, key), key=lambda m: m.step)]
               for key in latest.data.metrics}
    return metrics, latest.data.tags


IMAGE = ["task=mnist", "clients.num=4", "topology.assign.num_clusters=2"]


def test_hierarchical_fedavg_equals_flat_and_cuts_the_backhaul(tracking_uri, tmp_path):
    flat, _ = run(tracking_uri, tmp_path, *IMAGE, "topology=flat_network")
    three, tags = run(tracking_uri, tmp_path, *IMAGE, "topology=hierarchical")
    two, _ = run(tracking_uri, tmp_path, *IMAGE, "topology=two_tier")
    plain, _ = run(tracking_uri, tmp_path, *IMAGE)
    # every tier FedAvg, full participation: the same model as flat FedAvg (float rounding aside)
    for other in (two, three, plain):
        assert other["test_accuracy"] == pytest.approx(flat["test_accuracy"], abs=2e-3)
    assert tags["topology"] == "3-tier"
    # the LAN carries exactly what the server's own accounting counted
    assert three["lan_up_bytes"] == three["uplink_bytes"] and three["lan_down_bytes"] == three["downlink_bytes"]
    # backhaul per round: 4 client updates (flat), 2 cluster aggregates (2 tiers), 2 regional ones (3 tiers)
    assert three["backhaul_up_bytes"][1] == pytest.approx(flat["backhaul_up_bytes"][1] / 2, rel=0.01)
    assert two["backhaul_up_bytes"][1] == pytest.approx(flat["backhaul_up_bytes"][1] / 2, rel=0.01)
    assert all(v > 0 for v in three["region_close_s"])


@pytest.mark.parametrize("task", TASKS)
def test_a_hierarchy_with_a_tier_deadline_runs_every_task(task, tracking_uri, tmp_path):
    # a global deadline below every transfer: the regions' aggregates miss round 1; their clients are still
    # uploading (busy), so round 2 is idle and applies them when they arrive
    overrides = [*TASKS[task], "topology=hierarchical", "topology.assign.num_clusters=2",
                 "topology.rules.global.deadline_s=1e-6"]
    if task == "rl":
        overrides.append("topology.assign.by=twin")
    metrics, tags = run(tracking_uri, tmp_path, *overrides, rounds=3)
    assert metrics["global_updates_late"][0] > 0 and metrics["global_aggregated"][0] == 0
    assert metrics["clients_replied"][1] == 0 and metrics["global_aggregated"][1] == 1
    assert metrics["global_updates"][1] >= 1  # (the earliest; the idle round closes just after it)
    assert metrics["round_virtual_s"][1] > 1e-3  # the idle round waited for the arrivals
    assert all(v > 0 for v in metrics["backhaul_bytes"])


def test_a_planted_regression_is_rolled_back_in_a_real_run(tracking_uri, tmp_path):
    # round 2 on: two of three clients send global - 5 x their update (poisoned, well-formed)
    metrics, tags = run(tracking_uri, tmp_path, "task=mnist", "clients.num=3", "rollout=rollback",
                        "faults.fraction.scale=[0,0.67]", rounds=3)
    assert metrics["rollout_rejected"] == [0, 1, 1] and metrics["rollout_rejected_total"][-1] == 2
    assert metrics["test_accuracy"][-1] == metrics["test_accuracy"][1]  # the round-1 model stays deployed
    assert tags["rollout"] == "rollback"


@pytest.mark.parametrize("task", ["forecast", "rl"])
def test_every_task_has_a_validation_replay(task, tracking_uri, tmp_path):
    metrics, _ = run(tracking_uri, tmp_path, *TASKS[task], "rollout=mix", rounds=1)
    assert "rollout_score" in metrics and "rollout_stable_score" in metrics
