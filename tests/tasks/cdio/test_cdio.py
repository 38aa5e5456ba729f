"""CDIO (paper 004): complexity, the inference twin, CUCB super-arms, capacity, the preference LSTM, config errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgesim.devices import DeviceProfile
from edgesim.errors import EdgeSimError
from edgesim.inference import HostedModel, InferenceTwin, Links, Requests, Server
from fl_server.experiments.config import ConfigError, compose_config
from tasks.cdio.cmab import CUCB, best_assignment, task_reward
from tasks.cdio.complexity import spatial_complexity

BASE = ["task=cdio", "clients.num=3", "task.stream.train_tasks=400", "task.stream.holdout_tasks=300",
        "task.placement.slots=40", "task.placement.round_slots=10"]


def _profile(name: str, tflops: float, active: float, idle: float) -> DeviceProfile:
    return DeviceProfile(name=name, peak_tflops=tflops, memory_gb=8, uplink_mbps=300, downlink_mbps=300, rtt_ms=30,
                         active_w=active, idle_w=idle, availability={"model": "always"})


def _two_servers(edge_capacity: int = 1, cloud_capacity: int = 2, tasks_per_site: int = 3) -> InferenceTwin:
    edge = Server("edge-0", _profile("edge", 1.0, 10.0, 2.0), edge_capacity, HostedModel("s", 1e9, (0.8, 0.6)), 0)
    cloud = Server("cloud", _profile("cloud", 10.0, 100.0, 20.0), cloud_capacity, HostedModel("x", 1e10, (0.9, 0.9)), None)
    links = Links(access_mbps=8.0, backbone_mbps=8.0, access_rtt_ms=5, cloud_rtt_ms=30, utilisation=1.0, tx_power_w=2.0)
    return InferenceTwin([edge, cloud], links, tasks_per_site=tasks_per_site, slot_s=1.0, pre_s=0.0, seed=0)


def _three_requests() -> Requests:
    return Requests(site=np.zeros(3, int), complexity_bin=np.array([0, 1, 1]), images=np.ones(3), bytes=np.full(3, 1e6),
                    accuracy_req=np.array([0.7, 0.7, 0.95]), delay_req_s=np.array([5.0, 5.0, 5.0]))


# ------------------------------------------------------------ complexity (eqs. 1-2)
def test_spatial_complexity_by_hand():
    # Prepare: a flat image (no structure at any scale) and a 0/1 checkerboard
    flat = np.ones((1, 4, 4))
    board = (np.indices((4, 4)).sum(axis=0) % 2).astype(float)[None]
    # Execute
    c_flat, c_board = spatial_complexity(flat, block=2, scales=3), spatial_complexity(board, block=2, scales=3)
    # Assert: checkerboard -> 0.5 everywhere after one step: |O10 - (O00 + O11)/2| = |0.25 - (0.5 + 0.25)/2| = 0.125,
    # the next step changes nothing (0); a flat image has 0 at every scale
    assert c_flat[0] == pytest.approx(0.0)
    assert c_board[0] == pytest.approx(0.125)


# ------------------------------------------------------------ the inference twin
def test_twin_costs_one_request_by_hand():
    # Prepare: 1 MB over 8 Mbit/s shared by 3 requests per site -> 3 s per hop
    twin = _two_servers()
    # Execute
    out = twin.outcomes(_three_requests())
    # Assert: edge = 3 s + 5 ms + 1e9 / (1e12 / 1) = 3.005 + 0.001; cloud = 2 hops 6 s + 35 ms + 1e10 / (1e13 / 2)
    assert out["delay_s"][0, 0] == pytest.approx(3.0 + 0.005 + 0.001)
    assert out["delay_s"][0, 1] == pytest.approx(6.0 + 0.035 + 0.002)
    assert out["compute_tflop"][0].tolist() == pytest.approx([1.0 * 0.001, 10.0 * 0.002])
    assert out["bandwidth_mb"][0].tolist() == pytest.approx([1.0, 2.0])
    assert out["energy_j"][0].tolist() == pytest.approx([10 * 0.001 + 2 * 3.0, 100 * 0.002 + 2 * 6.0])
    assert out["accuracy"][:, 0].tolist() == [0.8, 0.6, 0.6]
    assert out["success_accuracy"].tolist() == [[True, True], [False, True], [False, False]]


def test_fluctuating_bandwidth_stays_within_its_band_and_stable_is_nominal():
    twin = _two_servers()
    fluct = InferenceTwin(twin.servers, Links(access_mbps=8.0, backbone_mbps=8.0, fluctuation=0.2), 3, 1.0, 0.0, seed=1)
    factors = np.concatenate([np.concatenate(fluct.bandwidth_factors(t)) for t in range(200)])
    assert factors.min() >= 0.8 and factors.max() <= 1.2 and factors.std() > 0.05
    assert np.concatenate(twin.bandwidth_factors(3)).tolist() == [1.0, 1.0]


# ------------------------------------------------------------ CUCB on 2 servers x 3 tasks
def test_the_oracle_picks_the_best_super_arm_within_capacity():
    # Prepare: edge holds 1 task, the cloud 2. Super-arms: which task goes to the edge
    values = np.array([[0.9, 0.5], [0.8, 0.6], [0.7, 0.1]])
    # task 0 on the edge: 0.9 + 0.6 + 0.1 = 1.6; task 1: 0.5 + 0.8 + 0.1 = 1.4; task 2: 0.5 + 0.6 + 0.7 = 1.8
    # Execute / Assert
    assert best_assignment(values, np.array([1, 2])).tolist() == [1, 1, 0]


def test_cucb_plays_unplayed_arms_first_then_the_best_ucb_super_arm():
    # Prepare: 3 task types, 2 servers (edge capacity 1, cloud 2)
    bandit = CUCB(num_types=3, num_servers=2)
    types, capacity = np.array([0, 1, 2]), np.array([1, 2])
    # Execute: slot 1 -- nothing played, every index is +inf, any super-arm within capacity
    first = bandit.select(types, capacity)
    assert np.bincount(first, minlength=2).tolist() == [1, 2]
    # hand-set statistics: every base arm played twice, means
    bandit.counts[:] = 2.0
    bandit.sums[:] = 2.0 * np.array([[0.9, 0.5], [0.8, 0.6], [0.7, 0.1]])
    bandit.t = 9  # the next select is t = 10: bonus sqrt(1.5 ln 10 / 2) = 1.314 on every arm alike
    bonus = math.sqrt(1.5 * math.log(10) / 2)
    chosen = bandit.select(types, capacity)
    # Assert: equal bonuses leave the ranking of the means: task 2 on the edge (1.8 + 3 x bonus)
    assert chosen.tolist() == [1, 1, 0]
    assert bandit.indices()[2, 0] == pytest.approx(0.7 + bonus)
    # an arm with fewer plays gets the larger bonus: edge for task 0 played once more often -> smaller index
    bandit.update(types, chosen, np.array([0.5, 0.6, 0.7]))
    assert bandit.counts[2, 0] == 3 and bandit.means[2, 0] == pytest.approx((1.4 + 0.7) / 3)


def test_task_reward_is_zero_on_a_missed_requirement_and_cheaper_is_better():
    reward = task_reward(np.array([True, True, False]), np.array([0.0, 1.0, 0.0]), cost_weight=0.5)
    assert reward.tolist() == [1.0, 0.5, 0.0]


# ------------------------------------------------------------ capacity
def test_no_policy_ever_exceeds_a_capacity():
    from tasks.cdio.placement import POLICIES, PlacementSettings, evaluate
    from tasks.cdio.workload import Stream

    # Prepare: 2 sites + cloud, capacities 2 / 2 / 3 for 3 requests per site (7 >= 6: tight)
    edge = _profile("edge", 0.45, 15, 2)
    model = HostedModel("s", 2e5, (0.9,) * 5)
    servers = [Server("edge-0", edge, 2, model, 0), Server("edge-1", edge, 2, model, 1),
               Server("cloud", _profile("cloud", 19.5, 400, 50), 3, HostedModel("x", 1.4e6, (0.95,) * 5), None)]
    twin = InferenceTwin(servers, Links(fluctuation=0.2), tasks_per_site=3, slot_s=1.0, pre_s=0.0, seed=0)
    rng = np.random.default_rng(0)
    n = 3 * 50
    streams = [Stream(site, rng.random(n), rng.integers(0, 5, n), rng.uniform(0.85, 0.97, n), rng.uniform(0.005, 0.06, n))
               for site in range(2)]
    predicted = [rng.random((n, 2)) for _ in range(2)]
    settings = PlacementSettings(slots=50, tasks_per_site=3, frames=30, cost_weight=0.5, phi=1.0, exploration=1.5,
                                 threshold_bin=3, rpp_s=1e-4)
    loads = []
    original = twin.check_assignment
    twin.check_assignment = lambda a: (loads.append(np.bincount(a, minlength=3)), original(a))
    # Execute
    summary, curves = evaluate(twin, streams, predicted, settings)
    # Assert: every slot of every policy within the capacities, every task placed, regret >= 0 and 0 for the oracle
    assert len(loads) == 50 * len(POLICIES)
    assert all((load <= [2, 2, 3]).all() and load.sum() == 6 for load in loads)
    assert curves["oracle"][-1] == pytest.approx(0.0)
    assert all(curve[-1] >= -1e-9 and np.all(np.diff(curve) >= -1e-9) for curve in curves.values())
    assert summary["oracle"]["reward"] >= max(s["reward"] for s in summary.values()) - 1e-12


def test_an_assignment_over_capacity_is_one_clear_error():
    with pytest.raises(EdgeSimError, match=r"2 requests on edge-0 exceed its capacity 1"):
        _two_servers().check_assignment(np.array([0, 0, 1]))


# ------------------------------------------------------------ the preference LSTM
def test_the_preference_lstm_beats_the_majority_class_on_held_out_tasks():
    from tasks.cdio.rpp import build_rpp, scores, train_rpp
    from tasks.cdio.spec import CDIOSpec
    from tasks.cdio.task import site_data

    # Prepare: sites 0 and 2 train (central here; federated in the end-to-end test), held-out tasks of site 1
    spec = CDIOSpec.from_config(compose_config(BASE))
    train = [site_data(spec, site, "train") for site in (0, 2)]
    x, y = np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])
    model = build_rpp(spec.hidden, spec.layers, seed=0)
    # Execute
    train_rpp(model, x, y, epochs=8, batch_size=64, lr=0.01, seed=0)
    result = scores(model, *site_data(spec, 1, "holdout"))
    # Assert
    assert result["exact_acc"] > result["majority_acc"] + 0.15
    assert result["bce"] < math.log(2)


# ------------------------------------------------------------ config errors
@pytest.mark.parametrize(("overrides", "message"), [
    (["task.edge_capacity=0"], r"task.edge_capacity=0 is invalid: use a whole number >= 1"),
    (["task.edge_capacity=1", "task.cloud_capacity=1"],
     r"task.edge_capacity=1 / task.cloud_capacity=1 with task.placement.tasks_per_site=3: 3 requests per site x 3 "
     r"sites exceed the total capacity 4 per slot"),
    (["task.stream.accuracy_req=[0.9,1.2]"], r"task.stream.accuracy_req=1.2 is invalid: use a number > 0 and <= 1"),
    (["task.stream.accuracy_req=[0.95,0.9]"], r"task.stream.accuracy_req=\[0.95, 0.9\] is invalid: low must be below high"),
    (["task.stream.delay_req_ms=[-5,60]"], r"task.stream.delay_req_ms=-5 is invalid: use a number > 0"),
    (["task.deployment=v7"], r"task.deployment=v7 is unknown: choose one of v1, v2"),
    (["privacy=dpsgd"], r"privacy=dpsgd \(DP-SGD\) does not apply to task=cdio"),
])
def test_bad_requirements_or_capacities_are_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config([*BASE, *overrides])


def test_bad_requests_reaching_the_twin_are_one_clear_error():
    requests = _three_requests()
    requests.accuracy_req = np.array([0.7, 1.5, 0.9])
    with pytest.raises(EdgeSimError, match=r"accuracy requirement 1.5 is invalid: use a fraction in \(0, 1\]"):
        _two_servers().outcomes(requests)


def test_the_measured_accuracies_name_the_command_that_wrote_them():
    from pathlib import Path

    from tasks.cdio.versions import load_measured

    measured = load_measured()
    assert measured.command.startswith("python -m scripts.cdio_accuracy")
    assert Path("scripts/cdio_accuracy.py").exists()
    params = {name: v.params for name, v in measured.versions.items()}
    assert 5.5 < params["cloud-l"] / params["edge-s"] < 6.5 and 11 < params["cloud-x"] / params["edge-s"] < 13.5


# ------------------------------------------------------------ end to end (skeleton + ClientApp, fake grid)
def test_a_federated_run_trains_the_predictor_and_logs_the_placement(tracking_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    from tests.conftest import run_in_process

    metrics, run_id, _ = run_in_process(tracking_uri, [*BASE, "num_rounds=2", "task.rpp.epochs=6", "seed=1",
                                                       f"checkpoint.dir={tmp_path}",
                                                       "tracking.log_model=false"])
    assert metrics["rpp_exact_acc"][-1] > metrics["rpp_majority_acc"][-1]
    assert metrics["rpp_bce"][-1] < metrics["rpp_bce"][0]
    assert 0 <= metrics["cdio_success_both"][-1] <= 1 and metrics["vc_compute_s"][0] > 0
    artifacts = {a.path for a in MlflowClient(tracking_uri).list_artifacts(run_id, "cdio")}
    assert artifacts == {"cdio/grid.csv", "cdio/regret.csv"}
    regret = metrics["regret_fluctuating_cdio"]  # per step (slot 1, 10, ..., 40), cumulative
    assert len(regret) == 5 and all(b >= a for a, b in zip(regret, regret[1:]))


def test_the_rollout_guard_scores_the_predictor_on_its_validation_replay(tracking_uri, tmp_path):
    from tests.conftest import run_in_process

    metrics, _, _ = run_in_process(tracking_uri, [*BASE, "task.final_study=false", "rollout=mix", "num_rounds=1", "seed=2",
                                                  f"checkpoint.dir={tmp_path}", "tracking.log_model=false"])
    assert "rollout_score" in metrics and "rollout_stable_score" in metrics
    assert -math.log(2) - 0.5 < metrics["rollout_score"][0] < 0  # minus a BCE
