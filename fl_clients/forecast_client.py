"""ClientApp handlers of the workload-forecasting task: each client is one
edge site training the global forecaster on its own series.

Everything arrives in the message's ConfigRecord: ``forecast-spec`` (the data,
see :class:`fl_datasets.forecast_data.ForecastSpec`) and ``forecaster`` (the
model and optimiser), so clients never compose the config.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fl_clients import privacy  # light: Opacus is imported only when DP-SGD runs
from fl_clients.forecasters import build_forecaster

# The forecasting task and its data (pandas, trace loading) are imported by the
# handlers that use them: fl_clients.app imports this module, and a ClientApp
# process of an image run should not pay for them.
if TYPE_CHECKING:
    from fl_datasets.forecast_data import ForecastSpec, SiteData


def is_forecast_message(config: ConfigRecord) -> bool:
    return "forecast-spec" in config


def site_of(context: Context, spec: ForecastSpec) -> tuple[int, SiteData]:
    """This node's site (its partition id) and its prepared windows."""
    from fl_datasets.forecast_data import build_forecast_data

    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config.get("num-partitions", spec.num_clients))
    if num_partitions != spec.num_clients:
        raise ValueError(
            f"the federation has {num_partitions} SuperNodes but clients.num={spec.num_clients}: "
            f"start it with num-supernodes={spec.num_clients}"
        )
    return partition_id, build_forecast_data(spec).sites[partition_id]


def forecaster_from(config: ConfigRecord, spec: ForecastSpec, arrays: ArrayRecord | None = None) -> torch.nn.Module:
    """The configured forecaster, with ``arrays`` loaded when given."""
    model_cfg = json.loads(str(config["forecaster"]))
    model = build_forecaster(
        model_cfg["model"],
        in_channels=len(spec.columns),
        horizon=spec.horizon,
        level_steps=spec.window if model_cfg["level_centred"] else None,
    )
    if arrays is not None:
        model.load_state_dict(arrays.to_torch_state_dict())
    return model


def train(msg: Message, context: Context, virtual_cost) -> Message:
    """Local Adam epochs on this site's training windows."""
    from fl_clients.forecast_task import train_forecaster
    from fl_datasets.forecast_data import ForecastSpec

    config = msg.content["config"]
    spec = ForecastSpec.from_json(str(config["forecast-spec"]))
    partition_id, site = site_of(context, spec)
    model = forecaster_from(config, spec, msg.content["arrays"])
    server_round = int(config["server-round"])
    optimiser = json.loads(str(config["forecaster"]))
    # a distinct, reproducible shuffle per (seed, round, client)
    seed = int(config["seed"]) * 1_000_003 + server_round * 1_009 + partition_id
    started = time.perf_counter()
    dp_settings = privacy.settings_from_config(config, partition_id)
    dp_round = None
    if dp_settings is None:
        loss = train_forecaster(
            model, *site.train, epochs=int(config["local-epochs"]),
            batch_size=int(optimiser["batch_size"]), lr=float(optimiser["lr"]), seed=seed,
        )[-1]
    else:  # Opacus DP-SGD on the MSE, accountant kept in context.state across rounds
        dp_round = privacy.train_private(
            model, torch.as_tensor(site.train[0]), torch.as_tensor(site.train[1]), torch.nn.MSELoss(),
            epochs=int(config["local-epochs"]), batch_size=int(optimiser["batch_size"]),
            lr=float(optimiser["dp_lr"]), momentum=float(optimiser["dp_momentum"]), seed=seed,
            settings=dp_settings, state=context.state,
        )
        if dp_round.declined:
            return privacy.declined_reply(msg, dp_round, partition_id, server_round)
        loss = dp_round.loss
    arrays = ArrayRecord(model.state_dict())
    metrics = {
        **(dp_round.metrics() if dp_round is not None else {}),
        "train_loss": loss,
        "num-examples": len(site),
        "partition-id": partition_id,
        "dispatch-round": server_round,
        "train_time_s": time.perf_counter() - started,
    }
    metrics.update(virtual_cost(config, spec, partition_id, server_round, len(site), msg, arrays))
    return Message(content=RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation on this site's validation windows (original units)."""
    from fl_clients.forecast_task import evaluate_forecaster
    from fl_datasets.forecast_data import ForecastSpec

    config = msg.content["config"]
    spec = ForecastSpec.from_json(str(config["forecast-spec"]))
    _, site = site_of(context, spec)
    model = forecaster_from(config, spec, msg.content["arrays"])
    scores = evaluate_forecaster(model, *site.val, site.y_train, spec.season, site.normaliser)
    metrics = {f"eval_{k}": v for k, v in scores.items()}
    metrics["num-examples"] = len(site.val[0])
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
