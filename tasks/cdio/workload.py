"""Task streams of the edge sites: digits with their spatial complexity, an
accuracy and a delay requirement, and the resource-preference labels.

A task (paper 004: a video inference task) is a clip of ``frames`` MNIST 5k
digits of one scene; its spatial complexity (eq. 2) is that of its key
digit. Requirements are drawn per task (paper 004 §4.2.1 draws the accuracy
requirement from [50, 80] mAP and the delay requirement from [0.2, 0.6] s,
ranges that span its edge and cloud models; ours span our models' measured
accuracies and our twin's nominal delays: ``conf/task/cdio.yaml``). Sites
are non-IID: site ``k`` draws its delay requirement from the tight half of
the range with probability ``tight_share[k]`` (more delay-critical cameras).

Labels (multi-label, paper 004 §3.2's "resource preference"):
``delay_sensitive`` = the cloud misses the delay requirement at nominal
bandwidth (the task needs bandwidth / the edge); ``accuracy_sensitive`` =
the home edge's model misses the accuracy requirement (it needs computing /
the cloud). Both set: no server placement meets both at nominal costs
except, possibly, another edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from edgesim.inference import InferenceTwin, Requests
from tasks.cdio.versions import Measured

FEATURES = ("time", "complexity", "accuracy_req", "delay_req")  # eq. 3's I_t, C_t, A_t, D_t
LABELS = ("delay_sensitive", "accuracy_sensitive")


@dataclass(frozen=True)
class StreamSettings:
    frames: int                      # digits per task (clip)
    accuracy_req: tuple[float, float]
    delay_req_ms: tuple[float, float]
    tight_share: tuple[float, float]  # site 0 .. last site: share of tasks in the tight delay half (linear)


@dataclass
class Stream:
    """One site's tasks in arrival order."""

    site: int
    complexity: np.ndarray
    complexity_bin: np.ndarray
    accuracy_req: np.ndarray
    delay_req_s: np.ndarray

    def __len__(self) -> int:
        return len(self.complexity)


@lru_cache(maxsize=2)
def _digits(split_name: str) -> np.ndarray:
    """Spatial complexity of the MNIST 5k digits of one split (``train`` / ``test``)."""
    from fl_datasets.sources import load_mnist_5k
    from tasks.cdio.complexity import spatial_complexity
    from tasks.cdio.versions import split

    data = load_mnist_5k()
    train, test = split(len(data.y))
    return spatial_complexity(data.x[train if split_name == "train" else test])


def build_stream(settings: StreamSettings, measured: Measured, site: int, num_sites: int, length: int, seed: int,
                 split_name: str) -> Stream:
    """``length`` tasks of ``site`` from the digits of ``split_name`` (training: ``train``; twin: ``test``)."""
    rng = np.random.default_rng([seed, site, 0 if split_name == "train" else 1, 17])
    pool = _digits(split_name)
    complexity = pool[rng.integers(0, len(pool), length)]
    lo, hi = settings.accuracy_req
    d_lo, d_hi = settings.delay_req_ms
    mid = (d_lo + d_hi) / 2
    share = np.interp(site, [0, max(num_sites - 1, 1)], settings.tight_share)
    tight = rng.random(length) < share
    delay_ms = np.where(tight, rng.uniform(d_lo, mid, length), rng.uniform(mid, d_hi, length))
    return Stream(site=site, complexity=complexity, complexity_bin=measured.bin_of(complexity),
                  accuracy_req=rng.uniform(lo, hi, length), delay_req_s=delay_ms / 1000.0)


def requests_of(stream: Stream, frames: int, index: np.ndarray | slice) -> Requests:
    """The twin's view of some of ``stream``'s tasks."""
    n = len(stream.complexity[index])
    return Requests(site=np.full(n, stream.site), complexity_bin=stream.complexity_bin[index],
                    images=np.full(n, float(frames)), bytes=np.full(n, 784.0 * frames),
                    accuracy_req=stream.accuracy_req[index], delay_req_s=stream.delay_req_s[index])


def labels(stream: Stream, twin: InferenceTwin, frames: int) -> np.ndarray:
    """(N, 2) float labels: delay-sensitive, accuracy-sensitive (see the module docstring)."""
    nominal = twin.outcomes(requests_of(stream, frames, slice(None)))  # slot=None: nominal bandwidth
    cloud, home = len(twin.servers) - 1, stream.site
    return np.stack([~nominal["success_delay"][:, cloud], ~nominal["success_accuracy"][:, home]], axis=1).astype(np.float32)


def features(stream: Stream, settings: StreamSettings, complexity_scale: float) -> np.ndarray:
    """(N, 4) eq. 3 features, each scaled to about [0, 1]."""
    n = len(stream)
    lo, hi = settings.accuracy_req
    d_lo, d_hi = settings.delay_req_ms
    return np.stack([np.arange(n) / max(n - 1, 1), stream.complexity / complexity_scale,
                     (stream.accuracy_req - lo) / (hi - lo), (stream.delay_req_s * 1000 - d_lo) / (d_hi - d_lo)],
                    axis=1).astype(np.float32)


def windows(x: np.ndarray, length: int) -> np.ndarray:
    """(N, length, F): for every task the ``length`` tasks up to and including it (zero-padded at the start)."""
    padded = np.concatenate([np.zeros((length - 1, x.shape[1]), dtype=x.dtype), x])
    return np.lib.stride_tricks.sliding_window_view(padded, (length, x.shape[1]))[:, 0]
