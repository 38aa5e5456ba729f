"""Episode metrics: latency percentiles, SLO, throughput, energy, cost,
utilisation, fragmentation, fulfillment and regional fairness.

Definitions (per episode):

* latency p50/p95/p99: percentiles of the served requests' latency, from a
  log-spaced histogram (100 bins per decade: a bin spans 2.3 %);
* SLO violation rate: (served later than the SLO + dropped) / (served + dropped),
  i.e. every request that left the system, a rejection counting as a miss;
* throughput: served requests per simulated second;
* J/request: edge energy (all nodes, idle included) + the cloud's dynamic
  energy for the requests it served, per served request;
* cost per 1k requests: cloud request fees + egress, per 1,000 served requests;
* CPU / GPU utilisation: mean busy fraction of the live nodes (GPU: GPU
  nodes only; CPU: every node, a GPU node's CPU busy at ``host_cpu_share``
  of its GPU load);
* fragmentation: external fragmentation of free replica capacity per
  cluster, ``1 - largest free block / total free`` (free = slots the shield
  would still allow, in requests/s), averaged over steps and clusters;
* fulfillment rate: served / arrived (paper 000's A/D);
* fairness variance: variance over regions (edge clusters) of their
  fulfillment A_j/D_j, the Var(R_j) term of paper 000 eq. 11, with Jain's
  index of the same numbers alongside;
* satisfaction: mean over regions of paper 000's S_j (:mod:`edgesim.fairness`,
  from each region's fulfillment, mean response time and redundancy = the
  share of its provisioned replica capacity left idle);
* min region fulfillment: the worst-served region's A_j/D_j.
"""

from __future__ import annotations

import numpy as np

from .fairness import jain_index

DROP_REASONS = ("rejected", "overflow", "timeout", "failure", "no_route", "cloud_unavailable", "packet_loss")


class LatencyHistogram:
    """Weighted latencies (seconds) on log-spaced bins from 0.1 ms to 1000 s.

    :meth:`add` only copies into a buffer; binning runs on the whole buffer
    when it fills or a result is read (one large numpy call instead of one
    small one per step).
    """

    LOW_S = 1e-4
    DECADES = 7
    PER_DECADE = 100
    BUFFER = 1 << 16

    def __init__(self) -> None:
        self.bins = self.DECADES * self.PER_DECADE
        self._counts = np.zeros(self.bins)
        self.weighted_sum = 0.0  # for the exact mean
        self._log_low = np.log10(self.LOW_S)
        self._latency = np.empty(self.BUFFER)
        self._weight = np.empty(self.BUFFER)
        self._used = 0

    def add(self, latency_s: np.ndarray, weight: np.ndarray) -> None:
        """Add ``weight`` requests at each ``latency_s`` (flat arrays, same size)."""
        size = latency_s.size
        if self._used + size > self.BUFFER:
            self._flush()
            if size > self.BUFFER:
                self._bin(latency_s, weight)
                return
        self._latency[self._used : self._used + size] = latency_s
        self._weight[self._used : self._used + size] = weight
        self._used += size

    def _flush(self) -> None:
        if self._used:
            self._bin(self._latency[: self._used], self._weight[: self._used])
            self._used = 0

    def _bin(self, latency_s: np.ndarray, weight: np.ndarray) -> None:
        index = ((np.log10(np.maximum(latency_s, self.LOW_S)) - self._log_low) * self.PER_DECADE).astype(np.int64)
        np.minimum(index, self.bins - 1, out=index)
        self._counts += np.bincount(index, weights=weight, minlength=self.bins)
        self.weighted_sum += float(latency_s @ weight)

    @property
    def counts(self) -> np.ndarray:
        """Requests per bin."""
        self._flush()
        return self._counts

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    def mean(self) -> float:
        total = self.total  # flushes, so weighted_sum is complete
        return self.weighted_sum / total if total > 0 else float("nan")

    def percentile(self, q: float) -> float:
        """The q-th percentile (0-100), geometric interpolation inside a bin; NaN if empty."""
        total = self.total
        if total <= 0:
            return float("nan")
        counts = self.counts
        cumulative = np.cumsum(counts)
        rank = q / 100.0 * total
        index = int(np.searchsorted(cumulative, rank, side="left"))
        index = min(index, self.bins - 1)
        before = cumulative[index - 1] if index > 0 else 0.0
        inside = (rank - before) / counts[index] if counts[index] > 0 else 0.0
        return float(10 ** (self._log_low + (index + inside) / self.PER_DECADE))


class EpisodeMetrics:
    """Accumulates one episode; :meth:`summary` turns the sums into the metrics.

    Per-node sums are kept as arrays (one vector add per step) and reduced to
    totals and per-region figures only in :meth:`summary`.
    """

    def __init__(
        self,
        cluster_start: np.ndarray,
        gpu: np.ndarray,
        cpu_share: np.ndarray,
        rule_names: tuple[str, ...],
        step_s: float,
        cloud_unit_cost_usd: float,
        response_gb: float,
    ) -> None:
        num_nodes = len(gpu)
        self.cluster_start = cluster_start
        self.gpu = gpu.astype(np.float64)
        self.cpu_share = cpu_share
        self.rule_names = rule_names
        self.step_s = step_s
        self.cloud_unit_cost_usd = cloud_unit_cost_usd
        self.response_gb = response_gb
        self.latency = LatencyHistogram()
        self.steps = 0
        self.arrived = np.zeros(num_nodes)  # at each node's users
        self.served_edge = np.zeros(num_nodes)  # by each node
        self.served_cloud = np.zeros(num_nodes)  # in the cloud, by ingress node
        self.late = np.zeros(num_nodes)
        self.dropped = np.zeros(len(DROP_REASONS))
        self.queued = 0.0
        self.energy_edge_j = np.zeros(num_nodes)
        self.energy_cloud_j = 0.0
        self.busy = np.zeros(num_nodes)  # sum over steps of busy fraction while alive
        self.alive_steps = np.zeros(num_nodes)
        self.fragmentation = 0.0
        self.fragmentation_samples = 0
        self.interventions = np.zeros(len(rule_names), dtype=np.int64)
        self.latency_sum_s = np.zeros(num_nodes)  # request-seconds by ingress/serving node (region response time)
        self.provisioned = np.zeros(num_nodes)  # replica capacity offered, requests (region redundancy)
        self.response_ref_s = 0.15  # satisfaction's references (edgesim.fairness); the twin sets them
        self.redundancy_ref = 0.2
        self.migrations = 0
        self.replica_churn = 0

    def region_fulfillment(self) -> np.ndarray:
        """Served / arrived per region (edge cluster); 1 where nothing arrived."""
        arrived = np.add.reduceat(self.arrived, self.cluster_start)
        served = np.add.reduceat(self.served_edge + self.served_cloud, self.cluster_start)
        return np.divide(served, arrived, out=np.ones_like(served), where=arrived > 0)

    def region_measures(self) -> dict[str, np.ndarray]:
        """Per region (edge cluster): fulfillment, mean response time (s), redundancy, satisfaction."""
        from .fairness import satisfaction

        starts = self.cluster_start
        served = np.add.reduceat(self.served_edge + self.served_cloud, starts)
        response = np.add.reduceat(self.latency_sum_s, starts) / np.maximum(served, 1e-12)
        provisioned = np.add.reduceat(self.provisioned, starts)
        idle = np.maximum(provisioned - np.add.reduceat(self.served_edge, starts), 0.0)
        redundancy = np.divide(idle, provisioned, out=np.zeros_like(idle), where=provisioned > 0)
        fulfilled = self.region_fulfillment()
        return {"fulfillment": fulfilled, "response_s": response, "redundancy": redundancy,
                "satisfaction": satisfaction(fulfilled, response, redundancy, self.response_ref_s, self.redundancy_ref)}

    def summary(self) -> dict[str, float]:
        """All metrics of the episode so far (see the module docstring)."""
        arrived = float(self.arrived.sum())
        served_cloud = float(self.served_cloud.sum())
        served_total = float(self.served_edge.sum()) + served_cloud
        late = float(self.late.sum())
        dropped = float(self.dropped.sum())
        finished = served_total + dropped
        seconds = self.steps * self.step_s
        served = max(served_total, 1e-12)
        energy_edge = float(self.energy_edge_j.sum())
        cost = served_cloud * self.cloud_unit_cost_usd
        regions = self.region_measures()
        fulfillment = regions["fulfillment"]
        jain = jain_index(fulfillment)
        gpu_steps = float(self.alive_steps @ self.gpu)
        cpu_steps = float(self.alive_steps.sum())
        out = {
            "p50_ms": 1e3 * self.latency.percentile(50),
            "p95_ms": 1e3 * self.latency.percentile(95),
            "p99_ms": 1e3 * self.latency.percentile(99),
            "mean_latency_ms": 1e3 * self.latency.mean(),
            "slo_violation_rate": (late + dropped) / finished if finished > 0 else 0.0,
            "late_rate": late / served if served_total > 0 else 0.0,
            "throughput_rps": served_total / seconds if seconds > 0 else 0.0,
            "energy_j_per_request": (energy_edge + self.energy_cloud_j) / served,
            "cost_per_1k_usd": 1e3 * cost / served,
            "mean_power_w": energy_edge / seconds if seconds > 0 else 0.0,
            "cpu_util": float((self.busy * self.cpu_share).sum()) / cpu_steps if cpu_steps > 0 else 0.0,
            "gpu_util": float(self.busy @ self.gpu) / gpu_steps if gpu_steps > 0 else 0.0,
            "fragmentation": self.fragmentation / self.fragmentation_samples if self.fragmentation_samples else 0.0,
            "fulfillment_rate": served_total / arrived if arrived > 0 else 1.0,
            "fairness_variance": float(np.var(fulfillment)),
            "jain_fairness": jain,
            "satisfaction": float(regions["satisfaction"].mean()),
            "min_region_fulfillment": float(fulfillment.min()),
            "cloud_share": served_cloud / served,
            "arrived": arrived,
            "served": served_total,
            "late": late,
            "dropped": dropped,
            "queued": self.queued,
            "energy_edge_j": energy_edge,
            "energy_cloud_j": self.energy_cloud_j,
            "cost_usd": cost,
            "egress_gb": served_cloud * self.response_gb,
            "shield_interventions": float(self.interventions.sum()),
            "migrations": float(self.migrations),
            "replica_churn": float(self.replica_churn),
            "steps": float(self.steps),
        }
        out.update({f"drop_{reason}": float(v) for reason, v in zip(DROP_REASONS, self.dropped)})
        out.update({f"shield_{rule}": float(v) for rule, v in zip(self.rule_names, self.interventions)})
        return out
