"""Screen training replies before aggregation.

A client that raised, timed out, or sent an update that cannot be aggregated
(non-finite values, missing or extra arrays, a wrong shape or dtype) is
recorded as a :class:`ClientFailure` with its reason and kept away from the
strategy. Flower's strategies only check that replies agree with each other;
an update that disagrees with the *global model* (e.g. a wrongly shaped array
that numpy would silently broadcast) or carries NaN would otherwise poison
the aggregate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common.constant import ErrorCode

from fl_common import protocol

# What a failure can be; each kind is counted per round in MLflow as
# ``clients_failed_<kind>``.
FAILURE_KINDS = ("error", "timeout", "unavailable", "nan", "shape")
# Flower's own error codes for a node or message that went away.
_UNAVAILABLE = {ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE}
WEIGHT_KEY = protocol.NUM_EXAMPLES


@dataclass(frozen=True)
class ClientFailure:
    """One client's failed contribution to one attempt of a round."""

    node_id: int
    kind: str  # one of FAILURE_KINDS
    reason: str
    partition_id: int | None = None
    attempt: int = 1


def check_update(content: RecordDict, reference: ArrayRecord) -> tuple[str, str] | None:
    """Whether a reply's content can be aggregated with the global ``reference``.

    Parameters
    ----------
    content : RecordDict
        A training reply's content: one ArrayRecord, one MetricRecord with a
        positive ``num-examples``.
    reference : ArrayRecord
        The arrays the round sent out; the update must have the same keys,
        shapes and dtypes.

    Returns
    -------
    tuple of (kind, reason), or None
        None if the update is fine; else ``("shape", ...)`` for a structural
        mismatch or ``("nan", ...)`` for NaN/Inf values.
    """
    records = list(content.array_records.values())
    if len(records) != 1:
        return "shape", f"expected one ArrayRecord, got {len(records)}"
    problem = _structure_problem(records[0], reference)
    if problem:
        return "shape", problem
    problem = _non_finite_problem(records[0])
    if problem:
        return "nan", problem
    return _metrics_problem(content)


def _structure_problem(update: ArrayRecord, reference: ArrayRecord) -> str | None:
    missing = [k for k in reference if k not in update]
    extra = [k for k in update if k not in reference]
    if missing or extra:
        return f"arrays differ from the global model: missing {missing[:5]}, unexpected {extra[:5]}"
    for key, ref in reference.items():
        got = update[key]
        if tuple(got.shape) != tuple(ref.shape):
            return f"array '{key}' has shape {tuple(got.shape)}, the global model {tuple(ref.shape)}"
        if got.dtype != ref.dtype:
            return f"array '{key}' has dtype {got.dtype}, the global model {ref.dtype}"
    return None


def _non_finite_problem(update: ArrayRecord) -> str | None:
    for key, array in update.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.inexact):
            bad = int(values.size - np.count_nonzero(np.isfinite(values)))
            if bad:
                return f"array '{key}' has {bad} non-finite values (NaN/Inf)"
    return None


def _metrics_problem(content: RecordDict) -> tuple[str, str] | None:
    records = list(content.metric_records.values())
    if len(records) != 1:
        return "shape", f"expected one MetricRecord, got {len(records)}"
    metrics = records[0]
    weight = metrics.get(WEIGHT_KEY)
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        return "shape", f"'{WEIGHT_KEY}' must be a positive number, got {weight!r}"
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            return "nan", f"metric '{key}' is {value}"
    return None


def screen_replies(
    sent: list[Message],
    replies: list[Message],
    reference: ArrayRecord,
    partition_of: dict[int, int] | None = None,
    attempt: int = 1,
    accept_as_is: Callable[[Message], bool] | None = None,
) -> tuple[list[Message], list[Message], list[ClientFailure]]:
    """Split one attempt's replies into accepted updates, Flower error replies
    and failures (errors, missing replies and rejected updates).

    Parameters
    ----------
    sent : list of Message
        The training messages of this attempt.
    replies : list of Message
        What came back before the timeout.
    reference : ArrayRecord
        The global arrays the round sent.
    partition_of : dict, optional
        Node id -> partition id, to name failures by partition.
    attempt : int
        The attempt of the round (1 = first), recorded with each failure.
    accept_as_is : callable, optional
        Replies it returns True for are accepted unchecked (a client that
        declined to train on purpose sends no update and is no failure).

    Returns
    -------
    accepted, errors, failures
        ``accepted`` may be aggregated; ``errors`` are Flower's error replies
        (which strategies skip and log); ``failures`` has one entry per
        client that contributes nothing, with its reason.
    """
    partition_of = partition_of or {}
    accepted: list[Message] = []
    errors: list[Message] = []
    failures: list[ClientFailure] = []

    def fail(node: int, kind: str, reason: str) -> None:
        failures.append(ClientFailure(node, kind, reason, partition_of.get(node), attempt))

    answered: set[int] = set()
    for reply in replies:
        node = _replying_node(reply, sent)
        answered.add(node)
        if reply.has_error():
            errors.append(reply)
            kind = "unavailable" if reply.error.code in _UNAVAILABLE else "error"
            fail(node, kind, reply.error.reason or f"error code {reply.error.code}")
        elif accept_as_is is not None and accept_as_is(reply):
            accepted.append(reply)
        elif (problem := check_update(reply.content, reference)) is not None:
            fail(node, *problem)
        else:
            accepted.append(reply)
    for message in sent:
        if message.metadata.dst_node_id not in answered:
            fail(message.metadata.dst_node_id, "timeout", "no reply before the round timeout")
    return accepted, errors, failures


def _replying_node(reply: Message, sent: list[Message]) -> int:
    """The node a reply stands for. An error the SuperLink makes for a node
    that went away comes from the SuperLink itself, so match it to the
    message it answers; a reply the node sent names the node."""
    reply_to = reply.metadata.reply_to_message_id
    if reply_to:
        for message in sent:
            if message.metadata.message_id == reply_to:
                return message.metadata.dst_node_id
    return reply.metadata.src_node_id


def failure_counts(failures: list[ClientFailure]) -> dict[str, float]:
    """``clients_failed_<kind>`` for every kind (0 included: absent is not zero in a plot)."""
    return {f"clients_failed_{kind}": float(sum(f.kind == kind for f in failures)) for kind in FAILURE_KINDS}


def failures_csv(failures: list[ClientFailure]) -> str:
    """One line per failure, for the run's per-round artifact."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["attempt", "node_id", "partition_id", "kind", "reason"])
    for f in failures:
        writer.writerow([f.attempt, f.node_id, "" if f.partition_id is None else f.partition_id, f.kind, f.reason])
    return out.getvalue()
