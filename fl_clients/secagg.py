"""Client side of secure aggregation: Flower's ``secaggplus_mod``, switched on
per message.

Flower's SecAgg+ (``flwr.client.mod.secaggplus_mod``) belongs to the legacy
``FitIns``/``FitRes`` API: in its masking stage it calls the ClientApp and
reads the reply as a ``FitRes`` (records ``fitres.parameters``,
``fitres.num_examples``, ``fitres.metrics``). This module puts it in front of
our Message-API ``train()``:

* a message without the ``secaggplus`` ConfigRecord (every run without
  SecAgg+, and every evaluate/query message) passes straight through;
* in the masking stage the ``secaggplus`` record is taken off the message (so
  Flower's clipping mods, which want exactly one ConfigRecord, still work),
  ``train()`` runs, and its reply becomes a ``FitRes`` whose parameters are
  the client's *update* (trained - received model): SecAgg+ clips values to
  ``[-clipping_range, clipping_range]`` before quantising, and updates are
  far inside that range where weights might not be. ``secaggplus_mod`` then
  masks it and empties the arrays, so the reply carries masked integers only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fl_common import protocol

CallNext = Callable[[Message, Context], Message]


def secagg_mod(msg: Message, ctxt: Context, call_next: CallNext) -> Message:
    """Run Flower's ``secaggplus_mod`` for SecAgg+ messages, else pass through."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content:
        return call_next(msg, ctxt)
    return secaggplus_mod(msg, ctxt, _as_fitres(call_next))


def _as_fitres(call_next: CallNext) -> CallNext:
    """Adapt our ``train()`` to the ``FitRes`` reply ``secaggplus_mod`` expects."""

    def train_as_fitres(msg: Message, ctxt: Context) -> Message:
        received = msg.content["arrays"]
        del msg.content[RECORD_KEY_CONFIGS]  # secaggplus_mod already holds its configs
        reply = call_next(msg, ctxt)
        if reply.has_error():
            return reply
        metrics = dict(reply.content["metrics"])
        update = update_arrays(received, reply.content["arrays"])
        fitres = FitRes(
            status=Status(code=Code.OK, message="Success"),
            parameters=ndarrays_to_parameters(update),
            num_examples=int(metrics[protocol.NUM_EXAMPLES]),
            metrics=metrics,
        )
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    return train_as_fitres


def update_arrays(received, trained) -> list[np.ndarray]:
    """trained - received, per tensor in the received model's order; zeros
    when the client sent no model (it declined to train: weight 0 anyway)."""
    if len(trained) == 0:
        return [np.zeros_like(received[k].numpy(), dtype=np.float64) for k in received.keys()]
    return [
        trained[k].numpy().astype(np.float64) - received[k].numpy().astype(np.float64)
        for k in received.keys()
    ]
