"""ClientApp handlers of the RL tasks (``task.kind == rl``).

PPO: each client is one edge site (node ``partition-id`` of the twin);
QMIX: each client is one edge cluster (cluster ``partition-id``). Everything
arrives in the ConfigRecord as ``rl-spec`` (:class:`fl_clients.rl.spec.RLSpec`).

What stays on the client lives in ``context.state`` (simulated clients are
re-created every round, Flower issue #2216; the context survives):

* ``personal_head`` (PPO) / ``local_mixer`` (QMIX): the local layers
  replace the global ones before training;
* ``federated: false`` (the non-federated MARL arm): the client ignores the
  global model after round 1 and continues from its own weights.

The reply always carries the full trained model, so the server can evaluate
what each site actually deploys.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fl_clients.rl.spec import RLSpec, client_seed, install_forecaster

# TorchRL loads only when an RL message arrives (the ClientApp serves every task).

LOCAL_KEY = "rl-local"  # context.state: this client's last trained weights
FORECASTER_KEY = "rl-forecaster"  # ConfigRecord: a trained forecaster's bytes (task.forecaster=federated:...)


def is_rl_message(config: ConfigRecord) -> bool:
    return "rl-spec" in config


def local_prefixes(spec: RLSpec) -> tuple[str, ...]:
    """State-dict key prefixes that never take the global values."""
    from fl_clients.rl import ppo, qmix

    if spec.algo == "ppo" and spec.personal_head:
        return ppo.HEAD_PREFIXES
    if spec.algo == "qmix" and spec.local_mixer:
        return (qmix.MIXER_PREFIX,)
    return ()


def deployed_state(spec: RLSpec, global_state: dict, local_state: dict | None) -> dict:
    """The weights a client acts with: global, with its local parts (or all of it) kept."""
    if local_state is None:
        return dict(global_state)
    if not spec.federated:
        return dict(local_state)
    prefixes = local_prefixes(spec)
    return {k: (local_state[k] if prefixes and k.startswith(prefixes) else v) for k, v in global_state.items()}


def _partition(context: Context, spec: RLSpec) -> int:
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config.get("num-partitions", spec.num_clients))
    if num_partitions != spec.num_clients:
        raise ValueError(f"the federation has {num_partitions} SuperNodes but clients.num={spec.num_clients}: "
                         f"start it with num-supernodes={spec.num_clients}")
    return partition_id


def _spec(config: ConfigRecord) -> RLSpec:
    """The run's spec, with its trained forecaster (if any) installed in this process."""
    spec = RLSpec.from_json(str(config["rl-spec"]))
    install_forecaster(spec, config[FORECASTER_KEY] if FORECASTER_KEY in config else None)
    return spec


def _model(spec: RLSpec, partition_id: int) -> torch.nn.Module:
    from fl_clients.rl import ppo, qmix

    return ppo.build_agent(spec) if spec.algo == "ppo" else qmix.build_learner(spec, cluster=partition_id)


def _local_state(context: Context) -> dict | None:
    if LOCAL_KEY not in context.state:
        return None
    return context.state[LOCAL_KEY].to_torch_state_dict()


def train(msg: Message, context: Context) -> Message:
    """One round of local PPO (one site) or QMIX/VDN (one cluster)."""
    from fl_clients.rl import ppo, qmix

    config = msg.content["config"]
    spec = _spec(config)
    partition_id = _partition(context, spec)
    server_round = int(config["server-round"])
    model = _model(spec, partition_id)
    model.load_state_dict(deployed_state(spec, msg.content["arrays"].to_torch_state_dict(), _local_state(context)))
    seed = client_seed(spec, server_round, partition_id)
    started = time.perf_counter()
    if spec.algo == "ppo":
        env = ppo.make_site_env(spec, partition_id)
        metrics = ppo.train_ppo(model, env, spec.steps_per_round, ppo.PPOHyper.from_dict(spec.hyper), seed)
    else:
        env = qmix.make_cluster_env(spec, partition_id)
        metrics = qmix.train_qmix(model, env, spec.steps_per_round, qmix.QMixHyper.from_dict(spec.hyper), seed,
                                  steps_before=(server_round - 1) * spec.steps_per_round)
    arrays = ArrayRecord(model.state_dict())
    context.state[LOCAL_KEY] = ArrayRecord(model.state_dict())
    metrics.update({
        "num-examples": spec.steps_per_round,  # FedAvg weighs clients by environment steps
        "partition-id": partition_id,
        "dispatch-round": server_round,
        "train_time_s": time.perf_counter() - started,
    })
    metrics = {k: v for k, v in metrics.items() if v == v}  # no NaN (e.g. no TD update yet) into MLflow
    return Message(content=RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation: the policy this client would deploy, alone on its site/cluster."""
    from fl_clients.rl.deploy import evaluate_deployment

    config = msg.content["config"]
    spec = _spec(config)
    partition_id = _partition(context, spec)
    model = _model(spec, partition_id)
    model.load_state_dict(deployed_state(spec, msg.content["arrays"].to_torch_state_dict(), _local_state(context)))
    scores, _ = evaluate_deployment(spec, {partition_id: model}, spec.eval_seeds[:1])
    metrics = {"eval_return": scores["return"], "eval_slo_violation_rate": scores["slo_violation_rate"],
               "num-examples": 1}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
