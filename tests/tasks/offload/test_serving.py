"""Serving request streams: latency and energy accounting by hand, listening,
outages, packet loss, and the θ_c extremes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from edgesim.devices import DeviceProfile, Fleet
from tasks.offload.policy import PolicySettings
from tasks.offload.serving import (
    BLOCK_CODE,
    Block,
    Endpoints,
    LinkSettings,
    StreamSettings,
    build_stream,
    min_exchange_s,
    serve,
    summarise,
)

ALWAYS = {"model": "always"}
# 1 MFLOP/s edge, 10 MFLOP/s cloud, 8 Mbit/s both ways (1 byte per µs), 20 ms RTT
EDGE = DeviceProfile("edge", peak_tflops=1e-6, memory_gb=1, uplink_mbps=8, downlink_mbps=8, rtt_ms=20,
                     active_w=10, idle_w=2, availability=ALWAYS)
CLOUD = DeviceProfile("cloud", peak_tflops=1e-5, memory_gb=1, uplink_mbps=8, downlink_mbps=8, rtt_ms=1,
                      active_w=100, idle_w=10, availability=ALWAYS)
FLEET = Fleet(profiles={"edge": EDGE, "cloud": CLOUD}, mix={"edge": 1.0}, utilisation=0.5,
              rtt_jitter_max=1.0, bandwidth_fluctuation=0.0)  # no jitter, no fluctuation: times by hand
ENDPOINTS = Endpoints(sites=(EDGE,), cloud=CLOUD, fleet=FLEET, edge_flops=1000.0, cloud_flops=5000.0)
SETTINGS = StreamSettings(rate_rps=2.0, load_profile="low", load_step_s=1.0, request_bytes=1000, response_bytes=100)
LINK = LinkSettings(faults="none", probe_s=1.0, rto_ms=200.0, outage_start=0.5, outage_duration=0.25)
# by hand: edge 1000 / (1e6 x 0.5) = 2 ms; cloud 5000 / (1e7 x 0.5) = 1 ms;
# up 1000 B x 8 / 8e6 + 10 ms = 11 ms; down 100 B x 8 / 8e6 + 10 ms = 10.1 ms
EDGE_S, CLOUD_S, UP_S, DOWN_S = 2e-3, 1e-3, 11e-3, 10.1e-3
GATED = PolicySettings(mode="confidence+load", theta=0.8, cpu_max=0.8, mem_max=0.9, queue_max=16, tx_ratio_max=3.0,
                       listen_timeout_s=5.0)


def stream_of(arrivals, *, cpu=None, link: LinkSettings | None = None, endpoints: Endpoints = ENDPOINTS):
    """A stream of ``len(arrivals)`` requests (sample i at arrivals[i]) at one site, idle unless ``cpu``."""
    stream = build_stream(len(arrivals), endpoints, SETTINGS, link or LINK, seed=0, stream_id=0)
    load = np.zeros_like(stream.cpu) if cpu is None else np.broadcast_to(np.asarray(cpu, float), stream.cpu.shape)
    return replace(stream, sample=np.arange(len(arrivals)), arrival_s=np.asarray(arrivals, float),
                   cpu=load.copy(), mem=np.zeros_like(stream.mem))


def test_the_stream_times_each_leg_as_bytes_over_bandwidth_plus_half_the_rtt():
    stream = stream_of([1.0])
    assert stream.legs[0, 0] == pytest.approx([UP_S, UP_S], abs=1e-12)
    assert stream.legs[0, 1] == pytest.approx([DOWN_S, DOWN_S], abs=1e-12)
    assert min_exchange_s(EDGE, SETTINGS) == pytest.approx(UP_S + DOWN_S, abs=1e-12)


def test_latency_and_energy_of_one_offloaded_hard_case_by_hand():
    # Prepare: one request, edge confidence 0.5 < θ_c = 0.8, idle edge, clean link
    stream = stream_of([1.0])
    # Execute
    served = serve(GATED, stream, ENDPOINTS, confidence=np.array([0.5]))
    # Assert: queueing 0 + edge compute + uplink + cloud compute + downlink
    assert served.by_cloud[0] and served.sent_s[0] == pytest.approx(1.0 + EDGE_S)
    assert served.latency_s[0] == pytest.approx(EDGE_S + UP_S + CLOUD_S + DOWN_S, abs=1e-12)  # 24.1 ms
    # edge: 10 W x 2 ms computing + 2 W x 21.1 ms on the link; cloud: 100 W x 1 ms
    assert served.edge_j[0] == pytest.approx(10 * EDGE_S + 2 * (UP_S + DOWN_S), abs=1e-12)
    assert served.cloud_j[0] == pytest.approx(100 * CLOUD_S, abs=1e-12)


def test_a_confident_request_costs_only_edge_compute_and_waits_in_the_queue():
    stream = stream_of([1.0, 1.0])  # two at once: the second waits for the first
    served = serve(GATED, stream, ENDPOINTS, confidence=np.array([0.95, 0.95]))
    assert not served.by_cloud.any() and np.isnan(served.sent_s).all()
    assert served.latency_s == pytest.approx([EDGE_S, 2 * EDGE_S], abs=1e-12)
    assert served.edge_j == pytest.approx([10 * EDGE_S, 10 * EDGE_S], abs=1e-12)


def test_colocated_load_slows_edge_compute_by_the_cpu_share_it_takes():
    served = serve(replace(GATED, mode="edge"), stream_of([1.0], cpu=0.5), ENDPOINTS, confidence=np.array([0.95]))
    assert served.latency_s[0] == pytest.approx(2 * EDGE_S, abs=1e-12)


def test_an_overloaded_edge_migrates_without_edge_inference():
    served = serve(GATED, stream_of([1.0], cpu=0.95), ENDPOINTS, confidence=np.array([0.99]))
    assert served.by_cloud[0]
    assert served.latency_s[0] == pytest.approx(UP_S + CLOUD_S + DOWN_S, abs=1e-12)
    assert served.edge_j[0] == pytest.approx(2 * (UP_S + DOWN_S), abs=1e-12)  # no edge compute


# ------------------------------------------------------------ the listen state
def test_overloaded_with_the_network_down_listens_until_the_load_drops():
    # overloaded during [0, 2) s, cloud down during [0, 10) s: listen from 0.5 s,
    # heartbeats at 1 s (still overloaded) and 2 s (load released): edge inference at 2 s
    stream = stream_of([0.5])
    stream.cpu[:, :2] = 0.95  # load_step_s = 1
    stream = replace(stream, outage=(0.0, 10.0))
    served = serve(GATED, stream, ENDPOINTS, confidence=np.array([0.99]))
    assert served.listened[0] and served.listen_s[0] == pytest.approx(1.5)
    assert not served.by_cloud[0] and served.blocked[0] == 0
    assert served.latency_s[0] == pytest.approx(1.5 + EDGE_S)


def test_overloaded_with_the_network_down_listens_until_the_network_returns():
    stream = replace(stream_of([0.5], cpu=0.95), outage=(0.0, 3.0))
    served = serve(GATED, stream, ENDPOINTS, confidence=np.array([0.99]))
    assert served.listened[0] and served.listen_s[0] == pytest.approx(2.5)
    assert served.by_cloud[0] and served.sent_s[0] == pytest.approx(3.0)  # the first heartbeat after the outage
    assert served.latency_s[0] == pytest.approx(2.5 + UP_S + CLOUD_S + DOWN_S)


def test_listening_gives_up_after_its_timeout_and_counts_the_outage():
    stream = replace(stream_of([0.5], cpu=0.95), outage=(0.0, 60.0))
    served = serve(GATED, stream, ENDPOINTS, confidence=np.array([0.99]))
    assert served.listen_s[0] == pytest.approx(5.0) and not served.by_cloud[0]
    assert served.blocked[0] == BLOCK_CODE[Block.OUTAGE] and np.isnan(served.sent_s[0])
    # the listening is latency (5 s + a saturated edge: 2 ms / 5 % share)
    assert served.latency_s[0] == pytest.approx(5.0 + EDGE_S / 0.05)


# ------------------------------------------------------------ outages and packet loss
@pytest.mark.parametrize("mode", ["cloud", "confidence", "confidence+load"])
def test_a_cloud_outage_sends_nothing_upward_and_is_counted(mode):
    link = replace(LINK, faults="outage", outage_start=0.25, outage_duration=0.5)
    stream = build_stream(400, ENDPOINTS, SETTINGS, link, seed=3, stream_id=1)
    policy = replace(GATED, mode=mode, theta=1.5)  # every request is a hard case
    served = serve(policy, stream, ENDPOINTS, confidence=np.full(400, 0.6))
    start, end = stream.outage
    sent = served.sent_s[~np.isnan(served.sent_s)]
    assert len(sent) > 0 and not ((sent >= start) & (sent < end)).any()
    figures = summarise(served, stream, np.zeros(400, int), np.zeros(400, int), np.zeros(400, int),
                        np.full(400, 0.6), policy.theta, 2)
    assert figures["sent_during_outage"] == 0
    assert figures["outage_blocked"] > 0.3 * 400  # about half the stream
    assert figures["outage_blocked"] + served.by_cloud.sum() == 400  # the rest went to the cloud


def test_a_lost_leg_costs_one_retransmission_timeout():
    stream = stream_of([1.0])
    lost = np.zeros_like(stream.lost)
    lost[0, 0, 0] = True  # the first uplink attempt
    served = serve(GATED, replace(stream, lost=lost), ENDPOINTS, confidence=np.array([0.5]))
    assert served.by_cloud[0] and served.retransmissions[0] == 1
    assert served.latency_s[0] == pytest.approx(EDGE_S + 0.2 + UP_S + CLOUD_S + DOWN_S, abs=1e-12)


def test_a_leg_lost_twice_falls_back_to_the_edge_answer():
    stream = stream_of([1.0])
    lost = np.zeros_like(stream.lost)
    lost[0, 0, :] = True  # both uplink attempts
    served = serve(GATED, replace(stream, lost=lost), ENDPOINTS, confidence=np.array([0.5]))
    assert served.failed[0] and not served.by_cloud[0]
    assert served.latency_s[0] == pytest.approx(EDGE_S + 0.4, abs=1e-12)
    assert served.edge_j[0] == pytest.approx(10 * EDGE_S + 2 * 0.4, abs=1e-12) and served.cloud_j[0] == 0


def test_packet_loss_fails_heartbeats_and_the_network_trigger_keeps_hard_cases_at_the_edge():
    stream = build_stream(400, ENDPOINTS, SETTINGS, replace(LINK, faults="loss20"), seed=0, stream_id=2)
    assert (stream.probe_ratio > GATED.tx_ratio_max).mean() == pytest.approx(0.36, abs=0.12)  # 1 - 0.8^2
    policy = replace(GATED, theta=1.5)
    served = serve(policy, stream, ENDPOINTS, confidence=np.full(400, 0.6))
    slow = (served.blocked == BLOCK_CODE[Block.SLOW_LINK]).sum()
    assert 0.1 * 400 < slow < 0.6 * 400 and served.by_cloud.sum() > 0.3 * 400
    assert served.retransmissions.sum() > 0


# ------------------------------------------------------------ θ_c extremes on a real fleet
def _mixed_fleet_endpoints() -> Endpoints:
    from fl_server.experiments.config import compose_config

    fleet = Fleet.from_config(compose_config([]).devices)
    sites = tuple(fleet.profiles[d] for d in fleet.assign(5, seed=0))
    return Endpoints(sites=sites, cloud=fleet.profiles["cloud-gpu"], fleet=fleet, edge_flops=2.3e6, cloud_flops=8e6)


@pytest.mark.parametrize(("theta", "fraction"), [(0.0, 0.0), (1.01, 1.0)])
def test_theta_zero_offloads_nothing_and_theta_above_one_everything(theta, fraction):
    endpoints = _mixed_fleet_endpoints()
    stream = build_stream(300, endpoints, replace(SETTINGS, load_profile="high"), LINK, seed=0, stream_id=0)
    confidence = np.random.default_rng(0).uniform(0.1, 1.0, 300)
    confidence[:5] = 1.0  # saturated softmax
    policy = replace(GATED, mode="confidence", theta=theta)
    served = serve(policy, stream, endpoints, confidence)
    assert served.by_cloud.mean() == fraction


def test_summary_splits_edge_and_cloud_accuracy_by_offloaded_and_kept_requests():
    stream = stream_of([0.1, 0.2, 0.3, 0.4])
    confidence = np.array([0.9, 0.9, 0.5, 0.5])
    served = serve(replace(GATED, mode="confidence"), stream, ENDPOINTS, confidence)
    y, edge, cloud = np.array([0, 1, 2, 3]), np.array([0, 1, 0, 0]), np.array([0, 1, 2, 0])
    figures = summarise(served, stream, y, edge, cloud, confidence, 0.8, 4)
    assert figures["fraction"] == 0.5 and figures["hard_cases"] == 2
    assert figures["edge_acc_kept"] == 1.0 and figures["edge_acc_offloaded"] == 0.0
    assert figures["cloud_acc_offloaded"] == 0.5 and figures["cloud_acc_kept"] == 1.0
    assert figures["accuracy"] == 0.75  # the edge's two right answers, the cloud's one


def test_colocated_load_stretches_latency_but_not_the_inference_energy():
    served = serve(replace(GATED, mode="edge"), stream_of([1.0], cpu=0.75), ENDPOINTS, confidence=np.array([0.95]))
    assert served.latency_s[0] == pytest.approx(4 * EDGE_S, abs=1e-12)
    assert served.edge_j[0] == pytest.approx(10 * EDGE_S, abs=1e-12)
