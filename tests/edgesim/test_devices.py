"""Device profiles and the virtual clock, on hand-built numbers."""

from __future__ import annotations

import pytest

from edgesim.devices import DeviceProfile, Fleet, ProfileError, is_online, round_cost
from fl_common.costs import check_memory
from fl_server.engine.virtual_clock import VirtualClock
from fl_server.experiments.config import ConfigError, compose_config
from tasks.image.models import model_costs
from tests.fake_grid import arrays, train_reply


def profile(name="dev", **changes) -> dict:
    base = dict(peak_tflops=1.0, memory_gb=4, uplink_mbps=8, downlink_mbps=16, rtt_ms=100,
                active_w=10, idle_w=1, availability={"model": "always"})
    base.update(changes)
    return base


def fleet(**profiles) -> Fleet:
    return Fleet.from_config({"profiles": profiles, "mix": {n: 1.0 for n in profiles}, "utilisation": 0.5})


def test_round_cost_hand_computed_without_jitter():
    # compute: 1e12 FLOPs / (1 TFLOP/s * 0.5) = 2 s
    # downlink: 2e6 B * 8 / 16e6 bit/s + 0.1 s = 1.1 s; uplink: 1e6 * 8 / 8e6 + 0.1 = 1.1 s
    # energy: 10 W * 2 s + 1 W * 2.2 s = 22.2 J
    f = fleet(dev=profile())
    cost = round_cost(f, f.profiles["dev"], 1e12, down_bytes=2_000_000, up_bytes=1_000_000, seed=0, client=0, server_round=1)
    assert cost.compute_s == pytest.approx(2.0)
    assert cost.downlink_s == pytest.approx(1.1)
    assert cost.uplink_s == pytest.approx(1.1)
    assert cost.energy_j == pytest.approx(22.2)
    assert cost.total_s == pytest.approx(4.2)


def test_mix_assignment_follows_shares_and_seed():
    f = Fleet.from_config({"profiles": {"a": profile(), "b": profile(), "c": profile()},
                           "mix": {"a": 0.5, "b": 0.3, "c": 0.2}, "utilisation": 1.0})
    devices = f.assign(10, seed=0)
    assert sorted(devices) == ["a"] * 5 + ["b"] * 3 + ["c"] * 2
    assert devices == f.assign(10, seed=0)
    assert devices != f.assign(10, seed=1)


def test_availability_models():
    always = DeviceProfile.from_dict("x", profile())
    never = DeviceProfile.from_dict("y", profile(availability={"model": "intermittent", "p_online": 0.0}))
    half = DeviceProfile.from_dict("z", profile(availability={"model": "intermittent", "p_online": 0.5}))
    assert all(is_online(always, 0, 0, c, 1) for c in range(20))
    assert not any(is_online(never, 0, 0, c, 1) for c in range(20))
    draws = [is_online(half, 0, 0, c, r) for c in range(20) for r in range(20)]
    assert 0.4 < sum(draws) / len(draws) < 0.6
    assert draws == [is_online(half, 0, 0, c, r) for c in range(20) for r in range(20)]  # seeded
    day = DeviceProfile.from_dict("d", profile(availability={"model": "diurnal", "min": 0.0, "max": 1.0, "peak_hour": 3}))
    assert all(is_online(day, 3 * 3600, 0, c, 1) for c in range(20))  # at the peak: p = 1
    assert not any(is_online(day, 15 * 3600, 0, c, 1) for c in range(20))  # 12 h later: p = 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(peak_tflops=0), "peak_tflops=0 is invalid"),
        (dict(uplink_mbps=-5), "uplink_mbps=-5 is invalid"),
        (dict(downlink_mbps=0), "downlink_mbps=0 is invalid"),
        (dict(availability={"model": "sometimes"}), "availability.model=sometimes is unknown"),
    ],
)
def test_bad_profiles_are_refused(changes, message):
    with pytest.raises(ProfileError, match=message):
        fleet(dev=profile(**changes))


def test_unknown_profile_in_the_mix_is_refused():
    with pytest.raises(ProfileError, match="devices.mix names unknown profile 'jetson-nono'"):
        compose_config(["+devices.mix.jetson-nono=0.1"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["devices.deadline_s=0"], "devices.deadline_s=0 is invalid"),
        (["devices.deadline_s=-3"], "devices.deadline_s=-3 is invalid"),
        (["devices.profiles.jetson-nano.uplink_mbps=0"], "jetson-nano.uplink_mbps=0 is invalid"),
        (["devices.profiles.cloud-gpu.peak_tflops=-1"], "cloud-gpu.peak_tflops=-1 is invalid"),
    ],
)
def test_bad_device_config_is_one_clear_error(overrides, message):
    with pytest.raises((ConfigError, ProfileError), match=message):
        compose_config(overrides)


def test_a_device_too_small_for_model_and_batch_is_refused():
    tiny = fleet(dev=profile(memory_gb=0.001))
    with pytest.raises(ProfileError, match="profile 'dev' has 0.001 GB but training 'cnn' with batch 512"):
        check_memory(tiny, "cnn", 512, model_costs("cnn", 10))
    check_memory(fleet(dev=profile()), "cnn", 512, model_costs("cnn", 10))  # 4 GB is plenty


def test_hook_flop_count_matches_torchs_flop_counter():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tasks.image.models import build_model, model_costs

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        build_model("cnn", 10)(torch.zeros(1, 1, 28, 28))
    flops, params, _ = model_costs("cnn", 10)
    assert flops == counter.get_total_flops()
    assert params == 96_938


def _reply(node: int, duration: float):
    message = train_reply(arrays([float(node)]), 10, node_id=node)
    return message, duration


def test_synchronous_round_waits_for_the_last_arrival_in_order():
    clock = VirtualClock()
    close = clock.close_round(1, [_reply(1, 3.0), _reply(2, 1.0), _reply(3, 2.0)])
    assert [a.node_id for a in close.applied] == [2, 3, 1]  # arrival order
    assert (close.start_s, close.end_s, close.staleness, close.held_back) == (0.0, 3.0, [0, 0, 0], 0)
    assert clock.now_s == 3.0


def test_deadline_holds_late_updates_and_applies_them_once_as_stale():
    clock = VirtualClock(deadline_s=2.0)
    # round 1 at t=0: node 1 arrives at 1.0, node 2 at 5.0 (late)
    first = clock.close_round(1, [_reply(1, 1.0), _reply(2, 5.0)])
    assert [a.node_id for a in first.applied] == [1] and first.held_back == 1
    assert first.end_s == 2.0 and clock.is_busy(2) and not clock.is_busy(1)
    # round 2 at t=2: node 1 again, arrives 3.0; node 2 still travelling (arrives 5.0 > 4.0)
    second = clock.close_round(2, [_reply(1, 1.0)])
    assert [a.node_id for a in second.applied] == [1] and second.end_s == 4.0
    # round 3 at t=4: node 1 arrives 4.5; node 2's round-1 update arrives 5.0 <= 6.0: tau = 2
    third = clock.close_round(3, [_reply(1, 0.5)])
    assert [(a.node_id, tau) for a, tau in zip(third.applied, third.staleness)] == [(1, 0), (2, 2)]
    assert not clock.pending and not clock.is_busy(2)
    # round 4: nothing pending, nothing applied twice
    fourth = clock.close_round(4, [_reply(1, 0.5)])
    assert [a.node_id for a in fourth.applied] == [1]
    applied_ids = [id(a.reply) for c in (first, second, third, fourth) for a in c.applied]
    assert len(applied_ids) == len(set(applied_ids))


def test_idle_round_jumps_to_the_next_arrival():
    clock = VirtualClock(deadline_s=1.0)
    clock.close_round(1, [_reply(7, 10.0)])
    idle = clock.idle_round(2)
    assert idle.end_s == 10.0 and [(a.node_id, tau) for a, tau in zip(idle.applied, idle.staleness)] == [(7, 1)]


def test_bad_deadline_is_refused():
    with pytest.raises(ValueError, match="deadline_s=0 must be > 0"):
        VirtualClock(deadline_s=0)
