"""Device profiles: what a simulated client's hardware costs in virtual time
and energy, and when it is online.

Every figure comes from ``conf/devices/*.yaml`` (with its source); this module
only turns them into numbers per client and round, deterministically per seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

AVAILABILITY_MODELS = ("always", "diurnal", "intermittent")


class ProfileError(ValueError):
    """A bad device profile or mix; the message names the value and the fix."""


@dataclass(frozen=True)
class DeviceProfile:
    """One kind of device. Bandwidths in Mbit/s, power in W, RTT in ms."""

    name: str
    peak_tflops: float
    memory_gb: float
    uplink_mbps: float
    downlink_mbps: float
    rtt_ms: float
    active_w: float
    idle_w: float
    availability: dict[str, Any]

    @classmethod
    def from_dict(cls, name: str, fields: dict[str, Any]) -> "DeviceProfile":
        profile = cls(name=name, **{k: fields[k] for k in cls.__dataclass_fields__ if k != "name"})
        profile.validate()
        return profile

    def validate(self) -> None:
        for key in ("peak_tflops", "memory_gb", "uplink_mbps", "downlink_mbps"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ProfileError(
                    f"devices.profiles.{self.name}.{key}={value} is invalid: throughput, "
                    "memory and bandwidth must be > 0"
                )
        for key in ("rtt_ms", "active_w", "idle_w"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ProfileError(f"devices.profiles.{self.name}.{key}={value} is invalid: must be >= 0")
        model = self.availability.get("model")
        if model not in AVAILABILITY_MODELS:
            raise ProfileError(
                f"devices.profiles.{self.name}.availability.model={model} is unknown: "
                f"use one of {', '.join(AVAILABILITY_MODELS)}"
            )


@dataclass(frozen=True)
class Fleet:
    """The profiles, the mix, and the knobs of the cost model."""

    profiles: dict[str, DeviceProfile]
    mix: dict[str, float]
    utilisation: float
    rtt_jitter_max: float = 1.0
    bandwidth_fluctuation: float = 0.0

    @classmethod
    def from_config(cls, devices: Any) -> "Fleet":
        """Build from the ``devices`` config node (or an equivalent dict)."""
        profiles = {name: DeviceProfile.from_dict(name, dict(fields)) for name, fields in devices["profiles"].items()}
        mix = {str(k): float(v) for k, v in devices["mix"].items()}
        for name, share in mix.items():
            if name not in profiles:
                raise ProfileError(
                    f"devices.mix names unknown profile '{name}': choose from "
                    f"{', '.join(sorted(profiles))} or add it under devices.profiles"
                )
            if share < 0:
                raise ProfileError(f"devices.mix.{name}={share} is invalid: shares must be >= 0")
        if sum(mix.values()) <= 0:
            raise ProfileError("devices.mix is empty: give at least one profile a share > 0")
        utilisation = float(devices["utilisation"])
        if not 0 < utilisation <= 1:
            raise ProfileError(f"devices.utilisation={utilisation} is invalid: use a value in (0, 1]")
        return cls(
            profiles=profiles,
            mix=mix,
            utilisation=utilisation,
            rtt_jitter_max=float(devices.get("rtt_jitter_max", 1.0)),
            bandwidth_fluctuation=float(devices.get("bandwidth_fluctuation", 0.0)),
        )

    def assign(self, num_clients: int, seed: int) -> list[str]:
        """Profile name of every client: the mix's shares by largest remainder,
        then a seeded shuffle (same seed, same devices)."""
        names = sorted(self.mix)
        shares = np.array([self.mix[n] for n in names]) / sum(self.mix.values())
        exact = shares * num_clients
        counts = np.floor(exact).astype(int)
        for index in np.argsort(-(exact - counts), kind="stable")[: num_clients - counts.sum()]:
            counts[index] += 1
        assigned = [n for n, c in zip(names, counts) for _ in range(c)]
        order = np.random.default_rng([seed, 7]).permutation(num_clients)
        return [assigned[i] for i in order]


def _rng(seed: int, client: int, server_round: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, client, server_round, purpose])


def is_online(profile: DeviceProfile, virtual_time_s: float, seed: int, client: int, server_round: int) -> bool:
    """Whether ``client`` is online at the start of ``server_round``.

    ``always``: yes. ``intermittent``: with probability ``p_online``.
    ``diurnal``: with a probability that swings between ``min`` and ``max``
    over a 24 h virtual day, peaking at ``peak_hour``.
    """
    spec = profile.availability
    model = spec["model"]
    if model == "always":
        return True
    if model == "intermittent":
        p_online = float(spec["p_online"])
    else:
        hour = (virtual_time_s / 3600.0) % 24.0
        swing = (1 + math.cos(2 * math.pi * (hour - float(spec["peak_hour"])) / 24.0)) / 2
        p_online = float(spec["min"]) + (float(spec["max"]) - float(spec["min"])) * swing
    return bool(_rng(seed, client, server_round, 1).random() < p_online)


@dataclass(frozen=True)
class RoundCost:
    """Virtual cost of one client's round: seconds and joules."""

    compute_s: float
    downlink_s: float
    uplink_s: float
    energy_j: float

    @property
    def comm_s(self) -> float:
        return self.downlink_s + self.uplink_s

    @property
    def total_s(self) -> float:
        return self.downlink_s + self.compute_s + self.uplink_s


def round_cost(
    fleet: Fleet,
    profile: DeviceProfile,
    train_flops: float,
    down_bytes: int,
    up_bytes: int,
    seed: int,
    client: int,
    server_round: int,
) -> RoundCost:
    """Compute time = training FLOPs / (peak x utilisation); each transfer =
    bytes / bandwidth (+-fluctuation) + one RTT (x jitter in [1, max]).
    Energy = active power while computing + idle power while communicating."""
    rng = _rng(seed, client, server_round, 2)
    compute_s = train_flops / (profile.peak_tflops * 1e12 * fleet.utilisation)

    def transfer(num_bytes: int, mbps: float) -> float:
        bandwidth = mbps * 1e6 * (1 + fleet.bandwidth_fluctuation * rng.uniform(-1, 1))
        rtt = profile.rtt_ms / 1000 * rng.uniform(1, fleet.rtt_jitter_max)
        return num_bytes * 8 / bandwidth + rtt

    down_s = transfer(down_bytes, profile.downlink_mbps)
    up_s = transfer(up_bytes, profile.uplink_mbps)
    energy = profile.active_w * compute_s + profile.idle_w * (down_s + up_s)
    return RoundCost(compute_s=compute_s, downlink_s=down_s, uplink_s=up_s, energy_j=energy)
