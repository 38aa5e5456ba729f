"""Fault injection (paper 000 §4.4): node failures, cloud outages, packet loss.

The whole schedule is drawn at reset from the episode's seed, as per-step
masks, so a step only reads one row and the same seed fails the same nodes
at the same steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .scenario import CloudOutage, NodeFailure, PacketLoss, Scenario


@dataclass(frozen=True, eq=False)
class FaultSchedule:
    """Which resources are up at each step.

    Attributes
    ----------
    node_up : numpy.ndarray of bool, shape (T, N)
        Edge node ``n`` is up during step ``t``.
    cloud_up : numpy.ndarray of bool, shape (T, R)
        Cloud region ``r`` is up during step ``t``.
    packet_loss : float
        Probability that one edge<->cloud transfer is lost.
    failed_nodes : tuple of numpy.ndarray
        The nodes each ``node_failure`` fault takes down, in config order.
    node_changes : numpy.ndarray of bool, shape (T,)
        Some node goes down at step ``t`` (lets a step skip the check).
    all_up : numpy.ndarray of bool, shape (T,)
        Every edge node is up during step ``t``.
    """

    node_up: np.ndarray
    cloud_up: np.ndarray
    packet_loss: float
    failed_nodes: tuple[np.ndarray, ...]
    node_changes: np.ndarray
    all_up: np.ndarray


def build_fault_schedule(scenario: Scenario, rng: np.random.Generator) -> FaultSchedule:
    """Draw the episode's faults; node choices come from ``rng``.

    Several ``node_failure`` faults take disjoint node sets, so the capacity
    they remove adds up exactly to their configured fractions.
    """
    steps, nodes, regions = scenario.episode_steps, scenario.num_nodes, len(scenario.cloud_regions)
    node_up = np.ones((steps, nodes), dtype=bool)
    cloud_up = np.ones((steps, regions), dtype=bool)
    packet_loss = 0.0
    failed: list[np.ndarray] = []
    candidates = rng.permutation(nodes)  # failures take nodes from this order, never twice
    taken = 0
    for fault in scenario.faults:
        if isinstance(fault, NodeFailure):
            count = round(fault.fraction * nodes)
            victims = np.sort(candidates[taken : taken + count])
            taken += count
            failed.append(victims)
            node_up[np.ix_(_window(fault.at_step, fault.duration_s, scenario), victims)] = False
        elif isinstance(fault, CloudOutage):
            first = math.floor(fault.start_s / scenario.step_s + 1e-9)
            window = _window(first, fault.duration_s, scenario)
            names = [r.name for r in scenario.cloud_regions]
            hit = range(regions) if fault.regions is None else [names.index(n) for n in fault.regions]
            cloud_up[np.ix_(window, np.array(list(hit)))] = False
        elif isinstance(fault, PacketLoss):
            packet_loss = fault.rate
    previous = np.vstack((np.ones((1, nodes), dtype=bool), node_up[:-1]))
    return FaultSchedule(
        node_up=node_up,
        cloud_up=cloud_up,
        packet_loss=packet_loss,
        failed_nodes=tuple(failed),
        node_changes=(previous & ~node_up).any(axis=1),
        all_up=node_up.all(axis=1),
    )


def _window(first_step: int, duration_s: float | None, scenario: Scenario) -> np.ndarray:
    """Steps ``first_step`` .. for ``duration_s`` (None: to the end), clipped to the episode."""
    if duration_s is None:
        last = scenario.episode_steps
    else:
        last = first_step + math.ceil(duration_s / scenario.step_s - 1e-9)
    return np.arange(first_step, min(last, scenario.episode_steps))


def rescale_faults(faults: list[dict], scale: float) -> list[dict]:
    """Fault entries with their times multiplied by ``scale``: a shortened or
    lengthened episode keeps its faults at the same relative times."""
    rescaled = []
    for fault in faults:
        fault = dict(fault)
        if fault.get("type") == "node_failure":
            fault["at_step"] = int(fault["at_step"] * scale)
        elif fault.get("type") == "cloud_outage":
            fault["start_s"], fault["duration_s"] = fault["start_s"] * scale, fault["duration_s"] * scale
        rescaled.append(fault)
    return rescaled
