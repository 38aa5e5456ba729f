"""The server's side of the wire: byte accounting and update compression.

``AccountingGrid`` wraps Flower's Grid. Strategies and the round driver keep
sending and receiving plain models; this wrapper

* counts the serialised bytes (:func:`fl_common.compression.serialised_size`)
  of every training message it sends (downlink) and of every reply (uplink);
* with compression on, decodes each compressed reply into the model the
  client would have sent uncompressed (the model that was sent to that node
  plus the decoded delta), so every strategy and Flower's DP wrappers work
  unchanged;
* with downlink compression on, replaces the model in each training message
  by the compressed delta to the model that node holds, and keeps, per node,
  the model it will then hold (committed once the node replies successfully).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fl_common import compression as comp
from fl_common import protocol
from fl_server.engine.rounds import GridWrapper


class AccountingGrid(GridWrapper):
    """A Grid that accounts (and optionally compresses) training traffic.

    Parameters
    ----------
    grid : Grid
        Flower's Grid.
    settings : CompressionSettings, optional
        Compression; None sends full-precision models both ways.
    """

    def __init__(self, grid: Grid, settings: comp.CompressionSettings | None = None) -> None:
        super().__init__(grid)
        self.settings = settings
        self.views: dict[int, tuple[comp.Tensors, int]] = {}  # node -> (model it holds, version)
        self._round = {"uplink_bytes": 0, "downlink_bytes": 0}
        self._total = {"uplink_bytes_total": 0, "downlink_bytes_total": 0}

    # -------------------------------------------------------------- accounting
    def take_round_counts(self) -> dict[str, float]:
        """Bytes since the last call (this round) and since the start."""
        counts = {**self._round, **self._total}
        self._round = {"uplink_bytes": 0, "downlink_bytes": 0}
        return {k: float(v) for k, v in counts.items()}

    def _count(self, direction: str, content: RecordDict) -> int:
        size = comp.serialised_size(content)
        self._round[f"{direction}_bytes"] += size
        self._total[f"{direction}_bytes_total"] += size
        return size

    # ------------------------------------------------------------ send/receive
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        sent_models: dict[int, ArrayRecord] = {}
        pending_views: dict[int, tuple[comp.Tensors, int]] = {}
        outgoing, down_bytes = [], {}
        for msg in messages:
            if _is_training(msg) and "arrays" in msg.content:
                sent_models[msg.metadata.dst_node_id] = msg.content["arrays"]
                msg = self._downlink(msg, pending_views)
            if msg.metadata.message_type == MessageType.TRAIN:
                down_bytes[msg.metadata.dst_node_id] = self._count("downlink", msg.content)
            outgoing.append(msg)
        replies = list(self._grid.send_and_receive(outgoing, timeout=timeout))
        for reply in replies:
            if reply.metadata.message_type != MessageType.TRAIN:
                continue
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.views.pop(node, None)  # it may not hold what we think: resend in full
                continue
            up_bytes = self._count("uplink", reply.content)
            if "metrics" in reply.content:  # what crossed the wire, for strategies that forward it (hierarchies)
                reply.content["metrics"][protocol.WIRE_UP_BYTES] = up_bytes
                reply.content["metrics"][protocol.WIRE_DOWN_BYTES] = down_bytes.get(node, 0)
            if node in pending_views:
                self.views[node] = pending_views[node]
            if self.settings is not None and node in sent_models:
                self._decode_uplink(reply, sent_models[node])
        return replies

    def _downlink(self, msg: Message, pending: dict[int, tuple[comp.Tensors, int]]) -> Message:
        """The message a node gets: unchanged, or with the compressed delta to
        the model it holds (the full model if it holds none yet)."""
        if self.settings is None or not self.settings.downlink:
            return msg
        node = msg.metadata.dst_node_id
        config = ConfigRecord(dict(msg.content["config"]))  # the strategy shares one record
        model = comp.tensors(msg.content["arrays"])
        version = int(config[protocol.SERVER_ROUND])
        held = self.views.get(node)
        if held is None:
            config[comp.DOWNLINK_BASE] = -1
            arrays, pending[node] = msg.content["arrays"], (model, version)
        else:
            view, base = held
            config[comp.DOWNLINK_BASE] = base
            arrays, sent = comp.round_trip(comp.subtract(model, view), self.settings)
            pending[node] = (comp.add(view, sent), version)
        content = RecordDict({**dict(msg.content.items()), "arrays": arrays, "config": config})
        return Message(content=content, dst_node_id=node, message_type=msg.metadata.message_type,
                       group_id=msg.metadata.group_id or None, ttl=msg.metadata.ttl or None)

    def _decode_uplink(self, reply: Message, sent: ArrayRecord) -> None:
        """Replace a compressed reply's arrays by the model it stands for:
        the model sent to that node + the decoded delta (same keys, same order)."""
        record = reply.content["arrays"]
        if len(record) == 0:  # a client that declined to train sends nothing
            return
        reference = comp.tensors(sent)
        reply.content["arrays"] = comp.to_record(comp.add(reference, comp.decode(record, reference)))


def _is_training(msg: Message) -> bool:
    return msg.metadata.message_type == MessageType.TRAIN and "config" in msg.content


class ReplyRecorder(GridWrapper):
    """The Grid, keeping each partition's last trained weights (its training reply).

    A task whose server evaluates what each client deploys when part or all
    of its model is local (personal heads, local mixers, non-federated arms)
    reads them; wrapped around :class:`AccountingGrid`, it sees decoded models.
    """

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.latest: dict[int, dict[str, Any]] = {}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error() or reply.metadata.message_type != MessageType.TRAIN or "arrays" not in reply.content:
                continue
            if len(reply.content["arrays"]) == 0:  # declined (DP budget): nothing trained
                continue
            partition = int(reply.content["metrics"][protocol.PARTITION_ID])
            self.latest[partition] = reply.content["arrays"].to_torch_state_dict()
        return replies


class UploadCollector(GridWrapper):
    """The Grid, taking the data clients send beside their models out of the
    training replies (``upload-<name>`` records) and handing it to ``sink``
    before anything aggregates; wrapped around :class:`AccountingGrid`, whose
    byte count includes it.

    Parameters
    ----------
    grid : Grid
    sink : callable
        ``(partition, dispatch_round, {name: ArrayRecord})`` per reply with uploads.
    """

    def __init__(self, grid: Grid, sink) -> None:
        super().__init__(grid)
        self.sink = sink

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error() or reply.metadata.message_type != MessageType.TRAIN:
                continue
            names = [key for key in reply.content.keys() if key.startswith(protocol.UPLOAD_PREFIX)]
            if not names:
                continue
            uploads = {key.removeprefix(protocol.UPLOAD_PREFIX): reply.content[key] for key in names}
            for key in names:
                del reply.content[key]
            metrics = reply.content["metrics"]
            self.sink(int(metrics[protocol.PARTITION_ID]), int(metrics[protocol.DISPATCH_ROUND]), uploads)
        return replies
