"""Scenario: every parameter of one twin experiment, validated once.

A :class:`Scenario` is built from a plain dict (or a ``conf/twin/*.yaml``
file, or a Hydra ``twin`` node) by :meth:`Scenario.from_dict`. Every check
happens here, so the twin itself never meets a bad value: a negative RTT, an
unknown fault type or a typo in a key is one :class:`EdgeSimError` naming the
value and the fix.

Device profiles (throughput, memory, power) come from the devices config
(``conf/devices/mixed.yaml``) through :class:`edgesim.devices.Fleet`; the
network figures default to paper 001 §5.3 (intra-cluster RTT 5-15 ms,
edge<->cloud 20-40 ms, jitter up to 2x) and the shield caps to paper 001
§4.1/§5.3 (migration-rate cap 2/min per service, node power caps 160-220 W,
GPU caps 120-180 W). Numbers the papers do not give are marked "our choice"
in ``conf/twin/*.yaml``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import EdgeSimError
from .errors import no_unknown_keys as _no_unknown_keys
from .fairness import parse_fairness
from .regions import cluster_configs, parse_regions

PROJECT_DIR = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_DIR / "conf"

FAULT_TYPES = ("node_failure", "cloud_outage", "packet_loss")
WORKLOAD_SOURCES = ("trace", "synthetic", "constant")
ACCELERATORS = ("gpu", "cpu")
SCALE_TO = ("cluster_mean", "node")


# ---------------------------------------------------------------- sections


@dataclass(frozen=True)
class ClusterSpec:
    """One edge cluster: its nodes' device profiles and its home cloud region."""

    name: str
    nodes: tuple[str, ...]
    cloud_region: str


@dataclass(frozen=True)
class CloudRegionSpec:
    """One cloud region: ``instances`` machines of one device profile."""

    name: str
    profile: str
    instances: int


@dataclass(frozen=True)
class NetworkSpec:
    """RTT ranges (ms, base RTT of a link drawn uniformly per episode), the
    jitter factor (each step multiplies a link's RTT by U(1, jitter_max)),
    link bandwidth, payload sizes and the retransmission timeout."""

    intra_cluster_rtt_ms: tuple[float, float] = (5.0, 15.0)
    edge_cloud_rtt_ms: tuple[float, float] = (20.0, 40.0)
    jitter_max: float = 2.0
    bandwidth_mbps: float = 300.0
    request_kb: float = 100.0
    response_kb: float = 20.0
    rto_ms: float = 200.0


@dataclass(frozen=True)
class ServiceSpec:
    """The one replicated service: work per request and replica sizing.

    A node's full service rate is ``peak_tflops * utilisation / request_gflop``
    requests/s; a replica is a 1/``max_replicas_per_node`` slice of it.
    """

    request_gflop: float = 1.0
    max_replicas_per_node: int = 4
    replica_memory_gb: float = 1.0
    initial_replicas: int = 1
    startup_s: float = 5.0
    queue_capacity: float = 1000.0
    timeout_s: float = 10.0
    host_cpu_share: float = 0.25


@dataclass(frozen=True)
class CostSpec:
    per_cloud_request_usd: float = 1e-5
    per_gb_egress_usd: float = 0.09


@dataclass(frozen=True)
class PowerSpec:
    """Caps on a node's worst-case power and on its accelerator's dynamic
    power; ``replica_static_share`` of a replica's dynamic power is drawn
    while it is provisioned, busy or not."""

    node_cap_w: float = 200.0
    gpu_cap_w: float = 150.0
    replica_static_share: float = 0.3


@dataclass(frozen=True)
class ThermalSpec:
    """First-order thermal model: T relaxes towards ``ambient + R * P`` with
    time constant ``tau_s``; R is set per profile so that full active power
    settles at ``full_load_c``; the shield keeps T <= ``max_c``."""

    ambient_c: float = 25.0
    full_load_c: float = 95.0
    max_c: float = 85.0
    tau_s: float = 120.0


@dataclass(frozen=True)
class ShieldSpec:
    migration_cap_per_min: int = 2
    max_replica_step: int = 2
    cloud_margin: float = 0.9


@dataclass(frozen=True)
class WorkloadSpec:
    """Where arrivals come from.

    ``trace``: GWA-T-12 CPU % of one VM per node, scaled so the node's mean
    arrival rate is ``mean_load`` x its capacity reference (``scale_to``);
    ``synthetic``: the same from :func:`fl_datasets.synthetic.synthetic_workload`;
    ``constant``: ``rate_rps`` at every node (tests, what-if runs).
    """

    source: str = "synthetic"
    trace_dir: str | None = None
    profile: str = "medium"
    mean_load: float = 0.5
    burst_cap: float = 4.0
    scale_to: str = "cluster_mean"
    interval_s: int = 300
    history_intervals: int = 576
    start: str | int = "random"
    rate_rps: float = 10.0
    poisson: bool = True


@dataclass(frozen=True)
class NodeFailure:
    """``round(fraction * edge nodes)`` nodes (seeded choice) go down at
    ``at_step`` for ``duration_s`` (None: until the episode ends)."""

    fraction: float
    at_step: int
    duration_s: float | None = None


@dataclass(frozen=True)
class CloudOutage:
    """Cloud regions (all, or the named ones) are down in [start_s, start_s + duration_s)."""

    start_s: float
    duration_s: float
    regions: tuple[str, ...] | None = None


@dataclass(frozen=True)
class PacketLoss:
    """Each edge<->cloud transfer is lost with probability ``rate``: one loss
    costs a retransmission timeout, two in a row drop the request."""

    rate: float


Fault = NodeFailure | CloudOutage | PacketLoss


@dataclass(frozen=True)
class RewardSpec:
    """Weights of the per-node reward (each term normalised to [0, 1])."""

    slo: float = 1.0
    energy: float = 0.1
    cost: float = 0.1


# ---------------------------------------------------------------- the node table


@dataclass(frozen=True, eq=False)
class NodeTable:
    """Per-edge-node constants as arrays (index = global node id).

    Attributes
    ----------
    cluster : (N,) int
        Cluster index of each node.
    profile : tuple of str
        Device profile name of each node.
    full_rate : (N,) float
        Service rate of the whole node, requests/s.
    replica_rate : (N,) float
        Service rate of one replica, requests/s.
    slots : (N,) int
        Replicas a node can hold (compute slices that fit in memory).
    idle_w, active_w : (N,) float
        Power at idle and at full load, W.
    gpu : (N,) bool
        Whether the node's compute is an accelerator (GPU utilisation) or CPU.
    thermal_r : (N,) float
        Thermal resistance, degC per W.
    neighbours : (N, N) bool
        Same cluster, not the node itself.
    """

    cluster: np.ndarray
    profile: tuple[str, ...]
    full_rate: np.ndarray
    replica_rate: np.ndarray
    slots: np.ndarray
    idle_w: np.ndarray
    active_w: np.ndarray
    gpu: np.ndarray
    thermal_r: np.ndarray
    neighbours: np.ndarray
    cluster_start: np.ndarray  # first node of each cluster (for np.add.reduceat)
    region: np.ndarray  # home cloud region index of each cluster, (C,)


# ---------------------------------------------------------------- the scenario


@dataclass(frozen=True, eq=False)
class Scenario:
    """A validated twin experiment; build it with :meth:`from_dict` or :func:`load_scenario`."""

    name: str
    step_s: float
    episode_steps: int
    slo_ms: float
    clusters: tuple[ClusterSpec, ...]
    cloud_regions: tuple[CloudRegionSpec, ...]
    profiles: Mapping[str, Any]  # name -> edgesim.devices.DeviceProfile
    accelerators: Mapping[str, str]
    device_utilisation: float
    network: NetworkSpec = field(default_factory=NetworkSpec)
    service: ServiceSpec = field(default_factory=ServiceSpec)
    cost: CostSpec = field(default_factory=CostSpec)
    power: PowerSpec = field(default_factory=PowerSpec)
    thermal: ThermalSpec = field(default_factory=ThermalSpec)
    shield: ShieldSpec = field(default_factory=ShieldSpec)
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    faults: tuple[Fault, ...] = ()
    reward: RewardSpec = field(default_factory=RewardSpec)
    fairness: Any = None  # edgesim.fairness.FairnessSpec (lambda 0: no fairness term)
    regions: Any = None  # edgesim.regions.RegionLayout when the clusters come from regions

    # -- derived ------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return sum(len(c.nodes) for c in self.clusters)

    @property
    def episode_s(self) -> float:
        return self.episode_steps * self.step_s

    @property
    def startup_steps(self) -> int:
        """Steps a new replica takes before it serves (cold start)."""
        return math.ceil(self.service.startup_s / self.step_s - 1e-9)

    @property
    def max_age_steps(self) -> int:
        """Steps a request may wait in a queue before it times out (>= 1)."""
        return max(1, math.ceil(self.service.timeout_s / self.step_s - 1e-9))

    def node_rate(self, profile_name: str) -> float:
        """Requests/s one whole device of ``profile_name`` serves."""
        profile = self.profiles[profile_name]
        return profile.peak_tflops * 1e3 * self.device_utilisation / self.service.request_gflop

    @cached_property
    def nodes(self) -> NodeTable:
        names = tuple(p for c in self.clusters for p in c.nodes)
        cluster = np.repeat(np.arange(len(self.clusters)), [len(c.nodes) for c in self.clusters])
        max_rep = self.service.max_replicas_per_node
        full_rate = np.array([self.node_rate(p) for p in names])
        memory_slots = np.array([math.floor(self.profiles[p].memory_gb / self.service.replica_memory_gb) for p in names])
        active_w = np.array([float(self.profiles[p].active_w) for p in names])
        region_index = {r.name: i for i, r in enumerate(self.cloud_regions)}
        return NodeTable(
            cluster=cluster,
            profile=names,
            full_rate=full_rate,
            replica_rate=full_rate / max_rep,
            slots=np.minimum(memory_slots, max_rep).astype(np.int64),
            idle_w=np.array([float(self.profiles[p].idle_w) for p in names]),
            active_w=active_w,
            gpu=np.array([self.accelerators[p] == "gpu" for p in names]),
            thermal_r=(self.thermal.full_load_c - self.thermal.ambient_c) / np.maximum(active_w, 1e-9),
            neighbours=(cluster[:, None] == cluster[None, :]) & ~np.eye(len(names), dtype=bool),
            cluster_start=np.concatenate(([0], np.cumsum([len(c.nodes) for c in self.clusters])[:-1])),
            region=np.array([region_index[c.cloud_region] for c in self.clusters]),
        )

    @cached_property
    def cloud_rate(self) -> np.ndarray:
        """Requests/s each cloud region serves when up, (R,)."""
        return np.array([r.instances * self.node_rate(r.profile) for r in self.cloud_regions])

    # -- construction -------------------------------------------------------
    @classmethod
    def from_dict(cls, config: Mapping[str, Any], devices: Mapping[str, Any] | None = None) -> "Scenario":
        """Validate a twin config (plain dict, YAML mapping or OmegaConf node).

        Parameters
        ----------
        config : mapping
            The ``twin`` config (see ``conf/twin/synthetic.yaml``).
        devices : mapping, optional
            The ``devices`` config node; default: ``config["devices"]``, either
            an inline mapping or the name of a ``conf/devices/<name>.yaml`` file.

        Raises
        ------
        EdgeSimError
            On the first invalid value, naming it and the fix.
        """
        return _parse(_plain(config), _plain(devices) if devices is not None else None)


def load_scenario(path_or_name: str | Path, overrides: Mapping[str, Any] | None = None) -> Scenario:
    """Read ``conf/twin/<name>.yaml`` (or a YAML path) and validate it.

    ``overrides`` is merged into the top level (one level deep for sections),
    e.g. ``{"episode_s": 600, "workload": {"source": "synthetic"}}``.
    """
    import yaml

    path = Path(path_or_name)
    if not path.suffix:
        path = CONF_DIR / "twin" / f"{path_or_name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in (CONF_DIR / "twin").glob("*.yaml"))
        raise EdgeSimError(f"twin config {path} not found: use one of {options} or a path to a YAML file")
    config = yaml.safe_load(path.read_text()) or {}
    for key, value in (overrides or {}).items():
        if isinstance(value, Mapping) and isinstance(config.get(key), Mapping):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return Scenario.from_dict(config)


# ---------------------------------------------------------------- parsing

_TOP_KEYS = (
    "name", "devices", "step_s", "episode_s", "slo_ms", "clusters", "cloud_regions", "accelerators",
    "layout_seed", "network", "service", "cost", "power", "thermal", "shield", "workload", "faults", "reward",
    "fairness", "regions",
)  # fmt: skip


def _plain(config: Any) -> Any:
    """OmegaConf nodes to plain containers; anything else unchanged."""
    if config is not None and type(config).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(config, resolve=True)
    return config


def _parse(config: Mapping[str, Any], devices: Mapping[str, Any] | None) -> Scenario:
    if not isinstance(config, Mapping):
        raise EdgeSimError(f"twin config must be a mapping, got {type(config).__name__}: pass a dict or a YAML file")
    _no_unknown_keys(config, _TOP_KEYS, "twin")
    fleet = _fleet(devices if devices is not None else config.get("devices", "mixed"))
    step_s = _number(config, "step_s", "twin", default=1.0, positive=True)
    episode_s = _number(config, "episode_s", "twin", default=3600.0, positive=True)
    episode_steps = _whole_multiple(episode_s, step_s, "twin.episode_s", "twin.step_s")
    regions = _cloud_regions(config.get("cloud_regions"), fleet)
    layout, cluster_config = _regions(config, fleet)
    clusters = _clusters(cluster_config, fleet, regions, config.get("layout_seed", 0))
    used = {p for c in clusters for p in c.nodes} | {r.profile for r in regions}
    accelerators = _accelerators(config.get("accelerators"), used)
    scenario = Scenario(
        name=str(config.get("name", "twin")),
        step_s=step_s,
        episode_steps=episode_steps,
        slo_ms=_number(config, "slo_ms", "twin", default=150.0, positive=True),
        clusters=clusters,
        cloud_regions=regions,
        profiles={name: fleet.profiles[name] for name in sorted(used)},
        accelerators=accelerators,
        device_utilisation=fleet.utilisation,
        network=_network(config.get("network")),
        service=_service(config.get("service")),
        cost=_section(config.get("cost"), CostSpec, "twin.cost", nonneg=("per_cloud_request_usd", "per_gb_egress_usd")),
        power=_power(config.get("power")),
        thermal=_thermal(config.get("thermal")),
        shield=_shield(config.get("shield")),
        workload=_workload(config.get("workload"), step_s),
        faults=(),
        reward=_section(config.get("reward"), RewardSpec, "twin.reward", nonneg=("slo", "energy", "cost")),
        fairness=parse_fairness(config.get("fairness")),
        regions=layout,
    )
    _check_cross(scenario)
    faults = _faults(config.get("faults"), scenario)
    object.__setattr__(scenario, "faults", faults)
    return scenario


def _regions(config: Mapping[str, Any], fleet: Any) -> tuple[Any, Any]:
    """``(RegionLayout, clusters config)``: regions expand into one cluster each (paper 000 Table 2)."""
    if config.get("regions") is None:
        return None, config.get("clusters")
    if config.get("clusters") is not None:
        raise EdgeSimError("twin config gives both clusters and regions: give regions (one cluster per region) "
                           "or clusters, not both")
    layout = parse_regions(config["regions"], set(fleet.profiles))
    return layout, cluster_configs(layout)


def _fleet(devices: Any) -> Any:
    from edgesim.devices import Fleet

    if isinstance(devices, str):
        path = CONF_DIR / "devices" / f"{devices}.yaml"
        if not path.is_file():
            options = sorted(p.stem for p in (CONF_DIR / "devices").glob("*.yaml"))
            raise EdgeSimError(f"twin.devices={devices!r}: no {path}; use one of {options} or an inline mapping")
        import yaml

        devices = yaml.safe_load(path.read_text())
    if not isinstance(devices, Mapping):
        raise EdgeSimError(f"twin.devices must be a profile-config name or mapping, got {devices!r}")
    try:
        return Fleet.from_config(devices)
    except (KeyError, TypeError, ValueError) as err:
        raise EdgeSimError(f"twin.devices is invalid: {err}") from err


def _number(
    config: Mapping[str, Any],
    key: str,
    where: str,
    default: float | None = None,
    positive: bool = False,
    nonneg: bool = False,
    low: float | None = None,
    high: float | None = None,
    integer: bool = False,
) -> Any:
    value = config.get(key, default)
    path = f"{where}.{key}"
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EdgeSimError(f"{path}={value!r} is not a finite number: set it to a number")
    if integer and value != int(value):
        raise EdgeSimError(f"{path}={value} must be a whole number")
    if positive and value < 0:
        raise EdgeSimError(f"{path}={value} is negative: it must be > 0")
    if positive and value == 0:
        raise EdgeSimError(f"{path}={value} is invalid: it must be > 0")
    if nonneg and value < 0:
        raise EdgeSimError(f"{path}={value} is negative: it must be >= 0")
    if low is not None and value < low:
        raise EdgeSimError(f"{path}={value} is below {low}: use a value >= {low}")
    if high is not None and value > high:
        raise EdgeSimError(f"{path}={value} is above {high}: use a value <= {high}")
    return int(value) if integer else float(value)


def _whole_multiple(value: float, step: float, name: str, step_name: str) -> int:
    count = value / step
    if abs(count - round(count)) > 1e-6 or round(count) < 1:
        raise EdgeSimError(f"{name}={value} is not a positive whole multiple of {step_name}={step}: adjust either")
    return int(round(count))


def _section(config: Any, spec: type, where: str, nonneg: tuple[str, ...] = (), positive: tuple[str, ...] = ()) -> Any:
    """A flat numeric section: unknown keys rejected, each value checked."""
    config = {} if config is None else config
    if not isinstance(config, Mapping):
        raise EdgeSimError(f"{where} must be a mapping, got {config!r}")
    keys = tuple(spec.__dataclass_fields__)
    _no_unknown_keys(config, keys, where)
    defaults = spec()
    values = {}
    for key in keys:
        if key in config:
            values[key] = _number(
                config, key, where, nonneg=key in nonneg, positive=key in positive,
                integer=isinstance(getattr(defaults, key), int) and not isinstance(getattr(defaults, key), bool),
            )  # fmt: skip
    return spec(**values)


def _rtt_range(config: Mapping[str, Any], key: str, default: tuple[float, float]) -> tuple[float, float]:
    value = config.get(key, list(default))
    path = f"twin.network.{key}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value, value]
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        raise EdgeSimError(f"{path}={value!r} must be [low, high] in ms (e.g. {list(default)})")
    low, high = (_number({"v": v}, "v", path) for v in value)
    if low < 0 or high < 0:
        raise EdgeSimError(f"{path}={list(value)} has a negative RTT: RTTs must be >= 0 ms (paper 001 §5.3: {list(default)})")
    if low > high:
        raise EdgeSimError(f"{path}={list(value)}: low > high; write the range as [low, high]")
    return (low, high)


def _network(config: Any) -> NetworkSpec:
    config = {} if config is None else config
    if not isinstance(config, Mapping):
        raise EdgeSimError(f"twin.network must be a mapping, got {config!r}")
    keys = tuple(NetworkSpec.__dataclass_fields__)
    _no_unknown_keys(config, keys, "twin.network")
    defaults = NetworkSpec()
    where = "twin.network"
    spec = NetworkSpec(
        intra_cluster_rtt_ms=_rtt_range(config, "intra_cluster_rtt_ms", defaults.intra_cluster_rtt_ms),
        edge_cloud_rtt_ms=_rtt_range(config, "edge_cloud_rtt_ms", defaults.edge_cloud_rtt_ms),
        jitter_max=_number(config, "jitter_max", where, default=defaults.jitter_max, low=1.0),
        bandwidth_mbps=_number(config, "bandwidth_mbps", where, default=defaults.bandwidth_mbps, positive=True),
        request_kb=_number(config, "request_kb", where, default=defaults.request_kb, nonneg=True),
        response_kb=_number(config, "response_kb", where, default=defaults.response_kb, nonneg=True),
        rto_ms=_number(config, "rto_ms", where, default=defaults.rto_ms, nonneg=True),
    )
    return spec


def _service(config: Any) -> ServiceSpec:
    spec = _section(
        config, ServiceSpec, "twin.service",
        nonneg=("initial_replicas", "startup_s", "host_cpu_share"),
        positive=("request_gflop", "max_replicas_per_node", "replica_memory_gb", "queue_capacity", "timeout_s"),
    )  # fmt: skip
    if spec.host_cpu_share > 1:
        raise EdgeSimError(f"twin.service.host_cpu_share={spec.host_cpu_share} must be in [0, 1]")
    if spec.initial_replicas > spec.max_replicas_per_node:
        raise EdgeSimError(
            f"twin.service.initial_replicas={spec.initial_replicas} exceeds max_replicas_per_node="
            f"{spec.max_replicas_per_node}: lower it"
        )
    return spec


def _power(config: Any) -> PowerSpec:
    spec = _section(config, PowerSpec, "twin.power", positive=("node_cap_w", "gpu_cap_w"), nonneg=("replica_static_share",))
    if spec.replica_static_share > 1:
        raise EdgeSimError(f"twin.power.replica_static_share={spec.replica_static_share} must be in [0, 1]")
    return spec


def _thermal(config: Any) -> ThermalSpec:
    spec = _section(config, ThermalSpec, "twin.thermal", positive=("tau_s",))
    if not spec.ambient_c < spec.max_c:
        raise EdgeSimError(f"twin.thermal.max_c={spec.max_c} must be above ambient_c={spec.ambient_c}")
    if not spec.full_load_c > spec.ambient_c:
        raise EdgeSimError(f"twin.thermal.full_load_c={spec.full_load_c} must be above ambient_c={spec.ambient_c}")
    return spec


def _shield(config: Any) -> ShieldSpec:
    spec = _section(
        config, ShieldSpec, "twin.shield", nonneg=("migration_cap_per_min",), positive=("max_replica_step", "cloud_margin")
    )
    if spec.cloud_margin > 1:
        raise EdgeSimError(f"twin.shield.cloud_margin={spec.cloud_margin} must be in (0, 1]")
    return spec


def _workload(config: Any, step_s: float) -> WorkloadSpec:
    config = {} if config is None else config
    if not isinstance(config, Mapping):
        raise EdgeSimError(f"twin.workload must be a mapping, got {config!r}")
    where = "twin.workload"
    _no_unknown_keys(config, tuple(WorkloadSpec.__dataclass_fields__), where)
    defaults = WorkloadSpec()
    source = config.get("source", defaults.source)
    if source not in WORKLOAD_SOURCES:
        raise EdgeSimError(f"{where}.source={source!r} is unknown: use one of {list(WORKLOAD_SOURCES)}")
    trace_dir = config.get("trace_dir")
    if source == "trace":
        if not trace_dir:
            raise EdgeSimError(f"{where}.source='trace' needs {where}.trace_dir (a GWA-T-12 month folder)")
        path = Path(trace_dir)
        path = path if path.is_absolute() else PROJECT_DIR / path
        if not path.is_dir():
            raise EdgeSimError(
                f"{where}.trace_dir={trace_dir!r}: no such directory ({path}); point it at a GWA-T-12 month "
                "folder or set workload.source=synthetic"
            )
        trace_dir = str(path)
    from fl_datasets.synthetic import PROFILES

    profile = config.get("profile", defaults.profile)
    if profile not in PROFILES:
        raise EdgeSimError(f"{where}.profile={profile!r} is unknown: use one of {sorted(PROFILES)}")
    scale_to = config.get("scale_to", defaults.scale_to)
    if scale_to not in SCALE_TO:
        raise EdgeSimError(f"{where}.scale_to={scale_to!r} is unknown: use one of {list(SCALE_TO)}")
    start = config.get("start", defaults.start)
    if not (start == "random" or (isinstance(start, int) and not isinstance(start, bool) and start >= 0)):
        raise EdgeSimError(f"{where}.start={start!r}: use 'random' or an interval index >= 0")
    poisson = config.get("poisson", defaults.poisson)
    if not isinstance(poisson, bool):
        raise EdgeSimError(f"{where}.poisson={poisson!r} must be true or false")
    interval_s = _number(config, "interval_s", where, default=defaults.interval_s, positive=True, integer=True)
    _whole_multiple(interval_s, step_s, f"{where}.interval_s", "twin.step_s")
    return WorkloadSpec(
        source=source,
        trace_dir=trace_dir,
        profile=profile,
        mean_load=_number(config, "mean_load", where, default=defaults.mean_load, nonneg=True),
        burst_cap=_number(config, "burst_cap", where, default=defaults.burst_cap, positive=True),
        scale_to=scale_to,
        interval_s=interval_s,
        history_intervals=_number(
            config, "history_intervals", where, default=defaults.history_intervals, positive=True, integer=True
        ),
        start=start,
        rate_rps=_number(config, "rate_rps", where, default=defaults.rate_rps, nonneg=True),
        poisson=poisson,
    )


def _cloud_regions(config: Any, fleet: Any) -> tuple[CloudRegionSpec, ...]:
    if not isinstance(config, list) or not config:
        raise EdgeSimError(
            f"twin.cloud_regions={config!r}: give a non-empty list of {{name, profile, instances}} "
            "(paper 001 §5.1: two public-cloud regions)"
        )
    regions = []
    for index, region in enumerate(config):
        where = f"twin.cloud_regions[{index}]"
        if not isinstance(region, Mapping):
            raise EdgeSimError(f"{where}={region!r} must be a mapping {{name, profile, instances}}")
        _no_unknown_keys(region, ("name", "profile", "instances"), where)
        profile = _profile_name(region.get("profile"), fleet, f"{where}.profile")
        instances = region.get("instances")
        if isinstance(instances, (int, float)) and not isinstance(instances, bool) and instances < 0:
            raise EdgeSimError(f"{where}.instances={instances} is a negative capacity: use >= 0 machines")
        instances = _number(region, "instances", where, positive=True, integer=True)
        regions.append(CloudRegionSpec(name=str(region.get("name", f"cloud-{index}")), profile=profile, instances=instances))
    _unique([r.name for r in regions], "twin.cloud_regions names")
    return tuple(regions)


def _clusters(config: Any, fleet: Any, regions: tuple[CloudRegionSpec, ...], layout_seed: Any) -> tuple[ClusterSpec, ...]:
    if not isinstance(config, list) or not config:
        raise EdgeSimError(f"twin.clusters={config!r}: give a non-empty list of {{name, nodes, cloud_region}}")
    region_names = [r.name for r in regions]
    counts = [c.get("nodes") if isinstance(c, Mapping) else None for c in config]
    drawn = _draw_profiles(sum(n for n in counts if isinstance(n, int) and not isinstance(n, bool)), fleet, layout_seed)
    clusters = []
    for index, cluster in enumerate(config):
        where = f"twin.clusters[{index}]"
        if not isinstance(cluster, Mapping):
            raise EdgeSimError(f"{where}={cluster!r} must be a mapping {{name, nodes, cloud_region}}")
        _no_unknown_keys(cluster, ("name", "nodes", "cloud_region"), where)
        nodes = cluster.get("nodes")
        if isinstance(nodes, int) and not isinstance(nodes, bool):
            if nodes < 1:
                raise EdgeSimError(f"{where}.nodes={nodes}: a cluster needs at least 1 node")
            nodes, drawn = drawn[:nodes], drawn[nodes:]
        elif isinstance(nodes, list) and nodes:
            nodes = [_profile_name(p, fleet, f"{where}.nodes[{i}]") for i, p in enumerate(nodes)]
        else:
            raise EdgeSimError(f"{where}.nodes={nodes!r}: give a list of device-profile names or a node count")
        region = cluster.get("cloud_region", region_names[index % len(region_names)])
        if region not in region_names:
            raise EdgeSimError(f"{where}.cloud_region={region!r} is not a cloud region: use one of {region_names}")
        clusters.append(ClusterSpec(name=str(cluster.get("name", f"edge-{index}")), nodes=tuple(nodes), cloud_region=region))
    _unique([c.name for c in clusters], "twin.clusters names")
    return tuple(clusters)


def _draw_profiles(count: int, fleet: Any, layout_seed: Any) -> list[str]:
    """Profiles for clusters given as a node count: the devices mix, seeded."""
    if count == 0:
        return []
    if not isinstance(layout_seed, int) or isinstance(layout_seed, bool):
        raise EdgeSimError(f"twin.layout_seed={layout_seed!r} must be an integer")
    return fleet.assign(count, layout_seed)


def _profile_name(name: Any, fleet: Any, where: str) -> str:
    if name not in fleet.profiles:
        raise EdgeSimError(f"{where}={name!r} is not a device profile: use one of {sorted(fleet.profiles)}")
    return str(name)


def _accelerators(config: Any, used: set[str]) -> dict[str, str]:
    config = {} if config is None else config
    if not isinstance(config, Mapping):
        raise EdgeSimError(f"twin.accelerators must map profile -> gpu|cpu, got {config!r}")
    accelerators = {}
    for name in sorted(used):
        kind = config.get(name)
        if kind not in ACCELERATORS:
            raise EdgeSimError(
                f"twin.accelerators.{name}={kind!r}: say whether profile {name!r} serves on a 'gpu' or a 'cpu'"
            )
        accelerators[name] = kind
    return accelerators


def _unique(names: list[str], what: str) -> None:
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise EdgeSimError(f"{what} repeat {duplicates}: give each a unique name")


def _check_cross(scenario: Scenario) -> None:
    """Checks that need several sections: caps vs. the profiles in use."""
    thermal, power = scenario.thermal, scenario.power
    for name, profile in scenario.profiles.items():
        if profile.active_w < profile.idle_w:
            raise EdgeSimError(f"profile {name!r}: active_w={profile.active_w} < idle_w={profile.idle_w}; fix the devices config")
        if any(name in c.nodes for c in scenario.clusters):
            if power.node_cap_w < profile.idle_w:
                raise EdgeSimError(
                    f"twin.power.node_cap_w={power.node_cap_w} is below the idle power {profile.idle_w} W of "
                    f"profile {name!r}: raise the cap or drop the profile"
                )
            idle_c = thermal.ambient_c + (thermal.full_load_c - thermal.ambient_c) * profile.idle_w / max(profile.active_w, 1e-9)
            if idle_c > thermal.max_c:
                raise EdgeSimError(
                    f"profile {name!r} settles at {idle_c:.1f} degC when idle, above twin.thermal.max_c="
                    f"{thermal.max_c}: raise max_c or lower full_load_c"
                )


def _faults(config: Any, scenario: Scenario) -> tuple[Fault, ...]:
    config = [] if config is None else config
    if not isinstance(config, list):
        raise EdgeSimError(f"twin.faults={config!r} must be a list of {{type: ..., ...}}")
    faults: list[Fault] = []
    claimed = 0  # nodes already taken by earlier node_failure faults (they are disjoint)
    for index, fault in enumerate(config):
        where = f"twin.faults[{index}]"
        if not isinstance(fault, Mapping) or "type" not in fault:
            raise EdgeSimError(f"{where}={fault!r} needs a 'type', one of {list(FAULT_TYPES)}")
        kind = fault["type"]
        if kind == "node_failure":
            faults.append(_node_failure(fault, where, scenario, claimed))
            claimed += round(faults[-1].fraction * scenario.num_nodes)
        elif kind == "cloud_outage":
            faults.append(_cloud_outage(fault, where, scenario))
        elif kind == "packet_loss":
            _no_unknown_keys(fault, ("type", "rate"), where)
            rate = _number(fault, "rate", where, nonneg=True)
            if rate >= 1:
                raise EdgeSimError(f"{where}.rate={rate} must be in [0, 1): a rate of 1 loses every packet")
            faults.append(PacketLoss(rate=rate))
        else:
            raise EdgeSimError(f"{where}.type={kind!r} is an unknown fault type: use one of {list(FAULT_TYPES)}")
    if sum(isinstance(f, PacketLoss) for f in faults) > 1:
        raise EdgeSimError("twin.faults has more than one packet_loss entry: give one rate")
    return tuple(faults)


def _node_failure(fault: Mapping[str, Any], where: str, scenario: Scenario, claimed: int) -> NodeFailure:
    _no_unknown_keys(fault, ("type", "fraction", "at_step", "duration_s"), where)
    fraction = _number(fault, "fraction", where, low=0.0, high=1.0)
    count = round(fraction * scenario.num_nodes)
    if count < 1:
        raise EdgeSimError(
            f"{where}.fraction={fraction} of {scenario.num_nodes} edge nodes fails no node: "
            f"use at least {1 / scenario.num_nodes:.3g}"
        )
    if claimed + count > scenario.num_nodes:
        raise EdgeSimError(f"{where}: node failures add up to more than the {scenario.num_nodes} edge nodes; lower the fractions")
    at_step = _number(fault, "at_step", where, nonneg=True, integer=True)
    if at_step >= scenario.episode_steps:
        raise EdgeSimError(f"{where}.at_step={at_step} is past the episode ({scenario.episode_steps} steps): "
                           f"use a step in [0, {scenario.episode_steps})")
    duration = fault.get("duration_s")
    if duration is not None:
        duration = _number(fault, "duration_s", where, positive=True)
    return NodeFailure(fraction=fraction, at_step=at_step, duration_s=duration)


def _cloud_outage(fault: Mapping[str, Any], where: str, scenario: Scenario) -> CloudOutage:
    _no_unknown_keys(fault, ("type", "start_s", "duration_s", "regions"), where)
    start = _number(fault, "start_s", where, nonneg=True)
    if start >= scenario.episode_s:
        raise EdgeSimError(f"{where}.start_s={start} is past the episode ({scenario.episode_s} s): start it earlier")
    duration = _number(fault, "duration_s", where, positive=True)
    regions = fault.get("regions")
    if regions is not None:
        names = [r.name for r in scenario.cloud_regions]
        if not isinstance(regions, list) or not regions or any(r not in names for r in regions):
            raise EdgeSimError(f"{where}.regions={regions!r}: list cloud region names from {names} (or omit for all)")
        regions = tuple(regions)
    return CloudOutage(start_s=start, duration_s=duration, regions=regions)
