"""Hierarchical aggregation on plain arrays: tiers, bytes per link, per-tier deadlines and staleness."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedAvgM

from fl_common.compression import CompressionSettings, round_trip
from fl_common.compression import serialised_size as platform_serialised_size
from strategies.ass import AccuracyStabilitySize
from strategies.hierarchical import HierarchicalStrategy, Link, Network, TierRule, serialised_size
from strategies.staleness_clustered import StalenessClustered
from tests.fake_grid import FakeGrid, arrays, train_reply

LINKS = dict(lan=Link(1000, 2), regional=Link(1000, 10), backhaul=Link(100, 30))


def network(clusters: dict[str, list[int]], regions: dict[str, list[str]], **links) -> Network:
    return Network(cluster_of={p: c for c, ps in clusters.items() for p in ps},
                   region_of={c: r for r, cs in regions.items() for c in cs}, **{**LINKS, **links})


def fedavg() -> FedAvg:
    return FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)


def hierarchy(net: Network, tiers=("cluster", "region"), rule=fedavg, global_strategy=None, **global_rule):
    return HierarchicalStrategy(net, {t: TierRule(rule) for t in tiers}, global_strategy or fedavg(),
                                TierRule(fedavg, **global_rule) if global_rule else None)


def one_round(strategy, server_round, start, values, examples, compute=None, stamp=None):
    """Configure, answer every message with ``values[partition]``, aggregate."""
    grid = FakeGrid(sorted(values))
    sent = list(strategy.configure_train(server_round, start, ConfigRecord({"lr": 0.1}), grid))
    replies = []
    for message in sent:
        p = message.metadata.dst_node_id
        metrics = {"partition-id": p, "train_loss": float(p), "vc_compute_s": (compute or {}).get(p, 1.0)}
        if stamp is not None:
            metrics["wire-up-bytes"] = stamp
        replies.append(train_reply(arrays(values[p]), examples[p], node_id=p, **metrics))
    strategy.reply_sizes = [platform_serialised_size(r.content) for r in replies]  # as the server's accounting sees them
    new, metrics = strategy.aggregate_train(server_round, replies)
    return sent, replies, new, dict(metrics)


VALUES = {0: [1.0, 10.0], 1: [2.0, 20.0], 2: [4.0, 40.0], 3: [8.0, 80.0], 4: [16.0, 160.0]}
EXAMPLES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 2}
# flat weighted mean: (1*1 + 1*2 + 2*4 + 2*8 + 2*16) / 8 = 59/8; second entry x10
FLAT_MEAN = [59 / 8, 590 / 8]


@pytest.mark.parametrize("tiers", [("cluster",), ("cluster", "region"), ("region",), ()])
def test_every_tier_fedavg_with_full_participation_is_the_flat_weighted_mean(tiers):
    # Prepare: a {0, 1, 2}, b {3}, c {4}; regions x {a, b}, y {c}
    net = network({"a": [0, 1, 2], "b": [3], "c": [4]}, {"x": ["a", "b"], "y": ["c"]})
    strategy = hierarchy(net, tiers)
    # Execute
    sent, _, new, metrics = one_round(strategy, 1, arrays([0.0, 0.0]), VALUES, EXAMPLES)
    # Assert: cluster a = (1 + 2 + 8) / 4 = 2.75 (4 examples), b = 8, c = 16; region x = (2.75*4 + 8*2) / 6 = 4.5,
    # y = 16; global = (4.5*6 + 16*2) / 8 = 59/8
    assert len(sent) == 5
    np.testing.assert_allclose(new.to_numpy_ndarrays()[0], FLAT_MEAN, rtol=1e-12)
    assert metrics["global_aggregated"] == 1
    assert metrics["train_loss"] == pytest.approx((0 * 1 + 1 * 1 + 2 * 2 + 3 * 2 + 4 * 2) / 8)
    if "cluster" in tiers:
        assert metrics["cluster_aggregated"] == 3 and metrics["cluster_updates"] == 5


def test_the_partial_aggregates_are_the_hand_computed_cluster_and_region_means():
    net = network({"a": [0, 1, 2], "b": [3], "c": [4]}, {"x": ["a", "b"], "y": ["c"]})
    strategy = hierarchy(net)
    one_round(strategy, 1, arrays([0.0, 0.0]), VALUES, EXAMPLES)
    models = {name: agg.model.to_numpy_ndarrays()[0][0] for name, agg in strategy.aggregators.items()}
    assert models["cluster:a"] == pytest.approx(2.75)
    assert models["region:x"] == pytest.approx(4.5)
    assert models["region:y"] == pytest.approx(16.0)


def test_bytes_per_link_are_the_serialised_payloads():
    # Prepare: 3 tiers, 2 regions, 3 clusters, 5 clients
    net = network({"a": [0, 1, 2], "b": [3], "c": [4]}, {"x": ["a", "b"], "y": ["c"]})
    strategy = hierarchy(net)
    start = arrays([0.0, 0.0])
    # Execute
    sent, replies, new, metrics = one_round(strategy, 1, start, VALUES, EXAMPLES)
    # Assert: our size is the platform's accounting (Flower's object tree, deflated)
    down = sent[0].content
    assert serialised_size(down) == platform_serialised_size(down) > 0
    # round 1 pushes the initial model: once per region over the backhaul, once per cluster over its
    # regional link, once per client over the LAN
    assert metrics["backhaul_down_bytes"] == 2 * serialised_size(down)
    assert metrics["regional_down_bytes"] == 3 * serialised_size(down)
    assert metrics["lan_down_bytes"] == sum(serialised_size(m.content) for m in sent)
    # up: each client's reply on the LAN, each cluster's aggregate on its regional link, each region's on the backhaul
    assert metrics["lan_up_bytes"] == sum(strategy.reply_sizes)

    def partial(name: str) -> int:
        agg = strategy.aggregators[name]
        content = RecordDict({"arrays": agg.model, "metrics": MetricRecord(
            {"num-examples": agg.examples, "dispatch-round": 1, "staleness": 0})})
        return platform_serialised_size(content)

    assert metrics["regional_up_bytes"] == sum(partial(f"cluster:{c}") for c in "abc")
    assert metrics["backhaul_up_bytes"] == sum(partial(f"region:{r}") for r in "xy")
    assert metrics["backhaul_bytes"] == metrics["backhaul_up_bytes"] + metrics["backhaul_down_bytes"]


def test_flat_on_the_network_sends_every_update_over_the_backhaul_and_counts_wire_stamps():
    net = network({"a": [0, 1, 2], "b": [3], "c": [4]}, {"x": ["a", "b"], "y": ["c"]})
    flat = hierarchy(net, tiers=())
    three = hierarchy(net)
    # the wire stamp (the server's accounting of a compressed reply) is what crosses every link
    _, _, _, m_flat = one_round(flat, 1, arrays([0.0, 0.0]), VALUES, EXAMPLES, stamp=1000)
    _, _, _, m_three = one_round(three, 1, arrays([0.0, 0.0]), VALUES, EXAMPLES, stamp=1000)
    assert m_flat["lan_up_bytes"] == m_flat["regional_up_bytes"] == m_flat["backhaul_up_bytes"] == 5 * 1000
    assert m_three["lan_up_bytes"] == 5 * 1000
    assert m_three["backhaul_up_bytes"] < m_flat["backhaul_up_bytes"]
    # downlink: flat sends the model to each client through the backhaul, 3 tiers once per region
    assert m_flat["backhaul_down_bytes"] == pytest.approx(5 / 2 * m_three["backhaul_down_bytes"])


def test_shared_backhaul_serialises_the_flat_uploads():
    # 4 clients in one cluster, backhaul 1 Mbit/s: flat sends 4 replies through it one after the other
    net = network({"a": [0, 1, 2, 3]}, {"x": ["a"]}, backhaul=Link(1, 0))
    values = {p: [float(p)] * 1000 for p in range(4)}
    examples = dict.fromkeys(range(4), 1)
    _, replies, _, flat = one_round(hierarchy(net, tiers=()), 1, arrays([0.0] * 1000), values, examples)
    _, _, _, two = one_round(hierarchy(net, tiers=("cluster",)), 1, arrays([0.0] * 1000), values, examples)
    one_upload = serialised_size(replies[0].content) * 8 / 1e6
    assert flat["round_virtual_s"] > 4 * one_upload  # four uploads in a row (plus the four downloads)
    assert two["round_virtual_s"] < flat["round_virtual_s"]


def test_a_straggling_cluster_yields_stale_updates_at_the_global_tier():
    # Prepare: cluster b's client computes 15 s; the global tier closes 10 s after the round starts
    net = network({"a": [0, 1], "b": [2]}, {"x": ["a"], "y": ["b"]})
    strategy = hierarchy(net, tiers=("cluster",), deadline_s=10.0)
    values = {0: [1.0], 1: [3.0], 2: [100.0]}
    examples = {0: 1, 1: 1, 2: 2}
    compute = {0: 1.0, 1: 1.0, 2: 15.0}
    # Execute
    _, _, g1, m1 = one_round(strategy, 1, arrays([0.0]), values, examples, compute)
    _, _, g2, m2 = one_round(strategy, 2, g1, values, examples, compute)
    # Assert: round 1 closes at its deadline without b (a's mean 2.0), b is in flight
    assert m1["round_virtual_s"] == pytest.approx(10.0)
    assert m1["global_updates"] == 1 and m1["global_updates_late"] == 1
    np.testing.assert_allclose(g1.to_numpy_ndarrays()[0], [2.0])
    # round 2 applies b's round-1 aggregate as a stale update (tau 1), next to a's fresh one
    assert m2["global_updates_stale"] == 1 and m2["global_staleness_max"] == 1
    assert m2["staleness_total_max"] == 1 and m2["staleness_total_tau1"] == 1
    np.testing.assert_allclose(g2.to_numpy_ndarrays()[0], [(2.0 * 2 + 100.0 * 2) / 4])


def test_a_straggling_client_stays_busy_and_is_applied_stale_at_its_cluster():
    net = network({"a": [0, 1]}, {"x": ["a"]})
    strategy = HierarchicalStrategy(net, {"cluster": TierRule(fedavg, deadline_s=5.0)}, fedavg())
    values, examples, compute = {0: [1.0], 1: [9.0]}, {0: 1, 1: 1}, {0: 1.0, 1: 8.0}
    sent1, _, g1, m1 = one_round(strategy, 1, arrays([0.0]), values, examples, compute)
    assert m1["cluster_updates_late"] == 1 and strategy.is_busy(1)
    sent2, _, _, m2 = one_round(strategy, 2, g1, values, examples, compute)
    assert [m.metadata.dst_node_id for m in sent2] == [0]  # the busy client is not sampled
    assert m2["cluster_updates_stale"] == 1 and not strategy.is_busy(1)


def test_period_k_aggregates_the_upper_tier_every_k_rounds():
    # regions every round, global every second round
    net = network({"a": [0], "b": [1]}, {"x": ["a"], "y": ["b"]})
    strategy = hierarchy(net, period=2)
    values, examples = {0: [2.0], 1: [4.0]}, {0: 1, 1: 1}
    _, _, g1, m1 = one_round(strategy, 1, arrays([0.0]), values, examples)
    assert g1 is None and m1["global_aggregated"] == 0 and m1["backhaul_up_bytes"] == 0
    assert m1["region_aggregated"] == 2
    _, _, g2, m2 = one_round(strategy, 2, arrays([0.0]), values, examples)
    assert m2["global_aggregated"] == 1 and m2["backhaul_up_bytes"] > 0
    assert m2["backhaul_down_bytes"] == 0 and m2["regional_down_bytes"] > 0  # regions pushed their models down
    np.testing.assert_allclose(g2.to_numpy_ndarrays()[0], [3.0])


def test_participation_fraction_per_tier():
    net = network({"a": [0, 1], "b": [2, 3], "c": [4, 5], "d": [6, 7]}, {"x": ["a", "b"], "y": ["c", "d"]})
    strategy = HierarchicalStrategy(net, {"cluster": TierRule(fedavg, fraction=0.5),
                                          "region": TierRule(fedavg, fraction=0.5)}, fedavg())
    sent = list(strategy.configure_train(1, arrays([0.0]), ConfigRecord(), FakeGrid(range(8))))
    # one cluster per region, one client per cluster
    clusters = {net.cluster_of[m.metadata.dst_node_id] for m in sent}
    assert len(sent) == 2 and len({net.region_of[c] for c in clusters}) == 2


def test_compression_per_tier_shrinks_the_regional_uplink():
    net = network({"a": [0, 1], "b": [2, 3]}, {"x": ["a", "b"]})
    codec = lambda delta: round_trip(delta, CompressionSettings(k=0.1, bits=8))  # noqa: E731
    plain = HierarchicalStrategy(net, {"cluster": TierRule(fedavg)}, fedavg())
    packed = HierarchicalStrategy(net, {"cluster": TierRule(fedavg, codec=codec)}, fedavg())
    rng = np.random.default_rng(0)
    values = {p: rng.normal(size=2000) for p in range(4)}
    examples = dict.fromkeys(range(4), 1)
    _, _, g_plain, m_plain = one_round(plain, 1, arrays(np.zeros(2000)), values, examples)
    _, _, g_packed, m_packed = one_round(packed, 1, arrays(np.zeros(2000)), values, examples)
    assert m_packed["backhaul_up_bytes"] < 0.3 * m_plain["backhaul_up_bytes"]
    assert m_packed["lan_up_bytes"] == m_plain["lan_up_bytes"]  # the clients' own compression is the run's
    # error feedback keeps what was not sent at the cluster
    assert all(agg.residual is not None for name, agg in packed.aggregators.items() if name.startswith("cluster"))


@pytest.mark.parametrize("rule", ["fedavgm", "staleness", "ass"])
def test_any_registered_rule_aggregates_a_tier(rule):
    net = network({"a": [0, 1], "b": [2]}, {"x": ["a", "b"]})
    make = {
        "fedavgm": lambda: FedAvgM(server_momentum=0.0, min_available_nodes=1, min_train_nodes=1),
        "staleness": lambda: StalenessClustered(min_available_nodes=1, min_train_nodes=1),
        "ass": lambda: AccuracyStabilitySize(lambda a: np.array([0.5, 0.5]), min_available_nodes=1, min_train_nodes=1),
    }[rule]
    strategy = HierarchicalStrategy(net, {"cluster": TierRule(make)}, make())
    values, examples = {0: [1.0], 1: [3.0], 2: [8.0]}, {0: 1, 1: 1, 2: 2}
    _, _, g1, _ = one_round(strategy, 1, arrays([0.0]), values, examples)
    _, _, g2, _ = one_round(strategy, 2, g1, values, examples)
    if rule in ("fedavgm", "staleness"):  # momentum 0 / no staleness: plain FedAvg, every tier
        np.testing.assert_allclose(g1.to_numpy_ndarrays()[0], [(1 + 3 + 16) / 4])
    assert g2 is not None


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(tiers={"cluster": TierRule(fedavg, period=2)}), r"cluster tier aggregates its clients every round"),
    (dict(tiers={"cluster": TierRule(fedavg), "region": TierRule(fedavg, period=2)}, global_rule=TierRule(fedavg, period=3)),
     r"global period \(3\) must be a multiple of the region period \(2\)"),
    (dict(tiers={}, global_rule=TierRule(fedavg, period=2)), r"flat aggregation .* needs a global period of 1"),
    (dict(tiers={"zone": TierRule(fedavg)}), r"unknown tier 'zone'"),
])
def test_inconsistent_tiers_are_one_clear_error(kwargs, message):
    net = network({"a": [0]}, {"x": ["a"]})
    with pytest.raises(ValueError, match=message):
        HierarchicalStrategy(net, global_strategy=fedavg(), **kwargs)


def test_a_rule_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match=r"fraction=0 must lie in \(0, 1\]"):
        TierRule(fedavg, fraction=0)
    with pytest.raises(ValueError, match=r"bandwidth_mbps=0 must be > 0"):
        Link(0, 1)
    net_dict = {"a": [0]}
    with pytest.raises(ValueError, match=r"cluster 'a' is in no region"):
        network(net_dict, {})
    assert isinstance(ArrayRecord(), ArrayRecord)
