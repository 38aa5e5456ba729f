"""A regional tier as its own SuperLink + ServerApp (scripts/deploy_regions.py).

The e2e run starts 3 SuperLinks and 6 SuperNodes on loopback and one regional
Flower run per region and global round (10-22 min on the 2 shared CPUs at load 12-24); the
other tests start nothing but the CLI.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from mlflow.tracking import MlflowClient

from fl_common import regions as contract
from fl_server.experiments.config import ConfigError
from fl_server.experiments.regions import TierPlan
from scripts.deploy_regions import check_deployable, hierarchical_overrides, with_layout
from tests.conftest import run_module, sqlite_uri

MARKER_ENV = "FEDCONTINUUM_TEST_DEPLOYMENT"


def _processes_with_env(text: str) -> list[int]:
    """PIDs whose environment contains ``text`` (read from /proc; nothing is signalled)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _left_behind(marker: str, wait_s: float = 15.0) -> list[int]:
    """Processes that inherited ``marker`` and are still alive (SIGKILL is asynchronous: wait a moment)."""
    deadline = time.monotonic() + wait_s
    while (left := _processes_with_env(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


# ----------------------------------------------------------- no Flower run
def test_clients_num_is_regions_times_clients_per_region():
    layout = contract.RegionLayout(2, 3)
    assert with_layout(["num_rounds=2"], layout) == ["num_rounds=2", "clients.num=6"]
    assert with_layout(["clients.num=6"], layout) == ["clients.num=6"]
    with pytest.raises(ConfigError, match="--regions 2 --clients-per-region 3 contradicts clients.num=5: "
                                          r"clients.num is their product \(6\)"):
        with_layout(["clients.num=5"], layout)


def test_what_a_deployment_does_not_compose_with_is_refused_one_line_each():
    from fl_server.experiments.config import compose_config

    layout = contract.RegionLayout(2, 2)
    cfg = compose_config(["clients.num=4", "compression=topk8", "clients.fraction_evaluate=0.5",
                          "clients.min_train=3"])
    with pytest.raises(ConfigError) as err:
        check_deployable(cfg, layout)
    lines = str(err.value).splitlines()
    assert lines == [
        "compression=topk8 is not composed with a regional deployment (the aggregators reply with full models): "
        "use compression=none",
        "clients.fraction_evaluate=0.5: the global tier's clients are aggregators, which hold no data: set it 0",
        "clients.min_train=3 exceeds the smallest tier (2 = min of --regions 2 and --clients-per-region 2): "
        "set clients.min_train<=2",
    ]
    check_deployable(compose_config(["clients.num=4"]), layout)  # the default job is deployable
    with pytest.raises(ConfigError, match="task kind forecast is not built for a regional deployment"):
        check_deployable(compose_config(["clients.num=4", "task=workload"]), layout)


def test_the_simulation_to_compare_has_one_cluster_per_region():
    assert hierarchical_overrides(["num_rounds=2"], contract.RegionLayout(2, 2)) == [
        "num_rounds=2", "topology=hierarchical", "topology.assign.num_clusters=2", "topology.assign.num_regions=2"]


def test_tier_run_config_is_read_and_checked():
    plan = TierPlan.from_run_config({"tier": "region", "regions": "2", "clients-per-region": "3", "region": "1",
                                     "global-round": "4", "handoff-dir": "/tmp/h"})
    assert (plan.is_region, plan.region, plan.global_round, plan.num_nodes()) == (True, 1, 4, 3)
    assert TierPlan.from_run_config({"tier": "global", "regions": "2", "clients-per-region": "3",
                                     "handoff-dir": "/tmp/h"}).num_nodes() == 2  # its nodes: the aggregators
    assert TierPlan.from_run_config({"tier": "", "overrides": ""}) is None  # a flat run
    bad = [
        ({"tier": "cloud"}, "run-config tier='cloud' is unknown"),
        ({"tier": "global", "regions": "2", "clients-per-region": "2"}, "tier=global needs handoff-dir"),
        ({"tier": "global", "regions": "two", "clients-per-region": "2", "handoff-dir": "/h"},
         "run-config regions='two' is invalid: use an integer"),
        ({"tier": "region", "regions": "2", "clients-per-region": "2", "region": "2", "global-round": "1",
          "handoff-dir": "/h"}, r"region 2 is invalid: use 0 \.\. 1"),
        ({"tier": "region", "regions": "2", "clients-per-region": "2", "region": "0", "global-round": "0",
          "handoff-dir": "/h"}, "global-round=0 is invalid: rounds count from 1"),
    ]
    for run_config, message in bad:
        with pytest.raises(ConfigError, match=message):
            TierPlan.from_run_config(run_config)


def test_the_global_tier_reports_each_regions_run_from_the_handoff(tmp_path):
    # Prepare: region 0's run was submitted at t=100 s, its ServerApp started at 130, its clients had all
    # answered at 170, it returned at 250; region 1 failed this round (nothing handed back)
    plan = TierPlan.from_run_config({"tier": "global", "regions": "2", "clients-per-region": "2",
                                     "handoff-dir": str(tmp_path)})
    contract.write_json(contract.round_folder(tmp_path, 1, 0) / "run.json",
                        {"flower_run_id": 42, "submitted_at": 100.0, "returned_at": 250.0})
    weights = ArrayRecord(OrderedDict([("w", Array(np.zeros(1, dtype=np.float32)))]))
    contract.write_handoff(contract.regional_model_folder(tmp_path, 1, 0), weights, 1900, mlflow_run_id="abc",
                           serverapp_main_at=130.0, nodes_discovered_at=170.0)
    # Execute
    metrics, runs = plan.round_report(1)
    # Assert: 250 - 100, 130 - 100, 170 - 100; region 1 is absent
    assert metrics == {"region0_run_wall_s": 150.0, "region0_serverapp_start_s": 30.0,
                       "region0_run_startup_s": 70.0, "region0_examples": 1900.0}
    assert json.loads(runs) == {"round": 1, "regional_runs": [
        {"region": 0, "mlflow_run_id": "abc", "flower_run_id": 42, "wall_s": 150.0, "num_examples": 1900}]}


def test_bad_input_exits_2_before_anything_starts():
    result = run_module("scripts.deploy_regions", "--regions", "0", timeout=120)
    assert result.returncode == 2 and "--regions 0 is invalid: use an integer >= 1" in result.stdout


def test_a_taken_port_is_a_clear_error_and_nothing_is_left():
    marker = uuid.uuid4().hex
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_module("scripts.deploy_regions", "--port", str(port), "num_rounds=1",
                            env={MARKER_ENV: marker}, timeout=120)
    assert result.returncode == 1, result.stdout[-2000:]
    assert f"port {port} on 127.0.0.1 is taken: choose another one" in result.stdout
    assert not _left_behind(marker)


# ------------------------------------------------------ a real deployment
@pytest.mark.e2e
def test_two_regions_give_the_example_weighted_mean_of_their_models_and_leave_no_process(tmp_path):
    # Prepare: 2 regions x 2 clients, FedAvg at both tiers, 2 global rounds; Dirichlet partitions,
    # so the regions hold different numbers of examples and a plain mean would differ from the weighted one
    marker, uri, handoff = uuid.uuid4().hex, sqlite_uri(tmp_path), tmp_path / "handoff"
    # Execute
    result = run_module("scripts.deploy_regions", "--regions", "2", "--clients-per-region", "2",
                        "--handoff-dir", str(handoff), "num_rounds=2", "partition=dirichlet",
                        env={"MLFLOW_TRACKING_URI": uri, MARKER_ENV: marker}, timeout=2400)
    out = result.stdout + result.stderr
    # Assert: it ran, and nothing it started (SuperLinks, SuperNodes, ServerApps, ClientApps, `flwr run`) is left
    assert result.returncode == 0, out[-5000:]
    assert not _left_behind(marker)
    client = MlflowClient(uri)
    (global_run,) = client.search_runs([client.get_experiment_by_name("fedcontinuum").experiment_id])
    regional_runs = client.search_runs([client.get_experiment_by_name("fedcontinuum-regions").experiment_id])
    assert global_run.info.status == "FINISHED" and global_run.data.tags["fc.tier"] == "global"
    assert sorted((r.data.tags["fc.global_round"], r.data.tags["fc.region"]) for r in regional_runs) == [
        ("1", "0"), ("1", "1"), ("2", "0"), ("2", "1")]
    assert all(r.info.status == "FINISHED" for r in regional_runs)
    gid = global_run.info.run_id
    assert [m.value for m in client.get_metric_history(gid, "clients_replied")] == [2.0, 2.0]  # the aggregators
    for server_round in (1, 2):
        # the global run logged each region's run: its MLflow id (artifact) and wall time (metric)
        logged = json.loads(Path(client.download_artifacts(
            gid, f"regional_runs/round_{server_round:03d}.json", str(tmp_path))).read_text())
        ids = {r.info.run_id for r in regional_runs if r.data.tags["fc.global_round"] == str(server_round)}
        assert {run["mlflow_run_id"] for run in logged["regional_runs"]} == ids
    for region in (0, 1):
        walls = client.get_metric_history(gid, f"region{region}_run_wall_s")
        assert [m.step for m in walls] == [1, 2] and all(m.value > 0 for m in walls)

    def weighted_mean(server_round: int) -> dict[str, np.ndarray]:
        handed = [contract.read_handoff(contract.regional_model_folder(handoff, server_round, r)) for r in (0, 1)]
        counts = [h.num_examples for h in handed]
        assert all(n > 0 for n in counts) and counts[0] != counts[1]
        return {key: sum(n * h.arrays[key].numpy().astype(np.float64) for n, h in zip(counts, handed)) / sum(counts)
                for key in handed[0].arrays.keys()}

    # round 1's regional models -> the global model both aggregators received in round 2
    expected = weighted_mean(1)
    for region in (0, 1):
        received = contract.read_handoff(contract.global_model_folder(handoff, 2, region)).arrays
        for key, value in expected.items():
            np.testing.assert_allclose(received[key].numpy(), value, rtol=1e-5, atol=1e-6)
    # round 2's regional models -> the final global model (MLflow artifact)
    final = torch.load(client.download_artifacts(gid, "model/final_state_dict.pt", str(tmp_path)), weights_only=True)
    for key, value in weighted_mean(2).items():
        np.testing.assert_allclose(final[key].numpy(), value, rtol=1e-5, atol=1e-6)


def test_an_aggregator_whose_region_fails_says_which_region_round_and_log(tmp_path):
    # Prepare: a real regional aggregator ClientApp call whose region has no SuperLink and no app:
    # the real `flwr run` fails at once and writes no regional model
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from fl_clients.regional import train_region
    from fl_common import protocol
    from tests.fake_grid import ensure_task_identity

    ensure_task_identity()  # a real ClientApp process gets it from its SuperNode
    handoff = tmp_path / "handoff"
    context = Context(run_id=1, node_id=7, state=RecordDict(),
                      node_config={"partition-id": 1, "num-partitions": 2,
                                   contract.NODE_REGION_HOME: str(tmp_path / "no-superlink"),
                                   contract.NODE_APP_DIR: str(tmp_path / "no-app")},
                      run_config={"overrides": "num_rounds=1", "tier": "global", "regions": "2",
                                  "clients-per-region": "2", "handoff-dir": str(handoff)})
    weights = ArrayRecord(OrderedDict([("w", Array(np.array([1.0, 2.0], dtype=np.float32)))]))
    msg = Message(content=RecordDict({"arrays": weights, "config": ConfigRecord({protocol.SERVER_ROUND: 3})}),
                  dst_node_id=7, message_type=MessageType.TRAIN)
    # Execute / Assert
    log = handoff / "round-003" / "region-1" / "flwr-run.log"
    with pytest.raises(RuntimeError, match=f"region 1's run for round 3 .* returned no model: .*its log: {log}"):
        train_region(msg, context)
    # the global model was handed over before the run, and the run's timings were kept
    handed = contract.read_handoff(contract.global_model_folder(handoff, 3, 1))
    assert handed.arrays["w"].numpy().tolist() == [1.0, 2.0]
    assert json.loads((handoff / "round-003" / "region-1" / "run.json").read_text())["flower_run_id"] is None
