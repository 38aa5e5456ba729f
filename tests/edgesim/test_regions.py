"""Paper 000's regions and fairness: the measures by hand on three regions,
the fairness reward term in the twin, the regions twin, and its bad inputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import yaml

from edgesim import EdgeCloudTwin, EdgeSimError, Scenario, load_scenario
from edgesim.actions import Action
from edgesim.baselines import ThresholdAutoscaler, run_episode
from edgesim.fairness import (
    FairnessSpec,
    fairness_penalty,
    fairness_variance,
    fulfillment,
    jain_index,
    omega,
    parse_fairness,
    satisfaction,
)
from edgesim.scenario import CONF_DIR
from edgesim.workload import build_workload

from .helpers import tiny_config

# Three regions: 90 of 100, 40 of 50 and 50 of 100 requests served.
SERVED, ARRIVED = np.array([90.0, 40.0, 50.0]), np.array([100.0, 50.0, 100.0])


def test_fairness_measures_by_hand_on_three_regions():
    # Prepare: F = [0.9, 0.8, 0.5], mean 0.7333
    # Execute
    f = fulfillment(SERVED, ARRIVED)
    # Assert
    np.testing.assert_allclose(f, [0.9, 0.8, 0.5])
    # Var = (0.1667^2 + 0.0667^2 + 0.2333^2) / 3 = 0.086667 / 3
    assert fairness_variance(f) == pytest.approx(0.0866667 / 3, rel=1e-5)
    # Jain = 2.2^2 / (3 x (0.81 + 0.64 + 0.25)) = 4.84 / 5.1
    assert jain_index(f) == pytest.approx(4.84 / 5.1)
    assert jain_index(np.ones(3)) == 1.0 and jain_index(np.zeros(3)) == 1.0
    # S = 0.4 F + 0.3 min(1, 0.15 / T) + 0.3 min(1, 0.2 / R)
    s = satisfaction(f, response_s=np.array([0.1, 0.3, 0.6]), redundancy=np.array([0.1, 0.4, 0.8]),
                     response_ref_s=0.15, redundancy_ref=0.2)
    np.testing.assert_allclose(s, [0.36 + 0.3 + 0.3, 0.32 + 0.15 + 0.15, 0.2 + 0.075 + 0.075])
    assert fulfillment(np.array([0.0]), np.array([0.0]))[0] == 1.0  # no demand: none unmet


def test_fairness_penalty_follows_the_omega_schedule():
    f = fulfillment(SERVED, ARRIVED)
    four_var = 4 * 0.0866667 / 3  # 0.115556
    constant = FairnessSpec(lam=1.0)
    assert fairness_penalty(constant, 0.0, f) == pytest.approx(four_var, rel=1e-5)
    assert fairness_penalty(FairnessSpec(lam=0.5), 0.0, f) == pytest.approx(0.5 * four_var, rel=1e-5)
    # spread: sd = sqrt(0.028889) = 0.16997; with spread_ref 0.33994 lambda is halved
    spread = FairnessSpec(lam=1.0, omega="spread", spread_ref=2 * np.sqrt(0.0866667 / 3))
    assert omega(spread, 0.0, f) == pytest.approx(0.5, rel=1e-5)
    assert omega(FairnessSpec(lam=1.0, omega="spread", spread_ref=0.1), 0.0, f) == 1.0  # capped at lambda
    ramp = FairnessSpec(lam=1.0, omega="ramp", ramp_s=60.0)
    assert fairness_penalty(ramp, 30.0, f) == pytest.approx(0.5 * four_var, rel=1e-5)


def test_the_twin_reward_pays_the_fairness_term():
    # Prepare: cluster a (2 boxes) serves all 10 of its requests; cluster b's box admits half of its 5.
    # Smoothing window 2 s (alpha = 0.5): F_a = 1, F_b = 1 + 0.5 (0.5 - 1) = 0.75;
    # Var = 0.125^2 = 0.015625, so every node pays 4 x 0.015625 = 0.0625 (lambda 1, constant).
    fair = Scenario.from_dict(tiny_config(fairness={"lambda": 1.0, "window_s": 2}))
    plain = Scenario.from_dict(tiny_config())
    action = Action.hold(3)
    action.admit[2] = 0.5
    # Execute
    rewards = [EdgeCloudTwin(s, seed=0).step(action).reward for s in (fair, plain)]
    # Assert
    np.testing.assert_allclose(plain_minus_fair := rewards[1] - rewards[0], [0.0625] * 3)
    assert plain_minus_fair.shape == (3,)


def test_region_measures_of_an_episode_by_hand():
    # Prepare: 10 steps, 5 requests/s per node; node 2 (cluster b) admits half.
    twin = EdgeCloudTwin(Scenario.from_dict(tiny_config()), seed=0)
    action = Action.hold(3)
    action.admit[2] = 0.5
    # Execute
    while not twin.done:
        twin.step(action)
    summary = twin.summary()
    # Assert: F = [100/100, 25/50] -> variance 0.0625, Jain 1.5^2 / (2 x 1.25) = 0.9
    assert summary["fairness_variance"] == pytest.approx(0.0625)
    assert summary["jain_fairness"] == pytest.approx(0.9)
    assert summary["min_region_fulfillment"] == pytest.approx(0.5)
    regions = twin.metrics.region_measures()
    # provisioned 10 req/s per box: a idles 10 of 20 per step (R = 0.5), b 7.5 of 10 (R = 0.75)
    np.testing.assert_allclose(regions["redundancy"], [0.5, 0.75])
    # S_a = 0.4 + 0.3 min(1, 0.15 / T_a) + 0.3 x 0.2 / 0.5; T_a is the twin's mean latency of cluster a
    expected = 0.4 * np.array([1.0, 0.5]) + 0.3 * np.minimum(1, 0.15 / regions["response_s"]) + 0.3 * np.array([0.4, 0.2 / 0.75])
    np.testing.assert_allclose(regions["satisfaction"], expected)
    assert summary["satisfaction"] == pytest.approx(expected.mean())


def regions_raw() -> dict:
    return yaml.safe_load((CONF_DIR / "twin" / "regions.yaml").read_text())


def test_the_regions_twin_has_nine_tier_by_industry_regions():
    scenario = load_scenario("regions", {"episode_s": 60, "faults": [], "workload": {"source": "synthetic"}})
    assert [c.name for c in scenario.clusters] == list("ABCDEFGHI")
    assert [(r.tier, r.industry) for r in scenario.regions.regions][:3] == [
        ("first", "manufacturing"), ("first", "service"), ("first", "agriculture")]
    # density 0.3: round(0.3 x 16) = 5, round(0.3 x 10) = 3, round(0.3 x 6) = 2 nodes per region
    assert [len(c.nodes) for c in scenario.clusters] == [5, 5, 5, 3, 3, 3, 2, 2, 2]
    assert scenario.clusters[8].nodes == ("jetson-nano", "jetson-nano") and scenario.clusters[8].cloud_region == "cloud-west"


def test_density_changes_the_nodes_not_the_demand():
    # Prepare: density 0.1 (2 / 1 / 1 nodes) and 0.5 (8 / 5 / 3) against the reference 0.3
    base = {"episode_s": 60, "faults": [], "workload": {"source": "synthetic"}}
    sparse, dense = (load_scenario("regions", {**base, "regions": {**regions_raw()["regions"], "density": d}})
                     for d in (0.1, 0.5))
    # Execute
    demand = [np.add.reduceat(build_workload(s, 0).envelope, s.nodes.cluster_start, axis=0) for s in (sparse, dense)]
    # Assert: same demand per region and interval; rural region I's reference = 2 nanos of 70.8 req/s
    assert [len(c.nodes) for c in sparse.clusters] == [2, 2, 2, 1, 1, 1, 1, 1, 1]
    assert [len(c.nodes) for c in dense.clusters] == [8, 8, 8, 5, 5, 5, 3, 3, 3]
    np.testing.assert_allclose(demand[0], demand[1], rtol=1e-9)
    assert sparse.node_rate("jetson-nano") == pytest.approx(70.8)


def test_the_regions_twin_runs_and_reports_fairness():
    scenario = load_scenario("regions", {"episode_s": 60, "faults": [], "workload": {"source": "synthetic"}})
    metrics = run_episode(EdgeCloudTwin(scenario, seed=0), ThresholdAutoscaler(), seed=0)
    assert 0.5 < metrics["fulfillment_rate"] <= 1.0
    assert 0.0 <= metrics["fairness_variance"] <= 0.25 and 1 / 9 <= metrics["jain_fairness"] <= 1.0
    assert 0.0 <= metrics["satisfaction"] <= 1.0


def _with(path: str, value):
    raw = regions_raw()
    node = raw
    *parents, last = path.split(".")
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    raw.update({"episode_s": 60, "faults": [], "workload": {**raw["workload"], "source": "synthetic"}})
    return raw


@pytest.mark.parametrize(
    "path, value, match",
    [
        ("fairness.lambda", 1.5, r"twin.fairness.lambda=1.5 is outside \[0, 1\].*use e.g. 0 \(off\) or 1"),
        ("fairness.lambda", -0.1, r"twin.fairness.lambda=-0.1 is outside \[0, 1\]"),
        ("fairness.omega", "wave", r"twin.fairness.omega='wave' is an unknown Omega\(t\) schedule: use one of "
                                   r"\['constant', 'spread', 'ramp'\]"),
        ("fairness.window_s", 0, r"twin.fairness.window_s=0 must be a number > 0"),
        ("regions.areas.0", {"name": "A", "tier": "megacity", "industry": "service"},
         r"twin.regions.areas\[0\].tier='megacity' is not a tier: use one of \['first', 'rural', 'second'\]"),
        ("regions.areas.0", {"name": "A", "tier": "first", "industry": "mining"},
         r"twin.regions.areas\[0\].industry='mining' is not an industry: use one of \['agriculture'"),
        ("regions.areas.1", {"name": "A", "tier": "first", "industry": "service"}, r"repeat the name\(s\) \['A'\]"),
        ("regions.density", 0, r"twin.regions.density=0 deploys no edge node: use a share in \(0, 1\]"),
        ("regions.density", 1.5, r"twin.regions.density=1.5 is outside \[0.0, 1.0\]"),
        ("regions.tiers.rural.sites", 0, r"twin.regions.tiers.rural.sites=0 must be a whole number >= 1"),
        ("regions.tiers.rural.profiles", ["jetson-tx2"], r"'jetson-tx2', not a device profile"),
        ("regions.industries.service.amplitude", 2, r"industries.service.amplitude=2 is outside \[0.0, 1.0\]"),
        ("regions.areas", [], r"twin.regions.areas=\[\]: give a non-empty list"),
        ("clusters", [{"name": "x", "nodes": 2}], r"gives both clusters and regions"),
    ],
)
def test_bad_region_or_fairness_settings_are_one_clear_error(path, value, match):
    with pytest.raises(EdgeSimError, match=match):
        Scenario.from_dict(_with(path, copy.deepcopy(value)))


def test_parse_fairness_defaults_to_off():
    assert not parse_fairness(None).enabled and parse_fairness({"lambda": 1}).enabled
