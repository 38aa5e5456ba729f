"""Helpers to exercise strategies on plain arrays, without a simulation.

``FakeGrid`` stands in for Flower's Grid: it lists node ids and answers
``send_and_receive`` with replies from a user-supplied function, so strategy
tests and driver tests can run Prepare/Execute/Assert on hand-built numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

ReplyFn = Callable[[Message], Message]


def ensure_task_identity() -> None:
    """Messages need a run/node/task identity, which a real process gets from
    the SuperLink; give this test process a fixed one if it has none."""
    for name, value in (("run_id", 1), ("node_id", 0), ("task_id", 1)):
        try:
            getattr(TaskIdentity, name)
        except RuntimeError:
            setattr(TaskIdentity, name, value)


def arrays(*values: list[float] | np.ndarray) -> ArrayRecord:
    """An ArrayRecord from plain lists: ``arrays([1.0, 2.0], [[3.0]])``."""
    return ArrayRecord([np.asarray(v, dtype=np.float64) for v in values])


def train_reply(record: ArrayRecord, num_examples: int, node_id: int = 1, **metrics: float) -> Message:
    """A training reply as a ClientApp would send it."""
    ensure_task_identity()
    content = RecordDict(
        {
            "arrays": record,
            "metrics": MetricRecord({"num-examples": num_examples, **metrics}),
        }
    )
    message = Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)
    message.metadata.__dict__["_src_node_id"] = node_id  # normally set by the SuperLink
    return message


class FakeGrid(Grid):
    """A Grid with fixed nodes whose replies come from ``reply_fn``.

    Parameters
    ----------
    node_ids : iterable of int
        The connected nodes.
    reply_fn : callable, optional
        ``message -> reply``; required only if messages are sent.
    """

    def __init__(self, node_ids: Iterable[int], reply_fn: ReplyFn | None = None) -> None:
        ensure_task_identity()
        self.node_ids = list(node_ids)
        self.reply_fn = reply_fn
        self.sent: list[Message] = []

    def set_run(self, run_id: int) -> None:  # pragma: no cover - not used offline
        pass

    @property
    def run(self):  # pragma: no cover - not used offline
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.sent.extend(messages)
        if self.reply_fn is None:
            raise RuntimeError("FakeGrid was given no reply_fn")
        return [self.reply_fn(m) for m in messages]
