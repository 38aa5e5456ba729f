"""The contract of a regional deployment (``scripts/deploy_regions.py``):
the global ServerApp, the regional aggregators' ClientApps and the regional
ServerApps agree here on the region layout, the run-config keys and the
hand-off files.

Flower lets no process be a client of one SuperLink and a server of another,
and a run returns nothing to whoever submitted it (README, "Deployment Engine:
what Flower allows"). So a regional aggregator (a SuperNode of the global
SuperLink) submits one run of the regional ServerApp per global round to its
region's SuperLink, and the models travel *beside* Flower, as files:

    <handoff-dir>/round-<g>/region-<r>/global/    the global model the aggregator received
    <handoff-dir>/round-<g>/region-<r>/regional/  the regional model its run produced
    <handoff-dir>/round-<g>/region-<r>/run.json   the aggregator's timings of that run

Each model folder holds ``model.npz`` (the arrays, in order) and
``meta.json`` (format, key order, example count, who wrote it); ``meta.json``
is written last and atomically, so a folder with it is complete.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy and flwr are imported where models are read or written: the launcher needs neither
    from flwr.app import ArrayRecord

HANDOFF_FORMAT = "fedcontinuum-handoff/1"

# run-config keys (pyproject.toml [tool.flwr.app.config]); every value a string, "" = not a deployment
TIER = "tier"                   # "" (a flat run) | "global" | "region"
REGIONS = "regions"             # number of regions R
CLIENTS_PER_REGION = "clients-per-region"  # clients per region C (clients.num = R x C)
REGION = "region"               # a regional run: its region index r
GLOBAL_ROUND = "global-round"   # a regional run: the global round g it serves
HANDOFF_DIR = "handoff-dir"     # where the models are handed over
TIER_GLOBAL, TIER_REGION = "global", "region"

# node-config keys of a regional aggregator SuperNode (besides partition-id = r, num-partitions = R)
NODE_REGION_HOME = "region-flwr-home"  # FLWR_HOME holding the connection to its region's SuperLink
NODE_APP_DIR = "app-dir"               # the staged app it submits there


class HandoffError(RuntimeError):
    """A hand-off folder is missing, incomplete or not ours."""


@dataclass(frozen=True)
class RegionLayout:
    """``regions`` regions of ``clients_per_region`` clients each.

    Global partition ids are region-major: region ``r`` holds partitions
    ``r * C .. r * C + C - 1`` of ``R * C`` (the same split a flat or a
    simulated hierarchical run of ``clients.num = R * C`` makes).
    """

    regions: int
    clients_per_region: int

    def __post_init__(self) -> None:
        for name, value in (("--regions", self.regions), ("--clients-per-region", self.clients_per_region)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} {value} is invalid: use an integer >= 1")

    @property
    def num_partitions(self) -> int:
        return self.regions * self.clients_per_region

    def partitions(self, region: int) -> range:
        """The global partition ids of ``region``'s clients."""
        if not 0 <= region < self.regions:
            raise ValueError(f"region {region} is invalid: use 0 .. {self.regions - 1}")
        start = region * self.clients_per_region
        return range(start, start + self.clients_per_region)

    def region_of(self, partition: int) -> int:
        if not 0 <= partition < self.num_partitions:
            raise ValueError(f"partition {partition} is invalid: use 0 .. {self.num_partitions - 1}")
        return partition // self.clients_per_region


def round_folder(root: Path | str, server_round: int, region: int) -> Path:
    return Path(root) / f"round-{int(server_round):03d}" / f"region-{int(region)}"


def global_model_folder(root: Path | str, server_round: int, region: int) -> Path:
    return round_folder(root, server_round, region) / "global"


def regional_model_folder(root: Path | str, server_round: int, region: int) -> Path:
    return round_folder(root, server_round, region) / "regional"


@dataclass
class Handoff:
    """A model handed over between tiers, with its FedAvg weight."""

    arrays: ArrayRecord
    num_examples: int
    info: dict[str, Any] = field(default_factory=dict)


def write_handoff(folder: Path | str, arrays: ArrayRecord, num_examples: int, **info: Any) -> Path:
    """Write ``arrays`` and ``num_examples`` (and JSON-able ``info``) to ``folder``."""
    import numpy as np

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(arrays.keys())
    # npz member names must be valid file names: a0, a1, ... in key order, the real keys in meta.json
    np.savez(folder / "model.npz", **{f"a{i}": arrays[k].numpy() for i, k in enumerate(keys)})
    meta = {"format": HANDOFF_FORMAT, "keys": keys, "num_examples": int(num_examples), **info}
    partial = folder / "meta.json.partial"
    partial.write_text(json.dumps(meta, indent=1))
    os.replace(partial, folder / "meta.json")  # atomic: a reader sees all of it or nothing
    return folder


def read_handoff(folder: Path | str) -> Handoff:
    """Read what :func:`write_handoff` wrote; :class:`HandoffError` names what is wrong."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise HandoffError(f"{meta_path} does not exist: nothing was handed over there (did its run fail?)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise HandoffError(f"{meta_path} is not valid JSON ({err})") from None
    if meta.get("format") != HANDOFF_FORMAT:
        raise HandoffError(f"{meta_path} has format {meta.get('format')!r}, expected {HANDOFF_FORMAT!r}")
    try:
        with np.load(folder / "model.npz") as npz:
            tensors = [npz[f"a{i}"] for i in range(len(meta["keys"]))]
    except (OSError, KeyError, ValueError) as err:
        raise HandoffError(f"{folder / 'model.npz'} does not hold the {len(meta['keys'])} arrays "
                           f"meta.json lists ({err})") from None
    record = ArrayRecord(OrderedDict((k, Array(t)) for k, t in zip(meta["keys"], tensors)))
    info = {k: v for k, v in meta.items() if k not in ("format", "keys", "num_examples")}
    return Handoff(record, int(meta["num_examples"]), info)


def write_json(path: Path | str, values: Mapping[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(dict(values), indent=1))
    os.replace(partial, path)


def run_config_args(values: Mapping[str, str]) -> list[str]:
    """``flwr run --run-config`` arguments, one per key so values may contain spaces."""
    args: list[str] = []
    for key, value in values.items():
        if '"' in value:
            raise ValueError(f'{key} may not contain a double quote: {value}')
        # flwr parses each pair as TOML: a backslash (Hydra escapes ':' in sweep overrides) must be doubled
        args += ["--run-config", f'{key}="{value.replace(chr(92), chr(92) * 2)}"']
    return args
