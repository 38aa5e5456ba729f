"""A ServerApp's place in a regional deployment (``scripts/deploy_regions.py``).

The same experiment skeleton (:func:`fl_server.experiments.experiment.run_experiment`)
runs every tier; the run-config keys of :mod:`fl_common.regions` select the tier:

* ``tier=global``: the global ServerApp. Its clients are the R regional
  aggregators (one SuperNode per region, partition id = region); FedAvg
  weights each regional model by its region's example count, so the global
  model is the example-weighted mean of the regional models. After every
  round it logs each region's run: its MLflow id, wall time, start-up.
* ``tier=region``: a regional ServerApp, one run per global round ``g``: it
  starts from the global model handed over by its aggregator, trains round
  ``g`` on its region's C SuperNodes (partitions ``r * C ..``, region-major)
  and hands the regional model and its example count back.

``clients.num`` is R x C in both (the one split of the data; the device of
each client follows from its global partition id, as in a flat run).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message, MessageType
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fl_common import protocol
from fl_common import regions as contract
from fl_server.engine.rounds import GridWrapper
from fl_server.experiments.config import ConfigError


class ExampleCounter(GridWrapper):
    """The Grid, summing the example counts of the training replies that carry
    a model: the regional model's FedAvg weight one tier up. (A deployment
    refuses fault injection, so no such reply is screened out afterwards.)"""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.num_examples = 0
        self.clients = 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error() or reply.metadata.message_type != MessageType.TRAIN:
                continue
            if "arrays" in reply.content and len(reply.content["arrays"]) > 0:
                self.num_examples += int(reply.content["metrics"][protocol.NUM_EXAMPLES])
                self.clients += 1
        return replies


@dataclass(frozen=True)
class TierPlan:
    """Where this ServerApp sits in a regional deployment (None: a flat run)."""

    tier: str
    layout: contract.RegionLayout
    handoff_dir: Path
    region: int = -1
    global_round: int = 0

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "TierPlan | None":
        tier = str(run_config.get(contract.TIER, ""))
        if not tier:
            return None
        if tier not in (contract.TIER_GLOBAL, contract.TIER_REGION):
            raise ConfigError(f"run-config tier={tier!r} is unknown: use '', "
                              f"'{contract.TIER_GLOBAL}' or '{contract.TIER_REGION}'")
        handoff = str(run_config.get(contract.HANDOFF_DIR, ""))
        if not handoff:
            raise ConfigError(f"run-config tier={tier} needs handoff-dir (where the tiers hand models over)")
        try:
            layout = contract.RegionLayout(_int(run_config, contract.REGIONS),
                                           _int(run_config, contract.CLIENTS_PER_REGION))
            if tier == contract.TIER_GLOBAL:
                return cls(tier, layout, Path(handoff))
            region, global_round = _int(run_config, contract.REGION), _int(run_config, contract.GLOBAL_ROUND)
            layout.partitions(region)  # checks the index
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if global_round < 1:
            raise ConfigError(f"run-config global-round={global_round} is invalid: rounds count from 1")
        return cls(tier, layout, Path(handoff), region, global_round)

    @property
    def is_region(self) -> bool:
        return self.tier == contract.TIER_REGION

    def check(self, cfg: DictConfig) -> None:
        """The config and the layout must describe the same federation."""
        if int(cfg.clients.num) != self.layout.num_partitions:
            raise ConfigError(f"clients.num={cfg.clients.num} but the deployment has {self.layout.regions} regions x "
                              f"{self.layout.clients_per_region} clients: clients.num must be "
                              f"{self.layout.num_partitions}")

    def num_nodes(self) -> int:
        """SuperNodes on this ServerApp's SuperLink: the aggregators, or the region's clients."""
        return self.layout.clients_per_region if self.is_region else self.layout.regions

    def experiment(self, cfg: DictConfig) -> str:
        """Regional runs go beside the global ones (one per region and round), not among them."""
        name = str(cfg.tracking.experiment)
        return f"{name}-regions" if self.is_region else name

    def tags(self) -> dict[str, str]:
        tags = {"fc.engine": "deployment", "fc.tier": self.tier, "fc.regions": str(self.layout.regions),
                "fc.clients_per_region": str(self.layout.clients_per_region)}
        if self.is_region:
            tags.update({"fc.region": str(self.region), "fc.global_round": str(self.global_round)})
        return tags

    def wrap_grid(self, grid: Grid) -> Grid:
        return ExampleCounter(grid) if self.is_region else grid

    def run(self, driver, checkpoints, fresh_arrays: ArrayRecord, num_rounds: int) -> ArrayRecord:
        """The global tier runs every round; a regional run only round ``g``, from the handed-over model."""
        if not self.is_region:
            return checkpoints.run(driver, fresh_arrays, num_rounds)
        received = contract.read_handoff(contract.global_model_folder(self.handoff_dir, self.global_round, self.region))
        return driver.run(received.arrays, num_rounds=self.global_round, start_round=self.global_round)

    def hand_back(self, arrays: ArrayRecord, grid: Grid, run_id: str, marks: Mapping[str, float]) -> None:
        """A regional run: the regional model and its example count, for the aggregator."""
        if not self.is_region:
            return
        assert isinstance(grid, ExampleCounter)
        contract.write_handoff(
            contract.regional_model_folder(self.handoff_dir, self.global_round, self.region),
            arrays, grid.num_examples, region=self.region, server_round=self.global_round,
            clients=grid.clients, mlflow_run_id=run_id, **{f"{k}_at": v for k, v in marks.items()},
        )

    def round_report(self, server_round: int) -> tuple[dict[str, float], str]:
        """The global tier, after round ``server_round``: per region its run's
        wall time, start-up and examples (metrics), and the runs' ids (JSON)."""
        if self.is_region:
            return {}, ""
        metrics: dict[str, float] = {}
        runs = []
        for region in range(self.layout.regions):
            folder = contract.round_folder(self.handoff_dir, server_round, region)
            try:
                run = json.loads((folder / "run.json").read_text())
                meta = json.loads((folder / "regional" / "meta.json").read_text())
            except (OSError, json.JSONDecodeError):
                continue  # this region failed this round: the round's failure counts say so
            submitted = float(run["submitted_at"])
            metrics[f"region{region}_run_wall_s"] = float(run["returned_at"]) - submitted
            # submit -> the regional ServerApp's first line, and -> its clients all answered (before training)
            metrics[f"region{region}_serverapp_start_s"] = float(meta["serverapp_main_at"]) - submitted
            if "nodes_discovered_at" in meta:
                metrics[f"region{region}_run_startup_s"] = float(meta["nodes_discovered_at"]) - submitted
            metrics[f"region{region}_examples"] = float(meta["num_examples"])
            runs.append({"region": region, "mlflow_run_id": meta.get("mlflow_run_id"),
                         "flower_run_id": run.get("flower_run_id"),
                         "wall_s": metrics[f"region{region}_run_wall_s"], "num_examples": meta["num_examples"]})
        return metrics, json.dumps({"round": server_round, "regional_runs": runs}, indent=1)


def _int(run_config: Mapping[str, Any], key: str) -> int:
    value = str(run_config.get(key, ""))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"run-config {key}={value!r} is invalid: use an integer") from None
