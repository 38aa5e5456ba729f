"""Deterministic fault injection in the ClientApp, for tests and robustness
studies (``faults.*`` in ``conf/config.yaml``; off by default).

Per round, a seeded permutation of the partitions is cut into consecutive,
disjoint slices, one per fault kind, each ``round(fraction × num_partitions)``
long (halves round up). Every client computes the same permutation from
``(seed, round, attempt)``, so it knows whether it is in a slice without any
coordination, and a seed reproduces the same faults. A retried round
(``round-attempt`` > 1) draws anew, like a transient fault would.

Kinds:

``error``    training raises (Flower returns an error reply);
``timeout``  the reply is held back ``hang_s`` seconds (a shorter
             ``simulation.round_timeout_s`` makes the server give up on it);
``nan`` / ``inf``  the first floating-point array is all NaN / +Inf;
``shape``    the first array with a first axis loses its last row;
``scale``    poisoned but well-formed: global + ``scale_factor`` × update, the
             model-poisoning case only robust aggregators can resist.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fl_common import protocol

FAULT_KINDS = ("error", "timeout", "nan", "inf", "shape", "scale")
CONFIG_KEY = "faults"  # the ConfigRecord entry that carries the plan (JSON)
_STREAM = 0xFA17  # keeps this generator's stream apart from training's


class InjectedFault(RuntimeError):
    """The failure a client was told to have."""


@dataclass(frozen=True)
class FaultPlan:
    """Fractions per kind (a number, or a list with one value per round; the
    last value holds for later rounds), plus the kinds' parameters."""

    fractions: dict[str, float | list[float]] = field(default_factory=dict)
    seed: int = 0
    hang_s: float = 30.0
    scale_factor: float = -5.0

    @classmethod
    def from_config(cls, faults: Mapping[str, Any], seed: int) -> "FaultPlan":
        """From the ``faults`` node of the composed config."""
        fractions = {k: _plain(v) for k, v in dict(faults["fraction"]).items()}
        return cls(fractions, seed, float(faults["hang_s"]), float(faults["scale_factor"]))

    @property
    def active(self) -> bool:
        return any(max(_as_list(v)) > 0 for v in self.fractions.values())

    def to_json(self) -> str:
        return json.dumps(
            {"fractions": self.fractions, "seed": self.seed, "hang_s": self.hang_s,
             "scale_factor": self.scale_factor},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> "FaultPlan":
        return cls(**json.loads(text))

    def fraction(self, kind: str, server_round: int) -> float:
        values = _as_list(self.fractions.get(kind, 0.0))
        return float(values[min(server_round, len(values)) - 1])

    def faulty(self, kind: str, server_round: int, num_partitions: int, attempt: int = 1) -> list[int]:
        """The partitions that have fault ``kind`` in this round and attempt."""
        order = np.random.default_rng([self.seed, server_round, attempt, _STREAM]).permutation(num_partitions)
        start = 0
        for k in FAULT_KINDS:
            count = math.floor(self.fraction(k, server_round) * num_partitions + 0.5)
            if k == kind:
                return sorted(int(p) for p in order[start : start + count])
            start += count
        raise ValueError(f"unknown fault kind '{kind}': choose one of {', '.join(FAULT_KINDS)}")

    def fault_for(self, partition_id: int, server_round: int, num_partitions: int, attempt: int = 1) -> str | None:
        """This partition's fault in this round and attempt, or None."""
        for kind in FAULT_KINDS:
            if partition_id in self.faulty(kind, server_round, num_partitions, attempt):
                return kind
        return None


def _plain(value: Any) -> float | list[float]:
    if isinstance(value, (int, float)):
        return float(value)
    return [float(v) for v in value]  # a ListConfig or list


def _as_list(value: float | list[float]) -> list[float]:
    return [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]


def planned_fault(config: ConfigRecord, partition_id: int, num_partitions: int) -> str | None:
    """The fault the server's plan (if any) gives this client in this message's round."""
    if CONFIG_KEY not in config:
        return None
    plan = FaultPlan.from_json(str(config[CONFIG_KEY]))
    attempt = int(config.get(protocol.ROUND_ATTEMPT, 1))
    return plan.fault_for(partition_id, int(config[protocol.SERVER_ROUND]), num_partitions, attempt)


def before_training(fault: str | None, config: ConfigRecord) -> None:
    """Raise for ``error``; nothing else happens before training."""
    if fault == "error":
        raise InjectedFault(f"injected fault 'error' in round {int(config['server-round'])}")


def corrupt(fault: str | None, config: ConfigRecord, trained: ArrayRecord, received: ArrayRecord) -> ArrayRecord:
    """The arrays to reply with: ``trained`` unless the fault corrupts them
    (``timeout`` only delays them)."""
    if fault is None or fault == "error":
        return trained
    if fault == "timeout":
        time.sleep(FaultPlan.from_json(str(config[CONFIG_KEY])).hang_s)
        return trained
    arrays = {k: v.numpy().copy() for k, v in trained.items()}
    if fault in ("nan", "inf"):
        key = next(k for k, a in arrays.items() if np.issubdtype(a.dtype, np.floating))
        arrays[key][...] = np.nan if fault == "nan" else np.inf
    elif fault == "shape":
        key = next(k for k, a in arrays.items() if a.ndim >= 1 and a.shape[0] > 1)
        arrays[key] = arrays[key][:-1]
    elif fault == "scale":
        factor = FaultPlan.from_json(str(config[CONFIG_KEY])).scale_factor
        for key, value in arrays.items():
            if np.issubdtype(value.dtype, np.floating):
                start = received[key].numpy()
                arrays[key] = (start + factor * (value - start)).astype(value.dtype)
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})
