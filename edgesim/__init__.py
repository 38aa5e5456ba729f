"""edgesim: a digital twin of the edge-cloud continuum for resource-allocation agents.

Edge clusters of nodes with device profiles (``conf/devices``), cloud regions,
trace-driven arrivals, per-node queues, RTTs with jitter, energy, cloud cost,
SLOs, faults, a safety shield, and Gymnasium / PettingZoo front ends.

Quick start::

    from edgesim import EdgeCloudTwin, load_scenario
    from edgesim.baselines import ThresholdAutoscaler, run_episode

    scenario = load_scenario("synthetic")          # or "bitbrains" (GWA-T-12 traces)
    twin = EdgeCloudTwin(scenario, seed=0)
    metrics = run_episode(twin, ThresholdAutoscaler(), seed=0)
    print(metrics["p95_ms"], metrics["slo_violation_rate"])

    from edgesim.envs import EdgeSiteEnv, ClusterParallelEnv   # gymnasium / pettingzoo
    env = EdgeSiteEnv(scenario, site=0, forecast_fn=None)

Modules: :mod:`~edgesim.scenario` (validated parameters),
:mod:`~edgesim.workload` (arrivals), :mod:`~edgesim.faults`,
:mod:`~edgesim.shield`, :mod:`~edgesim.twin` (the model),
:mod:`~edgesim.metrics`, :mod:`~edgesim.actions` (the action interface),
:mod:`~edgesim.envs`, :mod:`~edgesim.baselines`; paper 001's control
hierarchy: :mod:`~edgesim.control` (ESA/COA cadences, congestion prices,
the MPC prior) with :mod:`~edgesim.auction` and :mod:`~edgesim.modes`.

The environments and baselines are imported on first use:
``from edgesim import EdgeSiteEnv`` works, but ``import edgesim`` alone does
not import gymnasium or pettingzoo.
"""

from __future__ import annotations

from typing import Any

from .actions import AUTO_TARGET, NO_MIGRATION, Action, discrete_menu, encode_env_action
from .errors import EdgeSimError
from .faults import FaultSchedule, build_fault_schedule
from .metrics import DROP_REASONS, EpisodeMetrics, LatencyHistogram
from .scenario import Scenario, load_scenario
from .shield import RULES, SafetyShield
from .twin import EdgeCloudTwin, StepResult, TwinState
from .workload import Workload, build_workload

_LAZY = {
    "EdgeSiteEnv": "envs",
    "ClusterParallelEnv": "envs",
    "ThresholdAutoscaler": "baselines",
    "ForecastMPC": "baselines",
    "HoldPolicy": "baselines",
    "seasonal_naive_fn": "baselines",
    "oracle_fn": "baselines",
    "run_episode": "baselines",
}

__all__ = [
    "AUTO_TARGET", "NO_MIGRATION", "DROP_REASONS", "RULES",
    "Action", "EdgeCloudTwin", "EdgeSimError", "EpisodeMetrics", "FaultSchedule", "LatencyHistogram",
    "SafetyShield", "Scenario", "StepResult", "TwinState", "Workload",
    "build_fault_schedule", "build_workload", "discrete_menu", "encode_env_action", "load_scenario",
    *_LAZY,
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'edgesim' has no attribute {name!r}")
