"""The offloading policy: three triggers on plain numbers (paper 003 §4.1).

Per request, at arrival (paper 003: "network judgment, then resource
constraints"):

1. **network**: the cloud is reachable and the measured transmission time of
   a unit task is at most ``tx_ratio_max`` x the minimum achievable one
   (payload / bandwidth + RTT of the device profile);
2. **edge load**: CPU or memory utilisation above its threshold, or
   ``queue_max`` requests already waiting at the edge. Overloaded and the
   network available: migrate to the cloud without edge inference;
   overloaded and the network unavailable: **listen** until either the load
   drops (infer at the edge) or the network comes back (migrate);

and after edge inference:

3. **confidence**: the maximum softmax probability below ``theta`` makes the
   request a hard case, sent to the cloud model for secondary recognition if
   the network is available (else the edge answer stands, and the block is
   counted).

Policies (``mode``): ``edge`` (never offload), ``cloud`` (every request
straight to the cloud while it is reachable), ``confidence`` (trigger 3 with
the network check) and ``confidence+load`` (all three). Thresholds are strict:
``theta = 0`` offloads nothing, ``theta > 1`` everything (a probability never
exceeds 1); a load threshold of 1 never fires on utilisation (which never
exceeds 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

MODES = ("edge", "cloud", "confidence", "confidence+load")


class Route(Enum):
    """Where a request goes next."""

    EDGE = "edge"
    CLOUD = "cloud"
    LISTEN = "listen"


class Block(Enum):
    """Why a request that the policy would offload stays at the edge."""

    NONE = "none"
    OUTAGE = "outage"  # the cloud is unreachable: nothing is sent upward
    SLOW_LINK = "slow-link"  # reachable, but the transmission-time check fails


@dataclass(frozen=True)
class PolicySettings:
    """The triggers' thresholds (``task.policy`` in ``conf/task/offload.yaml``).

    Attributes
    ----------
    mode : str
        One of :data:`MODES`.
    theta : float
        Confidence threshold θ_c on the maximum softmax probability.
    cpu_max, mem_max : float
        Edge CPU / memory utilisation (fractions) above which the edge is overloaded.
    queue_max : int
        Requests waiting at the edge at which it is overloaded.
    tx_ratio_max : float
        The largest measured / minimum transmission-time ratio that counts as
        the network being available.
    listen_timeout_s : float
        The longest a request listens; then it is inferred at the edge anyway.
    """

    mode: str
    theta: float
    cpu_max: float
    mem_max: float
    queue_max: int
    tx_ratio_max: float
    listen_timeout_s: float

    @classmethod
    def from_config(cls, node: Any, where: str = "task.policy") -> "PolicySettings":
        return settings_from(cls, node, where)

    def validate(self, where: str = "task.policy") -> None:
        """Raise ``ValueError`` naming the first bad value and its fix."""
        check(self.mode in MODES, f"{where}.mode={self.mode} is unknown: choose one of {', '.join(MODES)}")
        check(number(self.theta) and self.theta >= 0,
              f"{where}.theta={self.theta} is invalid: the confidence threshold θ_c must be a number >= 0 "
              "(max softmax lies in [1/classes, 1]: 0 never offloads, > 1 offloads every request), e.g. 0.8")
        for key in ("cpu_max", "mem_max"):
            value = getattr(self, key)
            check(number(value) and 0 < value <= 1,
                  f"{where}.{key}={value} is invalid: a utilisation threshold lies in (0, 1] (1 = never on load), e.g. 0.8")
        check(isinstance(self.queue_max, int) and not isinstance(self.queue_max, bool) and self.queue_max >= 1,
              f"{where}.queue_max={self.queue_max} is invalid: use a whole number of waiting requests >= 1")
        check(number(self.tx_ratio_max) and self.tx_ratio_max >= 1,
              f"{where}.tx_ratio_max={self.tx_ratio_max} is invalid: the measured transmission time is never below "
              "the minimum, so use a ratio >= 1 (e.g. 3)")
        check(number(self.listen_timeout_s) and self.listen_timeout_s >= 0,
              f"{where}.listen_timeout_s={self.listen_timeout_s} is invalid: use seconds >= 0")

    @property
    def uses_confidence(self) -> bool:
        return self.mode in ("confidence", "confidence+load")

    @property
    def uses_load(self) -> bool:
        return self.mode == "confidence+load"


def settings_from(cls: type, node: Any, where: str) -> Any:
    """A settings dataclass from a config node or dict (the YAML is the only
    source of the values: no defaults here); unknown, missing and bad values
    raise ``ValueError`` naming ``where.<key>`` (its ``validate``)."""
    values = dict(node)
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]} is unknown: valid keys are {', '.join(names)}")
    missing = [n for n in names if n not in values]
    if missing:
        raise ValueError(f"{where}.{missing[0]} is missing: set it (conf/task/offload.yaml has every key)")
    settings = cls(**values)
    settings.validate(where)
    return settings


def number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def overloaded(settings: PolicySettings, cpu: float, mem: float, queue: int) -> bool:
    """Trigger 2: the edge's CPU or memory utilisation or its queue is above its limit."""
    return cpu > settings.cpu_max or mem > settings.mem_max or queue >= settings.queue_max


def network_block(settings: PolicySettings, reachable: bool, tx_s: float, min_tx_s: float) -> Block:
    """Trigger 1: :attr:`Block.NONE` when the network may carry the request."""
    if not reachable:
        return Block.OUTAGE
    if tx_s > settings.tx_ratio_max * min_tx_s:
        return Block.SLOW_LINK
    return Block.NONE


def on_arrival(settings: PolicySettings, *, cpu: float, mem: float, queue: int, network: Block) -> tuple[Route, Block]:
    """``(route, block)`` of a newly arrived (or still listening) request: network, then load.

    ``block`` is why the network kept a request from the cloud that the
    policy sends there (``cloud`` mode in an outage: answered at the edge;
    an overloaded edge: listening); :attr:`Block.NONE` otherwise.
    """
    if settings.mode == "edge":
        return Route.EDGE, Block.NONE
    if settings.mode == "cloud":  # blind offload, but never into an outage
        return (Route.EDGE, Block.OUTAGE) if network is Block.OUTAGE else (Route.CLOUD, Block.NONE)
    if settings.uses_load and overloaded(settings, cpu, mem, queue):
        return (Route.CLOUD, Block.NONE) if network is Block.NONE else (Route.LISTEN, network)
    return Route.EDGE, Block.NONE


def after_edge(settings: PolicySettings, confidence: float, network: Block) -> tuple[bool, Block]:
    """Trigger 3: ``(offload, block)`` for an edge prediction of max softmax ``confidence``.

    ``block`` says why a hard case stays at the edge (:attr:`Block.NONE`
    when it is offloaded or is no hard case).
    """
    if not settings.uses_confidence or not confidence < settings.theta:
        return False, Block.NONE
    return network is Block.NONE, network
