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
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

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
        How long a round waits for replies; a client that misses it fails.
    evaluate_config : ConfigRecord, optional
        Sent to clients for federated evaluation, if the strategy samples any.
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
    ) -> None:
        self.strategy = strategy
        self.grid = grid
        self.train_config = train_config
        self.evaluate_config = evaluate_config or train_config
        self.evaluate_fn = evaluate_fn
        self.on_round = on_round
        self.timeout_s = timeout_s

    def run(self, initial_arrays: ArrayRecord, num_rounds: int) -> ArrayRecord:
        """Run all rounds; returns the final global arrays."""
        arrays = initial_arrays
        self.on_round(0, self.evaluate_fn(0, arrays))
        for server_round in range(1, num_rounds + 1):
            outcome = self.run_round(server_round, arrays)
            arrays = outcome.arrays
            self.on_round(server_round, outcome.metrics)
        return arrays

    def run_round(self, server_round: int, arrays: ArrayRecord) -> RoundResult:
        started = time.perf_counter()
        sent = list(
            self.strategy.configure_train(
                server_round, arrays, ConfigRecord(dict(self.train_config)), self.grid
            )
        )
        replies = canonical_order(list(self.grid.send_and_receive(sent, timeout=self.timeout_s)))
        replied, failures = _count_replies(sent, replies)
        new_arrays, train_metrics = self.strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        metrics = {
            "clients_sampled": float(len(sent)),
            "clients_replied": float(replied),
            "clients_failed": float(len(failures)),
            "round_aggregated": float(new_arrays is not None),
        }
        metrics.update(_prefixed(train_metrics, "", skip=("num-examples", "partition-id")))
        metrics.update(self._federated_evaluation(server_round, arrays))
        metrics["round_train_time_s"] = time.perf_counter() - started
        metrics.update(self.evaluate_fn(server_round, arrays))
        metrics["round_wall_time_s"] = time.perf_counter() - started
        return RoundResult(arrays=arrays, metrics=metrics, failures=failures)

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
