"""The RL task's settings, the twin scenario they imply, and small shared helpers.

Everything a client needs travels in one JSON string (``rl-spec`` in the
message's ConfigRecord), so clients never compose the Hydra config.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from edgesim import Scenario
from edgesim.faults import rescale_faults
from edgesim.scenario import CONF_DIR, PROJECT_DIR

from .density import density_overrides, is_density

PAPER_EPISODE_S = 21_600.0  # paper 001 §5.3: six simulated hours
# Paper 000 Table 3 fault scenarios, by name. Times are fractions of the
# episode so that a short episode keeps the paper's proportions: a 30-minute
# outage is 1/12 of a six-hour run (our episodes are shorter; see the report).
FAULT_SCENARIOS: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "node10": [{"type": "node_failure", "fraction": 0.1, "at": 1 / 3}],
    "node20": [{"type": "node_failure", "fraction": 0.2, "at": 1 / 3}],
    "outage30": [{"type": "cloud_outage", "start": 0.5, "duration": 1800 / PAPER_EPISODE_S}],
    "outage60": [{"type": "cloud_outage", "start": 0.5, "duration": 3600 / PAPER_EPISODE_S}],
    "loss10": [{"type": "packet_loss", "rate": 0.1}],
    "loss20": [{"type": "packet_loss", "rate": 0.2}],
}
# "No shield" ablation: the twin always enforces physical limits (slots,
# failed nodes, thermal cap); what paper 001 calls the shield's policy guards
# (migration rate cap, cloud capacity margin, power budgets) are lifted.
NO_SHIELD_OVERRIDES: dict[str, dict[str, float]] = {
    "shield": {"migration_cap_per_min": 1e6, "cloud_margin": 1.0},
    "power": {"node_cap_w": 1e6, "gpu_cap_w": 1e6},
}
FORECAST_HORIZON = 3  # forecast slots in an observation (3 x 300-s intervals, as the MPC)
FORECAST_SEASON = 288  # one day of 300-s intervals (seasonal-naive forecaster)


@dataclass(frozen=True)
class RLSpec:
    """What an RL client needs: the twin, the agent and its hyper-parameters.

    Attributes
    ----------
    algo : str
        ``ppo`` (one edge site per client) or ``qmix`` (one cluster per client).
    scenario : str
        The twin's name (``twin.name``; a ``conf/twin/*.yaml`` option).
    episode_s : float
        Simulated seconds per episode (faults keep their relative times).
    steps_per_round : int
        Environment steps each client collects per round.
    num_clients : int
    seed : int
    federated : bool
        False: clients keep their own weights across rounds (no aggregation
        reaches them), the non-federated MARL arm.
    personal_head : bool
        PPO: the policy's and value's output layers stay local.
    local_mixer : bool
        QMIX: the mixing network stays local; only agent networks are federated.
    mixer : str
        ``qmix`` or ``vdn``.
    use_forecast : bool
        Observations carry a forecast of the next intervals' demand.
    forecaster : str
        ``seasonal-naive`` (one day) or ``federated:<MLflow run id>`` (a
        trained forecasting run, ``task=bitbrains``). The server loads the
        latter and ships it in every message (:func:`forecaster_payload`).
    shield : bool
        False lifts the shield's policy guards (:data:`NO_SHIELD_OVERRIDES`).
    faults : str
        ``default`` (the scenario file's faults) or a :data:`FAULT_SCENARIOS` name.
    background : str
        Nodes no agent controls: ``heuristic`` (threshold autoscaler) or ``hold``.
    eval_seeds : tuple of int
        Held-out twin seeds of the server's evaluation episodes.
    hidden : int
        Width of the two hidden layers of every MLP.
    centralised : bool
        C-ML (paper 000): one learner (the run's single client) pools the
        experience of ``sites`` edge sites into each update; the server
        deploys that one model on all of them. PPO only.
    sites : int
        Edge sites the centralised learner trains on and drives (0: ``num_clients``).
    edge_only : bool
        E-ML (paper 000): the agents' actions never offload to the cloud.
    twin : str, optional
        The run's composed ``twin`` config (JSON, the ``conf/twin/`` group with
        its ``twin.*`` overrides); None: ``conf/twin/<scenario>.yaml`` as it is.
    devices : str, optional
        The run's ``devices`` config (JSON): the twin's device profiles and
        mix, so ``devices.*`` overrides reach the twin (None: the twin file's).
    trace_dir : str, optional
        Absolute trace folder replacing the twin file's (the launcher stages
        the app elsewhere, where the file's relative path would not resolve).
    hyper : dict
        Algorithm hyper-parameters (``conf/task/<algo>.yaml``).
    control : str, optional
        The task's ``control`` block as JSON when enabled (paper 001's ESA/COA
        hierarchy, :mod:`edgesim.control`); None: the plain twin.
    """

    algo: str = "ppo"
    scenario: str = "bitbrains"
    episode_s: float = 288.0
    steps_per_round: int = 1024
    num_clients: int = 4
    seed: int = 0
    federated: bool = True
    personal_head: bool = False
    local_mixer: bool = True
    mixer: str = "qmix"
    use_forecast: bool = True
    forecaster: str = "seasonal-naive"
    shield: bool = True
    faults: str = "default"
    background: str = "heuristic"
    eval_seeds: tuple[int, ...] = (10_000, 10_001)
    hidden: int = 64
    centralised: bool = False
    sites: int = 0
    edge_only: bool = False
    hyper: dict[str, float] = field(default_factory=dict)
    trace_dir: str | None = None
    devices: str | None = None
    twin: str | None = None
    control: str | None = None

    @classmethod
    def from_config(cls, cfg) -> "RLSpec":
        from omegaconf import OmegaConf

        task = cfg.task
        return cls(
            algo=str(task.algo),
            scenario=str(cfg.twin.name),
            twin=json.dumps(OmegaConf.to_container(cfg.twin, resolve=True), sort_keys=True),
            episode_s=float(task.episode_s),
            steps_per_round=int(task.steps_per_round),
            num_clients=int(cfg.clients.num),
            seed=int(cfg.seed),
            federated=bool(task.federated),
            # each algorithm's YAML sets only its own switches (ppo: personal_head; qmix: mixer, local_mixer)
            personal_head=bool(task.personal_head) if task.algo == "ppo" else False,
            local_mixer=bool(task.local_mixer) if task.algo == "qmix" else False,
            mixer=str(task.mixer) if task.algo == "qmix" else "qmix",
            use_forecast=bool(task.use_forecast),
            forecaster=str(task.forecaster),
            shield=bool(task.shield),
            faults=str(task.faults),
            background=str(task.background),
            eval_seeds=tuple(int(s) for s in task.eval_seeds),
            hidden=int(task.hidden),
            centralised=bool(task.get("centralised", False)),
            sites=int(task.get("sites", 0) or 0),
            edge_only=bool(task.get("edge_only", False)),
            hyper={k: float(v) for k, v in OmegaConf.to_container(task.hyper, resolve=True).items()},
            trace_dir=str(task.trace_dir) if task.trace_dir else None,
            devices=json.dumps(OmegaConf.to_container(cfg.devices, resolve=True), sort_keys=True),
            control=_control_json(task),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RLSpec":
        raw = json.loads(text)
        raw["eval_seeds"] = tuple(raw["eval_seeds"])
        return cls(**raw)

    @property
    def agent_sites(self) -> int:
        """Sites driven by learned agents: every client's, or the centralised learner's ``sites``."""
        return (self.sites or self.num_clients) if self.centralised else self.num_clients

    @property
    def horizon(self) -> int:
        return FORECAST_HORIZON if self.use_forecast else 0


def _control_json(task) -> str | None:
    from omegaconf import OmegaConf

    block = task.get("control")
    if block is None or not block.get("enabled", False):
        return None
    return json.dumps(OmegaConf.to_container(block, resolve=True), sort_keys=True)


def control_config(spec: RLSpec):
    """The spec's :class:`edgesim.control.ControlConfig`, or None when the hierarchy is off."""
    if spec.control is None:
        return None
    from edgesim.control import ControlConfig

    return ControlConfig.from_dict(json.loads(spec.control))


def prior_weight(spec: RLSpec) -> float | None:
    """beta of the hybrid arm's MPC prior (added to logits / Q-values), None without one."""
    control = control_config(spec)
    return control.prior_weight if control is not None and control.hybrid else None


def _twin_config(name: str, twin: str | None) -> dict[str, Any]:
    """The composed twin config (JSON), or ``conf/twin/<name>.yaml`` as it is."""
    if twin is not None:
        return json.loads(twin)
    import yaml

    path = CONF_DIR / "twin" / f"{name}.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def scenario_overrides(name: str, episode_s: float, faults: str, shield: bool,
                       trace_dir: str | None = None, devices: str | None = None,
                       twin: str | None = None) -> dict[str, Any]:
    """``load_scenario`` overrides for an episode length, a fault set, the shield switch, the traces
    and the run's device profiles (``devices``: the devices config as JSON)."""
    raw = _twin_config(name, twin)
    overrides: dict[str, Any] = {"episode_s": episode_s}
    workload = raw.get("workload", {})
    if workload.get("source") == "trace":  # no traces here: the synthetic workload, as scripts/twin_baselines
        folder = Path(trace_dir or workload.get("trace_dir") or "")
        folder = folder if folder.is_absolute() else PROJECT_DIR / folder
        overrides["workload"] = {"trace_dir": str(folder)} if folder.is_dir() else {"source": "synthetic"}
    if is_density(faults):
        overrides.update(density_overrides(faults, raw))
    elif faults == "default":
        overrides["faults"] = rescale_faults(raw.get("faults") or [], episode_s / float(raw.get("episode_s", episode_s)))
    else:
        overrides["faults"] = fault_list(faults, episode_s, float(raw.get("step_s", 1.0)))
    if not shield:
        overrides.update(NO_SHIELD_OVERRIDES)
    if devices is not None:
        overrides["devices"] = json.loads(devices)
    return overrides


def site_node(scenario: Scenario, site: int) -> int:
    """The edge node of PPO site ``site``: node ``site``, or in a regions twin the sites
    dealt round-robin over the regions (site 0 = region 0's first node, site 1 = region 1's,
    ...), so that a few sites cover every region at any density."""
    if scenario.regions is None:
        return site
    sizes = np.diff(np.append(scenario.nodes.cluster_start, scenario.num_nodes))
    order = [start + rank for rank in range(int(sizes.max()))
             for start, size in zip(scenario.nodes.cluster_start, sizes) if rank < size]
    if not 0 <= site < len(order):
        raise ValueError(f"site {site} is not an edge site: the twin has {len(order)} nodes")
    return int(order[site])


def edge_only_menu(menu: np.ndarray) -> np.ndarray:
    """The discrete menu with every cloud share removed (E-ML: what went to the cloud stays local)."""
    menu = menu.copy()
    menu[:, 3] = -1.0  # env encoding: weight (x + 1) / 2 = 0; an all-zero placement means local
    return menu


def fault_list(name: str, episode_s: float, step_s: float) -> list[dict[str, Any]]:
    """The twin's fault entries of a :data:`FAULT_SCENARIOS` scenario for this episode."""
    if name not in FAULT_SCENARIOS:
        raise ValueError(f"unknown fault scenario {name!r}: use default or one of {', '.join(FAULT_SCENARIOS)}")
    out = []
    for fault in FAULT_SCENARIOS[name]:
        if fault["type"] == "node_failure":
            out.append({"type": "node_failure", "fraction": fault["fraction"],
                        "at_step": int(fault["at"] * episode_s / step_s)})
        elif fault["type"] == "cloud_outage":
            out.append({"type": "cloud_outage", "start_s": fault["start"] * episode_s,
                        "duration_s": max(step_s, fault["duration"] * episode_s)})
        else:
            out.append(dict(fault))
    return out


@lru_cache(maxsize=16)
def _scenario_cached(name: str, episode_s: float, faults: str, shield: bool, trace_dir: str | None,
                     devices: str | None, twin: str | None) -> Scenario:
    config = {**_twin_config(name, twin)}
    for key, value in scenario_overrides(name, episode_s, faults, shield, trace_dir, devices, twin).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):  # one level deep, as load_scenario
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return Scenario.from_dict(config)


def build_scenario(spec: RLSpec, faults: str | None = None) -> Scenario:
    """The twin scenario of ``spec`` (optionally with another fault set)."""
    return _scenario_cached(spec.scenario, float(spec.episode_s), faults or spec.faults, bool(spec.shield),
                            spec.trace_dir, spec.devices, spec.twin)


SEASONAL_NAIVE = "seasonal-naive"
FEDERATED_PREFIX = "federated:"
_INSTALLED: dict[str, Any] = {}  # "federated:<run id>" -> TrainedForecaster, per process


def check_forecaster_name(name: str) -> None:
    if name != SEASONAL_NAIVE and not (name.startswith(FEDERATED_PREFIX) and len(name) > len(FEDERATED_PREFIX)):
        raise ValueError(f"task.forecaster={name} is unknown: use {SEASONAL_NAIVE} or "
                         f"{FEDERATED_PREFIX}<MLflow run id of a task=bitbrains run>")


def forecaster_payload(spec: RLSpec, tracking_uri: str) -> bytes | None:
    """Server side: the trained forecaster of ``spec`` as bytes for the clients (None: nothing to ship).

    Clients get the weights in the message rather than reading MLflow, so
    SuperNodes on other machines work too; ~90 kB for the TCN.
    """
    if not spec.use_forecast or spec.forecaster == SEASONAL_NAIVE:
        return None
    from tasks.forecast.trained import load_from_mlflow

    trained = load_from_mlflow(spec.forecaster[len(FEDERATED_PREFIX):], tracking_uri)
    if trained.horizon < FORECAST_HORIZON:
        raise ValueError(f"task.forecaster={spec.forecaster} predicts {trained.horizon} steps; the observations "
                         f"need {FORECAST_HORIZON}: train it with task.horizon>={FORECAST_HORIZON}")
    _INSTALLED[spec.forecaster] = trained
    return trained.to_bytes()


def install_forecaster(spec: RLSpec, payload: bytes | None) -> None:
    """Client side: make ``spec``'s trained forecaster available to :func:`forecast_fn` (once per process)."""
    if payload is None or spec.forecaster in _INSTALLED:
        return
    from tasks.forecast.trained import TrainedForecaster

    _INSTALLED[spec.forecaster] = TrainedForecaster.from_bytes(payload)


def forecast_fn(spec: RLSpec) -> Callable | None:
    """The observation's forecaster: seasonal-naive over one day (as the MPC baseline), a trained one, or none."""
    if not spec.use_forecast:
        return None
    if spec.forecaster == SEASONAL_NAIVE:
        from edgesim.baselines import seasonal_naive_fn

        return seasonal_naive_fn(FORECAST_HORIZON, FORECAST_SEASON)
    if spec.forecaster not in _INSTALLED:
        raise ValueError(f"task.forecaster={spec.forecaster} was not shipped with the message "
                         "(forecaster_payload on the server, install_forecaster on the client)")
    return _INSTALLED[spec.forecaster].forecast_fn(FORECAST_HORIZON)


def background_policy(spec: RLSpec):
    """What drives the nodes no agent controls."""
    from edgesim.baselines import HoldPolicy, ThresholdAutoscaler

    if spec.background == "hold":
        return HoldPolicy()
    return ThresholdAutoscaler()


def mlp(inputs: int, hidden: int, outputs: int | None = None, activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """Two hidden layers of ``hidden`` units (the trunk), plus a linear output if ``outputs``."""
    layers: list[nn.Module] = [nn.Linear(inputs, hidden), activation(), nn.Linear(hidden, hidden), activation()]
    if outputs is not None:
        layers.append(nn.Linear(hidden, outputs))
    return nn.Sequential(*layers)


def seed_everything(seed: int) -> np.random.Generator:
    """Seed torch and return a numpy generator (clients run one at a time per process)."""
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def check_hyper(spec: RLSpec) -> None:
    """Every ``task.hyper`` key must be one the algorithm knows (``ValueError`` naming it)."""
    from tasks.rl import ppo, qmix

    (ppo.PPOHyper if spec.algo == "ppo" else qmix.QMixHyper).from_dict(spec.hyper)


def hyper_from_dict(cls, values: dict[str, float], algo: str, integers: tuple[str, ...]):
    """``cls(**values)`` for a hyper-parameter dataclass, rejecting unknown keys
    (``task.hyper.lamda`` must not be ignored) and casting the integer ones."""
    fields = cls.__dataclass_fields__
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"task.hyper.{unknown[0]} is unknown for {algo}: valid keys are "
                         f"{', '.join(fields)} (conf/task/{algo}.yaml)")
    return cls(**{k: int(v) if k in integers else v for k, v in values.items()})
