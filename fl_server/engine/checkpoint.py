"""Checkpoint and resume: after every completed round the server saves what
it needs to continue, and a restarted server carries on from there.

A checkpoint holds the global model, the strategy's state (momentum buffers,
cluster models and assignments, DP wrappers' clipping norm and accountant…),
the round driver's state (virtual time, energy, stale updates still in
flight), the round number, the metric history, Python's ``random`` state
(Flower's strategies sample clients with it) and the MLflow run id, so a
resumed run logs into the same MLflow run. Clients need no checkpoint: their
shuffles are seeded by (seed, round, partition).

Files: ``<checkpoint.dir>/<mlflow run id>/latest.pkl``, replaced atomically
after each round (a crash mid-write leaves the previous round's file). They
are pickles: load only checkpoints you wrote.

Node ids are random per simulation, so everything keyed by node is saved keyed
by partition id and mapped onto the new run's nodes when it resumes.
"""

from __future__ import annotations

import copyreg
import io
import os
import pickle
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fl_server.engine.virtual_clock import Arrival

FORMAT_VERSION = 1
# Settings that may differ between the interrupted run and its resumption.
RESUMABLE_DIFFERENCES = ("num_rounds", "checkpoint", "tracking", "simulation", "report")


class PartitionMap(dict):
    """node -> partition (or back); ids it does not know map to themselves
    (an in-process grid whose node ids are the partitions)."""

    def __missing__(self, key: int) -> int:
        return key


class CheckpointError(ValueError):
    """No usable checkpoint; the message names the run, the path and the fix."""


@dataclass
class Checkpoint:
    """Everything a resumed server needs (see the module docstring)."""

    server_round: int
    mlflow_run_id: str
    config: dict[str, Any]
    arrays: ArrayRecord
    history: list[dict[str, Any]]
    driver: dict[str, Any]
    strategy: dict[str, Any]
    rng: Any
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION
    saved_at: float = field(default_factory=time.time)


class CheckpointStore:
    """Latest checkpoint per MLflow run under ``root``.

    Parameters
    ----------
    root : str or Path
        ``checkpoint.dir`` (resolved against the project directory).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, run_id: str) -> Path:
        return self.root / run_id / "latest.pkl"

    def save(self, checkpoint: Checkpoint) -> Path:
        """Write atomically: readers see the old or the new file, never half."""
        target = self.path(checkpoint.mlflow_run_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        with tmp.open("wb") as f:
            _pickler(f).dump(checkpoint)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        return target

    def load(self, run_id: str) -> Checkpoint:
        target = self.path(run_id)
        if not target.is_file():
            known = sorted(p.parent.name for p in self.root.glob("*/latest.pkl"))
            raise CheckpointError(
                f"checkpoint.resume={run_id}: no checkpoint at {target}; resume takes the MLflow run id "
                f"of an interrupted run" + (f" (checkpoints exist for: {', '.join(known)})" if known else
                                             f" and {self.root} holds none")
            )
        try:
            with target.open("rb") as f:
                checkpoint = pickle.load(f)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing
            raise CheckpointError(f"{target} is not a readable checkpoint ({type(err).__name__}: {err}); "
                                  "delete it and start a new run") from None
        if not isinstance(checkpoint, Checkpoint) or checkpoint.version != FORMAT_VERSION:
            raise CheckpointError(f"{target} was written by another fedcontinuum version; start a new run")
        return checkpoint


def check_compatible(saved: dict[str, Any], current: dict[str, Any], completed_rounds: int, num_rounds: int) -> None:
    """Refuse to resume under a different experiment configuration."""
    differing = sorted(
        key for key in set(saved) | set(current)
        if key.split(".")[0] not in RESUMABLE_DIFFERENCES and saved.get(key) != current.get(key)
    )
    if differing:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differing[:5])
        raise CheckpointError(
            f"the checkpoint was written with another configuration ({shown}); resume with the "
            "interrupted run's overrides (only num_rounds may grow)"
        )
    if num_rounds < completed_rounds:
        raise CheckpointError(
            f"num_rounds={num_rounds} but the checkpoint has completed {completed_rounds} rounds: "
            f"use num_rounds>={completed_rounds}"
        )


# ------------------------------------------------------------- strategies


def strategy_state(strategy: Strategy, partition_of: dict[int, int]) -> dict[str, Any]:
    """The strategy's mutable state; wrappers (e.g. Flower's DP wrappers) and
    the strategy they wrap are saved separately.

    A strategy with a ``state_dict(partition_of)`` method (ours) saves what
    it says; any other saves its picklable, non-callable attributes (Flower's
    FedAvgM momentum, FedAdam moments, DP clipping norm and accountant…).
    """
    if hasattr(strategy, "state_dict"):
        return {"own": strategy.state_dict(partition_of)}
    state: dict[str, Any] = {"attributes": {}}
    for name, value in vars(strategy).items():
        if isinstance(value, Strategy):
            state["inner"] = (name, strategy_state(value, partition_of))
        elif not callable(value) and _picklable(value):
            state["attributes"][name] = value
    return state


def restore_strategy(strategy: Strategy, state: dict[str, Any], node_of: dict[int, int]) -> None:
    """Inverse of :func:`strategy_state` onto this run's nodes."""
    if "own" in state:
        strategy.load_state_dict(state["own"], node_of)
        return
    for name, value in state["attributes"].items():
        setattr(strategy, name, value)
    if "inner" in state:
        name, inner = state["inner"]
        restore_strategy(getattr(strategy, name), inner, node_of)


def _picklable(value: Any) -> bool:
    try:
        _pickler(io.BytesIO()).dump(value)
    except Exception:  # noqa: BLE001 - e.g. locks, open files, lambdas
        return False
    return True


def _pickler(file: Any) -> pickle.Pickler:
    """A pickler that stores Flower ``Array``s as numpy arrays: an Array made
    from a torch tensor holds a memoryview, which does not pickle."""
    pickler = pickle.Pickler(file, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = copyreg.dispatch_table.copy()
    pickler.dispatch_table[Array] = lambda array: (Array, (np.array(array.numpy()),))
    return pickler


# ---------------------------------------------------------------- driver


def driver_state(driver) -> dict[str, Any]:
    """The round driver's clock, energy and in-flight (stale) updates."""
    return {
        "now_s": driver.clock.now_s,
        "energy_j": driver.energy_j,
        "pending": [
            (a.arrival_s, PartitionMap(driver.partition_of)[a.node_id], a.dispatch_round, _portable(a.reply))
            for a in driver.clock.pending
        ],
    }


def _portable(reply: Message) -> dict[str, dict[str, Any]]:
    """A reply's records as plain numpy / Python values (Messages hold
    memoryviews, which do not pickle)."""
    out: dict[str, dict[str, Any]] = {}
    for name, record in reply.content.items():
        if isinstance(record, ArrayRecord):
            out[name] = {"arrays": {k: np.array(v.numpy()) for k, v in record.items()}}
        elif isinstance(record, MetricRecord):
            out[name] = {"metrics": dict(record)}
        elif isinstance(record, ConfigRecord):
            out[name] = {"config": dict(record)}
    return out


def _reply_from(portable: dict[str, dict[str, Any]], node_id: int) -> Message:
    """Rebuild a training reply from :func:`_portable`, sent by ``node_id``."""
    records: dict[str, Any] = {}
    for name, record in portable.items():
        (kind, values), = record.items()
        records[name] = {"arrays": lambda v: ArrayRecord({k: Array(a) for k, a in v.items()}),
                         "metrics": MetricRecord, "config": ConfigRecord}[kind](values)
    message = Message(content=RecordDict(records), dst_node_id=0, message_type=MessageType.TRAIN)
    message.metadata.__dict__["_src_node_id"] = node_id  # as the SuperLink would have set it
    return message


def restore_driver(driver, state: dict[str, Any]) -> None:
    """Inverse of :func:`driver_state`, once the driver knows this run's nodes."""
    node_of = PartitionMap({p: n for n, p in driver.partition_of.items()})
    driver.clock.now_s = state["now_s"]
    driver.energy_j = state["energy_j"]
    driver.clock.pending = []
    for arrival_s, partition, dispatch_round, portable in state["pending"]:
        node = node_of[partition]  # the update now comes from this run's node of that partition
        driver.clock.pending.append(Arrival(arrival_s, node, dispatch_round, _reply_from(portable, node)))


def capture_rng() -> Any:
    return random.getstate()


def restore_rng(state: Any) -> None:
    random.setstate(state)


# ------------------------------------------------------- experiment glue


class RunCheckpoints:
    """What an experiment needs: resume state at the start, a save per round.

    Parameters
    ----------
    cfg : DictConfig
        The composed config (``checkpoint.enabled``, ``checkpoint.dir``,
        ``checkpoint.resume``).
    """

    def __init__(self, cfg) -> None:
        from fl_server.engine.flat_config import flatten

        self.enabled = bool(cfg.checkpoint.enabled)
        self.store = CheckpointStore(cfg.checkpoint.dir)
        self.config = flatten(cfg)
        self.resumed: Checkpoint | None = None
        if cfg.checkpoint.resume:
            self.resumed = self.store.load(str(cfg.checkpoint.resume))
            check_compatible(self.resumed.config, self.config, self.resumed.server_round, int(cfg.num_rounds))

    @property
    def resume_run_id(self) -> str | None:
        return self.resumed.mlflow_run_id if self.resumed else None

    @property
    def start_round(self) -> int:
        return self.resumed.server_round + 1 if self.resumed else 1

    def initial_arrays(self, fresh: ArrayRecord) -> ArrayRecord:
        return self.resumed.arrays if self.resumed else fresh

    def history(self) -> list[dict[str, Any]]:
        return list(self.resumed.history) if self.resumed else []

    def on_ready(self, strategy: Strategy):
        """``RoundDriver.run``'s hook: restore strategy, driver and RNG state."""
        if self.resumed is None:
            return None
        resumed = self.resumed

        def restore(driver) -> None:
            node_of = PartitionMap({p: n for n, p in driver.partition_of.items()})
            restore_strategy(strategy, resumed.strategy, node_of)
            restore_driver(driver, resumed.driver)
            restore_rng(resumed.rng)

        return restore

    def run(self, driver, fresh_arrays: ArrayRecord, num_rounds: int) -> ArrayRecord:
        """``driver.run`` from round 1 with ``fresh_arrays``, or from the
        checkpoint's next round with its arrays and state."""
        return driver.run(
            self.initial_arrays(fresh_arrays), num_rounds=num_rounds,
            start_round=self.start_round, on_ready=self.on_ready(driver.strategy),
        )

    def save(self, run_id: str, server_round: int, driver, strategy: Strategy, history: list[dict[str, Any]]) -> None:
        """Checkpoint the round that just completed (call before logging it)."""
        if not self.enabled or server_round < 1:
            return
        self.store.save(Checkpoint(
            server_round=server_round,
            mlflow_run_id=run_id,
            config=self.config,
            arrays=driver.arrays,
            history=list(history),
            driver=driver_state(driver),
            strategy=strategy_state(strategy, PartitionMap(driver.partition_of)),
            rng=capture_rng(),
        ))
