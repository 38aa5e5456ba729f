"""The aggregation topology (``conf/topology/``) and the validated rollout
(``conf/rollout/``) of one experiment: validation, the client -> cluster ->
region assignment, and the strategy they wrap around the run's strategy.

``topology=flat`` (default) and ``rollout=none`` change nothing. With
``topology=hierarchical`` (``two_tier``, ``flat_network``) the run's strategy
becomes the global tier of a :class:`strategies.hierarchical.HierarchicalStrategy`,
whose tiers each get their own rule built by the strategy registry; with a
rollout guard, the outermost strategy is a :class:`strategies.rollout.RolloutGuard`
scoring each new global model with the task's ``validation_score``.

Assignment (``topology.assign.by``):

* ``blocks``: ``num_clusters`` contiguous blocks of partition ids;
* ``explicit``: ``clusters: {name: [partition ids]}``;
* ``device``: one cluster per device profile of the fleet (``Fleet.assign``);
* ``twin``: the clusters and cloud regions of the twin (``conf/twin/``): an
  RL PPO client is a twin node, a QMIX client a twin cluster, any other task's
  partition p the twin's node p mod (its number of nodes).

Regions: ``regions: {name: [cluster names]}``, else ``num_regions``
contiguous blocks of the sorted clusters (``by=twin``: the twin's regions).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
from flwr.serverapp.strategy import Strategy
from omegaconf import DictConfig, OmegaConf

from edgesim.devices import Fleet
from fl_server.engine.virtual_clock import VirtualClock
from fl_server.experiments.config import CONF_DIR, ConfigError
from strategies import build_strategy
from strategies.hierarchical import TIERS, HierarchicalStrategy, Link, Network, TierRule
from strategies.rollout import MODES, RolloutGuard
from strategies.validation import validate_strategy

ASSIGN_BY = ("blocks", "explicit", "device", "twin")
LINKS = ("lan", "regional", "backhaul")
_LABELS = {(): "flat-network", ("cluster",): "2-tier", ("region",): "2-tier-region", ("cluster", "region"): "3-tier"}


def is_hierarchical(cfg: DictConfig) -> bool:
    return "topology" in cfg and cfg.topology.name == "hierarchical"


def label(cfg: DictConfig) -> str:
    """``flat``, ``flat-network``, ``2-tier`` or ``3-tier`` (tags, run names, the study's table)."""
    if not is_hierarchical(cfg):
        return "flat"
    return _LABELS.get(tuple(cfg.topology.tiers), "-".join(cfg.topology.tiers))


def topology_tags(cfg: DictConfig) -> dict[str, str]:
    """MLflow tags of non-default topologies and rollout guards (none by default)."""
    tags = {}
    if is_hierarchical(cfg):
        tags["topology"] = label(cfg)
    if "rollout" in cfg and cfg.rollout.enabled:
        tags["rollout"] = str(cfg.rollout.mode)
    return tags


def run_name_suffix(cfg: DictConfig) -> str:
    return f"-{label(cfg)}" if is_hierarchical(cfg) else ""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ------------------------------------------------------------------ validation
def validate(cfg: DictConfig) -> None:
    """Topology and rollout settings; one :class:`ConfigError` naming the value and the fix."""
    if "rollout" in cfg:
        _validate_rollout(cfg)
    if "topology" not in cfg or cfg.topology.name == "flat":
        return
    topo = cfg.topology
    _require(topo.name == "hierarchical", f"topology.name={topo.name} is unknown: use flat or hierarchical")
    tiers = list(topo.tiers)
    _require(all(t in TIERS for t in tiers) and tiers == [t for t in TIERS if t in tiers],
             f"topology.tiers={tiers} is invalid: list the aggregating tiers bottom-up from {', '.join(TIERS)} "
             "(e.g. [cluster, region], [cluster] or [] for flat aggregation on the network)")
    _validate_rules(cfg, tiers)
    for name in LINKS:
        link = topo.links[name]
        _require(_is_number(link.bandwidth_mbps) and link.bandwidth_mbps > 0,
                 f"topology.links.{name}.bandwidth_mbps={link.bandwidth_mbps} is invalid: use Mbit/s > 0")
        _require(_is_number(link.rtt_ms) and link.rtt_ms >= 0,
                 f"topology.links.{name}.rtt_ms={link.rtt_ms} is invalid: use milliseconds >= 0")
    assignment(cfg)  # raises for a bad tree
    _require(cfg.devices.deadline_s is None,
             f"devices.deadline_s={cfg.devices.deadline_s} does not apply to topology=hierarchical: each tier has "
             "its own deadline; use topology.rules.cluster.deadline_s (and region / global)")
    _require(cfg.clients.fraction_train == 1.0,
             f"clients.fraction_train={cfg.clients.fraction_train} does not apply to topology=hierarchical: each "
             "tier samples its children; use topology.rules.<tier>.fraction")
    _require(not cfg.privacy.secagg.enabled,
             "privacy=secagg does not compose with topology=hierarchical: the aggregators need each update "
             "(a masked sum per tier is not implemented); use privacy=none or dpsgd")
    _require(cfg.privacy.central.mode == "none",
             f"privacy.central.mode={cfg.privacy.central.mode} does not compose with topology=hierarchical: Flower's "
             "DP wrappers clip against the one model sent, while clusters hold their own; use privacy.central.mode=none")
    _require(cfg.checkpoint.resume is None,
             "checkpoint.resume does not apply to topology=hierarchical: in-flight updates and link queues of "
             "the tiers are not checkpointed; start a new run")
    _require(not _clustered(cfg.strategy),
             "strategy=staleness_clustered with num_clusters or similarity_threshold keeps several global models, "
             "which topology=hierarchical cannot push down: set strategy.num_clusters=null and "
             "strategy.similarity_threshold=null")


def _clustered(strategy: DictConfig) -> bool:
    return strategy.name == "staleness_clustered" and (
        strategy.get("num_clusters") is not None or strategy.get("similarity_threshold") is not None)


def _validate_rollout(cfg: DictConfig) -> None:
    r = cfg.rollout
    _require(isinstance(r.enabled, bool), f"rollout.enabled={r.enabled} is invalid: use true or false")
    _require(r.mode in MODES, f"rollout.mode={r.mode} is unknown: use {' or '.join(MODES)}")
    _require(_is_number(r.threshold) and r.threshold >= 0,
             f"rollout.threshold={r.threshold} is invalid: the tolerated drop must be >= 0, e.g. rollout.threshold=0.02")
    _require(isinstance(r.relative, bool), f"rollout.relative={r.relative} is invalid: use true or false")
    _require(_is_number(r.mix_fraction) and 0 < r.mix_fraction < 1,
             f"rollout.mix_fraction={r.mix_fraction} is invalid: the stable model's share must lie in (0, 1)")
    if r.enabled:
        _require(not _clustered(cfg.strategy),
                 "rollout with strategy=staleness_clustered and clustering: the guard validates one global model; "
                 "set strategy.num_clusters=null and strategy.similarity_threshold=null")


def _validate_rules(cfg: DictConfig, tiers: list[str]) -> None:
    rules = cfg.topology.rules
    for tier in [*tiers, "global"]:
        rule, where = rules[tier], f"topology.rules.{tier}"
        _require(isinstance(rule.period, int) and not isinstance(rule.period, bool) and rule.period >= 1,
                 f"{where}.period={rule.period} is invalid: aggregate every k rounds, k an integer >= 1")
        _require(_is_number(rule.fraction) and 0 < rule.fraction <= 1,
                 f"{where}.fraction={rule.fraction} is invalid: the share of its children per round must lie in (0, 1]")
        _require(rule.deadline_s is None or (_is_number(rule.deadline_s) and rule.deadline_s > 0),
                 f"{where}.deadline_s={rule.deadline_s} is invalid: use virtual seconds > 0 after the round starts, "
                 "or null to wait for every update")
        if tier != "global":
            _require(isinstance(rule.compression, bool), f"{where}.compression={rule.compression} is invalid: use true or false")
            tier_strategy_config(cfg, tier)  # raises for an unknown or bad rule
    _require("cluster" not in tiers or rules.cluster.period == 1,
             f"topology.rules.cluster.period={rules.cluster.period} is invalid: the cluster tier aggregates its "
             "clients every round (clients keep no model between rounds); set periods on region / global")
    chain = [*tiers, "global"]
    for lower, upper in zip(chain, chain[1:]):
        _require(rules[upper].period % rules[lower].period == 0,
                 f"topology.rules.{upper}.period={rules[upper].period} is invalid: it must be a multiple of "
                 f"topology.rules.{lower}.period={rules[lower].period} (a tier aggregates what the tier below sent)")
    _require(tiers or rules["global"].period == 1,
             f"topology.rules.global.period={rules['global'].period} is invalid with topology.tiers=[]: flat "
             "aggregation happens every round (clients keep no model between rounds)")


def tier_strategy_config(cfg: DictConfig, tier: str) -> DictConfig:
    """The run's config with ``strategy`` replaced by the tier's rule (its
    conf/strategy/<name>.yaml with the tier's keys), sampling everything it is given."""
    node = cfg.topology.rules[tier].strategy
    where = f"topology.rules.{tier}.strategy"
    name = node.get("name") if OmegaConf.is_dict(node) else None
    options = sorted(p.stem for p in (CONF_DIR / "strategy").glob("*.yaml"))
    _require(name in options, f"{where}.name={name} is unknown: choose one of {', '.join(options)} (conf/strategy/*.yaml)")
    base = OmegaConf.load(CONF_DIR / "strategy" / f"{name}.yaml")
    unknown = sorted(set(node) - set(base))
    _require(not unknown, f"{where}.{unknown[0] if unknown else ''} is unknown for {name}: its keys are "
             f"{', '.join(sorted(base))} (conf/strategy/{name}.yaml)")
    container = OmegaConf.to_container(cfg, resolve=True)
    container["strategy"] = OmegaConf.to_container(OmegaConf.merge(base, node), resolve=True)
    container["clients"].update(fraction_train=1.0, fraction_evaluate=0.0, min_train=1, min_replies=None)
    tier_cfg = OmegaConf.create(container)
    try:
        validate_strategy(tier_cfg.strategy, int(tier_cfg.clients.num))
    except ValueError as err:
        raise ConfigError(str(err).replace("strategy.", f"{where}.", 1)) from None
    _require(not _clustered(tier_cfg.strategy),
             f"{where}: staleness_clustered with clustering keeps several models per aggregator; set "
             f"num_clusters=null and similarity_threshold=null at a tier")
    _require(name != "ass" or cfg.task.kind == "image",
             f"{where}.name=ass weighs by per-class accuracy on public data, which task={cfg.task.name} does not have")
    return tier_cfg


# ------------------------------------------------------------------ assignment
def _blocks(items: list[Any], count: int) -> list[list[Any]]:
    return [list(block) for block in np.array_split(np.array(items, dtype=object), count)]


def assignment(cfg: DictConfig) -> tuple[dict[int, str], dict[str, str]]:
    """``(partition -> cluster, cluster -> region)``, validated."""
    a, n = cfg.topology.assign, int(cfg.clients.num)
    _require(a.by in ASSIGN_BY, f"topology.assign.by={a.by} is unknown: use one of {', '.join(ASSIGN_BY)}")
    twin_regions: dict[str, str] = {}
    if a.by == "blocks":
        k = a.num_clusters
        _require(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= n,
                 f"topology.assign.num_clusters={k} is invalid: use an integer in [1, clients.num={n}] "
                 "(more clusters than clients would leave a cluster empty)")
        clusters = {f"c{i}": [int(p) for p in block] for i, block in enumerate(_blocks(list(range(n)), k))}
    elif a.by == "explicit":
        _require(OmegaConf.is_dict(a.clusters) and len(a.clusters) > 0,
                 "topology.assign.by=explicit needs topology.assign.clusters={name: [partition ids], ...}, "
                 "e.g. 'topology.assign.clusters={a:[0,1],b:[2,3]}'")
        clusters = {str(k): list(v) if OmegaConf.is_list(v) else v for k, v in a.clusters.items()}
    elif a.by == "device":
        devices = Fleet.from_config(cfg.devices).assign(n, int(cfg.seed))
        clusters = {}
        for partition, device in enumerate(devices):
            clusters.setdefault(device, []).append(partition)
    else:
        clusters, twin_regions = _twin_clusters(cfg, n)
    _check_clusters(clusters, n)  # before regions are drawn from them
    regions_cfg = a.regions
    if regions_cfg is not None:
        _require(OmegaConf.is_dict(regions_cfg) and len(regions_cfg) > 0,
                 "topology.assign.regions must map region names to lists of clusters, e.g. "
                 "'topology.assign.regions={eu:[c0,c1],us:[c2]}' (or null for num_regions blocks)")
        regions = {str(k): list(v) if OmegaConf.is_list(v) else v for k, v in regions_cfg.items()}
    elif twin_regions:
        regions = {}
        for cluster, region in twin_regions.items():
            regions.setdefault(region, []).append(cluster)
    else:
        r = a.num_regions
        names = sorted(clusters)
        _require(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= len(names),
                 f"topology.assign.num_regions={r} is invalid: use an integer in [1, {len(names)}] (the number of "
                 "clusters): more regions than clusters would leave a region empty")
        regions = {f"r{i}": [str(c) for c in block] for i, block in enumerate(_blocks(names, r))}
    return check_tree(clusters, regions, n)


def _twin_clusters(cfg: DictConfig, n: int) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Clusters and regions of the twin: which twin node (PPO, other tasks) or cluster (QMIX) each client is."""
    twin_clusters = list(cfg.twin.clusters)
    sizes = [len(c.nodes) if OmegaConf.is_list(c.nodes) else int(c.nodes) for c in twin_clusters]
    names = [str(c.get("name", f"edge-{i}")) for i, c in enumerate(twin_clusters)]
    node_cluster = [name for name, size in zip(names, sizes) for _ in range(size)]
    per_cluster = cfg.task.kind == "rl" and cfg.task.get("algo") == "qmix"
    clusters: dict[str, list[int]] = {}
    for partition in range(n):
        name = names[partition % len(names)] if per_cluster else node_cluster[partition % len(node_cluster)]
        clusters.setdefault(name, []).append(partition)
    return clusters, {name: str(c.cloud_region) for name, c in zip(names, twin_clusters) if name in clusters}


def check_tree(clusters: dict[str, Any], regions: dict[str, Any], num_clients: int) -> tuple[dict[int, str], dict[str, str]]:
    """Validate the cluster and region lists as one tree; one :class:`ConfigError` for the first problem."""
    cluster_of = _check_clusters(clusters, num_clients)
    both = sorted(set(clusters) & set(regions))
    _require(not both, f"'{both[0] if both else ''}' is both a cluster and a region: give them distinct names")
    where = "topology.assign.regions"
    for name, members in regions.items():
        _require(isinstance(members, list), f"{where}.{name}={members} is invalid: give a list of clusters")
        _require(len(members) > 0, f"{where}.{name} is empty: every region needs at least one cluster")
    _check_cycles({**regions, **clusters})
    region_of: dict[str, str] = {}
    for name, members in regions.items():
        for member in members:
            _require(member not in regions, f"{where}.{name} lists region '{member}': a region holds clusters")
            _require(member in clusters, f"{where}.{name} lists '{member}', which is no cluster: the clusters "
                     f"are {', '.join(sorted(clusters))}")
            _require(member not in region_of, f"cluster {member} is in two regions, {region_of.get(member)} and "
                     f"{name}: give every cluster one region")
            region_of[member] = name
    orphans = sorted(set(clusters) - set(region_of))
    _require(not orphans, f"cluster(s) {', '.join(orphans)} are in no region: list them in {where}")
    return cluster_of, region_of


def _check_clusters(clusters: dict[str, Any], num_clients: int) -> dict[int, str]:
    """partition -> cluster; every client in exactly one non-empty cluster."""
    where = "topology.assign.clusters"
    cluster_of: dict[int, str] = {}
    for name, members in clusters.items():
        _require(isinstance(members, list), f"{where}.{name}={members} is invalid: give a list of partition ids")
        _require(len(members) > 0, f"{where}.{name} is empty: every cluster needs at least one client")
        for member in members:
            _require(isinstance(member, int) and not isinstance(member, bool),
                     f"{where}.{name} lists {member!r}: a cluster holds partition ids (clients), regions hold clusters")
            _require(0 <= member < num_clients,
                     f"{where}.{name} lists partition {member}: partition ids lie in [0, clients.num={num_clients})")
            _require(member not in cluster_of, f"partition {member} is in two clusters, {cluster_of.get(member)} and "
                     f"{name}: give every client one cluster")
            cluster_of[member] = name
    missing = sorted(set(range(num_clients)) - set(cluster_of))
    _require(not missing, f"partition(s) {', '.join(map(str, missing[:5]))} are in no cluster: list every client "
             f"0..{num_clients - 1} in {where}")
    return cluster_of


def _check_cycles(graph: dict[str, list]) -> None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for child in graph.get(node, []):
            if not isinstance(child, str) or child not in graph:
                continue
            if state.get(child) == 1:
                cycle = path[path.index(child):] + [child] if child in path else [node, child]
                raise ConfigError(f"the topology has a cycle: {' -> '.join(cycle)}; the assignment must be a tree "
                                  "(clients in clusters, clusters in regions)")
            if child not in state:
                visit(child, [*path, child])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


# ------------------------------------------------------------------ assembly
def network(cfg: DictConfig, devices: list[str] | None = None) -> Network:
    """The tiered network: assignment, links, each client's device link as its LAN port's cap."""
    cluster_of, region_of = assignment(cfg)
    links = {name: Link(float(cfg.topology.links[name].bandwidth_mbps), float(cfg.topology.links[name].rtt_ms))
             for name in LINKS}
    access = {}
    if devices is not None:
        profiles = Fleet.from_config(cfg.devices).profiles
        access = {p: (profiles[d].uplink_mbps, profiles[d].downlink_mbps) for p, d in enumerate(devices)}
    return Network(cluster_of=cluster_of, region_of=region_of, access_mbps=access, **links)


def _codec(cfg: DictConfig):
    from fl_common.compression import CompressionSettings, round_trip

    bits = cfg.compression.quantise_bits
    settings = CompressionSettings(k=float(cfg.compression.k), bits=None if bits is None else int(bits))
    return partial(round_trip, settings=settings)


def _rule(cfg: DictConfig, tier: str, make) -> TierRule:
    rule = cfg.topology.rules[tier]
    compress = tier != "global" and bool(rule.compression)
    return TierRule(make, period=int(rule.period), fraction=float(rule.fraction),
                    deadline_s=None if rule.deadline_s is None else float(rule.deadline_s),
                    codec=_codec(cfg) if compress else None)


def arrange_strategy(cfg: DictConfig, server: Any, devices: list[str] | None, strategy: Strategy) -> Strategy:
    """``strategy`` as the global tier of the configured hierarchy and/or inside
    the rollout guard; unchanged for ``topology=flat rollout=none``."""
    if is_hierarchical(cfg):
        scorer = server.public_scorer()
        tiers = {}
        for tier in cfg.topology.tiers:
            tier_cfg = tier_strategy_config(cfg, tier)
            tiers[tier] = _rule(cfg, tier, partial(build_strategy, tier_cfg, scorer))
        strategy = HierarchicalStrategy(network(cfg, devices), tiers, strategy,
                                        global_rule=_rule(cfg, "global", lambda inner=strategy: inner),
                                        seed=int(cfg.seed), min_clients=int(cfg.clients.min_train))
    if cfg.rollout.enabled:
        if type(server).validation_score is _base_validation_score():
            raise ConfigError(f"rollout={cfg.rollout.name}: task={cfg.task.name} has no validation replay "
                              "(ServerTask.validation_score); use rollout=none")
        r = cfg.rollout
        strategy = RolloutGuard(strategy, server.validation_score, threshold=float(r.threshold), relative=bool(r.relative),
                                mode=str(r.mode), mix_fraction=float(r.mix_fraction))
    return strategy


def _base_validation_score():
    from tasks.base import ServerTask

    return ServerTask.validation_score


class TieredClock(VirtualClock):
    """The round driver's clock when the tiers keep the time: synchronous
    (every reply reaches the strategy, which applies its tiers' deadlines),
    its time the hierarchy's, and a node busy while the hierarchy still has
    its update in flight."""

    def __init__(self, hierarchy: HierarchicalStrategy) -> None:
        self.hierarchy = hierarchy
        super().__init__(None)

    @property
    def now_s(self) -> float:  # type: ignore[override]
        return self.hierarchy.now_s

    @now_s.setter
    def now_s(self, value: float) -> None:
        pass  # the hierarchy's timeline is the clock

    def is_busy(self, node_id: int) -> bool:
        return super().is_busy(node_id) or self.hierarchy.is_busy(node_id)

    def busy_nodes(self, node_ids=()) -> set[int]:
        return super().busy_nodes(node_ids) | {n for n in node_ids if self.hierarchy.is_busy(n)}


def find_hierarchy(strategy: Strategy) -> HierarchicalStrategy | None:
    while strategy is not None and not isinstance(strategy, HierarchicalStrategy):
        strategy = vars(strategy).get("strategy")
    return strategy


def attach_topology(driver: Any) -> None:
    """Give a hierarchy the driver's node -> partition map and its clock (no-op for flat runs)."""
    hierarchy = find_hierarchy(driver.strategy)
    if hierarchy is None:
        return
    hierarchy.node_partition = lambda node: driver.partition_of.get(node, node)
    driver.clock = TieredClock(hierarchy)
