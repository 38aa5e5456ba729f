"""Scenarios shared by the twin tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgesim import Scenario, load_scenario

PROJECT_DIR = Path(__file__).resolve().parents[2]
GWA_DIR = PROJECT_DIR.parent / "shared" / "data" / "gwa-t-12-rnd" / "2013-8"

requires_gwa = pytest.mark.skipif(
    not GWA_DIR.is_dir(), reason=f"real GWA-T-12 traces not found at {GWA_DIR} (../shared/data absent)"
)

# Two made-up devices with round numbers, so that every figure below can be
# checked by hand: "box" serves 0.01 TFLOPS x 1.0 / 1 GFLOP = 10 requests/s,
# "dc" 1000 requests/s.
TINY_DEVICES: dict[str, Any] = {
    "utilisation": 1.0,
    "mix": {"box": 1.0},
    "profiles": {
        "box": {
            "peak_tflops": 0.01, "memory_gb": 4, "uplink_mbps": 100, "downlink_mbps": 100,
            "rtt_ms": 10, "active_w": 20, "idle_w": 4, "availability": {"model": "always"},
        },
        "dc": {
            "peak_tflops": 1.0, "memory_gb": 64, "uplink_mbps": 1000, "downlink_mbps": 1000,
            "rtt_ms": 1, "active_w": 300, "idle_w": 100, "availability": {"model": "always"},
        },
    },
}  # fmt: skip


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """Cluster A = two boxes, cluster B = one box, one cloud region; constant
    arrivals of 5 requests/s per node without Poisson noise; fixed RTTs."""
    config: dict[str, Any] = {
        "name": "tiny",
        "devices": copy.deepcopy(TINY_DEVICES),
        "step_s": 1.0,
        "episode_s": 10,
        "slo_ms": 150,
        "clusters": [
            {"name": "a", "nodes": ["box", "box"], "cloud_region": "dc"},
            {"name": "b", "nodes": ["box"], "cloud_region": "dc"},
        ],
        "cloud_regions": [{"name": "dc", "profile": "dc", "instances": 1}],
        "accelerators": {"box": "gpu", "dc": "gpu"},
        "network": {
            "intra_cluster_rtt_ms": [10, 10], "edge_cloud_rtt_ms": [30, 30], "jitter_max": 1.0,
            "bandwidth_mbps": 100, "request_kb": 100, "response_kb": 25, "rto_ms": 200,
        },
        "service": {
            "request_gflop": 1.0, "max_replicas_per_node": 1, "replica_memory_gb": 1.0, "initial_replicas": 1,
            "startup_s": 0, "queue_capacity": 100, "timeout_s": 5, "host_cpu_share": 0.25,
        },
        "cost": {"per_cloud_request_usd": 1e-5, "per_gb_egress_usd": 0.09},
        "power": {"node_cap_w": 200, "gpu_cap_w": 150, "replica_static_share": 0.3},
        "thermal": {"ambient_c": 25, "full_load_c": 95, "max_c": 85, "tau_s": 120},
        "shield": {"migration_cap_per_min": 2, "max_replica_step": 2, "cloud_margin": 0.9},
        "workload": {"source": "constant", "rate_rps": 5.0, "poisson": False, "history_intervals": 4, "interval_s": 5},
        "faults": [],
        "reward": {"slo": 1.0, "energy": 0.1, "cost": 0.1},
    }  # fmt: skip
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def tiny(**overrides: Any) -> Scenario:
    return Scenario.from_dict(tiny_config(**overrides))


def synthetic(**overrides: Any) -> Scenario:
    """conf/twin/synthetic.yaml (3 clusters x 4 nodes), with overrides."""
    return load_scenario("synthetic", overrides)


def random_env_rows(rng: np.random.Generator, num_nodes: int, garbage: bool = False) -> np.ndarray:
    """Random env-encoded actions, slightly out of range; with ``garbage``, some NaN."""
    rows = rng.uniform(-1.3, 1.3, size=(num_nodes, 6))
    if garbage and rng.random() < 0.1:
        rows[rng.integers(num_nodes), rng.integers(6)] = np.nan
    return rows
