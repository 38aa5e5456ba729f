"""fedcontinuum ClientApp: trains (and optionally evaluates) the global model
on this SuperNode's partition.

Everything a client needs arrives in the message's ConfigRecord (composed by
the ServerApp from ``conf/``), so clients never re-compose the config.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_clients.image_task import evaluate, train_local
from fl_clients.models import build_model
from fl_datasets.federated import DataSpec, build_image_data

# Ray runs one client per CPU slot: one intra-op thread each avoids oversubscription.
torch.set_num_threads(1)

app = ClientApp()


def _partition(context: Context, spec: DataSpec):
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config.get("num-partitions", spec.num_clients))
    if num_partitions != spec.num_clients:
        raise ValueError(
            f"the federation has {num_partitions} SuperNodes but clients.num="
            f"{spec.num_clients}: start it with num-supernodes={spec.num_clients}"
        )
    return partition_id, build_image_data(spec).clients[partition_id]


def _model(msg: Message, config: ConfigRecord, spec: DataSpec) -> torch.nn.Module:
    model = build_model(str(config["model"]), spec.num_classes)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local SGD epochs on this client's partition."""
    config = msg.content["config"]
    spec = DataSpec.from_json(str(config["data-spec"]))
    partition_id, data = _partition(context, spec)
    model = _model(msg, config, spec)
    server_round = int(config["server-round"])
    started = time.perf_counter()
    loss = train_local(
        model,
        data,
        epochs=int(config["local-epochs"]),
        batch_size=int(config["batch-size"]),
        lr=float(config["lr"]),
        momentum=float(config["momentum"]),
        # a distinct, reproducible shuffle per (seed, round, client)
        seed=int(config["seed"]) * 1_000_003 + server_round * 1_009 + partition_id,
    )
    metrics = MetricRecord(
        {
            "train_loss": loss,
            "num-examples": len(data),
            "partition-id": partition_id,
            "train_time_s": time.perf_counter() - started,
        }
    )
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Federated evaluation of the global model on this client's partition."""
    config = msg.content["config"]
    spec = DataSpec.from_json(str(config["data-spec"]))
    partition_id, data = _partition(context, spec)
    model = _model(msg, config, spec)
    result = evaluate(model, data, spec.num_classes)
    metrics = MetricRecord(
        {
            "eval_loss": result["loss"],
            "eval_accuracy": result["accuracy"],
            "num-examples": len(data),
        }
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
