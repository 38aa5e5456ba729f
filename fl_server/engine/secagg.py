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

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow, WorkflowState

from fl_common import compression as comp
from fl_server.engine.rounds import RoundDriver, RoundResult, _SamplingView, privacy_round_metrics

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

    def run_round(self, server_round: int, arrays: ArrayRecord) -> RoundResult:
        started = time.perf_counter()
        candidates = self.samplable(server_round)
        sent: list[Message] = []
        if len(candidates) >= max(self.min_train, 2):  # SecAgg+ needs at least two clients
            view = _SamplingView(self.grid, candidates)
            sent = list(self.strategy.configure_train(server_round, arrays, ConfigRecord(dict(self.train_config)), view))
        workflow = self.secagg.workflow(self.timeout_s)
        average, client_metrics, survivors = secure_average(self.grid, workflow, server_round, sent) if sent else (None, {}, 0)
        replies = _as_replies(client_metrics)
        trained = [r for r in replies if not int(r.content["metrics"].get("dp_declined", 0))]
        new_arrays, train_metrics = None, None
        if average is not None and trained:
            model = comp.add(comp.tensors(arrays), dict(zip(arrays.keys(), average, strict=True)))
            for reply in trained:  # every client "sent" the aggregate: all the strategy may see
                reply.content["arrays"] = comp.to_record(model)
            new_arrays, train_metrics = self.strategy.aggregate_train(server_round, trained)
        close = self.clock.close_round(server_round, [(r, _duration(r)) for r in trained])
        arrays = new_arrays if new_arrays is not None else arrays
        round_energy = sum(float(r.content["metrics"].get("vc_energy_j", 0.0)) for r in replies)
        self.energy_j += round_energy
        metrics = {
            "clients_samplable": float(len(candidates)),
            "clients_sampled": float(len(sent)),
            "clients_replied": float(len(replies)),
            "clients_failed": float(len(sent) - len(replies)),
            "secagg_survivors": float(survivors),
            "round_aggregated": float(new_arrays is not None),
            "updates_applied": float(len(trained) if new_arrays is not None else 0),
            "virtual_time_s": close.end_s,
            "round_virtual_s": close.end_s - close.start_s,
            "energy_j": round_energy,
            "energy_total_j": self.energy_j,
        }
        metrics.update(privacy_round_metrics(replies))
        if train_metrics is not None:
            metrics.update({k: float(v) for k, v in train_metrics.items()
                            if k not in ("num-examples", "partition-id", "dispatch-round") and isinstance(v, (int, float))})
        metrics.update(self._federated_evaluation(server_round, arrays))
        metrics["round_train_time_s"] = time.perf_counter() - started
        metrics.update(self._evaluate(server_round, arrays))
        metrics["round_wall_time_s"] = time.perf_counter() - started
        return RoundResult(arrays=arrays, metrics=metrics)


def _as_replies(client_metrics: dict[int, dict[str, Any]]) -> list[Message]:
    """Reply-shaped Messages (metrics only, sorted by partition) for the
    strategy and the clock; arrays are added for those that trained."""
    replies = []
    for node, metrics in client_metrics.items():
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        reply = Message(RecordDict({"metrics": MetricRecord(numeric)}), dst_node_id=0, message_type=MessageType.TRAIN)
        reply.metadata.__dict__["_src_node_id"] = node  # the node it stands for
        replies.append(reply)
    return sorted(replies, key=lambda r: int(r.content["metrics"].get("partition-id", r.metadata.src_node_id)))


def _duration(reply: Message) -> float:
    metrics = reply.content["metrics"]
    return float(sum(metrics.get(k, 0.0) for k in ("vc_downlink_s", "vc_compute_s", "vc_uplink_s")))
