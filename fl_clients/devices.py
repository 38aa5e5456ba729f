"""Device profiles: what a simulated client's hardware costs in virtual time
and energy, and when it is online.

Every figure comes from ``conf/devices/*.yaml`` (with its source); this module
only turns them into numbers per client and round, deterministically per seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
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


@lru_cache(maxsize=8)
def model_costs(model_name: str, num_classes: int, in_channels: int = 1, side: int = 28) -> tuple[float, int, int]:
    """(forward FLOPs per sample, parameter count, activation floats per sample)
    of an image classifier; see :func:`module_costs`."""
    import torch

    from fl_clients.models import build_model

    return module_costs(build_model(model_name, num_classes, in_channels), torch.zeros(1, in_channels, side, side))


@lru_cache(maxsize=8)
def forecaster_costs(
    name: str, in_channels: int, window: int, horizon: int, level_centred: bool
) -> tuple[float, int, int]:
    """(forward FLOPs per window, parameter count, activation floats per window)
    of a workload forecaster; see :func:`module_costs`."""
    import torch

    from fl_clients.forecasters import build_forecaster

    model = build_forecaster(name, in_channels, horizon, level_steps=window if level_centred else None)
    return module_costs(model, torch.zeros(1, window, in_channels))


def module_costs(model: Any, example: Any) -> tuple[float, int, int]:
    """(forward FLOPs per sample, parameter count, activation floats per sample).

    FLOPs are counted with forward hooks on the layers that carry them
    (2 x multiply-accumulates of every Conv1d/Conv2d, Linear and LSTM), which
    is what torch's FlopCounterMode reports for the CNN (a test checks it).
    FlopCounterMode itself costs ~1.5 s on first use, paid by every Ray
    worker; the hooks cost milliseconds.
    """
    import torch
    from torch import nn

    flops, activations = 0.0, 0

    def count(module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal flops, activations
        out = output[0] if isinstance(output, tuple) else output
        activations += out[0].numel()
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            kernel = module.in_channels // module.groups * int(np.prod(module.kernel_size))
            flops += 2.0 * kernel * out[0].numel()
        elif isinstance(module, nn.Linear):
            flops += 2.0 * module.in_features * module.out_features * (out[0].numel() // module.out_features)
        elif isinstance(module, nn.LSTM):
            steps = out.shape[1] if module.batch_first else out.shape[0]
            for layer in range(module.num_layers):
                inputs = module.input_size if layer == 0 else module.hidden_size
                # 4 gates, each a matrix-vector product on [x_t, h_{t-1}]
                flops += 2.0 * 4 * (inputs + module.hidden_size) * module.hidden_size * steps

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children()) or isinstance(m, nn.LSTM)]
    with torch.no_grad():
        model(example)
    for hook in hooks:
        hook.remove()
    return flops, sum(p.numel() for p in model.parameters()), activations


def training_memory_bytes(params: int, activations_per_sample: int, batch_size: int) -> int:
    """Weights, gradients and SGD momentum (3 x params) plus forward activations
    kept for the backward pass, float32."""
    return 4 * (3 * params + 2 * activations_per_sample * batch_size)


def check_memory(
    fleet: Fleet, model_name: str, num_classes: int, batch_size: int,
    costs: tuple[float, int, int] | None = None,
) -> None:
    """Refuse a fleet whose devices cannot hold the model and a batch
    (``costs`` from :func:`forecaster_costs` for a forecaster)."""
    _, params, activations = costs or model_costs(model_name, num_classes)
    need = training_memory_bytes(params, activations, batch_size)
    for name in fleet.mix:
        have = fleet.profiles[name].memory_gb * 1e9
        if need > have and fleet.mix[name] > 0:
            raise ProfileError(
                f"profile '{name}' has {fleet.profiles[name].memory_gb} GB but training "
                f"'{model_name}' with batch {batch_size} needs {need / 1e9:.3f} GB: lower "
                "train.batch_size or drop the profile from devices.mix"
            )
