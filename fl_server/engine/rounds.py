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

from fl_common import protocol
from fl_server.engine.reply_checks import ClientFailure, failure_counts, screen_replies
from fl_server.engine.virtual_clock import VirtualClock

EvaluateFn = Callable[[int, ArrayRecord], dict[str, float]]
RoundCallback = Callable[[int, dict[str, float]], None]
FailuresCallback = Callable[[int, list[ClientFailure]], None]
# Nodes that dropped out may reconnect: wait this long before retrying a
# round that had too few connected nodes to sample.
RECONNECT_WAIT_S = 5.0
# Node discovery sends its QUERY messages this many at a time. Flower's
# simulation polls every node's queue every 0.1 s and each poll scans every
# undelivered-or-unanswered message (O(nodes x in-flight)); at 1,000 nodes,
# 1,000 queries in flight while the actors start cost the simulation process
# ~7 s more CPU than batches of 100 (measured here). A federation of <= 100
# nodes is asked in one batch, as before.
DISCOVERY_BATCH = 100


@dataclass
class RoundResult:
    """What one round produced: the new global arrays and MLflow-ready metrics."""

    arrays: ArrayRecord
    metrics: dict[str, float]
    failures: list[ClientFailure] = field(default_factory=list)


class RoundFailedError(RuntimeError):
    """A round stayed short of ``min_replies`` usable updates after its retries."""

    def __init__(self, message: str, failures: list[ClientFailure]) -> None:
        super().__init__(message)
        self.failures = failures


@dataclass
class _TrainPhase:
    """The training exchange of one round (its last attempt), screened."""

    candidates: list[int]
    sent: list[Message] = field(default_factory=list)
    replies: list[Message] = field(default_factory=list)
    accepted: list[Message] = field(default_factory=list)  # usable (or declined) replies
    errors: list[Message] = field(default_factory=list)  # Flower error replies
    failures: list[ClientFailure] = field(default_factory=list)  # of every attempt
    attempts: int = 1

    @property
    def dispatched(self) -> bool:
        return bool(self.sent)


def canonical_order(replies: list[Message]) -> list[Message]:
    """Replies sorted by the client's partition id (else node id).

    Arrival order varies between runs; floating-point sums do not commute, so
    aggregating in a fixed order is what makes a seed reproduce a run exactly.
    """

    def key(reply: Message) -> tuple[int, int]:
        if not reply.has_error():
            for record in reply.content.metric_records.values():
                if protocol.PARTITION_ID in record:
                    return (0, int(record[protocol.PARTITION_ID]))
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


def _declined(reply: Message) -> bool:
    """A client that declined to train (DP-SGD budget): it replied, but has
    no update to aggregate."""
    if reply.has_error() or "metrics" not in reply.content:
        return False
    return protocol.declined(reply.content["metrics"])


def privacy_round_metrics(replies: list[Message]) -> dict[str, float]:
    """Clients that declined (budget spent) and each client's epsilon.

    ``clients_declined``, ``epsilon_p<partition>``, ``epsilon_max`` and
    ``epsilon_mean`` over the clients that replied; empty without DP-SGD.
    """
    spent = {
        int(r.content["metrics"][protocol.PARTITION_ID]): float(r.content["metrics"]["dp_epsilon"])
        for r in replies
        if not r.has_error() and "metrics" in r.content and "dp_epsilon" in r.content["metrics"]
    }
    if not spent:
        return {}
    metrics = {"clients_declined": float(sum(_declined(r) for r in replies))}
    metrics.update({f"epsilon_p{p}": eps for p, eps in sorted(spent.items())})
    metrics["epsilon_max"] = max(spent.values())
    metrics["epsilon_mean"] = sum(spent.values()) / len(spent)
    return metrics


class Availability(Protocol):
    """What the driver needs to know about the simulated devices."""

    def is_online(self, partition_id: int, virtual_time_s: float, server_round: int) -> bool: ...


class GridWrapper(Grid):
    """A Grid that forwards everything to ``grid``: subclass it and override
    only what changes (sampling views, byte accounting, reply recording)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def set_run(self, run_id: int) -> None:
        self._grid.set_run(run_id)

    @property
    def run(self):  # noqa: D401
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class _SamplingView(GridWrapper):
    """The Grid as a strategy should see it this round: only the nodes that
    are online and not busy with an earlier update can be sampled."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        super().__init__(grid)
        self._node_ids = node_ids

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)


def discover_partitions(grid: Grid, expected: int, timeout_s: float,
                        batch_size: int | None = None) -> dict[int, int]:
    """Ask every node which partition it holds (one QUERY message each).

    Waits until ``expected`` nodes are connected. The server needs the map to
    know each node's device profile before it samples anyone. With
    ``batch_size``, at most that many queries are in flight at a time.
    """
    deadline = time.monotonic() + timeout_s
    while len(node_ids := list(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(node_ids)} of {expected} SuperNodes connected in {timeout_s:.0f} s")
        time.sleep(0.5)
    step = batch_size or len(node_ids) or 1
    mapping = {}
    for start in range(0, len(node_ids), step):
        queries = [
            Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in node_ids[start : start + step]
        ]
        for reply in grid.send_and_receive(queries, timeout=timeout_s):
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} did not say its partition: {reply.error.reason}")
            mapping[reply.metadata.src_node_id] = int(reply.content["metrics"][protocol.PARTITION_ID])
    return mapping


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
    min_replies : int
        A round proceeds with at least this many usable updates; with fewer
        it is retried. The default 0 lets every round proceed (the experiment
        passes ``clients.min_replies``).
    round_retries : int
        How often a round short of ``min_replies`` is retried (each time
        sampling and sending anew) before :class:`RoundFailedError` ends the run.
    on_failures : callable, optional
        ``(server_round, failures)``: every round's client failures (all its
        attempts), before the round's metrics and before a failed round raises.
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
        min_replies: int = 0,
        round_retries: int = 0,
        on_failures: FailuresCallback | None = None,
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
        self.min_replies = min_replies
        self.round_retries = round_retries
        self.on_failures = on_failures
        self.energy_j = 0.0
        self.marks: dict[str, float] = {}  # epoch seconds of the start-up steps (the run's timeline)
        self._discovery_s: float | None = None  # reported once, with the first round's metrics

    def run(
        self,
        initial_arrays: ArrayRecord,
        num_rounds: int,
        start_round: int = 1,
        on_ready: Callable[["RoundDriver"], None] | None = None,
    ) -> ArrayRecord:
        """Run rounds ``start_round`` .. ``num_rounds``; returns the final global arrays.

        ``start_round > 1`` resumes a checkpointed run: no round-0 evaluation,
        and ``on_ready(driver)``, called once the node -> partition map is
        known, restores the saved strategy and driver state onto this run's nodes.
        """
        arrays = initial_arrays
        if start_round == 1:
            self.on_round(0, self.evaluate_fn(0, arrays))
        if self.num_nodes is not None:
            self.marks["discover_start"] = time.time()
            self.partition_of = discover_partitions(self.grid, self.num_nodes, self.timeout_s, DISCOVERY_BATCH)
            self.marks["nodes_discovered"] = time.time()  # every client's actor has answered once
            self._discovery_s = self.marks["nodes_discovered"] - self.marks["discover_start"]
        if on_ready is not None:
            on_ready(self)
        for server_round in range(start_round, num_rounds + 1):
            outcome = self.run_round(server_round, arrays)
            arrays = self.arrays = outcome.arrays  # on_round may checkpoint them
            self.on_round(server_round, outcome.metrics)
        return arrays

    def samplable(self, server_round: int) -> list[int]:
        """Nodes that are online now and not busy with an earlier update.

        Ordered by partition id: node ids are random per simulation, so a
        seeded sampler over this list picks the same partitions every run.
        """
        connected = list(self.grid.get_node_ids())
        busy = self.clock.busy_nodes(connected)  # one pass over the in-flight updates, not one per node
        nodes = sorted(
            (n for n in connected if n not in busy),
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
        train = self._train(server_round, arrays)
        new_arrays, train_metrics, close = self._aggregate(server_round, arrays, train)
        if new_arrays is not None:
            arrays = new_arrays
        failures = train.failures
        round_energy = sum(float(r.content["metrics"].get(protocol.VC_ENERGY_J, 0.0)) for r in train.accepted)
        self.energy_j += round_energy
        metrics = {
            "clients_samplable": float(len(train.candidates)),
            "clients_sampled": float(len(train.sent)),
            "clients_replied": float(len(train.accepted)),
            "clients_failed": float(len(failures)),
            **failure_counts(failures),
            "round_attempts": float(train.attempts),
            "round_aggregated": float(new_arrays is not None),
            "updates_applied": float(len(close.applied)),
            "updates_stale": float(sum(1 for tau in close.staleness if tau > 0)),
            "updates_held_back": float(close.held_back),
            "virtual_time_s": close.end_s,
            "round_virtual_s": close.end_s - close.start_s,
            "energy_j": round_energy,
            "energy_total_j": self.energy_j,
            **self._protocol_metrics(),
        }
        for tau in sorted(set(close.staleness)):
            metrics[f"staleness_tau{tau}"] = float(close.staleness.count(tau))
        metrics.update(privacy_round_metrics(train.replies))
        metrics.update(_prefixed(train_metrics, "", skip=protocol.BOOKKEEPING))
        metrics.update(self._federated_evaluation(server_round, arrays))
        metrics["round_train_time_s"] = time.perf_counter() - started
        metrics.update(self._evaluate(server_round, arrays))
        metrics["round_wall_time_s"] = time.perf_counter() - started
        if self._discovery_s is not None:  # the QUERY round before round 1 (actors' start-up included)
            metrics["discover_partitions_s"], self._discovery_s = self._discovery_s, None
        return RoundResult(arrays=arrays, metrics=metrics, failures=failures)

    def _aggregate(self, server_round: int, arrays: ArrayRecord, train: _TrainPhase):
        """Order the usable updates on the virtual clock and let the strategy
        aggregate those that arrived (stale ones with their staleness).

        Returns the new arrays (None: nothing aggregated), the strategy's
        metrics and the clock's round close.
        """
        if train.dispatched:
            # a client that declined (DP budget) replied but has no update to apply
            good = [r for r in train.accepted if not _declined(r)]
            close = self.clock.close_round(server_round, [(r, protocol.virtual_duration(r.content["metrics"]))
                                                          for r in good])
        else:
            close = self.clock.idle_round(server_round)
        for arrival, tau in zip(close.applied, close.staleness):
            arrival.reply.content["metrics"][protocol.STALENESS] = tau
        # rejected updates never reach the strategy; Flower's error replies do (it skips and logs them)
        return (*self.strategy.aggregate_train(server_round, [a.reply for a in close.applied] + train.errors), close)

    def _protocol_metrics(self) -> dict[str, float]:
        """Per-round metrics of the aggregation protocol (SecAgg+ survivors); none by default."""
        return {}

    def _screen(self, sent: list[Message], replies: list[Message], arrays: ArrayRecord, attempt: int):
        """Accepted updates, Flower error replies and failures of one attempt."""
        return screen_replies(sent, replies, arrays, self.partition_of, attempt, accept_as_is=_declined)

    def _train(self, server_round: int, arrays: ArrayRecord) -> _TrainPhase:
        """Sample, send, receive and screen; retry while short of ``min_replies``.

        A round with fewer samplable nodes than ``min_train`` because devices
        are offline or busy (virtual clock) is idle, not failed. One with
        fewer *connected* nodes than that, or with fewer usable updates than
        ``min_replies``, is retried; each retry samples and sends anew and
        discards the earlier attempt's updates. Failures of every attempt count.
        """
        failures: list[ClientFailure] = []
        shortfall = ""
        for attempt in range(1, self.round_retries + 2):
            candidates = self.samplable(server_round)
            if len(candidates) < self.min_train:
                connected = len(list(self.grid.get_node_ids()))
                if connected >= self.min_train or self.min_replies == 0:  # offline or busy by design
                    self._report_failures(server_round, failures)
                    return _TrainPhase(candidates, failures=failures, attempts=attempt)
                shortfall = f"only {connected} nodes connected, clients.min_train={self.min_train}"
                if attempt <= self.round_retries:
                    time.sleep(RECONNECT_WAIT_S)
                continue
            sent, replies = self._dispatch(server_round, arrays, candidates, attempt)
            accepted, errors, new_failures = self._screen(sent, replies, arrays, attempt)
            failures += new_failures
            if len(accepted) >= self.min_replies:
                self._report_failures(server_round, failures)
                return _TrainPhase(candidates, sent, replies, accepted, errors, failures, attempt)
            shortfall = (f"{len(accepted)} of {len(sent)} sampled clients sent a usable update, "
                         f"clients.min_replies={self.min_replies}")
        self._report_failures(server_round, failures)
        kinds = ", ".join(f"{n:g} {k.removeprefix('clients_failed_')}"
                          for k, n in failure_counts(failures).items() if n)
        raise RoundFailedError(
            f"round {server_round} failed after {self.round_retries + 1} attempt(s): {shortfall}"
            + (f" (client failures: {kinds})" if kinds else ""),
            failures,
        )

    def _dispatch(
        self, server_round: int, arrays: ArrayRecord, candidates: list[int], attempt: int
    ) -> tuple[list[Message], list[Message]]:
        """One attempt: the strategy samples among ``candidates``; replies in canonical order."""
        view = _SamplingView(self.grid, candidates)
        config = ConfigRecord(dict(self.train_config))
        if attempt > 1:
            config[protocol.ROUND_ATTEMPT] = attempt  # clients (and fault injection) can tell a retry
        sent = list(self.strategy.configure_train(server_round, arrays, config, view))
        replies = canonical_order(list(self.grid.send_and_receive(sent, timeout=self.timeout_s)))
        return sent, replies

    def _report_failures(self, server_round: int, failures: list[ClientFailure]) -> None:
        if failures and self.on_failures is not None:
            self.on_failures(server_round, failures)

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
        return _prefixed(record, "fed_", skip=(protocol.NUM_EXAMPLES,))
