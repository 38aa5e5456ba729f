"""fedcontinuum ClientApp: trains (and optionally evaluates) the global model
on this SuperNode's partition.

Everything a client needs arrives in the message's ConfigRecord (composed by
the ServerApp from ``conf/``), so clients never re-compose the config.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_clients import compression, faults, forecast_client, privacy, rl_client
from fl_clients.privacy import central_clipping_mod
from fl_clients.secagg import secagg_mod
from fl_clients.devices import Fleet, forecaster_costs, model_costs, round_cost
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


def _model(msg: Message, config: ConfigRecord, spec: DataSpec, arrays: ArrayRecord | None = None) -> torch.nn.Module:
    model = build_model(str(config["model"]), spec.num_classes)
    model.load_state_dict((arrays if arrays is not None else msg.content["arrays"]).to_torch_state_dict())
    return model


# SecAgg+ and client-side central-DP clipping act only on runs that use them
@app.train(mods=[secagg_mod, central_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    """Local SGD epochs on this client's partition."""
    config = msg.content["config"]
    if forecast_client.is_forecast_message(config):
        return forecast_client.train(msg, context, _virtual_cost)
    if rl_client.is_rl_message(config):  # federated PPO / QMIX agents in the twin
        return rl_client.train(msg, context)
    spec = DataSpec.from_json(str(config["data-spec"]))
    partition_id, data = _partition(context, spec)
    # --- fault injection (tests, robustness studies): only when the run configures faults.*
    fault = faults.planned_fault(config, partition_id, spec.num_clients)
    faults.before_training(fault, config)
    # --- compression (downlink): the model as this client holds it
    received = compression.client_receive(msg.content["arrays"], config, context.state)
    compression.client_remember_model(received, config, context.state)
    model = _model(msg, config, spec, received)
    server_round = int(config["server-round"])
    started = time.perf_counter()
    # a distinct, reproducible shuffle per (seed, round, client)
    seed = int(config["seed"]) * 1_000_003 + server_round * 1_009 + partition_id
    loss, dp_round = _train_image(model, data, config, seed, partition_id, context)
    if dp_round is not None and dp_round.declined:  # --- DP-SGD: the budget forbids this round
        return privacy.declined_reply(msg, dp_round, partition_id, server_round)
    # --- compression (uplink): the encoded delta, or the model itself
    trained = faults.corrupt(fault, config, ArrayRecord(model.state_dict()), received)
    arrays = compression.client_send(trained, received, config, context.state)
    metrics = {
        "train_loss": loss,
        "num-examples": len(data),
        "partition-id": partition_id,
        "dispatch-round": server_round,
        "train_time_s": time.perf_counter() - started,
        **(dp_round.metrics() if dp_round is not None else {}),
    }
    metrics.update(_virtual_cost(config, spec, partition_id, server_round, len(data), msg, arrays))
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def _train_image(model, data, config, seed, partition_id, context) -> tuple[float, privacy.PrivateRound | None]:
    """Plain local SGD, or DP-SGD (Opacus) when the run configures it."""
    settings = privacy.settings_from_config(config, partition_id)
    hyper = dict(epochs=int(config["local-epochs"]), batch_size=int(config["batch-size"]),
                 lr=float(config["lr"]), momentum=float(config["momentum"]), seed=seed)
    if settings is None:
        return train_local(model, data, **hyper), None
    outcome = privacy.train_private(
        model, torch.from_numpy(data.x), torch.from_numpy(data.y), torch.nn.CrossEntropyLoss(),
        settings=settings, state=context.state, **hyper,
    )
    return outcome.loss, outcome


def _fleet(config: ConfigRecord) -> Fleet:
    return _fleet_from_json(str(config["devices"]))


@lru_cache(maxsize=4)
def _fleet_from_json(text: str) -> Fleet:
    return Fleet.from_config(json.loads(text))


def _virtual_cost(config, spec, partition_id, server_round, samples, msg, arrays) -> dict[str, float]:
    """What this round would cost on this client's device (virtual clock)."""
    if "devices" not in config:
        return {}
    fleet = _fleet(config)
    profile = fleet.profiles[fleet.assign(spec.num_clients, spec.seed)[partition_id]]
    forward_flops, _, _ = _costs(config, spec)
    train_flops = 3 * forward_flops * samples * int(config["local-epochs"])  # fwd + 2x bwd
    cost = round_cost(
        fleet, profile, train_flops,
        down_bytes=msg.content["arrays"].count_bytes(), up_bytes=arrays.count_bytes(),
        seed=spec.seed, client=partition_id, server_round=server_round,
    )
    return {
        "vc_compute_s": cost.compute_s,
        "vc_downlink_s": cost.downlink_s,
        "vc_uplink_s": cost.uplink_s,
        "vc_energy_j": cost.energy_j,
        "vc_up_bytes": float(arrays.count_bytes()),
    }


def _costs(config: ConfigRecord, spec) -> tuple[float, int, int]:
    if forecast_client.is_forecast_message(config):
        model = json.loads(str(config["forecaster"]))
        return forecaster_costs(model["model"], len(spec.columns), spec.window, spec.horizon, model["level_centred"])
    return model_costs(str(config["model"]), spec.num_classes)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition (and so which device) this node holds."""
    metrics = MetricRecord({"partition-id": int(context.node_config["partition-id"])})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Federated evaluation of the global model on this client's partition."""
    config = msg.content["config"]
    if forecast_client.is_forecast_message(config):
        return forecast_client.evaluate(msg, context)
    if rl_client.is_rl_message(config):
        return rl_client.evaluate(msg, context)
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
