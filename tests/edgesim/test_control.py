"""Paper 001's control hierarchy (edgesim.auction, edgesim.modes, edgesim.control): the auction on
hand-made instances, mode weights on a hand-computed step, the COA cadence, and bad configs."""

from __future__ import annotations

import numpy as np
import pytest

from edgesim import Action, EdgeCloudTwin, EdgeSimError
from edgesim.auction import proportional_share, uniform_price
from edgesim.control import COA_MENU, ControlConfig, ControlLayer, whole_slices
from edgesim.modes import ModePlan, mode_weights
from tests.edgesim.helpers import tiny

# ------------------------------------------------------------------ auction


def test_uniform_price_auction_clears_within_capacity_and_is_individually_rational():
    # Prepare: 3 bidders ask 2, 3, 1 units at values 3, 1, 2; 4 units for sale
    quantity, value = np.array([2.0, 3.0, 1.0]), np.array([3.0, 1.0, 2.0])
    # Execute
    clearing = uniform_price(quantity, value, capacity=4.0)
    # Assert: by value, bidder 0 gets 2, bidder 2 gets 1, bidder 1 the last unit and is the
    # marginal bid, so the uniform price is its value 1; payments 2, 1, 1
    np.testing.assert_allclose(clearing.allocation, [2.0, 1.0, 1.0])
    assert clearing.price == 1.0 and clearing.demand == 6.0
    np.testing.assert_allclose(clearing.payments, [2.0, 1.0, 1.0])
    assert clearing.allocation.sum() <= 4.0 and (clearing.allocation <= quantity).all()
    utility = (value - clearing.price) * clearing.allocation
    assert (utility >= 0).all()  # individually rational


def test_ties_share_the_marginal_units_and_the_reserve_excludes_low_bids():
    # a tie at the margin: 2 units, two bids of 2 at value 1 -> 1 each at price 1
    tie = uniform_price(np.array([2.0, 2.0]), np.array([1.0, 1.0]), capacity=2.0)
    np.testing.assert_allclose(tie.allocation, [1.0, 1.0])
    assert tie.price == 1.0
    # no congestion: every bid at or above the reserve 1 is served in full, at the reserve
    free = uniform_price(np.array([1.0, 1.0]), np.array([5.0, 0.5]), capacity=10.0, reserve=1.0)
    np.testing.assert_allclose(free.allocation, [1.0, 0.0])
    assert free.price == 1.0


def test_proportional_share_rations_without_a_price():
    clearing = proportional_share(np.array([2.0, 3.0, 1.0]), capacity=4.0)
    np.testing.assert_allclose(clearing.allocation, [4 / 3, 2.0, 2 / 3])  # x 4/6 each
    assert clearing.price == 0.0


def test_whole_slices_use_the_capacity_by_largest_remainder():
    # 0.5 + 0.5 of capacity 1 would floor to nothing: the first tie gets the slice
    np.testing.assert_allclose(whole_slices(np.array([0.5, 0.5]), 1.0), [1.0, 0.0])
    np.testing.assert_allclose(whole_slices(np.array([2.0, 1.4, 0.6]), 4.0), [2.0, 1.0, 1.0])


def test_bad_bids_are_one_clear_error():
    with pytest.raises(EdgeSimError, match="finite and >= 0"):
        uniform_price(np.array([1.0, -1.0]), np.array([1.0, 1.0]), 1.0)


# ------------------------------------------------------------------ modes


def cloud_rows(num_nodes: int) -> Action:
    placement = np.tile([0.0, 0.0, 1.0], (num_nodes, 1))
    return Action(np.ones(num_nodes), placement, np.zeros(num_nodes, dtype=np.int64), np.full(num_nodes, -1))


@pytest.mark.parametrize("mode, expected", [
    # terms of an all-cloud step on the tiny twin: miss 0 (30 + 10 + 1 ms < 150 ms),
    # energy (idle 4 W + 0.3 x 16 W static for the one replica) / 20 W = 0.44, cloud share 1
    ("balanced", -(1.0 * 0 + 0.1 * 0.44 + 0.1 * 1)),
    ("energy-saver", -(1.0 * 0 + 0.5 * 0.44 + 0.1 * 1)),
    ("burst-absorber", -(2.0 * 0 + 0.02 * 0.44 + 0.05 * 1)),
    ("cost-cap", -(1.0 * 0 + 0.1 * 0.44 + 1.0 * 1)),
])
def test_mode_weights_change_the_reward_as_specified(mode, expected):
    # Prepare: slices for every node (slice_share 1) and no price charge, so only the weights act
    config = ControlConfig.from_dict({"enabled": True, "mode": mode, "slice_share": 1.0, "price_weight": 0.0})
    twin = EdgeCloudTwin(tiny(), seed=0, control=ControlLayer(config))
    # Execute
    result = twin.step(cloud_rows(twin.num_nodes))
    # Assert
    np.testing.assert_allclose(result.reward_terms, [[0.0, 0.44, 1.0]] * 3, atol=1e-9)
    np.testing.assert_allclose(result.reward, expected, atol=1e-9)


def test_balanced_mode_is_the_twin_files_reward():
    plain = EdgeCloudTwin(tiny(), seed=0).step(cloud_rows(3)).reward
    config = ControlConfig.from_dict({"enabled": True, "slice_share": 1.0})
    controlled = EdgeCloudTwin(tiny(), seed=0, control=ControlLayer(config)).step(cloud_rows(3)).reward
    np.testing.assert_allclose(controlled, plain)
    np.testing.assert_allclose(mode_weights()["balanced"], [1.0, 0.1, 0.1])


def test_a_schedule_switches_modes_at_its_fractions():
    plan = ModePlan("schedule", [{"at": 0.0, "mode": "burst-absorber"}, {"at": 0.5, "mode": "cost-cap"}])
    plan.reset(seed=0, episode_steps=10)
    names = [plan.names[plan.index(t)] for t in range(10)]
    assert names == ["burst-absorber"] * 5 + ["cost-cap"] * 5


# ------------------------------------------------------------------ cadence and auction in the twin


def test_the_coa_acts_exactly_every_k_steps_and_its_allocation_binds():
    # Prepare: k = 4 on the 10-step tiny twin; cluster a (2 nodes x 1 slot) may hand out
    # floor(0.5 x 2) = 1 slice, cluster b (1 slot) none
    config = ControlConfig.from_dict({"enabled": True, "coa_every": 4, "slice_share": 0.5})
    twin = EdgeCloudTwin(tiny(), seed=0, control=ControlLayer(config))
    # Execute
    held = []
    while not twin.done:
        twin.step(None)
        held.append(twin.state.replicas + twin.state.pending_total)
    # Assert: decisions at steps 0, 4, 8; never more replicas than slices per cluster
    assert twin.control.coa_steps == [0, 4, 8]
    assert twin.summary()["coa_decisions"] == 3
    held = np.array(held)
    assert (held[:, :2].sum(axis=1) <= 1).all() and (held[:, 2] == 0).all()
    assert twin.summary()["control_clips"] > 0


# ------------------------------------------------------------------ the learned COA's hooks (coa: qmix)


def test_a_learned_coa_is_asked_exactly_every_k_steps_with_its_window_reward():
    # Prepare: k = 4 on the 10-step tiny twin; a policy that records when it is asked
    config = ControlConfig.from_dict({"enabled": True, "coa_every": 4, "coa": "qmix"})
    calls = []
    layer = ControlLayer(config, coa_policy=lambda obs, reward: calls.append((obs.shape, reward)) or np.zeros(2, int))
    twin = EdgeCloudTwin(tiny(), seed=0, control=layer)
    # Execute
    steps = []
    while not twin.done:
        before = len(calls)
        twin.step(None)
        steps += [twin.state.step - 1] * (len(calls) - before)
    # Assert: asked at steps 0, 4, 8 only, with the (C, 6 + 4 modes) observation; the first decision of
    # the episode has no window behind it, the next two get the window just closed, which is what
    # the layer adds to its COA return
    assert steps == [0, 4, 8] == twin.control.coa_steps
    assert [shape for shape, _ in calls] == [(2, 10)] * 3
    assert calls[0][1] is None
    np.testing.assert_allclose(calls[1][1] + calls[2][1], twin.control.coa_return)


@pytest.mark.parametrize("row, slices, link_budget, links", [
    # cluster a: 2 slots, b: 1 slot; link 1 Mbps per cluster. Every node asks its 1 held slice and, all
    # to the cloud at step 0, max(0 arrivals, 1) x 100 kB = 0.8 Mbps; all bids at value 0 (no backlog) tie.
    # share 0.5: a gets floor(0.5 x 2) = 1 slice (largest remainder: the first node), b floor(0.5) = 0;
    # half links 0.5 Mbps: a's two bids of 0.8 share it, 0.25 each; b gets 0.5 of its 0.8
    ((0.5, 0.5, False), [1, 0, 0], [0.5, 0.5], [0.25, 0.25, 0.5]),
    # share 1: every slice; full links 1 Mbps: a's 1.6 asked is cut to 0.5 each, b's 0.8 fits
    ((1.0, 1.0, False), [1, 1, 1], [1.0, 1.0], [0.5, 0.5, 0.8]),
])
def test_a_chosen_coa_action_sets_the_capacities_the_auction_clears_against(row, slices, link_budget, links):
    # Prepare
    config = ControlConfig.from_dict({"enabled": True, "coa": "qmix", "link_mbps": 1.0})
    action = COA_MENU.index(row)
    twin = EdgeCloudTwin(tiny(), seed=0, control=ControlLayer(config, coa_policy=lambda obs, reward: np.full(2, action)))
    # Execute
    twin.step(cloud_rows(twin.num_nodes))
    # Assert
    layer = twin.control
    np.testing.assert_allclose(layer.slice_budget, [slices[0] + slices[1], slices[2]])
    np.testing.assert_allclose(layer.slice_alloc, slices)
    np.testing.assert_allclose(layer.link_budget, link_budget)
    np.testing.assert_allclose(layer.link_alloc, links)
    assert layer.coa_actions.tolist() == [action, action]


def test_the_rule_is_the_learned_menus_default_row_bit_for_bit():
    # Prepare: the rule, and a "learned" COA that always picks (0.75, 1.0, migrate), on a twin with
    # 3 clusters x 4 nodes and migrations (the rule's constants: slice_share 0.75, full link, rebalancing)
    from tests.edgesim.helpers import synthetic

    scenario = synthetic(episode_s=60, faults=[])
    row = COA_MENU.index((0.75, 1.0, True))
    summaries = []
    for raw, policy in (({}, None), ({"coa": "qmix"}, lambda obs, reward: np.full(len(obs), row))):
        layer = ControlLayer(ControlConfig.from_dict({"enabled": True, "migrate_gap": 0.0, **raw}), coa_policy=policy)
        twin = EdgeCloudTwin(scenario, seed=3, control=layer)
        rng = np.random.default_rng(0)
        while not twin.done:
            twin.step(Action.from_env(rng.uniform(-1, 1, size=(twin.num_nodes, 6)), 2))
        summaries.append({k: v for k, v in twin.summary().items() if not k.endswith("cpu_s")})
    # Assert: identical, to the bit
    assert summaries[0] == summaries[1]
    assert summaries[0]["coa_decisions"] == 20 and summaries[0]["coa_migrations"] > 0


# ------------------------------------------------------------------ bad configs


@pytest.mark.parametrize("raw, match", [
    ({"price_weight": -1}, r"task.control.price_weight=-1 is invalid: use a number >= 0 \(lambda"),
    ({"mode": "turbo"}, r"task.control.mode=turbo is unknown: choose one of balanced, energy-saver, burst-absorber, "
                        r"cost-cap, random, schedule"),
    ({"coa_every": 0}, r"task.control.coa_every=0 is invalid: the COA cadence is a whole number of twin steps >= 1"),
    ({"coa_every": 2.5}, r"task.control.coa_every=2.5 is invalid"),
    ({"slice_share": 1.5}, r"task.control.slice_share=1.5 is invalid: use a number in \(0, 1\]"),
    ({"mode": "schedule"}, r"task.control.mode=schedule needs task.control.schedule"),
    ({"mode": "schedule", "schedule": [{"at": 0.5, "mode": "cost-cap"}]}, r"the first entry needs at: 0"),
    ({"mode": "schedule", "schedule": [{"at": 0.0, "mode": "eco"}]}, r"task.control.schedule mode=eco is unknown"),
    ({"cadence": 3}, r"task.control.cadence is unknown: valid keys are"),
    ({"coa": "foo"}, r"^task.control.coa=foo is invalid: use rule or qmix$"),
    ({"coa": "qmix", "enabled": False}, r"task.control.coa=qmix needs task.control.enabled=true"),
])
def test_bad_control_config_is_one_clear_error(raw, match):
    with pytest.raises(EdgeSimError, match=match):
        ControlConfig.from_dict({"enabled": True, **raw})
