"""Request arrivals per edge node and step, from real traces or the generator.

The demand *envelope* is a rate (requests/s) per node and workload interval
(300 s, the GWA-T-12 sampling period): one VM's CPU % divided by that VM's
mean CPU % (a unit-mean shape, capped at ``burst_cap`` so a VM that idles at
1 % and spikes to 90 % does not become a 90x burst), times ``mean_load`` x the
node's capacity reference (its own full rate, or its cluster's mean full rate
so that small boards see the same demand as big ones and must offload).
Within an interval the rate is constant; each step's arrivals are Poisson
with that rate (seeded), so an interval's mean arrival rate is its envelope
value up to sampling noise.

Forecasters see the envelope's past (before the episode) and the observed
per-interval mean arrivals (during it); the oracle reads the envelope ahead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .errors import EdgeSimError
from .scenario import Scenario

ORACLE_LOOKAHEAD = 48  # intervals of envelope kept past the episode (4 h at 300 s)


@dataclass(frozen=True, eq=False)
class Workload:
    """One episode's demand.

    Attributes
    ----------
    envelope : numpy.ndarray, shape (N, L + E + ORACLE_LOOKAHEAD)
        Arrival rate (requests/s) per node and interval: ``L`` history
        intervals before the episode, ``E`` episode intervals, then lookahead.
    history_intervals : int
        ``L``: index of the episode's first interval in ``envelope``.
    interval_steps : int
        Twin steps per workload interval.
    sites : tuple of str
        Source series of each node (trace VM id, or synthetic site id).
    start_interval : int
        Where the episode starts in the source series (interval index).
    """

    envelope: np.ndarray
    history_intervals: int
    interval_steps: int
    sites: tuple[str, ...]
    start_interval: int

    def step_rates(self, episode_steps: int) -> np.ndarray:
        """Rate of every node at every episode step, (N, episode_steps)."""
        episode = self.envelope[:, self.history_intervals :]
        return np.repeat(episode, self.interval_steps, axis=1)[:, :episode_steps]

    def arrivals(self, rng: np.random.Generator, episode_steps: int, step_s: float, poisson: bool) -> np.ndarray:
        """Arrivals per node and step, (N, episode_steps), float64.

        All are drawn up front (one vectorised call) so that a step costs no
        sampling and the arrival stream does not depend on the actions.
        """
        expected = self.step_rates(episode_steps) * step_s
        return rng.poisson(expected).astype(np.float64) if poisson else expected.copy()

    def history(self) -> np.ndarray:
        """Envelope before the episode, (N, L), oldest first."""
        return self.envelope[:, : self.history_intervals].copy()

    def oracle(self, interval: int, horizon: int) -> np.ndarray:
        """True envelope of episode intervals ``interval .. interval + horizon - 1``, (N, H).

        Past the stored lookahead the last value is repeated.
        """
        first = self.history_intervals + interval
        index = np.minimum(np.arange(first, first + horizon), self.envelope.shape[1] - 1)
        return self.envelope[:, index]


def build_workload(scenario: Scenario, seed: int) -> Workload:
    """The demand of one episode of ``scenario`` for ``seed`` (same seed, same demand)."""
    spec = scenario.workload
    interval_steps = round(spec.interval_s / scenario.step_s)
    episode_intervals = math.ceil(scenario.episode_steps / interval_steps)
    needed = spec.history_intervals + episode_intervals + ORACLE_LOOKAHEAD
    num_nodes = scenario.num_nodes
    rng = np.random.default_rng([seed, 1])
    if spec.source == "constant":
        shape = np.ones((num_nodes, needed))
        sites, start = tuple("constant" for _ in range(num_nodes)), spec.history_intervals
        rates = np.full((num_nodes, needed), spec.rate_rps)
    else:
        # A regions twin draws one series per region, shared by its nodes: the region's workload shape,
        # the same at every edge-node density (paper 000 Table 4 keeps the other parameters constant).
        series = num_nodes if scenario.regions is None else len(scenario.clusters)
        if spec.source == "trace":
            shape, sites, start = _trace_shapes(spec.trace_dir, spec.interval_s, series, needed, spec, rng)
        else:
            shape, sites, start = _synthetic_shapes(scenario, series, needed, seed)
        if scenario.regions is not None:
            shape, sites = shape[scenario.nodes.cluster], tuple(sites[c] for c in scenario.nodes.cluster)
        rates = spec.mean_load * shape * (
            region_demand(scenario, start - spec.history_intervals, needed) if scenario.regions is not None
            else capacity_reference(scenario)[:, None]
        )
    return Workload(
        envelope=rates,
        history_intervals=spec.history_intervals,
        interval_steps=interval_steps,
        sites=sites,
        start_interval=start,
    )


def capacity_reference(scenario: Scenario) -> np.ndarray:
    """Requests/s that ``mean_load`` refers to, per node, (N,)."""
    nodes = scenario.nodes
    if scenario.workload.scale_to == "node":
        return nodes.full_rate.copy()
    sums = np.bincount(nodes.cluster, weights=nodes.full_rate)
    counts = np.bincount(nodes.cluster)
    return (sums / counts)[nodes.cluster]


def region_demand(scenario: Scenario, first_interval: int, intervals: int) -> np.ndarray:
    """Requests/s per node and interval that ``mean_load`` refers to in a regions twin, (N, intervals).

    A region's demand is its industry's ``load`` x the service rate of the
    nodes it has at the reference density x the industry's daily factor,
    shared evenly by the nodes it has now (:mod:`edgesim.regions`), so
    changing the density changes capacity, not demand.
    """
    from .regions import daily_factor

    interval_h = scenario.workload.interval_s / 3600.0
    hours = (first_interval + np.arange(intervals)) * interval_h % 24.0
    rows = []
    for region in scenario.regions.regions:
        reference = sum(scenario.node_rate(p) for p in region.reference_nodes)
        per_node = region.load * reference / len(region.nodes) * daily_factor(region, hours)
        rows.extend([per_node] * len(region.nodes))
    return np.array(rows)


def unit_mean_shape(series: np.ndarray, burst_cap: float) -> np.ndarray:
    """Each row divided by its mean (NaN filled with that mean first), capped at ``burst_cap``.

    A row that is all zero (an idle VM) stays zero: it brings no demand.
    """
    series = np.asarray(series, dtype=np.float64)
    mean = np.nanmean(series, axis=1, keepdims=True)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    filled = np.where(np.isfinite(series), series, mean)
    shape = np.divide(filled, mean, out=np.zeros_like(filled), where=mean > 0)
    return np.minimum(np.maximum(shape, 0.0), burst_cap)


@lru_cache(maxsize=4)
def _load_trace(directory: str, interval_s: int):  # noqa: ANN202 - TraceSet
    from fl_datasets.traces import TraceError, load_trace_dir

    try:
        return load_trace_dir(directory, columns=("cpu_usage_pct",), step_s=interval_s)
    except TraceError as err:
        raise EdgeSimError(f"twin.workload.trace_dir: {err}") from err


def _trace_shapes(
    directory: str, interval_s: int, num_nodes: int, needed: int, spec, rng: np.random.Generator
) -> tuple[np.ndarray, tuple[str, ...], int]:
    """One VM per node (seeded choice, VMs reused only when nodes outnumber them)."""
    traces = _load_trace(directory, interval_s)
    cpu = traces.values[..., 0].astype(np.float64)
    cpu[~traces.mask] = np.nan
    num_sites, length = cpu.shape
    start = _start_interval(spec, length, needed, rng)
    order = rng.permutation(num_sites)
    chosen = order[np.arange(num_nodes) % num_sites]
    # The shape is normalised over the VM's whole month, so a quiet episode stays quiet.
    shape = unit_mean_shape(cpu[chosen], spec.burst_cap)
    first = start - spec.history_intervals
    return shape[:, first : first + needed], tuple(traces.sites[i] for i in chosen), start


def _start_interval(spec, length: int, needed: int, rng: np.random.Generator) -> int:
    latest = length - (needed - spec.history_intervals)
    if latest < spec.history_intervals:
        raise EdgeSimError(
            f"the trace has {length} intervals but history ({spec.history_intervals}) + episode + "
            f"{ORACLE_LOOKAHEAD} lookahead need {needed}: shorten twin.episode_s or twin.workload.history_intervals"
        )
    if spec.start == "random":
        return int(rng.integers(spec.history_intervals, latest + 1))
    if not spec.history_intervals <= spec.start <= latest:
        raise EdgeSimError(
            f"twin.workload.start={spec.start} leaves no room for the history or the episode: "
            f"use an interval in [{spec.history_intervals}, {latest}] or 'random'"
        )
    return int(spec.start)


def _synthetic_shapes(scenario: Scenario, num_nodes: int, needed: int, seed: int) -> tuple[np.ndarray, tuple[str, ...], int]:
    from fl_datasets.synthetic import synthetic_workload

    spec = scenario.workload
    traces = synthetic_workload(num_nodes, needed, step_s=spec.interval_s, profile=spec.profile, seed=seed)
    shape = unit_mean_shape(traces.values[..., 0], spec.burst_cap)
    return shape, traces.sites, spec.history_intervals
