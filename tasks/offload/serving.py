"""Request streams per edge site, served under an offloading policy.

The test split arrives as requests: a seeded shuffle deals it to the edge
sites (one per client; each site is that client's device), and each site's
requests arrive as a Poisson process of ``rate_rps``. Each site runs its
co-located workload too: CPU and memory utilisation from the synthetic edge
workload generator (:func:`fl_datasets.synthetic.synthetic_workload`: Poisson
+ diurnal + bursts), sampled every ``load_step_s`` from a random time of day
per site and stream.

Per request (all times virtual, from the device profiles):

* **edge compute** = forward FLOPs / (peak x utilisation x the CPU share the
  co-located load leaves, at least :data:`MIN_CPU_SHARE`), after waiting in
  the site's FIFO queue;
* **uplink / downlink** = bytes / bandwidth (x (1 +- fluctuation)) + RTT/2
  (x jitter in [1, max]) each way; a leg lost (packet loss ``p``) is sent
  again after the retransmission timeout, a leg lost twice fails the offload
  (the request falls back to the edge), as in the twin (:mod:`edgesim.twin`);
* **cloud compute** = the cloud model's FLOPs / (cloud peak x utilisation),
  no cloud queue (one A100-class GPU serves a request in microseconds);
* **latency** = listening + queueing + edge compute [+ uplink + cloud compute
  + downlink, + timeouts];
* **energy** (the platform's cost model, :func:`edgesim.devices.round_cost`):
  edge active power x the inference's own compute time (FLOPs / (peak x
  utilisation): the co-located load stretches the latency, not the work) +
  edge idle power x time on the link, plus the cloud's active power x cloud
  compute. Listening is not charged.

The network trigger reads a heartbeat: every ``probe_s`` each site times one
unit task's exchange (jitter and loss drawn like a request's); the policy
compares the latest probe with the minimum achievable exchange time
(payload / bandwidth + RTT of the profile). Reachability is known at once
(the connection drops), so an outage sends nothing upward.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from edgesim.devices import DeviceProfile, Fleet
from tasks.offload.policy import Block, PolicySettings, Route, after_edge, check, network_block, number, on_arrival

MIN_CPU_SHARE = 0.05  # our choice: a saturated device still serves the inference at 5 % of its throughput
LINK_FAULTS = {"none": 0.0, "loss10": 0.1, "loss20": 0.2, "outage": 0.0}  # packet loss per scenario
LOAD_PROFILES = ("low", "medium", "high")
BLOCK_CODE = {Block.NONE: 0, Block.OUTAGE: 1, Block.SLOW_LINK: 2}


@dataclass(frozen=True)
class StreamSettings:
    """The request streams and the sites' co-located load (``task.stream``).

    Attributes
    ----------
    rate_rps : float
        Mean Poisson arrivals per edge site and second.
    load_profile : str
        Level of the co-located workload (``fl_datasets.synthetic.PROFILES``).
    load_step_s : float
        Sampling step of the co-located CPU / memory utilisation.
    request_bytes, response_bytes : int
        Payload of one offloaded request (the raw image) and of its answer.
    """

    rate_rps: float
    load_profile: str
    load_step_s: float
    request_bytes: int
    response_bytes: int

    def validate(self, where: str = "task.stream") -> None:
        check(number(self.rate_rps) and self.rate_rps > 0,
              f"{where}.rate_rps={self.rate_rps} is invalid: use a positive arrival rate (requests/s per site)")
        check(self.load_profile in LOAD_PROFILES,
              f"{where}.load_profile={self.load_profile} is unknown: choose one of {', '.join(LOAD_PROFILES)}")
        check(number(self.load_step_s) and self.load_step_s > 0,
              f"{where}.load_step_s={self.load_step_s} is invalid: use seconds > 0")
        for key in ("request_bytes", "response_bytes"):
            value = getattr(self, key)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                  f"{where}.{key}={value} is invalid: use a whole number of bytes >= 0")


@dataclass(frozen=True)
class LinkSettings:
    """The edge-cloud link's faults and its heartbeat (``task.link``).

    Attributes
    ----------
    faults : str
        ``none``, ``loss10`` / ``loss20`` (packet loss 10 / 20 %) or ``outage``
        (the cloud unreachable from ``outage_start`` for ``outage_duration``,
        as fractions of the stream's expected length).
    probe_s : float
        Heartbeat period of the transmission-time check.
    rto_ms : float
        Retransmission timeout of a lost leg (Linux TCP minimum, as the twin).
    """

    faults: str
    probe_s: float
    rto_ms: float
    outage_start: float
    outage_duration: float

    def validate(self, where: str = "task.link") -> None:
        check(self.faults in LINK_FAULTS,
              f"{where}.faults={self.faults} is unknown: choose one of {', '.join(LINK_FAULTS)}")
        check(number(self.probe_s) and self.probe_s > 0, f"{where}.probe_s={self.probe_s} is invalid: use seconds > 0")
        check(number(self.rto_ms) and self.rto_ms >= 0, f"{where}.rto_ms={self.rto_ms} is invalid: use milliseconds >= 0")
        for key in ("outage_start", "outage_duration"):
            value = getattr(self, key)
            check(number(value) and 0 <= value <= 1,
                  f"{where}.{key}={value} is invalid: a fraction of the stream in [0, 1]")

    @property
    def packet_loss(self) -> float:
        return LINK_FAULTS[self.faults]


@dataclass(frozen=True)
class Endpoints:
    """What serving costs where: each site's device, the cloud and the two models.

    Attributes
    ----------
    sites : tuple of DeviceProfile
        Site ``s``'s device (the device of client ``s``).
    cloud : DeviceProfile
        The device the cloud model runs on.
    fleet : Fleet
        Utilisation, RTT jitter and bandwidth fluctuation.
    edge_flops, cloud_flops : float
        Forward FLOPs per request of the edge and the cloud model.
    """

    sites: tuple[DeviceProfile, ...]
    cloud: DeviceProfile
    fleet: Fleet
    edge_flops: float
    cloud_flops: float

    def edge_compute_s(self, site: int, cpu_load: float = 0.0) -> float:
        """Edge inference time with the CPU share the co-located load leaves (0: the whole device)."""
        share = max(1.0 - cpu_load, MIN_CPU_SHARE)
        return self.edge_flops / (self.sites[site].peak_tflops * 1e12 * self.fleet.utilisation * share)

    @property
    def cloud_compute_s(self) -> float:
        return self.cloud_flops / (self.cloud.peak_tflops * 1e12 * self.fleet.utilisation)


def min_exchange_s(profile: DeviceProfile, stream: StreamSettings) -> float:
    """The minimum achievable transmission time of one request and its answer
    (no jitter, no fluctuation, no loss): bytes / bandwidth both ways + one RTT."""
    return (stream.request_bytes * 8 / (profile.uplink_mbps * 1e6)
            + stream.response_bytes * 8 / (profile.downlink_mbps * 1e6) + profile.rtt_ms / 1e3)


@dataclass(frozen=True)
class Stream:
    """One stream of requests with everything random about it drawn up front
    (common random numbers: every policy and threshold sees the same draws).

    Attributes
    ----------
    site, sample : numpy.ndarray of int, shape (R,)
        Edge site of each request and its index into the test set, by site then arrival.
    arrival_s : numpy.ndarray, shape (R,)
        Arrival time (s from the stream's start).
    window_s : float
        Expected length of the stream (requests of the busiest site / rate).
    cpu, mem : numpy.ndarray, shape (S, steps)
        Co-located utilisation of each site over the stream, per ``load_step_s``.
    legs : numpy.ndarray, shape (R, 2, 2)
        Per request, per leg (up, down): one-way time of attempt 1 and 2 (without loss).
    lost : numpy.ndarray of bool, shape (R, 2, 2)
        Per request, per leg, whether attempt 1 / 2 is lost.
    probe_ratio : numpy.ndarray, shape (S, probes)
        Each heartbeat's measured / minimum exchange time (inf: lost twice).
    outage : tuple of float or None
        ``(start_s, end_s)`` while the cloud is unreachable.
    """

    site: np.ndarray
    sample: np.ndarray
    arrival_s: np.ndarray
    window_s: float
    cpu: np.ndarray
    mem: np.ndarray
    load_step_s: float
    legs: np.ndarray
    lost: np.ndarray
    probe_ratio: np.ndarray
    probe_s: float
    rto_s: float
    outage: tuple[float, float] | None

    def load(self, site: int, t: float) -> tuple[float, float]:
        step = min(int(t / self.load_step_s), self.cpu.shape[1] - 1)
        return float(self.cpu[site, step]), float(self.mem[site, step])

    def network(self, settings: PolicySettings, site: int, t: float) -> Block:
        """The network trigger at time ``t``: reachability, then the latest heartbeat."""
        reachable = self.outage is None or not self.outage[0] <= t < self.outage[1]
        probe = min(int(t / self.probe_s), self.probe_ratio.shape[1] - 1)
        return network_block(settings, reachable, float(self.probe_ratio[site, probe]), min_tx_s=1.0)


def build_stream(num_samples: int, endpoints: Endpoints, stream: StreamSettings, link: LinkSettings,
                 seed: int, stream_id: int, repeats: int = 1) -> Stream:
    """Deal ``repeats`` shuffled copies of the ``num_samples`` test samples to the
    sites and draw the stream (same arguments, same stream)."""
    num_sites = len(endpoints.sites)
    rng = np.random.default_rng([seed, stream_id, 17])
    order = np.concatenate([rng.permutation(num_samples) for _ in range(repeats)])
    sites, samples, arrivals = [], [], []
    for s in range(num_sites):
        mine = order[s::num_sites]
        sites.append(np.full(len(mine), s))
        samples.append(mine)
        arrivals.append(np.cumsum(rng.exponential(1.0 / stream.rate_rps, size=len(mine))))
    window_s = math.ceil(len(order) / num_sites) / stream.rate_rps
    horizon_s = max(window_s, max((a[-1] for a in arrivals if len(a)), default=0.0)) + 60.0  # room for listening
    cpu, mem = _site_load(stream, num_sites, seed, rng, horizon_s)
    site = np.concatenate(sites)
    jitter_max, fluctuation = endpoints.fleet.rtt_jitter_max, endpoints.fleet.bandwidth_fluctuation

    def draw(profiles: list[DeviceProfile], count: int) -> tuple[np.ndarray, np.ndarray]:
        jitter = rng.uniform(1.0, jitter_max, size=(count, 2, 2))
        fluct = 1 + fluctuation * rng.uniform(-1, 1, size=(count, 2, 2))
        return _leg_times(profiles, stream, jitter, fluct), rng.random((count, 2, 2)) < link.packet_loss

    legs, lost = draw([endpoints.sites[s] for s in site], len(site))
    probes = int(horizon_s / link.probe_s) + 1
    probe_ratio = np.empty((num_sites, probes))
    rto_s = link.rto_ms / 1e3
    for s, profile in enumerate(endpoints.sites):
        p_legs, p_lost = draw([profile] * probes, probes)
        floor = min_exchange_s(profile, stream)
        for k in range(probes):
            spent, failed, _ = _exchange(p_legs[k], p_lost[k], rto_s)
            probe_ratio[s, k] = math.inf if failed else spent / floor
    outage = None
    if link.faults == "outage":
        outage = (link.outage_start * window_s, (link.outage_start + link.outage_duration) * window_s)
    return Stream(site=site, sample=np.concatenate(samples), arrival_s=np.concatenate(arrivals), window_s=window_s,
                  cpu=cpu, mem=mem, load_step_s=stream.load_step_s, legs=legs, lost=lost, probe_ratio=probe_ratio,
                  probe_s=link.probe_s, rto_s=rto_s, outage=outage)


def _leg_times(profiles: list[DeviceProfile], stream: StreamSettings, jitter: np.ndarray, fluct: np.ndarray) -> np.ndarray:
    """One-way times ``(request, leg, attempt)``: bytes / (bandwidth x fluctuation) + RTT/2 x jitter."""
    rtt_half = np.array([p.rtt_ms / 2e3 for p in profiles])[:, None]
    up_bps = np.array([p.uplink_mbps * 1e6 for p in profiles])[:, None]
    down_bps = np.array([p.downlink_mbps * 1e6 for p in profiles])[:, None]
    up = stream.request_bytes * 8 / (up_bps * fluct[:, 0]) + rtt_half * jitter[:, 0]
    down = stream.response_bytes * 8 / (down_bps * fluct[:, 1]) + rtt_half * jitter[:, 1]
    return np.stack([up, down], axis=1)


def _exchange(legs: np.ndarray, lost: np.ndarray, rto_s: float) -> tuple[float, bool, int]:
    """One request/answer exchange: ``(seconds on the link, failed, retransmissions)``.

    A lost attempt costs the retransmission timeout, then the leg is sent
    again; a leg lost twice fails the exchange (after its two timeouts).
    """
    spent, retries = 0.0, 0
    for leg in range(2):
        if lost[leg, 0] and lost[leg, 1]:
            return spent + 2 * rto_s, True, retries + 1
        if lost[leg, 0]:
            spent, retries = spent + rto_s + legs[leg, 1], retries + 1
        else:
            spent += legs[leg, 0]
    return spent, False, retries


def _site_load(stream: StreamSettings, num_sites: int, seed: int, rng: np.random.Generator,
               horizon_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Each site's co-located CPU / memory utilisation over the stream, from a random time of day."""
    from fl_datasets.synthetic import DAY_S

    cpu_day, mem_day = _day_load(num_sites, stream.load_step_s, stream.load_profile, seed)
    steps = int(horizon_s / stream.load_step_s) + 1
    starts = rng.integers(0, cpu_day.shape[1], size=num_sites)
    index = (starts[:, None] + np.arange(steps)[None, :]) % int(DAY_S / stream.load_step_s)
    rows = np.arange(num_sites)[:, None]
    return cpu_day[rows, index], mem_day[rows, index]


@lru_cache(maxsize=4)
def _day_load(num_sites: int, step_s: float, profile: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic day of every site's co-located load, as utilisation fractions."""
    from fl_datasets.synthetic import DAY_S, MEM_CAPACITY_KB, synthetic_workload

    traces = synthetic_workload(num_sites, int(DAY_S / step_s), step_s=step_s, profile=profile, seed=seed)
    return traces.values[..., 0] / 100.0, traces.values[..., 1] / MEM_CAPACITY_KB


@dataclass(frozen=True)
class Served:
    """Per request of a stream: what the policy did and what it cost.

    ``by_cloud``: the answer came from the cloud model; ``sent_s``: when an
    exchange with the cloud began (NaN: none); ``failed``: it was lost twice
    (the edge answered); ``blocked``: 0 none, 1 outage, 2 slow link (the
    policy wanted the cloud, the network kept the request at the edge).
    Cloud energy is charged for answered requests only.
    """

    latency_s: np.ndarray
    edge_j: np.ndarray
    cloud_j: np.ndarray
    listen_s: np.ndarray
    retransmissions: np.ndarray
    sent_s: np.ndarray
    by_cloud: np.ndarray
    failed: np.ndarray
    listened: np.ndarray
    blocked: np.ndarray


def serve(settings: PolicySettings, stream: Stream, endpoints: Endpoints, confidence: np.ndarray) -> Served:
    """Serve every request of ``stream`` under ``settings``; ``confidence`` is the
    edge model's max softmax per test sample."""
    count = len(stream.site)
    out = {k: np.zeros(count) for k in ("latency_s", "edge_j", "cloud_j", "listen_s", "retransmissions")}
    out["sent_s"] = np.full(count, np.nan)
    flags = {k: np.zeros(count, dtype=bool) for k in ("by_cloud", "failed", "listened")}
    blocked = np.zeros(count, dtype=np.int8)
    cloud_s, cloud_w = endpoints.cloud_compute_s, endpoints.cloud.active_w
    free_at = [0.0] * len(endpoints.sites)  # each site's FIFO: when its edge model is next free
    pending: list[deque] = [deque() for _ in endpoints.sites]  # finish times of requests at the edge
    for r in range(count):
        site, arrival = int(stream.site[r]), float(stream.arrival_s[r])
        t = arrival
        while True:  # arrival decision; a listening request re-decides at every heartbeat
            cpu, mem = stream.load(site, t)
            queue = pending[site]
            while queue and queue[0] <= t:
                queue.popleft()
            route, block = on_arrival(settings, cpu=cpu, mem=mem, queue=len(queue), network=stream.network(settings, site, t))
            if route is not Route.LISTEN:
                break
            flags["listened"][r] = True
            wake = (math.floor(t / stream.probe_s + 1e-9) + 1) * stream.probe_s
            if wake - arrival > settings.listen_timeout_s:  # listened long enough: infer at the edge
                t, route = arrival + settings.listen_timeout_s, Route.EDGE
                break
            t = wake
        out["listen_s"][r] = t - arrival
        blocked[r] = BLOCK_CODE[block] if route is Route.EDGE else 0
        link_s, edge_s, work_s, done = 0.0, 0.0, 0.0, None
        if route is Route.CLOUD:
            done, link_s = _offload(stream, r, t, flags, out)
            t = done if done is not None else t + link_s
        if done is None:  # edge inference: the first choice, or the fallback after a failed exchange
            start = max(t, free_at[site])
            edge_s = endpoints.edge_compute_s(site, stream.load(site, start)[0])
            work_s = endpoints.edge_compute_s(site)  # what the inference itself keeps the device busy for
            t = free_at[site] = start + edge_s
            pending[site].append(t)
            if route is Route.EDGE:
                offload, block = after_edge(settings, float(confidence[stream.sample[r]]), stream.network(settings, site, t))
                blocked[r] = max(blocked[r], BLOCK_CODE[block])
                if offload:
                    done, spent = _offload(stream, r, t, flags, out)
                    link_s += spent
                    t = done if done is not None else t + spent
        if done is not None:  # answered by the cloud model
            flags["by_cloud"][r] = True
            t = done + cloud_s
            out["cloud_j"][r] = cloud_w * cloud_s
        out["latency_s"][r] = t - arrival
        profile = endpoints.sites[site]
        out["edge_j"][r] = profile.active_w * work_s + profile.idle_w * link_s
    return Served(blocked=blocked, **out, **flags)


def _offload(stream: Stream, r: int, t: float, flags: dict, out: dict) -> tuple[float | None, float]:
    """Send request ``r`` upward at ``t``: ``(when the answer is back, without the
    cloud's compute, or None if the exchange failed; seconds on the link)``."""
    out["sent_s"][r] = t
    spent, failed, retries = _exchange(stream.legs[r], stream.lost[r], stream.rto_s)
    out["retransmissions"][r] += retries
    if failed:
        flags["failed"][r] = True
        return None, spent
    return t + spent, spent


def summarise(served: Served, stream: Stream, y: np.ndarray, edge_pred: np.ndarray, cloud_pred: np.ndarray,
              confidence: np.ndarray, theta: float, num_classes: int) -> dict[str, float]:
    """The stream's accuracy, latency, energy and offloading figures (names without prefix)."""
    from tasks.image.training import classification_metrics

    truth, edge, cloud = y[stream.sample], edge_pred[stream.sample], cloud_pred[stream.sample]
    answer = np.where(served.by_cloud, cloud, edge)
    system = classification_metrics(truth, answer, num_classes)
    kept, up = ~served.by_cloud, served.by_cloud
    latency_ms = 1e3 * served.latency_s
    return {
        "requests": float(len(truth)),
        "accuracy": system["accuracy"],
        "macro_f1": system["macro_f1"],
        "weakest_class_recall": system["weakest_class_recall"],
        "fraction": float(up.mean()),
        "hard_cases": float(np.sum(confidence[stream.sample] < theta)),
        "hard_fraction": float(np.mean(confidence[stream.sample] < theta)),
        "edge_acc_kept": _mean(edge[kept] == truth[kept]),
        "edge_acc_offloaded": _mean(edge[up] == truth[up]),
        "cloud_acc_offloaded": _mean(cloud[up] == truth[up]),
        "cloud_acc_kept": _mean(cloud[kept] == truth[kept]),
        "latency_p50_ms": float(np.percentile(latency_ms, 50)),
        "latency_p95_ms": float(np.percentile(latency_ms, 95)),
        "latency_p99_ms": float(np.percentile(latency_ms, 99)),
        "latency_mean_ms": float(latency_ms.mean()),
        "energy_mj": float(1e3 * (served.edge_j + served.cloud_j).mean()),
        "edge_energy_mj": float(1e3 * served.edge_j.mean()),
        "cloud_energy_mj": float(1e3 * served.cloud_j.mean()),
        "listen_fraction": float(served.listened.mean()),
        "outage_blocked": float(np.sum(served.blocked == BLOCK_CODE[Block.OUTAGE])),
        "slow_link_blocked": float(np.sum(served.blocked == BLOCK_CODE[Block.SLOW_LINK])),
        "sent_during_outage": float(np.sum(_in_outage(stream, served.sent_s))),
        "failed_exchanges": float(served.failed.sum()),
        "retransmissions": float(served.retransmissions.sum()),
    }


def _in_outage(stream: Stream, times: np.ndarray) -> np.ndarray:
    """Which ``times`` fall into the outage (none without one; NaN never)."""
    if stream.outage is None:
        return np.zeros(len(times), dtype=bool)
    return (times >= stream.outage[0]) & (times < stream.outage[1])


def _mean(hits: np.ndarray) -> float:
    return float(hits.mean()) if len(hits) else float("nan")
