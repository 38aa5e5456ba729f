"""plain-fedavg ClientApp: local training on this SuperNode's IID shard."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from plain_fedavg_app.task import SEED, load_partition, new_model, train as train_fn

torch.set_num_threads(1)

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on the local data."""
    model = new_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())

    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    data = load_partition(partition_id, num_partitions)

    config = msg.content["config"]
    server_round = int(config["server-round"])
    loss = train_fn(
        model,
        data,
        epochs=int(context.run_config["local-epochs"]),
        batch_size=int(context.run_config["batch-size"]),
        lr=float(config["lr"]),
        momentum=float(context.run_config["momentum"]),
        # same per-(seed, round, client) shuffle as fedcontinuum
        seed=SEED * 1_000_003 + server_round * 1_009 + partition_id,
    )

    metrics = MetricRecord({"train_loss": loss, "num-examples": len(data[1])})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)
