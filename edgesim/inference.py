"""Inference requests with accuracy and delay requirements, served by edge
sites and the cloud (paper 004 §3.3, §4.1): the twin's cost model of one
time slot.

Each request comes from an end device at one edge site and carries an
accuracy requirement and a delay requirement. Every server (the edge sites
and the cloud) hosts one model version and serves at most ``capacity``
requests per slot, each on an equal share of its throughput, so a request's
cost does not depend on the other requests of the slot (the per-request
rewards of a combinatorial bandit add up). Per request and server:

* delay = pre-processing (``pre_s``) + transfer (bytes / bandwidth share on
  every hop + each hop's RTT) + inference (FLOPs / (peak x utilisation /
  capacity));
* accuracy = the hosted version's measured accuracy on the request's
  complexity bin;
* compute = the server's peak TFLOPS x inference seconds (paper 004 §4.2.3:
  "FP16 performance x inference time", in TFLOP);
* bandwidth = bytes x hops (MB): the home edge is one hop (access link),
  another edge or the cloud two (access + edge-edge / WAN);
* energy = active power x inference seconds + transmission power x
  serialisation seconds (per request) + each edge server's idle power x its
  idle seconds of the slot (:func:`slot_idle_energy`; paper 004 §4.2.5).

Bandwidths fluctuate per slot and link by up to +-``fluctuation`` (paper
004 §4.1: 300 Mbps stable, +-20 % fluctuating). Pure NumPy, no FL.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgesim.devices import DeviceProfile
from edgesim.errors import EdgeSimError


@dataclass(frozen=True)
class HostedModel:
    """A model version as the twin sees it: FLOPs per image, accuracy per complexity bin."""

    name: str
    flops: float
    accuracy: tuple[float, ...]


@dataclass(frozen=True)
class Server:
    """An edge site (``site`` = its index) or the cloud (``site`` = None)."""

    name: str
    profile: DeviceProfile
    capacity: int
    model: HostedModel
    site: int | None


@dataclass(frozen=True)
class Links:
    """Network of the slot model. Bandwidths in Mbit/s, RTTs in ms, power in W."""

    access_mbps: float = 300.0       # end device -> its edge site (paper 004 §4.1)
    backbone_mbps: float = 300.0     # edge -> other edge / cloud (paper 004 §4.1)
    access_rtt_ms: float = 5.0       # est.
    edge_edge_rtt_ms: float = 10.0   # paper 001 §5.3: intra-cluster 5-15 ms
    cloud_rtt_ms: float = 30.0       # paper 001 §5.3: edge <-> cloud 20-40 ms
    fluctuation: float = 0.0         # +-fraction per slot and link (0.2: paper 004's fluctuating bandwidth)
    tx_power_w: float = 2.0          # transmission power of a sender while serialising (est.)
    utilisation: float = 0.3         # effective / peak throughput (devices.utilisation)


@dataclass
class Requests:
    """The requests of one slot (arrays of length K)."""

    site: np.ndarray          # home edge site
    complexity_bin: np.ndarray
    images: np.ndarray        # images (frames) per request
    bytes: np.ndarray         # payload bytes
    accuracy_req: np.ndarray  # in [0, 1]
    delay_req_s: np.ndarray

    def __len__(self) -> int:
        return len(self.site)


class InferenceTwin:
    """Costs of serving requests on servers within one slot (see the module docstring).

    Parameters
    ----------
    servers : list of Server
        The edge sites in site order, then the cloud (last).
    links : Links
    tasks_per_site : int
        Requests each site sends per slot (they share its links equally).
    slot_s : float
        Slot length (idle energy).
    pre_s : float
        Pre-processing delay per request (e.g. the preference prediction).
    seed : int
        Fixes the bandwidth fluctuation.
    """

    def __init__(self, servers: list[Server], links: Links, tasks_per_site: int, slot_s: float, pre_s: float,
                 seed: int) -> None:
        self.servers, self.links, self.tasks_per_site = servers, links, int(tasks_per_site)
        self.slot_s, self.pre_s, self.seed = float(slot_s), float(pre_s), int(seed)
        self.validate()
        self.capacity = np.array([s.capacity for s in servers])
        self.num_sites = sum(s.site is not None for s in servers)

    def validate(self) -> None:
        """One :class:`EdgeSimError` naming the bad value and the fix."""
        if not self.servers or self.servers[-1].site is not None:
            raise EdgeSimError("the servers must be the edge sites followed by the cloud (site=None) last")
        for s in self.servers:
            if not (isinstance(s.capacity, (int, np.integer)) and not isinstance(s.capacity, bool) and s.capacity >= 1):
                raise EdgeSimError(f"capacity of {s.name}={s.capacity} is invalid: use a whole number of "
                                   "requests per slot >= 1")
        sites = len(self.servers) - 1
        total = sum(s.capacity for s in self.servers)
        if self.tasks_per_site < 1 or total < self.tasks_per_site * sites:
            raise EdgeSimError(f"{self.tasks_per_site} requests per site x {sites} sites exceed the total capacity "
                               f"{total} per slot: raise the capacities or lower the requests per site (>= 1)")
        links = self.links
        if not 0 <= links.fluctuation < 1:
            raise EdgeSimError(f"bandwidth fluctuation={links.fluctuation} is invalid: use a fraction in [0, 1)")
        for key in ("access_mbps", "backbone_mbps", "utilisation"):
            if not getattr(links, key) > 0:
                raise EdgeSimError(f"{key}={getattr(links, key)} is invalid: it must be > 0")
        if not (self.slot_s > 0 and self.pre_s >= 0):
            raise EdgeSimError(f"slot_s={self.slot_s} / pre_s={self.pre_s} are invalid: slot_s > 0, pre_s >= 0")

    def check_requests(self, requests: Requests) -> None:
        """Requirements must be reachable values: accuracy in (0, 1], delay > 0."""
        bad = (requests.accuracy_req <= 0) | (requests.accuracy_req > 1)
        if bad.any():
            raise EdgeSimError(f"accuracy requirement {requests.accuracy_req[bad][0]:g} is invalid: use a fraction in (0, 1]")
        if (requests.delay_req_s <= 0).any():
            raise EdgeSimError(f"delay requirement {requests.delay_req_s.min():g} s is invalid: it must be > 0")
        if ((requests.site < 0) | (requests.site >= self.num_sites)).any():
            raise EdgeSimError(f"request site {requests.site.max()} is unknown: sites are 0..{self.num_sites - 1}")

    def bandwidth_factors(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """This slot's factor on every site's access link and backbone link (1 +- fluctuation)."""
        rng = np.random.default_rng([self.seed, slot, 41])
        f = self.links.fluctuation
        return 1 + f * rng.uniform(-1, 1, self.num_sites), 1 + f * rng.uniform(-1, 1, self.num_sites)

    def outcomes(self, requests: Requests, slot: int | None = None) -> dict[str, np.ndarray]:
        """Every request on every server: K x M arrays of ``delay_s``, ``accuracy``, ``compute_tflop``,
        ``bandwidth_mb``, ``energy_j``, ``inference_s``, ``success_accuracy``, ``success_delay``.
        ``slot=None``: nominal bandwidth (what a policy can know in advance)."""
        self.check_requests(requests)
        links, k, m = self.links, len(requests), len(self.servers)
        access_f, backbone_f = (np.ones(self.num_sites), np.ones(self.num_sites)) if slot is None else \
            self.bandwidth_factors(slot)
        bits = requests.bytes * 8.0
        share = float(self.tasks_per_site)
        access_s = bits / (links.access_mbps * 1e6 * access_f[requests.site] / share)
        backbone_s = bits / (links.backbone_mbps * 1e6 * backbone_f[requests.site] / share)
        out = {key: np.zeros((k, m)) for key in ("delay_s", "accuracy", "compute_tflop", "bandwidth_mb", "energy_j",
                                                 "inference_s")}
        for j, server in enumerate(self.servers):
            home = requests.site == server.site
            if server.site is None:
                serial, rtt = access_s + backbone_s, links.access_rtt_ms + links.cloud_rtt_ms
                hops = 2.0
            else:
                serial = access_s + np.where(home, 0.0, backbone_s)
                rtt = links.access_rtt_ms + np.where(home, 0.0, links.edge_edge_rtt_ms)
                hops = np.where(home, 1.0, 2.0)
            rate = server.profile.peak_tflops * 1e12 * links.utilisation / server.capacity
            inference = requests.images * server.model.flops / rate
            out["inference_s"][:, j] = inference
            out["delay_s"][:, j] = self.pre_s + serial + rtt / 1000.0 + inference
            out["accuracy"][:, j] = np.asarray(server.model.accuracy)[requests.complexity_bin]
            out["compute_tflop"][:, j] = server.profile.peak_tflops * inference
            out["bandwidth_mb"][:, j] = requests.bytes * hops / 1e6
            out["energy_j"][:, j] = server.profile.active_w * inference + links.tx_power_w * serial
        out["success_accuracy"] = out["accuracy"] >= requests.accuracy_req[:, None]
        out["success_delay"] = out["delay_s"] <= requests.delay_req_s[:, None]
        return out

    def check_assignment(self, assignment: np.ndarray) -> None:
        """Every request on one server (constraint C3), no server over its capacity."""
        if ((assignment < 0) | (assignment >= len(self.servers))).any():
            raise EdgeSimError(f"assignment names server {assignment.max()}: servers are 0..{len(self.servers) - 1}")
        load = np.bincount(assignment, minlength=len(self.servers))
        over = np.flatnonzero(load > self.capacity)
        if len(over):
            j = over[0]
            raise EdgeSimError(f"{load[j]} requests on {self.servers[j].name} exceed its capacity {self.capacity[j]}")

    def slot_idle_energy(self, assignment: np.ndarray, inference_s: np.ndarray) -> float:
        """Idle energy of the edge servers in one slot (their busy time is charged per request)."""
        busy = np.bincount(assignment, weights=inference_s[np.arange(len(assignment)), assignment],
                           minlength=len(self.servers)) / self.capacity  # shares run in parallel
        return float(sum(s.profile.idle_w * max(self.slot_s - busy[j], 0.0)
                         for j, s in enumerate(self.servers) if s.site is not None))
