"""fedcontinuum ClientApp: one pipeline for every task.

Everything a client needs arrives in the message's ConfigRecord (composed by
the ServerApp from ``conf/``), so clients never re-compose the config. The
task (``task`` key, :mod:`tasks.registry`) trains and evaluates; this module
does what is the same for every task, in this order:

1. the partition (its data shard, edge site or cluster) from the node config;
2. fault injection (tests, robustness studies), only when the run configures it;
3. downlink decompression: the model as this client holds it;
4. the task's local training, with DP-SGD handed in when configured;
5. fault corruption and uplink compression of the trained model;
6. the virtual clock: what the round would cost on this client's device
   (training FLOPs from the task, the actual payload bytes both ways).
"""

from __future__ import annotations

import json
import time
from functools import lru_cache, partial

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edgesim.devices import Fleet, round_cost
from fl_clients import privacy, regional
from fl_clients.privacy import central_clipping_mod
from fl_clients.secagg import secagg_mod
from fl_common import compression, faults, protocol
from fl_common.dp_config import settings_from_config
from tasks.base import ClientRound, LocalUpdate
from tasks.registry import get_task

# Ray runs one client per CPU slot: one intra-op thread each avoids oversubscription.
torch.set_num_threads(1)

app = ClientApp()


def client_round(config: ConfigRecord, context: Context) -> ClientRound:
    """What the task needs to know about this client and round."""
    num_clients = int(config[protocol.NUM_CLIENTS])
    partition_id = protocol.node_partition(context.node_config, num_clients)
    server_round = int(config[protocol.SERVER_ROUND])
    dp = settings_from_config(config, partition_id)
    return ClientRound(
        config=config,
        partition_id=partition_id,
        num_clients=num_clients,
        server_round=server_round,
        seed=protocol.client_seed(int(config[protocol.SEED]), server_round, partition_id),
        state=context.state,
        dp=dp,
        train_private=None if dp is None else partial(privacy.train_private, settings=dp, state=context.state),
    )


# SecAgg+ and client-side central-DP clipping act only on runs that use them
@app.train(mods=[secagg_mod, central_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    """Local training of the configured task on this client's partition."""
    if regional.is_aggregator(context):  # a regional deployment's global tier: run the region instead
        return regional.train_region(msg, context)
    config = msg.content["config"]
    task = get_task(str(config[protocol.TASK]))
    run = client_round(config, context)
    fault = faults.planned_fault(config, run.partition_id, run.num_clients)
    faults.before_training(fault, config)
    received = compression.client_receive(msg.content["arrays"], config, context.state)
    compression.client_remember_model(received, config, context.state)
    started = time.perf_counter()
    update = task.train(received, run)
    if update.declined is not None:  # DP-SGD: the budget forbids this round
        return privacy.declined_reply(msg, update.declined, run.partition_id, run.server_round)
    trained = faults.corrupt(fault, config, update.arrays, received)
    arrays = compression.client_send(trained, received, config, context.state)
    metrics = {
        **update.metrics,
        protocol.NUM_EXAMPLES: update.num_examples,
        protocol.PARTITION_ID: run.partition_id,
        protocol.DISPATCH_ROUND: run.server_round,
        protocol.TRAIN_TIME_S: time.perf_counter() - started,
    }
    metrics.update(virtual_cost(config, run, update, msg.content["arrays"], arrays))
    uploads = {protocol.UPLOAD_PREFIX + name: record for name, record in update.uploads.items()}
    return Message(content=RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics), **uploads}), reply_to=msg)


@lru_cache(maxsize=4)
def _fleet(devices_json: str) -> Fleet:
    return Fleet.from_config(json.loads(devices_json))


@lru_cache(maxsize=4)
def _devices(devices_json: str, num_clients: int, seed: int) -> tuple[str, ...]:
    """Every client's device (the server's ``Fleet.assign``), once per process, not once per message."""
    return tuple(_fleet(devices_json).assign(num_clients, seed))


def virtual_cost(config: ConfigRecord, run: ClientRound, update: LocalUpdate,
                 received: ArrayRecord, sent: ArrayRecord) -> dict[str, float]:
    """What this round would cost on this client's device (virtual clock)."""
    fleet = _fleet(str(config[protocol.DEVICES]))
    seed = int(config[protocol.SEED])
    profile = fleet.profiles[_devices(str(config[protocol.DEVICES]), run.num_clients, seed)[run.partition_id]]
    up_bytes = sent.count_bytes() + sum(record.count_bytes() for record in update.uploads.values())
    cost = round_cost(
        fleet, profile, update.train_flops,
        down_bytes=received.count_bytes(), up_bytes=up_bytes,
        seed=seed, client=run.partition_id, server_round=run.server_round,
    )
    return {
        protocol.VC_COMPUTE_S: cost.compute_s,
        protocol.VC_DOWNLINK_S: cost.downlink_s,
        protocol.VC_UPLINK_S: cost.uplink_s,
        protocol.VC_ENERGY_J: cost.energy_j,
        protocol.VC_UP_BYTES: float(up_bytes),
    }


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition (and so which device) this node holds."""
    metrics = MetricRecord({protocol.PARTITION_ID: int(context.node_config[protocol.NODE_PARTITION_ID])})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Federated evaluation of the global model on this client's partition."""
    config = msg.content["config"]
    task = get_task(str(config[protocol.TASK]))
    metrics = task.evaluate(msg.content["arrays"], client_round(config, context))
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
