"""The offloading policy on hand-made confidences, loads and link states."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from tasks.offload.policy import Block, PolicySettings, Route, after_edge, network_block, on_arrival, overloaded

GATED = PolicySettings(mode="confidence+load", theta=0.8, cpu_max=0.8, mem_max=0.9, queue_max=16, tx_ratio_max=3.0,
                       listen_timeout_s=5.0)
VALUES = {f: getattr(GATED, f) for f in ("mode", "theta", "cpu_max", "mem_max", "queue_max", "tx_ratio_max",
                                         "listen_timeout_s")}
IDLE = {"cpu": 0.3, "mem": 0.4, "queue": 0}


# ------------------------------------------------------------ trigger 1: network
@pytest.mark.parametrize(("reachable", "tx_s", "expected"), [
    (True, 0.03, Block.NONE),        # at the minimum
    (True, 0.09, Block.NONE),        # 3x the minimum: still available
    (True, 0.0901, Block.SLOW_LINK),  # just over 3x
    (False, 0.03, Block.OUTAGE),     # unreachable, however fast the last heartbeat was
])
def test_network_trigger_compares_the_measured_with_the_minimum_transmission_time(reachable, tx_s, expected):
    assert network_block(GATED, reachable, tx_s, min_tx_s=0.03) is expected


# ------------------------------------------------------------ trigger 2: edge load
@pytest.mark.parametrize(("cpu", "mem", "queue", "expected"), [
    (0.3, 0.4, 0, False), (0.8, 0.9, 15, False),  # at the thresholds: not over them
    (0.81, 0.4, 0, True), (0.3, 0.91, 0, True), (0.3, 0.4, 16, True),
])
def test_load_trigger_fires_on_cpu_memory_or_queue(cpu, mem, queue, expected):
    assert overloaded(GATED, cpu, mem, queue) is expected


def test_an_overloaded_edge_migrates_when_the_network_is_available():
    assert on_arrival(GATED, cpu=0.95, mem=0.4, queue=0, network=Block.NONE) == (Route.CLOUD, Block.NONE)


@pytest.mark.parametrize("network", [Block.OUTAGE, Block.SLOW_LINK])
def test_an_overloaded_edge_listens_when_the_network_is_unavailable(network):
    assert on_arrival(GATED, cpu=0.95, mem=0.4, queue=0, network=network) == (Route.LISTEN, network)


def test_a_lightly_loaded_edge_infers_locally_whatever_the_network():
    for network in Block:
        assert on_arrival(GATED, **IDLE, network=network) == (Route.EDGE, Block.NONE)


# ------------------------------------------------------------ trigger 3: confidence
def test_a_low_confidence_prediction_is_a_hard_case_sent_to_the_cloud():
    assert after_edge(GATED, confidence=0.55, network=Block.NONE) == (True, Block.NONE)
    assert after_edge(GATED, confidence=0.95, network=Block.NONE) == (False, Block.NONE)
    assert after_edge(GATED, confidence=0.8, network=Block.NONE) == (False, Block.NONE)  # strict: at θ_c it stays


@pytest.mark.parametrize("network", [Block.OUTAGE, Block.SLOW_LINK])
def test_a_hard_case_stays_at_the_edge_when_the_network_is_unavailable_and_says_why(network):
    assert after_edge(GATED, confidence=0.55, network=network) == (False, network)


def test_theta_zero_offloads_nothing_and_theta_above_one_everything():
    never, always = replace(GATED, mode="confidence", theta=0.0), replace(GATED, mode="confidence", theta=1.0001)
    for confidence in (0.0, 0.1, 0.5, 0.999, 1.0):
        assert after_edge(never, confidence, Block.NONE) == (False, Block.NONE)
        assert after_edge(always, confidence, Block.NONE) == (True, Block.NONE)


# ------------------------------------------------------------ the policies
def test_confidence_only_ignores_the_edge_load():
    policy = replace(GATED, mode="confidence")
    assert on_arrival(policy, cpu=1.0, mem=1.0, queue=999, network=Block.NONE) == (Route.EDGE, Block.NONE)
    assert after_edge(policy, 0.1, Block.NONE) == (True, Block.NONE)


def test_edge_only_never_offloads():
    policy = replace(GATED, mode="edge", theta=2.0)
    assert on_arrival(policy, cpu=1.0, mem=1.0, queue=999, network=Block.NONE) == (Route.EDGE, Block.NONE)
    assert after_edge(policy, 0.0, Block.NONE) == (False, Block.NONE)


def test_cloud_only_offloads_blindly_but_never_into_an_outage():
    policy = replace(GATED, mode="cloud")
    assert on_arrival(policy, **IDLE, network=Block.NONE) == (Route.CLOUD, Block.NONE)
    assert on_arrival(policy, **IDLE, network=Block.SLOW_LINK) == (Route.CLOUD, Block.NONE)
    assert on_arrival(policy, **IDLE, network=Block.OUTAGE) == (Route.EDGE, Block.OUTAGE)


# ------------------------------------------------------------ bad settings: one clear error
@pytest.mark.parametrize(("values", "message"), [
    ({"theta": -0.1}, r"^task\.policy\.theta=-0\.1 is invalid: the confidence threshold θ_c must be a number >= 0"),
    ({"theta": math.nan}, r"^task\.policy\.theta=nan is invalid"),
    ({"theta": "high"}, r"^task\.policy\.theta=high is invalid"),
    ({"theta": True}, r"^task\.policy\.theta=True is invalid"),
    ({"cpu_max": 0}, r"^task\.policy\.cpu_max=0 is invalid: a utilisation threshold lies in \(0, 1\]"),
    ({"mem_max": 1.5}, r"^task\.policy\.mem_max=1\.5 is invalid"),
    ({"queue_max": 0}, r"^task\.policy\.queue_max=0 is invalid: use a whole number of waiting requests >= 1"),
    ({"tx_ratio_max": 0.5}, r"^task\.policy\.tx_ratio_max=0\.5 is invalid: .* use a ratio >= 1"),
    ({"listen_timeout_s": -1}, r"^task\.policy\.listen_timeout_s=-1 is invalid"),
    ({"mode": "sedna"}, r"^task\.policy\.mode=sedna is unknown: choose one of edge, cloud, confidence, confidence\+load$"),
    ({"thet": 0.5}, r"^task\.policy\.thet is unknown: valid keys are mode, theta"),
])
def test_bad_thresholds_are_one_clear_error(values, message):
    with pytest.raises(ValueError, match=message) as caught:
        PolicySettings.from_config({**VALUES, **values})
    assert "\n" not in str(caught.value)


def test_a_missing_key_is_one_clear_error_not_a_python_default():
    values = dict(VALUES)
    del values["queue_max"]
    with pytest.raises(ValueError, match=r"^task\.policy\.queue_max is missing: set it"):
        PolicySettings.from_config(values)
