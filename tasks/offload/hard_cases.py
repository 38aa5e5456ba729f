"""The hard-case cache: the closed loop from edge inference back into training.

While serving with the global model it received, a client's edge model meets
samples it is unsure of (max softmax below θ_c): the policy's hard cases
(paper 003 §4.1: "low-confidence samples ... serving as key data for the next
training round"). The client keeps their metadata in ``context.state``
(position in its partition, confidence, edge prediction, the round they were
seen in); the images never leave the client, and the server only learns
counts. The next round the client trains on, it weights those samples' loss
up by ``boost`` (mean-normalised, so the step size stays comparable; the
batches are the same as without the cache).

Only where the config says the cloud may store them
(``task.hard_cases.cloud_store=true``, off by default) does a client also
send the raw hard cases (8-bit images and labels, as a request would carry
them) beside its model; the cloud keeps each client's latest set and
fine-tunes its model on its own data plus them (:mod:`tasks.offload.cloud`).
Their bytes count in the uplink and in the virtual uplink time.

The client's own (labelled) training partition stands in for the requests
it served: the labels are those of the partition, where paper 003 has the
cloud verify the hard cases. The server's request streams (the test split)
never enter training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from tasks.offload.policy import check, number

STATE_KEY = "offload-hard-cases"  # context.state: this client's cache


@dataclass(frozen=True)
class HardCaseSettings:
    """``task.hard_cases``: the cache and how training uses it.

    Attributes
    ----------
    enabled : bool
        false: no cache (the comparison arm).
    boost : float
        Loss weight of a cached sample relative to the others (before normalisation).
    max_fraction : float
        At most this share of the partition is cached, lowest confidence first.
    cloud_store : bool
        true: the client also uploads the raw hard cases, for the cloud to store
        and fine-tune its model on (raw data leaves the client); false: only counts.
    """

    enabled: bool
    boost: float
    max_fraction: float
    cloud_store: bool = False

    def validate(self, where: str = "task.hard_cases") -> None:
        check(isinstance(self.enabled, bool), f"{where}.enabled={self.enabled} is invalid: use true or false")
        check(number(self.boost) and self.boost >= 1,
              f"{where}.boost={self.boost} is invalid: a hard case's loss weight is >= 1 (1 = no effect), e.g. 3")
        check(number(self.max_fraction) and 0 < self.max_fraction <= 1,
              f"{where}.max_fraction={self.max_fraction} is invalid: use a share of the partition in (0, 1]")
        check(isinstance(self.cloud_store, bool), f"{where}.cloud_store={self.cloud_store} is invalid: use true or false")
        check(self.enabled or not self.cloud_store,
              f"{where}.cloud_store=true needs the cache: set {where}.enabled=true (or cloud_store=false)")


def collect(confidence: np.ndarray, theta: float, max_fraction: float) -> np.ndarray:
    """Positions of the hard cases (confidence < ``theta``), lowest confidence first,
    at most ``max_fraction`` of the samples."""
    hard = np.flatnonzero(confidence < theta)
    hard = hard[np.argsort(confidence[hard], kind="stable")]
    return hard[: int(max_fraction * len(confidence))]


def store(state: RecordDict, positions: np.ndarray, confidence: np.ndarray, predicted: np.ndarray,
          server_round: int) -> None:
    """Replace the client's cache (metadata only)."""
    state[STATE_KEY] = ConfigRecord({
        "positions": [int(p) for p in positions],
        "confidence": [float(c) for c in confidence],
        "predicted": [int(p) for p in predicted],
        "round": int(server_round),
    })


def cached(state: RecordDict, size: int) -> np.ndarray:
    """Positions in the client's cache (empty before its first round)."""
    if STATE_KEY not in state:
        return np.zeros(0, dtype=int)
    positions = np.asarray(state[STATE_KEY]["positions"], dtype=int)
    return positions[(positions >= 0) & (positions < size)]


def loss_weights(size: int, positions: np.ndarray, boost: float) -> np.ndarray:
    """1 for every sample, ``boost`` for the cached ones."""
    weights = np.ones(size)
    weights[positions] = boost
    return weights


UPLOAD = "hard-cases"  # LocalUpdate.uploads: the raw hard cases, where the cloud may store them


def as_upload(images: np.ndarray, labels: np.ndarray) -> ArrayRecord:
    """Hard cases as they would travel: 8-bit pixels and 8-bit labels."""
    pixels = np.clip(np.rint(np.asarray(images) * 255.0), 0, 255).astype(np.uint8)
    labels = np.asarray(labels)
    small = labels.size == 0 or int(labels.max()) < 256
    return ArrayRecord({"x": Array(pixels), "y": Array(labels.astype(np.uint8 if small else np.int32))})


def from_upload(record: ArrayRecord) -> tuple[np.ndarray, np.ndarray]:
    """(float32 images in [0, 1], int64 labels) of an uploaded record."""
    pixels = record["x"].numpy()
    return pixels.astype(np.float32) / 255.0, record["y"].numpy().astype(np.int64)
