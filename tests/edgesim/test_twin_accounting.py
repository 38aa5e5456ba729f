"""Latency, energy and cost accounting, hand-computed on the tiny scenario.

Every node serves 10 requests/s with one replica (service time s = 0.1 s)
and receives 5 requests/s, so a node serving only its own users runs at
rho = 0.5 with c = 1: an M/M/1 queue, where P(wait) = rho = 0.5 and the
conditional wait has mean m = s / (1 - rho) = 0.2 s.
"""

import math

import numpy as np
import pytest

from edgesim import Action, EdgeCloudTwin, LatencyHistogram

from .helpers import tiny

STEPS = 10
NODES = 3
ARRIVALS = 5.0 * STEPS * NODES  # 150 requests


def run(scenario, placement=(1.0, 0.0, 0.0), admit=(1.0, 1.0, 1.0)) -> EdgeCloudTwin:
    twin = EdgeCloudTwin(scenario, seed=0)
    action = Action.hold(NODES)
    action.placement = np.array(placement, dtype=float).reshape(-1, 3) * np.ones((NODES, 1))
    action.admit = np.array(admit, dtype=float)
    while not twin.done:
        twin.step(action)
    return twin


def test_local_mm1_latency_energy_and_heat():
    twin = run(tiny())
    m = twin.summary()
    assert m["arrived"] == ARRIVALS and m["served"] == pytest.approx(ARRIVALS) and m["dropped"] == 0
    # latency = s + wait: mean 0.1 + 0.5 * 0.2 = 0.2 s (exact: bin means keep the mean)
    assert m["mean_latency_ms"] == pytest.approx(200.0, rel=1e-9)
    # half the requests never wait: the median is the service time (histogram bins ~2.3 % wide)
    assert m["p50_ms"] == pytest.approx(100.0, rel=0.025)
    # late = P(wait > 0.15 - 0.1) = 0.5 exp(-0.05 / 0.2)
    assert m["slo_violation_rate"] == pytest.approx(0.5 * math.exp(-0.25), rel=1e-9)
    assert m["throughput_rps"] == pytest.approx(15.0)
    # P = idle + (active - idle)(static x replicas/slots + (1 - static) x busy) = 4 + 16 (0.3 + 0.7 x 0.5)
    power = 4 + 16 * (0.3 + 0.7 * 0.5)
    assert power == pytest.approx(14.4)
    assert m["energy_edge_j"] == pytest.approx(NODES * STEPS * power)
    assert m["energy_j_per_request"] == pytest.approx(NODES * STEPS * power / ARRIVALS)
    assert m["gpu_util"] == pytest.approx(0.5) and m["cpu_util"] == pytest.approx(0.25 * 0.5)
    assert m["cost_per_1k_usd"] == 0 and m["fulfillment_rate"] == 1 and m["fairness_variance"] == 0
    # T relaxes towards ambient + R P with R = (95 - 25) / 20 degC/W and tau = 120 s
    expected = 25 + 3.5 * power * (1 - math.exp(-STEPS / 120))
    np.testing.assert_allclose(twin.state.temp_c, expected, rtol=1e-12)


def test_cloud_latency_cost_egress_and_energy():
    twin = run(tiny(), placement=(0.0, 0.0, 1.0))
    m = twin.summary()
    # RTT 30 ms + transfer (100 + 25) KB x 8 / 100 Mbit/s = 10 ms + service 1 ms
    # + M/M/1 wait at rho = 15 / 1000: rho s / (1 - rho)
    rho = 15 / 1000
    latency = 0.030 + 0.010 + 0.001 + rho * 0.001 / (1 - rho)
    assert m["mean_latency_ms"] == pytest.approx(1e3 * latency, rel=1e-9)
    for q in ("p50_ms", "p95_ms", "p99_ms"):
        assert m[q] == pytest.approx(1e3 * latency, rel=0.025)
    assert m["slo_violation_rate"] == 0 and m["cloud_share"] == pytest.approx(1.0)
    fee = 1e-5 + 25e-6 * 0.09  # per request + 25 KB of egress at $0.09/GB
    assert m["cost_usd"] == pytest.approx(ARRIVALS * fee)
    assert m["cost_per_1k_usd"] == pytest.approx(1000 * fee)
    assert m["egress_gb"] == pytest.approx(ARRIVALS * 25e-6)
    # cloud: 300 W per 1000 requests/s = 0.3 J per request; idle edge boxes with one replica: 4 + 16 x 0.3 W
    assert m["energy_cloud_j"] == pytest.approx(ARRIVALS * 0.3)
    assert m["energy_edge_j"] == pytest.approx(NODES * STEPS * (4 + 16 * 0.3))


def test_packet_loss_retransmits_or_drops():
    twin = run(tiny(faults=[{"type": "packet_loss", "rate": 0.1}]), placement=(0.0, 0.0, 1.0))
    m = twin.summary()
    # lost twice (1 %) -> dropped; lost once (9 %) -> + 200 ms RTO -> late
    assert m["drop_packet_loss"] == pytest.approx(0.01 * ARRIVALS)
    assert m["served"] == pytest.approx(0.99 * ARRIVALS)
    assert m["late"] == pytest.approx(0.09 * ARRIVALS)
    assert m["slo_violation_rate"] == pytest.approx(0.10)
    rho = 0.99 * 15 / 1000  # the region serves what was not lost
    clean = 0.030 + 0.010 + 0.001 + rho * 0.001 / (1 - rho)
    mean = (0.90 * clean + 0.09 * (clean + 0.2)) / 0.99
    assert m["mean_latency_ms"] == pytest.approx(1e3 * mean, rel=1e-9)


def test_neighbour_offload_latency():
    # Node 0 sends half its users to its only neighbour, node 1: node 0 runs at
    # rho 0.25, node 1 at 0.75 (5 own + 2.5 from node 0); node 2 at 0.5.
    placement = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    twin = run(tiny(), placement=placement)
    m = twin.summary()

    def mm1(rho):  # mean latency of a request served with s = 0.1
        return 0.1 + rho * 0.1 / (1 - rho)

    hop = 0.010 + 0.010  # intra-cluster RTT + transfer
    total = STEPS * (2.5 * mm1(0.25) + 5 * mm1(0.75) + 2.5 * (mm1(0.75) + hop) + 5 * mm1(0.5))
    assert m["mean_latency_ms"] == pytest.approx(1e3 * total / ARRIVALS, rel=1e-9)
    np.testing.assert_allclose(twin.metrics.served_edge, [25, 75, 50])


def test_admission_rejects_and_regional_fairness():
    twin = run(tiny(), admit=(1.0, 1.0, 0.5))
    m = twin.summary()
    assert m["drop_rejected"] == pytest.approx(25)
    # region a (nodes 0, 1) fulfils 1, region b (node 2) 0.5: paper 000 eq. 11 Var(R_j)
    assert m["fulfillment_rate"] == pytest.approx(125 / 150)
    assert m["fairness_variance"] == pytest.approx(np.var([1.0, 0.5]))
    assert m["jain_fairness"] == pytest.approx(1.5**2 / (2 * (1 + 0.25)))
    # node 2 runs at rho 0.25 now; violations = late + rejected over everything that left
    late = 100 * 0.5 * math.exp(-0.25) + 25 * 0.25 * math.exp(-0.05 / (0.1 / 0.75))
    assert m["slo_violation_rate"] == pytest.approx((late + 25) / 150, rel=1e-9)


def test_reward_of_one_step():
    twin = EdgeCloudTwin(tiny(), seed=0)
    result = twin.step()
    # misses 0.5 exp(-0.25) per request, energy 14.4 W / 20 W x 0.1, no cloud spend
    np.testing.assert_allclose(result.reward, -(0.5 * math.exp(-0.25) + 0.1 * 14.4 / 20), rtol=1e-12)


def test_overload_builds_a_backlog_that_times_out():
    # 15 requests/s into a 10 requests/s node: 5 more queue every step; a
    # request older than timeout_s = 5 steps is dropped.
    scenario = tiny(workload={"rate_rps": 15.0}, episode_s=40)
    twin = run(scenario)
    m = twin.summary()
    assert m["served"] == pytest.approx(10 * 40 * NODES)
    assert m["drop_timeout"] > 0
    assert m["arrived"] == pytest.approx(m["served"] + m["dropped"] + m["queued"], rel=1e-12)
    assert m["p99_ms"] > 1000  # backlog waits whole steps


def test_latency_histogram_percentiles():
    hist = LatencyHistogram()
    latencies = np.linspace(0.001, 0.1, 1000)
    hist.add(latencies, np.ones(1000))
    for q in (50, 95, 99):
        assert hist.percentile(q) == pytest.approx(np.percentile(latencies, q), rel=0.025)
    assert hist.mean() == pytest.approx(latencies.mean(), rel=1e-12)
    assert math.isnan(LatencyHistogram().percentile(50))
