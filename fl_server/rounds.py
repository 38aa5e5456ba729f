"""The round driver: Flower's ``Strategy.start`` loop, with each round's
bookkeeping (replies, failures, wall time, server-side evaluation) exposed to a
callback for tracking and progress.

We drive rounds ourselves instead of calling ``Strategy.start`` because the
platform needs per-round hooks that ``start`` does not offer: counts of
replied/failed clients and round wall time now, and the virtual clock, stale
updates and deadlines of later work. Strategies stay plain Flower strategies:
only their ``configure_*``/``aggregate_*`` methods are called.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_server.virtual_clock import VirtualClock

EvaluateFn = Callable[[int, ArrayRecord], dict[str, float]]
RoundCallback = Callable[[int, dict[str, float]], None]


@dataclass
class RoundResult:
    """What one round produced: the new global arrays and MLflow-ready metrics."""

    arrays: ArrayRecord
    metrics: dict[str, float]
    failures: list[str] = field(default_factory=list)


def _count_replies(sent: list[Message], replies: list[Message]) -> tuple[int, list[str]]:
    """Replies with content, and one reason per failed or missing reply."""
    ok = [r for r in replies if not r.has_error()]
    reasons = [f"node {r.metadata.src_node_id}: {r.error.reason}" for r in replies if r.has_error()]
    missing = len(sent) - len(replies)
    reasons += ["no reply before the round timeout"] * max(missing, 0)
    return len(ok), reasons


def canonical_order(replies: list[Message]) -> list[Message]:
    """Replies sorted by the client's partition id (else node id).

    Arrival order varies between runs; floating-point sums do not commute, so
    aggregating in a fixed order is what makes a seed reproduce a run exactly.
    """

    def key(reply: Message) -> tuple[int, int]:
        if not reply.has_error():
            for record in reply.content.metric_records.values():
                if "partition-id" in record:
                    return (0, int(record["partition-id"]))
        return (1, reply.metadata.src_node_id)

    return sorted(replies, key=key)


def _prefixed(record: MetricRecord | None, prefix: str, skip: tuple[str, ...]) -> dict[str, float]:
    if record is None:
        return {}
    return {
        f"{prefix}{key}": float(value)
        for key, value in record.items()
        if key not in skip and isinstance(value, (int, float))
    }


class Availability(Protocol):
    """What the driver needs to know about the simulated devices."""

    def is_online(self, partition_id: int, virtual_time_s: float, server_round: int) -> bool: ...


class _SamplingView(Grid):
    """The Grid as a strategy should see it this round: only the nodes that
    are online and not busy with an earlier update can be sampled."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid, self._node_ids = grid, node_ids

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    # Grid's abstract interface, delegated
    def set_run(self, run_id: int) -> None:
        self._grid.set_run(run_id)

    @property
    def run(self):  # noqa: D401
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


def discover_partitions(grid: Grid, expected: int, timeout_s: float) -> dict[int, int]:
    """Ask every node which partition it holds (one QUERY message each).

    Waits until ``expected`` nodes are connected. The server needs the map to
    know each node's device profile before it samples anyone.
    """
    deadline = time.monotonic() + timeout_s
    while len(node_ids := list(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(node_ids)} of {expected} SuperNodes connected in {timeout_s:.0f} s")
        time.sleep(0.5)
    queries = [
        Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in node_ids
    ]
    replies = list(grid.send_and_receive(queries, timeout=timeout_s))
    mapping = {}
    for reply in replies:
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} did not say its partition: {reply.error.reason}")
        mapping[reply.metadata.src_node_id] = int(reply.content["metrics"]["partition-id"])
    return mapping


def _virtual_duration(reply: Message) -> float:
    metrics = reply.content["metrics"]
    return float(sum(metrics.get(k, 0.0) for k in ("vc_downlink_s", "vc_compute_s", "vc_uplink_s")))


class RoundDriver:
    """Run ``num_rounds`` of train (+ optional federated evaluation) rounds.

    Parameters
    ----------
    strategy : Strategy
        Any Flower strategy; only its configure/aggregate methods are used.
    grid : Grid
        Flower's Grid for sending and receiving messages.
    train_config : ConfigRecord
        Sent to clients every training round (copied per round).
    evaluate_fn : callable
        ``(server_round, arrays) -> metrics``: server-side evaluation, run
        before round 1 (as round 0) and after every round.
    on_round : callable
        ``(server_round, metrics)``: receives every round's metrics.
    timeout_s : float
        How long a round waits for replies (real seconds); a client that
        misses it fails.
    evaluate_config : ConfigRecord, optional
        Sent to clients for federated evaluation, if the strategy samples any.
    clock : VirtualClock, optional
        Virtual timeline (deadline, stale updates). Default: synchronous.
    fleet : Availability, optional
        Device availability; with it only online, idle nodes are sampled.
    num_nodes : int, optional
        Size of the federation. With it, the driver asks every node for its
        partition (:func:`discover_partitions`) after the round-0 evaluation
        and before round 1, so it can sample in partition order and look up
        device availability. That query is what makes Ray start its workers:
        placing it after round 0 lets the tracker's start-up overlap it.
    min_train : int
        A round needs this many samplable nodes; with fewer it is idle.
    """

    def __init__(
        self,
        strategy: Strategy,
        grid: Grid,
        train_config: ConfigRecord,
        evaluate_fn: EvaluateFn,
        on_round: RoundCallback,
        timeout_s: float,
        evaluate_config: ConfigRecord | None = None,
        clock: VirtualClock | None = None,
        fleet: Availability | None = None,
        num_nodes: int | None = None,
        min_train: int = 1,
    ) -> None:
        self.strategy = strategy
        self.grid = grid
        self.train_config = train_config
        self.evaluate_config = evaluate_config or train_config
        self.evaluate_fn = evaluate_fn
        self.on_round = on_round
        self.timeout_s = timeout_s
        self.clock = clock or VirtualClock()
        self.fleet = fleet
        self.num_nodes = num_nodes
        self.partition_of: dict[int, int] = {}
        self.min_train = min_train
        self.energy_j = 0.0

    def run(self, initial_arrays: ArrayRecord, num_rounds: int) -> ArrayRecord:
        """Run all rounds; returns the final global arrays."""
        arrays = initial_arrays
        self.on_round(0, self.evaluate_fn(0, arrays))
        if self.num_nodes is not None:
            self.partition_of = discover_partitions(self.grid, self.num_nodes, self.timeout_s)
        for server_round in range(1, num_rounds + 1):
            outcome = self.run_round(server_round, arrays)
            arrays = outcome.arrays
            self.on_round(server_round, outcome.metrics)
        return arrays

    def samplable(self, server_round: int) -> list[int]:
        """Nodes that are online now and not busy with an earlier update.

        Ordered by partition id: node ids are random per simulation, so a
        seeded sampler over this list picks the same partitions every run.
        """
        nodes = sorted(
            (n for n in self.grid.get_node_ids() if not self.clock.is_busy(n)),
            key=lambda n: self.partition_of.get(n, n),
        )
        if self.fleet is None:
            return nodes
        return [
            n for n in nodes
            if self.fleet.is_online(self.partition_of[n], self.clock.now_s, server_round)
        ]

    def run_round(self, server_round: int, arrays: ArrayRecord) -> RoundResult:
        started = time.perf_counter()
        candidates = self.samplable(server_round)
        sent: list[Message] = []
        replies: list[Message] = []
        if len(candidates) >= self.min_train:
            view = _SamplingView(self.grid, candidates)
            config = ConfigRecord(dict(self.train_config))
            sent = list(self.strategy.configure_train(server_round, arrays, config, view))
            replies = canonical_order(list(self.grid.send_and_receive(sent, timeout=self.timeout_s)))
            good = [r for r in replies if not r.has_error()]
            close = self.clock.close_round(server_round, [(r, _virtual_duration(r)) for r in good])
        else:
            close = self.clock.idle_round(server_round)
        replied, failures = _count_replies(sent, replies)
        for arrival, tau in zip(close.applied, close.staleness):
            arrival.reply.content["metrics"]["staleness"] = tau
        errors = [r for r in replies if r.has_error()]
        new_arrays, train_metrics = self.strategy.aggregate_train(
            server_round, [a.reply for a in close.applied] + errors
        )
        if new_arrays is not None:
            arrays = new_arrays
        round_energy = sum(float(r.content["metrics"].get("vc_energy_j", 0.0)) for r in replies if not r.has_error())
        self.energy_j += round_energy
        metrics = {
            "clients_samplable": float(len(candidates)),
            "clients_sampled": float(len(sent)),
            "clients_replied": float(replied),
            "clients_failed": float(len(failures)),
            "round_aggregated": float(new_arrays is not None),
            "updates_applied": float(len(close.applied)),
            "updates_stale": float(sum(1 for tau in close.staleness if tau > 0)),
            "updates_held_back": float(close.held_back),
            "virtual_time_s": close.end_s,
            "round_virtual_s": close.end_s - close.start_s,
            "energy_j": round_energy,
            "energy_total_j": self.energy_j,
        }
        for tau in sorted(set(close.staleness)):
            metrics[f"staleness_tau{tau}"] = float(close.staleness.count(tau))
        metrics.update(_prefixed(train_metrics, "", skip=("num-examples", "partition-id", "dispatch-round")))
        metrics.update(self._federated_evaluation(server_round, arrays))
        metrics["round_train_time_s"] = time.perf_counter() - started
        metrics.update(self._evaluate(server_round, arrays))
        metrics["round_wall_time_s"] = time.perf_counter() - started
        return RoundResult(arrays=arrays, metrics=metrics, failures=failures)

    def _evaluate(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        """Server-side evaluation; a strategy with several models (clusters)
        has each evaluated, and the headline metrics are their averages
        weighted by cluster membership."""
        per_model = getattr(self.strategy, "models_for_evaluation", None)
        models = per_model() if per_model is not None else {}
        if len(models) <= 1:
            return self.evaluate_fn(server_round, arrays)
        results = {c: (self.evaluate_fn(server_round, a), w) for c, (a, w) in models.items()}
        total = sum(w for _, w in results.values())
        first = next(iter(results.values()))[0]
        combined = {k: sum(r[k] * w for r, w in results.values()) / total for k in first}
        for cluster, (result, _) in results.items():
            combined[f"cluster{cluster}_test_accuracy"] = result.get("test_accuracy", float("nan"))
        return combined

    def _federated_evaluation(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        sent = list(
            self.strategy.configure_evaluate(
                server_round, arrays, ConfigRecord(dict(self.evaluate_config)), self.grid
            )
        )
        if not sent:
            return {}
        replies = list(self.grid.send_and_receive(sent, timeout=self.timeout_s))
        record = self.strategy.aggregate_evaluate(server_round, replies)
        return _prefixed(record, "fed_", skip=("num-examples",))
