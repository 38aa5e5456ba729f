"""Helpers for the privacy / compression / SecAgg+ tests: in-process clients
that run the real ClientApp (mods included) with a persistent
``context.state`` per node and messages copied as over the wire."""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from mlflow.tracking import MlflowClient

from fl_clients import app as client_app


def wire(message: Message) -> Message:
    """A copy of ``message`` as the other side receives it (serialised and
    parsed), so neither side shares objects with the other."""
    return message_from_proto(message_to_proto(message))


class stateful_clients:  # noqa: N801 - used like a function
    """Reply as the real ClientApp (with its mods) would, keeping each node's
    Context — and so its ``context.state`` — across rounds, as Flower does
    (issue #2216). Partition id = node id."""

    def __init__(self, num_partitions: int) -> None:
        self.num_partitions = num_partitions
        self.contexts: dict[int, Context] = {}

    def context(self, node: int) -> Context:
        if node not in self.contexts:
            self.contexts[node] = Context(
                run_id=1, node_id=node, state=RecordDict(), run_config={},
                node_config={"partition-id": node, "num-partitions": self.num_partitions},
            )
        return self.contexts[node]

    def __call__(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        return wire(client_app.app(wire(message), self.context(node)))


def only_run(uri: str):
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return client, runs[0]


def history(client: MlflowClient, run, key: str) -> list[float]:
    """A metric's values by round (step order)."""
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
