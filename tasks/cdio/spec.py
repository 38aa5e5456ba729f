"""``task.*`` of the CDIO task, checked, as one JSON-able spec (server and clients build the same twin)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from edgesim.devices import DeviceProfile
from edgesim.inference import HostedModel, InferenceTwin, Links, Server
from tasks.cdio.placement import PlacementSettings
from tasks.cdio.rpp import rpp_flops
from tasks.cdio.versions import DEPLOYMENTS, Measured, load_measured
from tasks.cdio.workload import StreamSettings


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _whole(value: Any, name: str, minimum: int = 1) -> int:
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
           f"{name}={value} is invalid: use a whole number >= {minimum}")
    return int(value)


def _number(value: Any, name: str, low: float, high: float | None = None, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > low if low_open else value >= low) \
        and (high is None or value <= high)
    bound = f"{'>' if low_open else '>='} {low:g}" + ("" if high is None else f" and <= {high:g}")
    _check(ok, f"{name}={value} is invalid: use a number {bound}")
    return float(value)


def _range(value: Any, name: str, low: float, high: float | None) -> tuple[float, float]:
    _check(len(value) == 2, f"{name}={list(value)} is invalid: give [low, high]")
    lo, hi = (_number(v, name, low, high, low_open=True) for v in value)
    _check(lo < hi, f"{name}=[{lo:g}, {hi:g}] is invalid: low must be below high")
    return lo, hi


@dataclass(frozen=True)
class CDIOSpec:
    num_sites: int
    seed: int
    deployment: str
    edge_profile: dict[str, Any]
    cloud_profile: dict[str, Any]
    edge_capacity: int
    cloud_capacity: int
    utilisation: float
    stream: StreamSettings
    train_tasks: int
    holdout_tasks: int
    window: int
    hidden: int
    layers: int
    epochs: int
    batch_size: int
    lr: float
    placement: PlacementSettings
    round_slots: int
    fluctuation: float
    bandwidth_mbps: float
    slot_s: float
    final_study: bool

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "CDIOSpec":
        t = cfg.task
        _check(t.deployment in DEPLOYMENTS, f"task.deployment={t.deployment} is unknown: choose one of "
               f"{', '.join(DEPLOYMENTS)} (v1: cloud ~6x the edge's parameters, v2: ~12x)")
        profiles = cfg.devices.profiles
        for key in ("edge_device", "cloud_device"):
            _check(t[key] in profiles, f"task.{key}={t[key]} is unknown: choose one of {', '.join(sorted(profiles))}")
        s, r, p = t.stream, t.rpp, t.placement
        stream = StreamSettings(frames=_whole(s.frames, "task.stream.frames"),
                                accuracy_req=_range(s.accuracy_req, "task.stream.accuracy_req", 0.0, 1.0),
                                delay_req_ms=_range(s.delay_req_ms, "task.stream.delay_req_ms", 0.0, None),
                                tight_share=tuple(_number(v, "task.stream.tight_share", 0.0, 1.0) for v in s.tight_share))
        _check(len(stream.tight_share) == 2, f"task.stream.tight_share={list(s.tight_share)} is invalid: give [first, last]")
        placement = PlacementSettings(
            slots=_whole(p.slots, "task.placement.slots"),
            tasks_per_site=_whole(p.tasks_per_site, "task.placement.tasks_per_site"),
            frames=stream.frames, cost_weight=_number(p.cost_weight, "task.placement.cost_weight", 0.0, 0.999),
            phi=_number(p.phi, "task.placement.phi", 0.0), exploration=_number(p.exploration, "task.placement.exploration", 0.0),
            threshold_bin=_whole(p.threshold_bin, "task.placement.threshold_bin", 0),
            rpp_s=float(rpp_flops(int(r.hidden), int(r.layers), int(r.window))
                        / (float(profiles[t.edge_device].peak_tflops) * 1e12 * float(cfg.devices.utilisation))))
        spec = cls(
            num_sites=_whole(cfg.clients.num, "clients.num", 2), seed=int(cfg.seed), deployment=str(t.deployment),
            edge_profile=OmegaConf.to_container(profiles[t.edge_device]) | {"name": str(t.edge_device)},
            cloud_profile=OmegaConf.to_container(profiles[t.cloud_device]) | {"name": str(t.cloud_device)},
            edge_capacity=_whole(t.edge_capacity, "task.edge_capacity"),
            cloud_capacity=_whole(t.cloud_capacity, "task.cloud_capacity"),
            utilisation=float(cfg.devices.utilisation), stream=stream,
            train_tasks=_whole(s.train_tasks, "task.stream.train_tasks"),
            holdout_tasks=_whole(s.holdout_tasks, "task.stream.holdout_tasks"),
            window=_whole(r.window, "task.rpp.window"), hidden=_whole(r.hidden, "task.rpp.hidden"),
            layers=_whole(r.layers, "task.rpp.layers"), epochs=_whole(r.epochs, "task.rpp.epochs"),
            batch_size=_whole(r.batch_size, "task.rpp.batch_size"), lr=_number(r.lr, "task.rpp.lr", 0.0, low_open=True),
            placement=placement, round_slots=_whole(p.round_slots, "task.placement.round_slots"),
            fluctuation=_number(p.fluctuation, "task.placement.fluctuation", 0.0, 0.99),
            bandwidth_mbps=_number(profiles[t.edge_device].uplink_mbps if p.bandwidth_mbps is None else p.bandwidth_mbps,
                                   "task.placement.bandwidth_mbps", 0.0, low_open=True),
            slot_s=_number(p.slot_s, "task.placement.slot_s", 0.0, low_open=True), final_study=bool(t.final_study))
        _check(placement.threshold_bin <= 5, f"task.placement.threshold_bin={placement.threshold_bin} is invalid: "
               "the complexity has 5 bins (0..4); use 0..5")
        for length, name in ((spec.train_tasks, "task.stream.train_tasks"), (spec.holdout_tasks, "task.stream.holdout_tasks")):
            _check(length >= spec.window, f"{name}={length} is shorter than task.rpp.window={spec.window}: raise it")
        spec.twin(0.0)  # capacities vs requests: the twin's one clear error
        return spec

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "CDIOSpec":
        raw = json.loads(text)
        raw["stream"] = StreamSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw["stream"].items()})
        raw["placement"] = PlacementSettings(**raw["placement"])
        return cls(**raw)

    def measured(self) -> Measured:
        return load_measured()

    def twin(self, fluctuation: float, measured: Measured | None = None) -> InferenceTwin:
        """The edge sites and the cloud with this deployment's model versions."""
        from edgesim import EdgeSimError

        measured = measured or self.measured()
        edge_name, cloud_name = DEPLOYMENTS[self.deployment]

        def hosted(name: str) -> HostedModel:
            v = measured.versions[name]
            return HostedModel(name=name, flops=v.flops, accuracy=v.accuracy)

        def profile(fields: dict[str, Any]) -> DeviceProfile:
            fields = dict(fields)
            return DeviceProfile.from_dict(fields.pop("name"), fields)

        edge, cloud = profile(self.edge_profile), profile(self.cloud_profile)
        servers = [Server(f"edge-{k}", edge, self.edge_capacity, hosted(edge_name), k) for k in range(self.num_sites)]
        servers.append(Server("cloud", cloud, self.cloud_capacity, hosted(cloud_name), None))
        links = Links(access_mbps=self.bandwidth_mbps, backbone_mbps=self.bandwidth_mbps, fluctuation=fluctuation,
                      cloud_rtt_ms=float(edge.rtt_ms), utilisation=self.utilisation)
        try:
            return InferenceTwin(servers, links, self.placement.tasks_per_site, self.slot_s, 0.0, seed=self.seed)
        except EdgeSimError as err:
            raise ValueError(f"task.edge_capacity={self.edge_capacity} / task.cloud_capacity={self.cloud_capacity} "
                             f"with task.placement.tasks_per_site={self.placement.tasks_per_site}: {err}") from None
