"""The wire contract between the ServerApp and the ClientApp.

Server and client code never import each other: everything one tells the
other travels in a Flower message under one of these keys, and the few rules
both sides must compute alike (the client seed, who declined) live here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# ConfigRecord keys (server -> client)
TASK = "task"                    # the registered task name (tasks.registry)
NUM_CLIENTS = "num-clients"      # size of the federation (clients.num)
SEED = "seed"                    # the run's seed
DEVICES = "devices"              # the devices config (JSON): profiles, mix, cost-model knobs
SERVER_ROUND = "server-round"    # set by Flower's strategies in configure_train / configure_evaluate
ROUND_ATTEMPT = "round-attempt"  # > 1 when the driver retries a round

# MetricRecord keys (client -> server)
PARTITION_ID = "partition-id"
NUM_EXAMPLES = "num-examples"    # FedAvg's weight
DISPATCH_ROUND = "dispatch-round"
TRAIN_TIME_S = "train_time_s"
DECLINED = "dp_declined"         # 1: the client declined to train (its DP budget); no update
STALENESS = "staleness"          # set by the server's virtual clock on each applied update
# virtual clock: what the round would cost on the client's device profile
VC_COMPUTE_S, VC_DOWNLINK_S, VC_UPLINK_S = "vc_compute_s", "vc_downlink_s", "vc_uplink_s"
VC_ENERGY_J, VC_UP_BYTES = "vc_energy_j", "vc_up_bytes"
VC_DURATION_KEYS = (VC_DOWNLINK_S, VC_COMPUTE_S, VC_UPLINK_S)
# set by the server's byte accounting on each training reply: the serialised bytes of the reply and of
# the message that node received, as they crossed the wire (compressed, if so); hierarchical aggregation
# (strategies/hierarchical.py) forwards them over its links
WIRE_UP_BYTES, WIRE_DOWN_BYTES = "wire-up-bytes", "wire-down-bytes"
# records a client sends beside its model, named "upload-<name>" in the reply (e.g. the raw hard cases a
# config lets the cloud store): counted in the uplink bytes, handed to the task's server, never aggregated
UPLOAD_PREFIX = "upload-"
# bookkeeping keys that are not training metrics (the strategy's aggregated metrics skip them)
BOOKKEEPING = (NUM_EXAMPLES, PARTITION_ID, DISPATCH_ROUND, WIRE_UP_BYTES, WIRE_DOWN_BYTES)

# node_config keys (set per SuperNode)
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A distinct, reproducible seed per (run seed, round, client)."""
    return int(seed) * 1_000_003 + int(server_round) * 1_009 + int(partition_id)


def node_partition(node_config: Mapping[str, Any], num_clients: int) -> int:
    """This SuperNode's partition id, checked against the federation's size."""
    partition_id = int(node_config[NODE_PARTITION_ID])
    num_partitions = int(node_config.get(NODE_NUM_PARTITIONS, num_clients))
    if num_partitions != num_clients:
        raise ValueError(
            f"the federation has {num_partitions} SuperNodes but clients.num={num_clients}: "
            f"start it with num-supernodes={num_clients}"
        )
    return partition_id


def declined(metrics: Mapping[str, Any]) -> bool:
    """Whether a reply's metrics say the client declined to train."""
    return int(metrics.get(DECLINED, 0)) == 1


def virtual_duration(metrics: Mapping[str, Any]) -> float:
    """Downlink + compute + uplink virtual seconds of one reply."""
    return float(sum(metrics.get(k, 0.0) for k in VC_DURATION_KEYS))
