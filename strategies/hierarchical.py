"""Hierarchical aggregation: clients -> cluster aggregators -> regional
aggregators -> global (paper 001 §3.2, §4.3: "cluster→regional→global to
reduce uplink pressure"), on a virtual network with its own links.

The physical network has four levels joined by three kinds of link:

    client --LAN-- cluster site --regional link-- region site --backhaul-- cloud
    (level 0)      (level 1)                       (level 2)                (3)

Every client sits in one cluster, every cluster in one region. ``tiers``
says where aggregation happens: ``("cluster", "region")`` (three tiers with
the global one), ``("cluster",)`` (two tiers), ``()`` (flat FL measured on the
same network: every client update crosses LAN, regional link and backhaul to
the cloud). A site without an aggregator forwards what passes through it.

Per tier, a :class:`TierRule`: the aggregation rule (any Flower strategy, a
new instance per aggregator: FedAvg, FedAvgM, ASS, staleness-aware, ...),
the period k (the tier aggregates its children's models every k rounds; the
cluster tier aggregates every round), the participation fraction (of its
children, per round), a deadline, and optional compression of what it sends
upward. The global tier's rule is the run's strategy.

One round r, on the virtual clock (all in this strategy, no extra processes):

1. *Downlink.* What an aggregator produced last round is pushed down to all
   its descendants over the links (the global model after a global
   aggregation, a regional model after a regional one); then each sampled
   client gets its parent aggregator's model.
2. *Clients* compute (``vc_compute_s`` of their reply) and send their update
   up to their parent aggregator.
3. *Tiers, bottom-up.* An active aggregator closes at its deadline (round
   start + ``deadline_s``) or when everything it waits for has arrived, and
   aggregates what arrived; an update arriving later stays in flight and is
   applied in a later round as a *stale* update (its sender is busy until
   then: a slow cluster does not block the round above it). Staleness tau at
   a tier = how many newer models its receiver has had since the update's
   base model; the *age* of an update at the global tier adds up the taus of
   every tier it went through (staleness counted across tiers).
4. The global model is returned to the round driver only when the global
   tier aggregated; it is pushed down at the start of the next round, so a
   rollout guard around this strategy (:mod:`strategies.rollout`) decides
   what is pushed.

Links are shared FIFO pipes, one per direction: each cluster's regional link,
each region's backhaul; the LAN is one dedicated port per client (capped by
the device's own bandwidth, if given). A transfer takes bytes x 8 /
bandwidth + RTT. Bytes are the serialised payloads (Flower's object tree,
each object deflated; :func:`serialised_size`), counted per link level and
direction. Client replies carry the size the server's accounting counted on
the wire (``wire-up-bytes`` / ``wire-down-bytes``), so compressed client
updates are counted compressed also where they are forwarded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore import log
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from .sync import adopt

TIERS = ("cluster", "region")  # aggregating tiers below the global one, bottom-up
LEVEL = {"client": 0, "cluster": 1, "region": 2, "global": 3}
LINK_LEVELS = ("lan", "regional", "backhaul")  # link k joins level k and k + 1
# stamped on every training reply by the server's byte accounting (fl_common.protocol)
WIRE_UP_BYTES, WIRE_DOWN_BYTES = "wire-up-bytes", "wire-down-bytes"
# reply metrics that are bookkeeping, not training metrics
_NOT_TRAINING = ("num-examples", "partition-id", "dispatch-round", "staleness", WIRE_UP_BYTES, WIRE_DOWN_BYTES)
AGGREGATOR_IDS = 2**62  # node ids of the aggregators' partial aggregates (never real nodes)
# encodes a model delta (name -> tensor): (the record sent, the delta the receiver decodes)
Codec = Callable[[dict[str, np.ndarray]], tuple[ArrayRecord, dict[str, np.ndarray]]]


def serialised_size(content: RecordDict | ArrayRecord) -> int:
    """Bytes Flower transmits for ``content``: its object tree, each unique
    object deflated once (what a SuperNode pushes to / pulls from the SuperLink)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


# ---------------------------------------------------------------- network
@dataclass(frozen=True)
class Link:
    """A link's bandwidth (Mbit/s) and round-trip time (ms)."""

    bandwidth_mbps: float
    rtt_ms: float

    def __post_init__(self) -> None:
        if not (isinstance(self.bandwidth_mbps, (int, float)) and self.bandwidth_mbps > 0):
            raise ValueError(f"link bandwidth_mbps={self.bandwidth_mbps} must be > 0")
        if not (isinstance(self.rtt_ms, (int, float)) and self.rtt_ms >= 0):
            raise ValueError(f"link rtt_ms={self.rtt_ms} must be >= 0")

    def serialisation_s(self, num_bytes: int, cap_mbps: float | None = None) -> float:
        mbps = self.bandwidth_mbps if cap_mbps is None else min(self.bandwidth_mbps, cap_mbps)
        return num_bytes * 8 / (mbps * 1e6)

    def transfer_s(self, num_bytes: int, cap_mbps: float | None = None) -> float:
        """bytes x 8 / bandwidth (capped at ``cap_mbps``) + one RTT."""
        return self.serialisation_s(num_bytes, cap_mbps) + self.rtt_ms / 1000


class Pipe:
    """One direction of a shared link: transfers go one after the other (FIFO)."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.free_s = 0.0

    def send(self, ready_s: float, num_bytes: int) -> float:
        """Arrival time of ``num_bytes`` handed to the link at ``ready_s``."""
        start = max(ready_s, self.free_s)
        self.free_s = start + self.link.serialisation_s(num_bytes)
        return self.free_s + self.link.rtt_ms / 1000


@dataclass(frozen=True)
class Network:
    """Who sits where, and the links.

    Parameters
    ----------
    cluster_of : mapping of int to str
        Partition id -> its cluster.
    region_of : mapping of str to str
        Cluster -> its region.
    lan, regional, backhaul : Link
        Client <-> cluster site, cluster site <-> region site, region site <-> cloud.
    access_mbps : mapping of int to (float, float)
        Partition id -> (uplink, downlink) Mbit/s of its device: caps its LAN port.
    """

    cluster_of: Mapping[int, str]
    region_of: Mapping[str, str]
    lan: Link
    regional: Link
    backhaul: Link
    access_mbps: Mapping[int, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.cluster_of:
            raise ValueError("the network has no clients")
        missing = sorted(set(self.cluster_of.values()) - set(self.region_of))
        if missing:
            raise ValueError(f"cluster '{missing[0]}' is in no region")

    @property
    def clusters(self) -> list[str]:
        return sorted(set(self.cluster_of.values()))

    @property
    def regions(self) -> list[str]:
        return sorted({self.region_of[c] for c in self.clusters})


@dataclass(frozen=True)
class TierRule:
    """How one tier aggregates.

    Parameters
    ----------
    strategy : callable
        ``() -> Strategy``: a new instance for every aggregator of the tier.
    period : int
        Aggregate every ``period`` rounds (1 = every round).
    fraction : float
        Fraction of its children that take part in a round, in (0, 1].
    deadline_s : float, optional
        Close at round start + this many virtual seconds; None waits for all.
    codec : callable, optional
        Compress what the tier's aggregators send upward (their model's delta
        to the model they started from, with error feedback).
    """

    strategy: Callable[[], Strategy]
    period: int = 1
    fraction: float = 1.0
    deadline_s: float | None = None
    codec: Codec | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.period, int) and self.period >= 1):
            raise ValueError(f"period={self.period} must be an integer >= 1")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction={self.fraction} must lie in (0, 1]")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ValueError(f"deadline_s={self.deadline_s} must be > 0 (or None: wait for all)")


# ---------------------------------------------------------------- internals
@dataclass
class _Update:
    """An update travelling to, or waiting at, an aggregator."""

    arrival_s: float
    source: Any  # partition id (a client) or aggregator name
    node_id: int
    content: RecordDict
    base_version: int  # the receiver's model version the update started from
    base_round: int  # the round that base model was sent in
    age: int = 0  # staleness accumulated in the tiers below


@dataclass
class _Dispatch:
    server_round: int
    node_id: int
    parent: str
    ready_s: float  # the parent's model at the parent's site
    base_version: int
    down_bytes: int


class _Aggregator:
    def __init__(self, name: str, tier: str, node_id: int, rule: TierRule, strategy: Strategy,
                 cluster: str | None, region: str) -> None:
        self.name, self.tier, self.node_id, self.rule, self.strategy = name, tier, node_id, rule, strategy
        self.cluster, self.region = cluster, region  # where it sits
        self.parent: str | None = None
        self.children: list[Any] = []  # partition ids or aggregator names
        self.model: ArrayRecord | None = None
        self.base: ArrayRecord | None = None  # the model it got from its parent (compression reference)
        self.version = 0  # its aggregations so far (staleness at it counts them)
        self.base_version = 0  # the parent's version it started from
        self.base_round = 1
        self.ready_s = 0.0  # its current model is at its site since
        self.closed_s = 0.0
        self.updated = False  # aggregated since its last upward send
        self.examples = 0  # weight of its last aggregate
        self.age = 0  # age of its last aggregate's contents
        self.inflight_until = -math.inf  # arrival of its last upward send
        self.residual: dict[str, np.ndarray] | None = None  # error feedback of the codec
        self.inbox: list[_Update] = []
        self.push_pending = False  # aggregated in a round where its parent did not

    @property
    def level(self) -> int:
        return LEVEL[self.tier]


def _as_reply(content: RecordDict, src_node_id: int) -> Message:
    """A reply message from aggregator ``src_node_id``, as a strategy expects one."""
    instruction = Message(content=RecordDict(), dst_node_id=src_node_id, message_type=MessageType.TRAIN)
    return Message(content=content, reply_to=instruction)


def _tensors(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record.keys()}


def _record(values: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in values.items()})


def _count(fraction: float, available: int) -> int:
    return min(available, max(1, int(fraction * available + 1e-9))) if available else 0


# ---------------------------------------------------------------- the strategy
class HierarchicalStrategy(Strategy):
    """Clients -> clusters -> regions -> global over a virtual network (module docstring).

    Parameters
    ----------
    network : Network
        Clients' clusters, clusters' regions, links.
    tiers : dict of str to TierRule
        The aggregating tiers below the global one (keys among ``"cluster"``,
        ``"region"``); empty = flat FL on the network.
    global_strategy : Strategy
        The global tier's rule (the run's strategy); it also configures
        federated evaluation.
    global_rule : TierRule, optional
        Period, participation fraction and deadline of the global tier (its
        ``strategy`` is not used).
    seed : int
        Seeds the per-tier sampling.
    min_clients : int
        Sample at least this many clients per round (topped up in partition
        order from clusters that were not drawn), as far as idle clients exist.
    node_partition : callable, optional
        Node id -> partition id (the round driver's map); default: the same.
    """

    def __init__(
        self,
        network: Network,
        tiers: Mapping[str, TierRule],
        global_strategy: Strategy,
        global_rule: TierRule | None = None,
        seed: int = 0,
        min_clients: int = 1,
        node_partition: Callable[[int], int] | None = None,
    ) -> None:
        unknown = sorted(set(tiers) - set(TIERS))
        if unknown:
            raise ValueError(f"unknown tier '{unknown[0]}': tiers are {', '.join(TIERS)} (bottom-up)")
        self.network = network
        self.tier_names = tuple(t for t in TIERS if t in tiers)
        self.rules = dict(tiers)
        self.global_strategy = global_strategy
        self.global_rule = global_rule or TierRule(strategy=lambda: global_strategy)
        self.rules["global"] = self.global_rule
        if "cluster" in self.rules and self.rules["cluster"].period != 1:
            raise ValueError(f"the cluster tier aggregates its clients every round: period="
                             f"{self.rules['cluster'].period} must be 1 (periods apply to the tiers above)")
        chain = [*self.tier_names, "global"]
        for lower, upper in zip(chain, chain[1:]):
            if self.rules[upper].period % self.rules[lower].period:
                raise ValueError(f"the {upper} period ({self.rules[upper].period}) must be a multiple of the "
                                 f"{lower} period ({self.rules[lower].period})")
        if not self.tier_names and self.global_rule.period != 1:
            raise ValueError("flat aggregation (no tier below the global one) needs a global period of 1: "
                             "clients keep no model between rounds")
        self.seed, self.min_clients = seed, min_clients
        self.node_partition = node_partition or (lambda node: node)
        self.now_s = 0.0
        self.aggregators: dict[str, _Aggregator] = {}
        self.parent_of_client: dict[int, str] = {}
        self._build()
        self.busy: set[int] = set()  # partitions whose update is still in flight
        self.client_free_s: dict[int, float] = {}  # when each client's last update reached its parent
        self._dispatched: dict[int, _Dispatch] = {}
        self._global_new = True  # the initial model is pushed in round 1
        self._started = False
        self._round = 0
        self._round_start = 0.0
        self._config = ConfigRecord()
        self.bytes_total = {level: 0 for level in LINK_LEVELS}
        self._bytes: dict[str, int] = {}
        self._stats: dict[str, list] = {}
        self._pipes = {
            ("regional", c, d): Pipe(network.regional) for c in network.clusters for d in ("up", "down")
        } | {("backhaul", r, d): Pipe(network.backhaul) for r in network.regions for d in ("up", "down")}

    # ------------------------------------------------------------- structure
    def _build(self) -> None:
        net, index = self.network, 0

        def add(name: str, tier: str, cluster: str | None, region: str) -> _Aggregator:
            nonlocal index
            index += 1
            strategy = self.global_strategy if tier == "global" else self.rules[tier].strategy()
            agg = _Aggregator(name, tier, AGGREGATOR_IDS + index, self.rules[tier], strategy, cluster, region)
            self.aggregators[name] = agg
            return agg

        glob = add("global", "global", None, "")
        if "region" in self.tier_names:
            for region in net.regions:
                add(f"region:{region}", "region", None, region)
        if "cluster" in self.tier_names:
            for cluster in net.clusters:
                add(f"cluster:{cluster}", "cluster", cluster, net.region_of[cluster])

        def parent_above(cluster: str, level: int) -> str:
            if level < LEVEL["cluster"] and "cluster" in self.tier_names:
                return f"cluster:{cluster}"
            if level < LEVEL["region"] and "region" in self.tier_names:
                return f"region:{net.region_of[cluster]}"
            return glob.name

        for agg in self.aggregators.values():
            if agg.tier != "global":
                agg.parent = parent_above(agg.cluster or self._any_cluster(agg.region), agg.level)
                self.aggregators[agg.parent].children.append(agg.name)
        for partition in sorted(net.cluster_of):
            parent = parent_above(net.cluster_of[partition], LEVEL["client"])
            self.parent_of_client[partition] = parent
            self.aggregators[parent].children.append(partition)

    def _any_cluster(self, region: str) -> str:
        return next(c for c in self.network.clusters if self.network.region_of[c] == region)

    @property
    def global_agg(self) -> _Aggregator:
        return self.aggregators["global"]

    def _below(self, agg: _Aggregator) -> list[_Aggregator]:
        return [self.aggregators[c] for c in agg.children if isinstance(c, str)]

    # ------------------------------------------------------------- links
    def _travel(self, items: list[dict[str, Any]], direction: str, src_level: int, dst_level: int) -> list[float]:
        """Arrival times of transfers (``ready``, ``bytes``, ``partition``,
        ``cluster``, ``region``) from ``src_level`` to ``dst_level``, hop by
        hop, each shared link serving its transfers in the order they reach it."""
        times = [float(item["ready"]) for item in items]
        hops = range(src_level, dst_level) if direction == "up" else range(src_level - 1, dst_level - 1, -1)
        for hop in hops:
            level = LINK_LEVELS[hop]
            for i in sorted(range(len(items)), key=lambda i: times[i]):
                item = items[i]
                self._bytes[f"{level}_{direction}_bytes"] += item["bytes"]
                if hop == 0:
                    up, down = self.network.access_mbps.get(item["partition"], (None, None))
                    times[i] += self.network.lan.transfer_s(item["bytes"], up if direction == "up" else down)
                else:
                    where = item["cluster"] if hop == 1 else item["region"]
                    times[i] = self._pipes[(level, where, direction)].send(times[i], item["bytes"])
        return times

    def _endpoint(self, agg: _Aggregator) -> dict[str, Any]:
        return {"partition": None, "cluster": agg.cluster, "region": agg.region}

    def _client_endpoint(self, partition: int) -> dict[str, Any]:
        cluster = self.network.cluster_of[partition]
        return {"partition": partition, "cluster": cluster, "region": self.network.region_of[cluster]}

    # ------------------------------------------------------------- state
    def partition_busy(self, partition: int) -> bool:
        """True while the client's last update is still travelling (at the round's start) or waiting at
        an aggregator that closed before it arrived: it is not sampled meanwhile."""
        return partition in self.busy or self.client_free_s.get(partition, 0.0) > self.now_s

    def is_busy(self, node_id: int) -> bool:
        return self.partition_busy(self.node_partition(node_id))

    def state_dict(self, partition_of: dict[int, int]) -> dict:
        """Checkpoints keep no hierarchy state: resuming a hierarchical run is refused by the config."""
        return {}

    def load_state_dict(self, state: dict, node_of: dict[int, int]) -> None:
        raise ValueError("resuming a hierarchical run is not supported (its tiers' in-flight updates and link "
                         "queues are not checkpointed); start a new run")

    def summary(self) -> None:
        rules = ", ".join(f"{t}: period {self.rules[t].period}, fraction {self.rules[t].fraction:g}, "
                          f"deadline {self.rules[t].deadline_s}" for t in (*self.tier_names, "global"))
        log(INFO, "\t├──> hierarchical: %d clusters, %d regions, tiers %s; %s", len(self.network.clusters),
            len(self.network.regions), "/".join(self.tier_names) or "none (flat)", rules)
        self.global_strategy.summary()

    # ------------------------------------------------------------- downlink
    def _push(self, agg: _Aggregator, server_round: int, start_s: float) -> None:
        """Send ``agg``'s model down to every aggregator below it (recursively)."""
        below = self._below(agg)
        if not below:
            return
        content = RecordDict({"arrays": agg.model, "config": self._config})
        size = serialised_size(content)
        items = [{"ready": start_s, "bytes": size, **self._endpoint(c)} for c in below]
        arrivals = self._travel(items, "down", agg.level, below[0].level)
        for child, arrival in zip(below, arrivals):
            if child.updated:
                self._stats.setdefault(f"{child.tier}_superseded", []).append(1)
            child.model = child.base = agg.model
            child.base_version, child.base_round = agg.version, server_round
            child.ready_s, child.updated, child.push_pending = arrival, False, False
            self._push(child, server_round, arrival)
        adopt(agg.strategy, agg.model, server_round, [c.node_id for c in below])

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Push down last round's aggregates, then sample per tier and send each
        sampled client its parent aggregator's model."""
        if server_round != self._round:  # a retried round keeps its pushes and counts
            self._round, self._round_start = server_round, self.now_s
            self._bytes = {f"{level}_{d}_bytes": 0 for level in LINK_LEVELS for d in ("up", "down")}
            self._stats = {}
        config = ConfigRecord(dict(config))
        config["server-round"] = server_round
        self._config = config
        start = self._round_start
        if not self._started:
            for agg in self.aggregators.values():
                agg.model = agg.base = arrays
            self._started = True
        if self._global_new:  # the global model of last round (or the initial one), as the driver adopted it
            glob = self.global_agg
            glob.model, glob.ready_s = arrays, start
            self._push(glob, server_round, start)
            self._global_new = False
        for agg in self.aggregators.values():
            if agg.push_pending:
                agg.push_pending = False
                self._push(agg, server_round, agg.closed_s)
        chosen = self._sample(server_round, grid)
        messages, sizes = [], {}
        for partition, node in chosen:
            parent = self.aggregators[self.parent_of_client[partition]]
            if parent.name not in sizes:
                sizes[parent.name] = serialised_size(RecordDict({"arrays": parent.model, "config": config}))
            ready = max(start, parent.ready_s, self.client_free_s.get(partition, 0.0))
            self._dispatched[partition] = _Dispatch(server_round, node, parent.name, ready, parent.version,
                                                    sizes[parent.name])
            messages.append(Message(content=RecordDict({"arrays": parent.model, "config": config}),
                                    message_type=MessageType.TRAIN, dst_node_id=node))
        for agg in self.aggregators.values():
            members = [node for p, node in chosen if self.parent_of_client[p] == agg.name]
            if members:
                adopt(agg.strategy, agg.model, server_round, members)
        return messages

    def _sample(self, server_round: int, grid: Grid) -> list[tuple[int, int]]:
        """(partition, node) of the clients that train this round: each tier
        draws its fraction of the children that have an idle client below."""
        idle = {}
        for node in grid.get_node_ids():
            partition = self.node_partition(node)
            if partition in self.parent_of_client and not self.partition_busy(partition):
                idle[partition] = node
        rng = np.random.default_rng([self.seed, server_round, 7])

        def has_idle(child: Any) -> bool:
            if not isinstance(child, str):
                return child in idle
            return any(has_idle(c) for c in self.aggregators[child].children)

        def draw(agg: _Aggregator) -> list[int]:
            available = [c for c in agg.children if has_idle(c)]
            k = _count(agg.rule.fraction, len(available))
            picked = [available[i] for i in sorted(rng.choice(len(available), size=k, replace=False))] if k else []
            out = []
            for child in picked:
                out.extend(draw(self.aggregators[child]) if isinstance(child, str) else [child])
            return out

        chosen = set(draw(self.global_agg))
        for partition in sorted(idle):  # top up to min_clients
            if len(chosen) >= self.min_clients:
                break
            chosen.add(partition)
        return [(p, idle[p]) for p in sorted(chosen)]

    # ------------------------------------------------------------- uplink
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Deliver the clients' updates over the links and aggregate tier by
        tier; returns the global model if the global tier aggregated (else
        None) and the round's metrics."""
        replies = list(replies)
        valid = [m for m in replies if not m.has_error()]
        origin = start = self._round_start
        pending = [u.arrival_s for a in self.aggregators.values() for u in a.inbox]
        if not valid and pending:  # nobody could train (all in flight): time moves on to the next arrival
            start = max(start, min(pending))
        self._deliver_clients(valid, start)
        closes: dict[str, list[float]] = {}
        chain = [*self.tier_names, "global"]
        for i, tier in enumerate(chain):
            if server_round % self.rules[tier].period:
                continue
            aggs = [a for a in self.aggregators.values() if a.tier == tier]
            for agg in aggs:
                close = self._close(agg, server_round, start)
                if close is not None:
                    closes.setdefault(tier, []).append(close)
            if tier == "global":
                continue
            if server_round % self.rules[chain[i + 1]].period == 0:  # the tier above aggregates now
                self._send_up(aggs)
            else:
                for agg in aggs:
                    if agg.updated and self._below(agg):
                        agg.push_pending = True  # its children get its model next round
        glob = self.global_agg
        aggregated = bool(self._stats.pop("global_aggregated", []))
        if aggregated:
            self._global_new = True
            for agg in self.aggregators.values():
                agg.push_pending = False  # the global model supersedes
        # the round ends when the global tier closes (a slow tier below does not hold it up), or, in a round
        # without global aggregation, when the last active tier closes
        end = max(closes["global"]) if "global" in closes else max([start, *(c for cs in closes.values() for c in cs)])
        self.now_s = end
        metrics = self._metrics(server_round, valid, closes, origin, end, aggregated)
        return (glob.model if aggregated else None), metrics

    def _deliver_clients(self, valid: list[Message], start: float) -> None:
        """Put each client's update on the links to its parent aggregator."""
        by_parent: dict[str, list[tuple[int, Message, _Dispatch]]] = {}
        for message in valid:
            metrics = next(iter(message.content.metric_records.values()))
            partition = int(metrics.get("partition-id", self.node_partition(message.metadata.src_node_id)))
            dispatch = self._dispatched.pop(partition, None)
            if dispatch is None:  # not sent by us this round (should not happen): treat as sent at round start
                parent = self.aggregators[self.parent_of_client[partition]]
                dispatch = _Dispatch(self._round, message.metadata.src_node_id, parent.name, start, parent.version, 0)
            by_parent.setdefault(dispatch.parent, []).append((partition, message, dispatch))
        for parent_name, entries in by_parent.items():
            parent = self.aggregators[parent_name]
            down = [{"ready": d.ready_s, "partition": p, **self._client_endpoint(p),
                     "bytes": int(next(iter(m.content.metric_records.values())).get(WIRE_DOWN_BYTES, d.down_bytes))}
                    for p, m, d in entries]
            got = self._travel(down, "down", parent.level, LEVEL["client"])
            up = []
            for (p, m, d), t in zip(entries, got):
                metrics = next(iter(m.content.metric_records.values()))
                size = int(metrics.get(WIRE_UP_BYTES, serialised_size(m.content)))
                up.append({"ready": t + float(metrics.get("vc_compute_s", 0.0)), "bytes": size,
                           **self._client_endpoint(p)})
            arrivals = self._travel(up, "up", LEVEL["client"], parent.level)
            for (p, m, d), arrival in zip(entries, arrivals):
                parent.inbox.append(_Update(arrival, p, m.metadata.src_node_id, m.content, d.base_version,
                                            d.server_round))
                self.busy.add(p)
                self.client_free_s[p] = arrival
        for p, d in sorted(self._dispatched.items()):  # sent, but no usable reply: the model still went down
            parent = self.aggregators[d.parent]
            self._travel([{"ready": d.ready_s, "bytes": d.down_bytes, **self._client_endpoint(p)}], "down",
                         parent.level, LEVEL["client"])
        self._dispatched = {}

    def _close(self, agg: _Aggregator, server_round: int, start: float) -> float | None:
        """Close ``agg`` for this round and aggregate what has arrived; returns
        its close time (None: nothing was on its way to it)."""
        if not agg.inbox:
            return None
        inbox = sorted(agg.inbox, key=lambda u: u.arrival_s)
        deadline = agg.rule.deadline_s
        if deadline is None:
            due, late, close = inbox, [], inbox[-1].arrival_s
        else:
            cutoff = start + deadline
            due = [u for u in inbox if u.arrival_s <= cutoff]
            late = [u for u in inbox if u.arrival_s > cutoff]
            close = cutoff if late or not due else due[-1].arrival_s
        agg.inbox = late
        self._stats.setdefault(f"{agg.tier}_late", []).append(len(late))
        if not due:
            return close
        # a fixed order (clients by partition, aggregators by name): float sums do not commute, so a
        # seed reproduces a run exactly
        due.sort(key=lambda u: (isinstance(u.source, str), u.source))
        messages, taus = [], []
        for update in due:
            tau = max(agg.version - update.base_version, 0)
            metrics = next(iter(update.content.metric_records.values()))
            metrics["staleness"], metrics["dispatch-round"] = tau, update.base_round
            messages.append(_as_reply(update.content, update.node_id))
            taus.append(tau)
            if not isinstance(update.source, str):
                self.busy.discard(update.source)
        adopt(agg.strategy, agg.model)  # its children's base, should a push from above have replaced it
        new, _ = agg.strategy.aggregate_train(server_round, messages)
        self._stats.setdefault(f"{agg.tier}_staleness", []).extend(taus)
        if agg.tier == "global":
            self._stats.setdefault("global_age", []).extend(u.age + t for u, t in zip(due, taus))
        if new is None:
            return close
        agg.model, agg.closed_s, agg.updated = new, close, True
        agg.version += 1
        agg.examples = sum(int(next(iter(u.content.metric_records.values()))["num-examples"]) for u in due)
        agg.age = max(u.age + t for u, t in zip(due, taus))
        self._stats.setdefault(f"{agg.tier}_aggregated", []).append(1)
        return close

    def _send_up(self, aggs: list[_Aggregator]) -> None:
        """Each aggregator with a new aggregate (and no upward send still in
        flight) sends it to its parent."""
        senders = []
        for agg in sorted(aggs, key=lambda a: a.closed_s):
            if not agg.updated:
                continue
            if agg.inflight_until > agg.closed_s:  # its last upward send has not arrived yet
                self._stats.setdefault(f"{agg.tier}_uplink_busy", []).append(1)
                continue
            senders.append(agg)
        if not senders:
            return
        items, contents = [], []
        for agg in senders:
            metrics = MetricRecord({"num-examples": agg.examples, "dispatch-round": agg.base_round, "staleness": 0})
            wire, model = self._encode(agg)
            items.append({"ready": agg.closed_s, "bytes": serialised_size(RecordDict({"arrays": wire, "metrics": metrics})),
                          **self._endpoint(agg)})
            contents.append(RecordDict({"arrays": model, "metrics": metrics}))
        parent_level = self.aggregators[senders[0].parent].level  # one tier: one level
        arrivals = self._travel(items, "up", senders[0].level, parent_level)
        for agg, content, arrival in zip(senders, contents, arrivals):
            self.aggregators[agg.parent].inbox.append(
                _Update(arrival, agg.name, agg.node_id, content, agg.base_version, agg.base_round, agg.age))
            agg.updated, agg.inflight_until = False, arrival

    def _encode(self, agg: _Aggregator) -> tuple[ArrayRecord, ArrayRecord]:
        """(what goes on the wire, the model the parent decodes) of ``agg``'s
        model: itself, or with the tier's codec its compressed delta to the
        model it got from its parent (error feedback kept at ``agg``)."""
        codec = agg.rule.codec
        if codec is None:
            return agg.model, agg.model
        model, base = _tensors(agg.model), _tensors(agg.base)
        delta = {}
        for name, value in model.items():
            if np.issubdtype(value.dtype, np.floating):
                delta[name] = value.astype(np.float32) - base[name].astype(np.float32)
                if agg.residual is not None:
                    delta[name] = delta[name] + agg.residual[name]
            else:
                delta[name] = value
        wire, decoded = codec(delta)
        agg.residual = {n: (delta[n] - decoded[n]).astype(np.float32) for n in delta
                        if np.issubdtype(delta[n].dtype, np.floating)}
        out = {n: (base[n] + decoded[n]).astype(base[n].dtype) if np.issubdtype(base[n].dtype, np.floating)
               else decoded[n] for n in base}
        return wire, _record(out)

    # ------------------------------------------------------------- metrics
    def _metrics(self, server_round: int, valid: list[Message], closes: dict[str, list[float]], start: float,
                 end: float, aggregated: bool) -> MetricRecord:
        metrics: dict[str, float] = {}
        training = [m.content for m in valid if "num-examples" in next(iter(m.content.metric_records.values()))]
        if training:  # the clients' training metrics, averaged by examples (as flat FedAvg reports them)
            for key, value in aggregate_metricrecords(training, "num-examples").items():
                if key not in _NOT_TRAINING and isinstance(value, (int, float)):
                    metrics[key] = float(value)
        metrics["virtual_time_s"], metrics["round_virtual_s"] = end, end - start
        metrics["global_aggregated"] = float(aggregated)
        for tier in (*self.tier_names, "global"):
            if tier in closes:
                metrics[f"{tier}_close_s"] = max(closes[tier]) - start
            taus = self._stats.get(f"{tier}_staleness", [])
            metrics[f"{tier}_updates"] = float(len(taus))
            metrics[f"{tier}_updates_stale"] = float(sum(t > 0 for t in taus))
            metrics[f"{tier}_updates_late"] = float(sum(self._stats.get(f"{tier}_late", [])))
            metrics[f"{tier}_staleness_max"] = float(max(taus, default=0))
            if tier != "global":
                metrics[f"{tier}_aggregated"] = float(len(self._stats.get(f"{tier}_aggregated", [])))
                metrics[f"{tier}_uplink_busy"] = float(len(self._stats.get(f"{tier}_uplink_busy", [])))
                metrics[f"{tier}_superseded"] = float(len(self._stats.get(f"{tier}_superseded", [])))
        ages = self._stats.get("global_age", [])  # staleness summed over the tiers an update went through
        metrics["staleness_total_max"] = float(max(ages, default=0))
        metrics["updates_stale_total"] = float(sum(a > 0 for a in ages))
        for age in sorted(set(ages)):
            metrics[f"staleness_total_tau{age}"] = float(ages.count(age))
        metrics["clients_in_flight"] = float(sum(self.partition_busy(p) for p in self.parent_of_client))
        for key, value in self._bytes.items():
            metrics[key] = float(value)
        for level in LINK_LEVELS:
            self.bytes_total[level] += self._bytes[f"{level}_up_bytes"] + self._bytes[f"{level}_down_bytes"]
            metrics[f"{level}_bytes_total"] = float(self.bytes_total[level])
        metrics["backhaul_bytes"] = float(self._bytes["backhaul_up_bytes"] + self._bytes["backhaul_down_bytes"])
        return MetricRecord(metrics)

    # ------------------------------------------------------------- evaluation
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Federated evaluation of the global model: the global strategy's."""
        return self.global_strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.global_strategy.aggregate_evaluate(server_round, replies)
