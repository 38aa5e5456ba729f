"""One experiment = one Flower run = one MLflow run, for every task.

``run_experiment`` is what the ServerApp executes. It is the one experiment
skeleton: the task (:mod:`tasks`) provides the model, its ConfigRecord
entries, the server-side evaluation and the report; everything else is the
engine's and the same for every task: tracking, device profiles and the
virtual clock, availability, byte accounting and compression, central DP and
SecAgg+, fault handling, the round driver, checkpoints, the rounds table.
If anything fails, the MLflow run is marked FAILED with the reason and
whatever was already logged stays.
"""

from __future__ import annotations

import csv
import io
import json
import random
import time
import traceback
from typing import Any

from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from omegaconf import DictConfig, OmegaConf

from edgesim.devices import Fleet, is_online
from fl_common import protocol
from fl_common.costs import check_memory
from fl_common.per_client import sample_clients
from fl_server.engine import fault_handling, protection
from fl_server.engine.checkpoint import RunCheckpoints
from fl_server.engine.comm import ReplyRecorder, UploadCollector
from fl_server.engine.per_client import limit_per_client
from fl_server.engine.rounds import RoundDriver
from fl_server.engine.virtual_clock import VirtualClock
from fl_server.experiments import progress
from fl_server.experiments.config import default_run_name, flatten
from fl_server.experiments.profiling import RunProfile
from fl_server.experiments.regions import TierPlan
from fl_server.experiments.topology import arrange_strategy, attach_topology, topology_tags
from fl_server.experiments.tracking import RunTracker
from strategies import build_strategy
from tasks.base import ServerTask
from tasks.registry import task_of


def run_tags(cfg: DictConfig) -> dict[str, str]:
    """Tags that let the MLflow UI group and compare runs: the task's, plus the engine's axes."""
    tags = task_of(cfg).tags(cfg)
    tags["deadline"] = "sync" if cfg.devices.deadline_s is None else f"{cfg.devices.deadline_s:g}s"
    tags["availability"] = "on" if cfg.devices.availability else "off"
    if cfg.compression.enabled:
        tags["compression"] = str(cfg.compression.name)
    if cfg.privacy.name != "none":
        tags["privacy"] = str(cfg.privacy.name)
    tags.update(topology_tags(cfg))  # hierarchical topologies, rollout guards (none by default)
    return tags


def engine_config(cfg: DictConfig, server: ServerTask) -> dict[str, Any]:
    """The engine's ConfigRecord entries, the same for every task."""
    return {
        protocol.TASK: str(cfg.task.kind),
        protocol.NUM_CLIENTS: int(server.num_clients),
        protocol.SEED: int(cfg.seed),
        protocol.DEVICES: json.dumps(OmegaConf.to_container(cfg.devices, resolve=True)),
        # DP-SGD, client-side central DP, compression: no keys by default
        **protection.client_config(cfg),
        **fault_handling.client_config(cfg),  # injected faults (tests, studies): none by default
    }


def train_config(cfg: DictConfig, server: ServerTask | None = None) -> ConfigRecord:
    """The ConfigRecord every training client receives: the task's entries and the engine's."""
    server = server or task_of(cfg).server(cfg, "")
    return ConfigRecord({**server.train_config(), **engine_config(cfg, server)})


def run_experiment(grid: Grid, cfg: DictConfig, tracking_uri: str, parent_run_id: str | None = None,
                   tier: TierPlan | None = None) -> dict[str, float]:
    """Run the configured experiment on ``grid``; returns the final metrics.

    ``tier``: this run's place in a regional deployment (None: a flat run, the default)."""
    run_name = default_run_name(cfg)
    if tier is not None:
        tier.check(cfg)

    def announce(run_id: str, experiment_id: str) -> None:
        progress.emit("start", run_name=run_name, mlflow_run_id=run_id,
                      experiment_id=experiment_id, num_rounds=int(cfg.num_rounds))

    checkpoints = RunCheckpoints(cfg)  # raises CheckpointError for a bad checkpoint.resume
    tracker = RunTracker(
        tracking_uri,
        experiment=str(cfg.tracking.experiment) if tier is None else tier.experiment(cfg),
        run_name=run_name,
        tags={**run_tags(cfg), **(tier.tags() if tier else {})},
        parent_run_id=parent_run_id,
        on_created=announce,
        # MLflow's set-up waits until round 1 is dispatched: before that it
        # would compete with the server's start-up for this process's GIL.
        deferred=True,
        resume_run_id=checkpoints.resume_run_id,
    )
    profile = RunProfile(bool(cfg.tracking.get("profile", False)))  # tracking.profile: cProfile this thread
    try:
        return _run_tracked(grid, cfg, tracker, run_name, checkpoints, profile, tier)
    except BaseException as err:
        reason = f"{type(err).__name__}: {err}"
        progress.emit("failed", reason=reason)
        tracker.log_text(traceback.format_exc(), "failure/traceback.txt")
        profile.log(tracker)  # a failed run's profile too (up to the failure)
        tracker.fail(reason)
        raise


def start_tracking(cfg: DictConfig, tracker: RunTracker, checkpoints: RunCheckpoints) -> list[dict[str, Any]]:
    """Params (new run) or the resumed run's missing rounds; returns the history so far."""
    # Flower's strategies sample clients with the stdlib's global `random`
    # (a resumed run restores the saved state before its first round).
    random.seed(int(cfg.seed))
    history = checkpoints.history()
    if checkpoints.resumed:
        tracker.set_tags({"fc.resumed_after_round": str(checkpoints.resumed.server_round)})
        tracker.log_missing_rounds(history)
    else:
        uses_twin = task_of(cfg).uses_twin  # every config holds the twin group; only the twin's tasks log it
        tracker.log_params({k: v for k, v in flatten(cfg).items() if uses_twin or not k.startswith("twin.")})
    tracker.warm_up("matplotlib.pyplot")  # for the final plot, while clients train
    return history


def driver_settings(cfg: DictConfig, tracker: RunTracker, num_clients: int,
                    availability: FleetAvailability | None = None) -> dict[str, Any]:
    """RoundDriver keyword arguments every task shares: round timeout, virtual
    clock, device availability, federation size, sampling minimum, and fault
    handling (min replies, bounded retries, failure log)."""
    return {
        "timeout_s": float(cfg.simulation.round_timeout_s),
        "clock": VirtualClock(cfg.devices.deadline_s),
        "fleet": availability if cfg.devices.availability else None,
        "num_nodes": num_clients,
        "min_train": int(cfg.clients.min_train),
        **fault_handling.driver_settings(cfg, tracker),
    }


def checkpoint_then_log(
    tracker: RunTracker, checkpoints: RunCheckpoints, driver: RoundDriver, history: list[dict[str, Any]],
    server_round: int, metrics: dict[str, float],
) -> None:
    """Record a completed round: history, checkpoint, then MLflow. A server
    that dies between the two logs the round when it resumes; one that dies
    before the checkpoint re-runs the round: no round is lost or logged twice."""
    history.append({"round": server_round, **metrics})
    if server_round > 0 and checkpoints.enabled:
        started = time.perf_counter()
        checkpoints.save(tracker.run_id, server_round, driver, driver.strategy, history)
        metrics = {**metrics, "checkpoint_save_s": time.perf_counter() - started}
    tracker.log_metrics(metrics, step=server_round)
    tracker.start_writing()  # round 1 is dispatched next: the server idles


def _run_tracked(
    grid: Grid, cfg: DictConfig, tracker: RunTracker, run_name: str, checkpoints: RunCheckpoints, profile: RunProfile,
    tier: TierPlan | None = None,
) -> dict[str, float]:
    started = time.perf_counter()
    history = start_tracking(cfg, tracker, checkpoints)
    server = task_of(cfg).server(cfg, tracker.tracking_uri)
    if not checkpoints.resumed:
        server.log_inputs(tracker)
    fleet, devices = _fleet(cfg, server)
    tracker.log_text("client,device\n" + "".join(f"{i},{d}\n" for i, d in enumerate(devices)),
                     "data/client_devices.csv")
    if tier is not None:
        grid = tier.wrap_grid(grid)  # a regional run counts its examples for the tier above
    wire = protection.accounting_grid(grid, cfg)  # bytes per round; compression if configured
    driver_grid = UploadCollector(wire, server.receive_uploads) if server.receives_uploads else wire
    if server.needs_client_models:  # outside the accounting grid: it sees decoded models
        recorder = ReplyRecorder(driver_grid)
        server.client_models, driver_grid = recorder.latest, recorder

    keep = sample_clients(server.num_clients, cfg.tracking.per_client_limit)  # None: every client
    keep = None if keep is None else frozenset(keep)

    def on_round(server_round: int, metrics: dict[str, float]) -> None:
        progress.mark(f"round{server_round}_done" if server_round < 2 else "last_round_done")
        metrics = {**limit_per_client(metrics, keep), "elapsed_wall_time_s": time.perf_counter() - started}
        if server_round > 0:
            metrics.update(wire.take_round_counts())
        if tier is not None and server_round > 0:
            regional, runs = tier.round_report(server_round)  # the global tier: its regions' runs
            metrics.update(regional)
            if runs:
                tracker.log_text(runs, f"regional_runs/round_{server_round:03d}.json")
        checkpoint_then_log(tracker, checkpoints, driver, history, server_round, metrics)
        if server_round > 0:
            server.after_round(server_round, driver.arrays, tracker)
        progress.emit("round", round=server_round, **{k: metrics[k] for k in server.shown if k in metrics})

    progress.mark("task_ready")  # config, data, model, tracker set-up queued
    driver_cls, driver_extra = protection.round_driver(cfg, server.client_sizes)  # SecAgg+ or plain
    strategy = protection.protect_strategy(build_strategy(cfg, server.public_scorer()), cfg)
    driver = driver_cls(
        strategy=arrange_strategy(cfg, server, devices, strategy),  # tiers, rollout guard: unchanged by default
        grid=driver_grid,
        train_config=train_config(cfg, server),
        evaluate_fn=server.evaluate,
        on_round=on_round,
        **driver_settings(cfg, tracker, server.num_clients if tier is None else tier.num_nodes(),
                          FleetAvailability(fleet, devices, int(cfg.seed))),
        **driver_extra,
    )
    attach_topology(driver)  # a hierarchy keeps the virtual time of its tiers
    if tier is None:
        final_arrays = checkpoints.run(driver, server.initial_arrays(), int(cfg.num_rounds))
    else:  # a regional deployment: a regional run plays only its global round, from the model handed over
        final_arrays = tier.run(driver, checkpoints, server.initial_arrays(), int(cfg.num_rounds))

    tracker.log_text(_history_csv(history), "metrics/rounds.csv")
    if cfg.tracking.log_model:
        tracker.log_torch_state(final_arrays.to_torch_state_dict(), "model/final_state_dict.pt")
    final = {k: history[-1][k] for k in server.headline if k in history[-1]}
    final.update(server.report(tracker, history, final_arrays, run_name))
    final["wall_time_s"] = time.perf_counter() - started
    tracker.log_metrics({f"final_{k}": v for k, v in final.items()}, step=int(cfg.num_rounds))
    profile.log(tracker)
    tracker.finish()
    progress.mark("tracking_finished")
    if tier is not None:
        tier.hand_back(final_arrays, grid, tracker.run_id, {**progress.timeline(), **driver.marks})
    for name, at in driver.marks.items():
        progress.mark(name, at)
    progress.emit("timeline", **progress.timeline())
    progress.emit("finished", mlflow_run_id=tracker.run_id, **final)
    return final


def _fleet(cfg: DictConfig, server: ServerTask) -> tuple[Fleet, list[str]]:
    """The device fleet (refused if a device cannot hold model and batch) and
    each client's device."""
    fleet = Fleet.from_config(cfg.devices)
    check_memory(fleet, server.model_name, server.batch_size(), server.model_costs())
    return fleet, fleet.assign(server.num_clients, int(cfg.seed))


class FleetAvailability:
    """Which partitions' devices are online at a virtual time (for the driver)."""

    def __init__(self, fleet: Fleet, devices: list[str], seed: int) -> None:
        self.fleet, self.devices, self.seed = fleet, devices, seed

    def is_online(self, partition_id: int, virtual_time_s: float, server_round: int) -> bool:
        profile = self.fleet.profiles[self.devices[partition_id]]
        return is_online(profile, virtual_time_s, self.seed, partition_id, server_round)


def _history_csv(history: list[dict[str, Any]]) -> str:
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "round", k))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()
