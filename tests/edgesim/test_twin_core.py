"""The twin's invariants: conservation, the shield's guarantees, faults, determinism."""

import numpy as np
import pytest

from edgesim import RULES, Action, EdgeCloudTwin, EdgeSimError

from .helpers import random_env_rows, synthetic, tiny

FAULTS = [
    {"type": "node_failure", "fraction": 0.25, "at_step": 300, "duration_s": 600},
    {"type": "node_failure", "fraction": 0.1, "at_step": 1000},
    {"type": "cloud_outage", "start_s": 500, "duration_s": 400},
    {"type": "packet_loss", "rate": 0.15},
]


def conserved(twin: EdgeCloudTwin) -> tuple[float, float]:
    m = twin.summary()
    return m["arrived"], m["served"] + m["dropped"] + m["queued"]


def test_conservation_over_a_long_random_run():
    # arrived = served + dropped + queued, at every checkpoint of a 2,000-step
    # run with random (partly invalid) actions, migrations, failures, an
    # outage and packet loss.
    twin = EdgeCloudTwin(synthetic(episode_s=2000, faults=FAULTS, workload={"mean_load": 0.8}), seed=11)
    rng = np.random.default_rng(0)
    max_step = twin.scenario.shield.max_replica_step
    while not twin.done:
        twin.step(Action.from_env(random_env_rows(rng, twin.num_nodes, garbage=True), max_step))
        if twin.state.step % 250 == 0:
            arrived, accounted = conserved(twin)
            assert accounted == pytest.approx(arrived, rel=1e-9, abs=1e-6)
    m = twin.summary()
    # the run exercised every way out
    for reason in ("rejected", "overflow", "timeout", "failure", "packet_loss"):
        assert m[f"drop_{reason}"] > 0, reason
    assert m["served"] > 0 and m["migrations"] > 0 and m["queued"] >= 0


def tight_caps():
    """Caps that bind: AGX boards limited by the GPU power cap, all boards by heat."""
    return synthetic(
        episode_s=1500,
        faults=FAULTS[:1] + FAULTS[2:],
        power={"node_cap_w": 40, "gpu_cap_w": 20},
        thermal={"max_c": 50},
        workload={"mean_load": 1.0},
        shield={"migration_cap_per_min": 2, "max_replica_step": 2},
    )


def test_shield_never_lets_capacity_be_exceeded():
    scenario = tight_caps()
    twin = EdgeCloudTwin(scenario, seed=3)
    nodes, shield = scenario.nodes, twin.shield
    rng = np.random.default_rng(1)
    cloud_capacity = scenario.cloud_rate * scenario.step_s
    total_interventions = np.zeros(len(RULES), dtype=np.int64)
    while not twin.done:
        s = twin.state
        thermal_before = shield.thermal_limit(s.temp_c.copy())
        energy_before = twin.metrics.energy_edge_j.copy()
        cloud_before = twin.metrics.served_cloud.copy()
        rows = random_env_rows(rng, twin.num_nodes, garbage=True)
        rows[:, 5] = 1.0  # every node asks to migrate, every step
        result = twin.step(Action.from_env(rows, scenario.shield.max_replica_step))
        total_interventions += result.interventions
        held = s.replicas + s.pending_total
        assert (s.replicas >= 0).all() and (s.pending >= 0).all()
        assert (held <= nodes.slots).all()  # compute slices
        assert (held * scenario.service.replica_memory_gb <= [scenario.profiles[p].memory_gb for p in nodes.profile]).all()
        assert (held <= shield.power_limit).all()
        assert (held <= thermal_before).all()
        assert (held[~s.alive] == 0).all()
        assert (s.temp_c <= scenario.thermal.max_c + 1e-9).all()
        assert (s.queue_total <= scenario.service.queue_capacity + 1e-9).all()
        assert (s.migration_window_sum <= scenario.shield.migration_cap_per_min).all()
        power = (twin.metrics.energy_edge_j - energy_before) / scenario.step_s
        assert (power <= scenario.power.node_cap_w + 1e-9).all()
        assert ((power - nodes.idle_w)[nodes.gpu & s.alive] <= scenario.power.gpu_cap_w + 1e-9).all()
        cloud = np.bincount(shield.region_of_node, weights=twin.metrics.served_cloud - cloud_before, minlength=2)
        assert (cloud <= cloud_capacity * s.cloud_up + 1e-9).all()
    counted = dict(zip(RULES, total_interventions))
    for rule in RULES:  # every rule had to step in at least once
        assert counted[rule] > 0, rule
    assert twin.summary()["shield_interventions"] == total_interventions.sum()


def test_shield_counts_and_clips_single_actions():
    twin = EdgeCloudTwin(tiny(), seed=0)
    action = Action.hold(3)
    action.admit = np.array([np.nan, 1.5, 1.0])
    action.placement = np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    action.replica_delta = np.array([1, 5, 0])  # slots are full (1 per node); 5 > max step
    safe, counts = twin.shield.project(action, twin.state)
    counted = dict(zip(RULES, counts))
    assert counted["bounds"] == 2 + 2 + 1 and counted["capacity"] == 2
    np.testing.assert_array_equal(safe.admit, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(safe.placement, np.tile([1.0, 0.0, 0.0], (3, 1)))
    np.testing.assert_array_equal(safe.replica_delta, [0, 0, 0])


def test_fault_injection_removes_exactly_the_configured_capacity():
    scenario = synthetic(episode_s=1200, faults=FAULTS[:3])
    twin = EdgeCloudTwin(scenario, seed=5)
    nodes = scenario.nodes
    first, second = twin.faults.failed_nodes
    assert len(first) == round(0.25 * 12) == 3 and len(second) == round(0.1 * 12) == 1
    assert not set(first) & set(second)  # disjoint: capacities add up
    full = nodes.full_rate.sum()
    up_capacity = []
    cloud_down_steps = 0
    while not twin.done:
        twin.step(Action.hold(twin.num_nodes))
        s = twin.state
        up_capacity.append((nodes.full_rate * s.alive).sum())
        assert (twin.replica_limit()[~s.alive] == 0).all() and (s.replicas[~s.alive] == 0).all()
        cloud_down_steps += not s.cloud_up.any()
    up_capacity = np.array(up_capacity)
    assert up_capacity[299] == full
    assert up_capacity[300] == pytest.approx(full - nodes.full_rate[first].sum(), rel=1e-15)
    assert up_capacity[899] == up_capacity[300] and up_capacity[900] == full  # back after 600 s
    assert up_capacity[1000] == pytest.approx(full - nodes.full_rate[second].sum(), rel=1e-15)
    assert cloud_down_steps == 400  # [500 s, 900 s) at 1 s steps
    assert (~twin.faults.cloud_up[500:900]).all() and twin.faults.cloud_up[499].all() and twin.faults.cloud_up[900].all()


def trajectory(seed: int, action_seed: int = 7) -> tuple[dict, np.ndarray, np.ndarray]:
    failure = {"type": "node_failure", "fraction": 0.25, "at_step": 100}
    twin = EdgeCloudTwin(synthetic(episode_s=400, faults=[failure, FAULTS[3]]), seed=seed)
    rng = np.random.default_rng(action_seed)
    rewards = []
    while not twin.done:
        rewards.append(twin.step(Action.from_env(random_env_rows(rng, twin.num_nodes), 2)).reward)
    return twin.summary(), np.array(rewards), twin.state.queue.copy()


def test_same_seed_same_trajectory():
    first, second, other = trajectory(4), trajectory(4), trajectory(5)
    assert first[0] == second[0]
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(first[2], second[2])
    assert first[0]["arrived"] != other[0]["arrived"]


def test_reset_replays_the_episode():
    twin = EdgeCloudTwin(synthetic(episode_s=300, faults=[]), seed=2)
    while not twin.done:
        twin.step()
    before = twin.summary()
    twin.reset(2)
    while not twin.done:
        twin.step()
    assert twin.summary() == before


def test_misuse_is_one_clear_error():
    twin = EdgeCloudTwin(tiny(), seed=0)
    with pytest.raises(EdgeSimError, match="one entry per edge node"):
        twin.step(Action.hold(5))
    while not twin.done:
        twin.step()
    with pytest.raises(EdgeSimError, match="call reset"):
        twin.step()


def test_thermal_limit_fast_path_agrees_with_the_formula():
    shield = EdgeCloudTwin(tight_caps(), seed=0).shield
    rng = np.random.default_rng(0)

    class State:
        alive = np.ones(12, dtype=bool)

    for _ in range(200):
        State.temp_c = rng.uniform(25, 50, size=12)
        _, _, thermal = shield.replica_limits(State)
        np.testing.assert_array_equal(np.minimum(thermal, shield.slots),
                                      np.minimum(shield.thermal_limit(State.temp_c), shield.slots))
