"""The regional aggregator: a SuperNode of the global SuperLink whose
ClientApp, on each TRAIN message, runs its region as a Flower run of its own.

Flower lets no process be a client of one SuperLink and a server of another,
and a run returns no payload to whoever submitted it (README, "Deployment
Engine: what Flower allows"). So, per global round ``g``:

1. the global model is written to ``<handoff-dir>/round-g/region-r/global``;
2. a run of the regional ServerApp (run-config ``tier=region``) is submitted to
   the region's SuperLink over the Control API with ``flwr run … --stream``, as
   our launcher does, and followed to its end (its log beside the hand-off);
3. the regional model and its example count are read back from
   ``…/regional`` (written by that run), the timings go to ``…/run.json``;
4. the reply is the regional model, weighted by the region's examples.

Where the region's SuperLink is and which app to submit come from this
node's config (:mod:`fl_common.regions`), everything else from this run's own
run-config (the same overrides, tracking URI and project dir).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict

from fl_common import protocol
from fl_common import regions as contract

# the connection name our SuperLinks write into their FLWR_HOME (fl_server.runtime.superlink.CONNECTION)
CONNECTION = "fedcontinuum"
_RUN_ID = re.compile(r"Successfully started run (\d+)")
# a regional run is one round of a run that lives one level up: no checkpoints, and its model
# goes up through the hand-off, not as an MLflow artifact
REGIONAL_OVERRIDES = ("checkpoint.enabled=false", "tracking.log_model=false")


def is_aggregator(context: Context) -> bool:
    """A ClientApp of the global tier's run is a regional aggregator."""
    return str(context.run_config.get(contract.TIER, "")) == contract.TIER_GLOBAL


def regional_run_config(context: Context, region: int, server_round: int) -> dict[str, str]:
    """The regional run's run-config: this run's, with the regional tier's keys."""
    run_config = context.run_config
    overrides = " ".join([str(run_config.get("overrides", "")), *REGIONAL_OVERRIDES]).strip()
    return {
        "overrides": overrides,
        "project-dir": str(run_config.get("project-dir", "")),
        "tracking-uri": str(run_config.get("tracking-uri", "")),
        contract.TIER: contract.TIER_REGION,
        contract.REGIONS: str(run_config[contract.REGIONS]),
        contract.CLIENTS_PER_REGION: str(run_config[contract.CLIENTS_PER_REGION]),
        contract.REGION: str(region),
        contract.GLOBAL_ROUND: str(server_round),
        contract.HANDOFF_DIR: str(run_config[contract.HANDOFF_DIR]),
    }


def submit_regional_run(context: Context, region: int, server_round: int, log_path: Path) -> int | None:
    """``flwr run APP fedcontinuum --stream`` against the region's SuperLink; returns Flower's run id."""
    node = context.node_config
    flwr = Path(sys.executable).parent / "flwr"  # the same environment as this ClientApp
    command = [str(flwr), "run", str(node[contract.NODE_APP_DIR]), CONNECTION, "--stream",
               *contract.run_config_args(regional_run_config(context, region, server_round))]
    env = {**os.environ, "FLWR_HOME": str(node[contract.NODE_REGION_HOME])}  # its connection, not this node's
    with log_path.open("w") as log:
        subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    match = _RUN_ID.search(log_path.read_text(errors="replace"))
    return int(match.group(1)) if match else None


def train_region(msg: Message, context: Context) -> Message:
    """Hand the global model to the region, run it, reply with the regional model."""
    config = msg.content["config"]
    region = int(context.node_config[protocol.NODE_PARTITION_ID])
    server_round = int(config[protocol.SERVER_ROUND])
    root = Path(str(context.run_config[contract.HANDOFF_DIR]))
    folder = contract.round_folder(root, server_round, region)
    contract.write_handoff(contract.global_model_folder(root, server_round, region), msg.content["arrays"], 0,
                           region=region, server_round=server_round)
    submitted = time.time()
    log_path = folder / "flwr-run.log"
    flower_run_id = submit_regional_run(context, region, server_round, log_path)
    returned = time.time()
    contract.write_json(folder / "run.json", {"region": region, "server_round": server_round,
                                              "flower_run_id": flower_run_id,
                                              "submitted_at": submitted, "returned_at": returned})
    try:
        result = contract.read_handoff(contract.regional_model_folder(root, server_round, region))
    except contract.HandoffError as err:
        # Flower sends the reason back to the global ServerApp as this node's failure
        raise RuntimeError(f"region {region}'s run for round {server_round} (Flower run {flower_run_id}) "
                           f"returned no model: {err}; its log: {log_path}") from None
    metrics = {
        protocol.NUM_EXAMPLES: result.num_examples,
        protocol.PARTITION_ID: region,
        protocol.DISPATCH_ROUND: server_round,
        protocol.TRAIN_TIME_S: returned - submitted,
        "regional_run_wall_s": returned - submitted,
        "regional_clients": int(result.info.get("clients", 0)),
    }
    return Message(content=RecordDict({"arrays": result.arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)
