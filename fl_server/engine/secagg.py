"""Secure aggregation rounds with Flower's SecAgg+ under our Message-API driver.

Flower 1.41 ships SecAgg+ only in the legacy API: ``SecAggPlusWorkflow``
(``flwr.server.workflow``) is written for ``DefaultWorkflow`` with a
``LegacyContext`` and a legacy ``flwr.server.strategy`` Strategy
(``configure_fit`` / ``aggregate_fit``), and its ``__call__`` refuses any
other context. Its four stage methods (setup, share keys, collect masked
vectors, unmask) however only need ``grid.send_and_receive`` and a few
attributes of the context, so :class:`SecAggPlusRoundDriver` runs them
directly, one training round at a time, with a small bridge object standing
in for the LegacyContext:

* the Message-API strategy samples the clients (``configure_train``) and
  builds their training messages, which replace the FitIns the workflow would
  have sent;
* the workflow's unmask stage hands the bridge only the *sum* of the masked
  updates, dequantised into their weighted average (weights = num-examples);
  no individual update ever reaches server-side code — a client's reply
  carries masked integers and emptied arrays only;
* the new global model (global + average update) is then given to the
  strategy's ``aggregate_train`` as every client's model, with each client's
  own (unmasked) metrics.

Which strategies compose: those whose aggregation needs only the weighted
average — FedAvg (exactly), FedAvgM (its momentum acts on the average), and
Flower's client-side central-DP wrappers (clipping happens on the client,
noise is added to the aggregate). Strategies that need each client's update
cannot: ASS scores every client's model, staleness-aware clustering clusters
updates and applies stale ones late, Flower's server-side clipping wrappers
clip each update on the server, and update compression (top-k) would be
undone by SecAgg+'s dense masks. ``fl_server.experiments.config`` refuses those
combinations, and deadlines (stale updates cannot join a later round's
masked sum).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow, WorkflowState

from fl_common import compression as comp
from fl_common import protocol
from fl_server.engine.reply_checks import screen_replies
from fl_server.engine.rounds import GridWrapper, RoundDriver, _SamplingView

SECAGG_STRATEGIES = ("fedavg", "fedavgm")


@dataclass(frozen=True)
class SecAggSettings:
    """SecAgg+ parameters (Flower's ``SecAggPlusWorkflow`` arguments)."""

    num_shares: int | float = 1.0
    reconstruction_threshold: int | float = 0.7
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    max_weight: float = 1000.0

    @classmethod
    def from_config(cls, secagg: Any, max_weight: float) -> SecAggSettings:
        """From ``cfg.privacy.secagg``; ``max_weight`` = the largest client's
        num-examples (SecAgg+ quantises each weight as a fraction of it)."""
        return cls(
            num_shares=secagg.num_shares,
            reconstruction_threshold=secagg.reconstruction_threshold,
            clipping_range=float(secagg.clipping_range),
            quantization_range=int(secagg.quantization_range),
            modulus_range=int(secagg.modulus_range),
            max_weight=float(max_weight),
        )

    def workflow(self, timeout_s: float) -> SecAggPlusWorkflow:
        return SecAggPlusWorkflow(
            self.num_shares,
            self.reconstruction_threshold,
            max_weight=self.max_weight,
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
            modulus_range=self.modulus_range,
            timeout=timeout_s,
        )


class _Proxy:
    """The workflow keys its bookkeeping by ``ClientProxy.node_id`` only."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id


class _LegacyBridge:
    """Stands in for the LegacyContext (and its strategy, client manager and
    history) that ``SecAggPlusWorkflow``'s stages read."""

    def __init__(self, server_round: int, node_ids: list[int]) -> None:
        self.state = RecordDict(
            {
                MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
                MAIN_PARAMS_RECORD: ArrayRecord(),  # our messages carry the model instead
            }
        )
        self.node_ids = node_ids
        self.strategy = self.client_manager = self.history = self
        self.average_update: list[np.ndarray] | None = None
        self.client_metrics: dict[int, dict[str, Any]] = {}

    # strategy
    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any):
        return [(_Proxy(n), FitIns(Parameters(tensors=[], tensor_type=""), {})) for n in self.node_ids]

    def aggregate_fit(self, server_round: int, results: list, failures: list):
        """Receives the unmasked average only (the same in every FitRes)."""
        if results:
            self.average_update = parameters_to_ndarrays(results[0][1].parameters)
        self.client_metrics = {proxy.node_id: dict(res.metrics) for proxy, res in results}
        return None, {}

    # client manager / history
    def num_available(self) -> int:
        return len(self.node_ids)

    def add_metrics_distributed_fit(self, server_round: int, metrics: dict) -> None:  # pragma: no cover
        pass


def secure_average(
    grid, workflow: SecAggPlusWorkflow, server_round: int, messages: list[Message]
) -> tuple[list[np.ndarray] | None, dict[int, dict[str, Any]], int]:
    """Run SecAgg+'s four stages for one round's training ``messages``.

    Returns
    -------
    tuple
        The weighted-average update (None if the protocol halted or nobody
        trained), each replying client's metrics, and how many clients
        survived to the end of the protocol.
    """
    bridge = _LegacyBridge(server_round, [m.metadata.dst_node_id for m in messages])
    state = WorkflowState()
    if not workflow.setup_stage(grid, bridge, state):
        return None, {}, 0
    # Our training messages replace the workflow's empty FitIns; one copy per
    # node, since the collect stage writes each node's key shares into it.
    state.nid_to_fitins = {m.metadata.dst_node_id: RecordDict(dict(m.content.items())) for m in messages}
    if not (workflow.share_keys_stage(grid, bridge, state) and workflow.collect_masked_vectors_stage(grid, bridge, state)):
        return None, {}, 0
    metrics = {proxy.node_id: dict(res.metrics) for proxy, res in state.legacy_results}
    if sum(res.num_examples for _, res in state.legacy_results) == 0:
        return None, metrics, len(state.active_node_ids)  # all declined: nothing to unmask
    if not workflow.unmask_stage(grid, bridge, state):
        return None, metrics, 0
    return bridge.average_update, bridge.client_metrics, len(state.active_node_ids)


class SecAggPlusRoundDriver(RoundDriver):
    """A :class:`RoundDriver` whose training rounds aggregate with SecAgg+.

    Only the exchange and the aggregation differ from the plain driver:
    sampling, retries while short of ``min_replies``, the failure log, the
    virtual clock, energy, privacy metrics and evaluation are the driver's.
    A client that did not survive the protocol (it dropped out, timed out or
    erred in any stage) counts as a failure; its masked vector cannot be
    screened for NaN or shape (nobody sees it), so screening is the
    protocol's own: unmasking fails on a malformed vector.

    Parameters
    ----------
    secagg : SecAggSettings
        Protocol parameters.
    **kwargs
        As :class:`RoundDriver` (no deadline: SecAgg+ rounds are synchronous).
    """

    def __init__(self, *args: Any, secagg: SecAggSettings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.secagg = secagg
        self._average: list[np.ndarray] | None = None
        self._survivors = 0

    def _dispatch(self, server_round: int, arrays: ArrayRecord, candidates: list[int], attempt: int):
        """Sample with the strategy, then run SecAgg+'s four stages on its messages."""
        self._average, self._survivors = None, 0
        if len(candidates) < 2:  # SecAgg+ hides one update among at least two
            return [], []
        view = _SamplingView(self.grid, candidates)
        config = ConfigRecord(dict(self.train_config))
        if attempt > 1:
            config[protocol.ROUND_ATTEMPT] = attempt
        sent = list(self.strategy.configure_train(server_round, arrays, config, view))
        if not sent:
            return [], []
        workflow = self.secagg.workflow(self.timeout_s)
        watched = _ErrorWatcher(self.grid)  # a client that erred in any stage is an error, not a timeout
        self._average, client_metrics, self._survivors = secure_average(watched, workflow, server_round, sent)
        survivors = _as_replies(client_metrics)
        answered = {r.metadata.src_node_id for r in survivors}
        errors = [e for node, e in watched.errors.items() if node not in answered]
        return sent, survivors + errors

    def _screen(self, sent: list[Message], replies: list[Message], arrays: ArrayRecord, attempt: int):
        """Replies are the survivors' metrics (no arrays to check); a protocol that
        halted before unmasking leaves no usable update from anyone."""
        replies = [r for r in replies
                   if r.has_error() or self._average is not None or protocol.declined(r.content["metrics"])]
        return screen_replies(sent, replies, arrays, self.partition_of, attempt, accept_as_is=lambda _reply: True)

    def _aggregate(self, server_round: int, arrays: ArrayRecord, train):
        """Global + the securely averaged update, handed to the strategy as every
        trained client's model (all the strategy may see)."""
        trained = [r for r in train.accepted if not protocol.declined(r.content["metrics"])]
        if self._average is None or not trained:
            return None, None, self.clock.close_round(server_round, [])
        model = comp.add(comp.tensors(arrays), dict(zip(arrays.keys(), self._average, strict=True)))
        for reply in trained:
            reply.content["arrays"] = comp.to_record(model)
        new_arrays, train_metrics = self.strategy.aggregate_train(server_round, trained)
        close = self.clock.close_round(server_round, [(r, protocol.virtual_duration(r.content["metrics"]))
                                                      for r in trained])
        return new_arrays, train_metrics, close

    def _protocol_metrics(self) -> dict[str, float]:
        return {"secagg_survivors": float(self._survivors)}


class _ErrorWatcher(GridWrapper):
    """The Grid, keeping each node's first error reply of the SecAgg+ stages."""

    def __init__(self, grid) -> None:
        super().__init__(grid)
        self.errors: dict[int, Message] = {}

    def send_and_receive(self, messages, *, timeout: float | None = None):
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error():
                self.errors.setdefault(reply.metadata.src_node_id, reply)
        return replies


def _as_replies(client_metrics: dict[int, dict[str, Any]]) -> list[Message]:
    """Reply-shaped Messages (metrics only, sorted by partition) for the
    strategy and the clock; arrays are added for those that trained."""
    replies = []
    for node, metrics in client_metrics.items():
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        reply = Message(RecordDict({"metrics": MetricRecord(numeric)}), dst_node_id=0, message_type=MessageType.TRAIN)
        reply.metadata.__dict__["_src_node_id"] = node  # the node it stands for
        replies.append(reply)
    return sorted(replies, key=lambda r: int(r.content["metrics"].get(protocol.PARTITION_ID, r.metadata.src_node_id)))
