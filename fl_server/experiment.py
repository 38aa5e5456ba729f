"""One experiment = one Flower run = one MLflow run.

``run_experiment`` is what the ServerApp executes: it builds the data view the
server needs (test set, public validation set), the strategy and the initial
model, drives the rounds, and records everything in MLflow. If anything fails,
the MLflow run is marked FAILED with the reason and whatever was already
logged stays.
"""

from __future__ import annotations

import csv
import json
import io
import random
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from omegaconf import DictConfig, OmegaConf

from fl_clients.image_task import evaluate, per_class_accuracy, predict
from fl_clients.models import build_model
from fl_datasets.federated import DataSpec, build_image_data
from fl_server import fault_handling, mlflow_ui, progress, protection
from fl_server.config import default_run_name, flatten, is_forecast, is_rl
from fl_clients.devices import Fleet, check_memory, is_online
from fl_server.checkpoint import RunCheckpoints
from fl_server.rounds import RoundDriver
from fl_server.tracking import RunTracker
from fl_server.virtual_clock import VirtualClock
from strategies import build_strategy

HEADLINE = ("test_accuracy", "test_macro_f1", "test_weakest_class_recall", "train_loss")


def run_tags(cfg: DictConfig) -> dict[str, str]:
    """Tags that let the MLflow UI group and compare runs."""
    tags = {
        "task": cfg.task.name,
        "strategy": cfg.strategy.name,
        "partition": cfg.partition.name,
        "rho": f"{cfg.partition.rho:g}",
        "seed": str(cfg.seed),
    }
    if cfg.partition.name == "dirichlet":
        tags["alpha"] = f"{cfg.partition.alpha:g}"
    tags["deadline"] = "sync" if cfg.devices.deadline_s is None else f"{cfg.devices.deadline_s:g}s"
    tags["availability"] = "on" if cfg.devices.availability else "off"
    if cfg.strategy.name == "ass":  # the ablation's axes
        tags["ass_abg"] = f"{cfg.strategy.alpha:g}/{cfg.strategy.beta:g}/{cfg.strategy.gamma:g}"
    return tags


def _tags(cfg: DictConfig) -> dict[str, str]:
    if is_forecast(cfg):
        from fl_server.forecast_experiment import forecast_tags

        return forecast_tags(cfg)
    if is_rl(cfg):
        from fl_server.rl_experiment import rl_tags

        return rl_tags(cfg)
    return run_tags(cfg)


def train_config(cfg: DictConfig, spec: DataSpec) -> ConfigRecord:
    """The ConfigRecord every client receives (the clients' whole config)."""
    return ConfigRecord(
        {
            "data-spec": spec.to_json(),
            "devices": json.dumps(OmegaConf.to_container(cfg.devices, resolve=True)),
            "model": str(cfg.task.model),
            "local-epochs": int(cfg.train.local_epochs),
            "batch-size": int(cfg.train.batch_size),
            "lr": float(cfg.train.lr),
            "momentum": float(cfg.train.momentum),
            "seed": int(cfg.seed),
            # DP-SGD, client-side central DP, compression: no keys by default
            **protection.client_config(cfg),
            **fault_handling.client_config(cfg),  # injected faults (tests, studies): none by default
        }
    )


def _history_csv(history: list[dict[str, Any]]) -> str:
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "round", k))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()


def _accuracy_plot(history: list[dict[str, Any]], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [row["round"] for row in history]
    for key, label in (
        ("test_accuracy", "accuracy"),
        ("test_macro_f1", "macro-F1"),
        ("test_weakest_class_recall", "weakest-class recall"),
    ):
        ax.plot(rounds, [row.get(key, np.nan) for row in history], marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("server-side test metric")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def run_experiment(grid: Grid, cfg: DictConfig, tracking_uri: str, parent_run_id: str | None = None) -> dict[str, float]:
    """Run the configured experiment on ``grid``; returns the final metrics."""
    run_name = default_run_name(cfg)

    def announce(run_id: str, experiment_id: str) -> None:
        progress.emit("start", run_name=run_name, mlflow_run_id=run_id,
                      experiment_id=experiment_id, num_rounds=int(cfg.num_rounds))

    checkpoints = RunCheckpoints(cfg)  # raises CheckpointError for a bad checkpoint.resume
    tracker = RunTracker(
        tracking_uri,
        experiment=str(cfg.tracking.experiment),
        run_name=run_name,
        tags=_tags(cfg),
        parent_run_id=parent_run_id,
        on_created=announce,
        # MLflow's set-up waits until round 1 is dispatched: before that it
        # would compete with the server's start-up for this process's GIL.
        deferred=True,
        resume_run_id=checkpoints.resume_run_id,
    )
    try:
        if is_forecast(cfg):
            from fl_server.forecast_experiment import run_forecast_tracked

            return run_forecast_tracked(grid, cfg, tracker, run_name, checkpoints)
        if is_rl(cfg):
            from fl_server.rl_experiment import run_rl_tracked

            return run_rl_tracked(grid, cfg, tracker, run_name, checkpoints)
        return _run_tracked(grid, cfg, tracker, run_name, checkpoints)
    except BaseException as err:
        reason = f"{type(err).__name__}: {err}"
        progress.emit("failed", reason=reason)
        tracker.log_text(traceback.format_exc(), "failure/traceback.txt")
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
        tracker.log_params(flatten(cfg))
    tracker.warm_up("matplotlib.pyplot")  # for the final plot, while clients train
    return history


def driver_settings(cfg: DictConfig, tracker: RunTracker, num_clients: int,
                    availability: "FleetAvailability | None" = None) -> dict[str, Any]:
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
    grid: Grid, cfg: DictConfig, tracker: RunTracker, run_name: str, checkpoints: RunCheckpoints
) -> dict[str, float]:
    started = time.perf_counter()
    history = start_tracking(cfg, tracker, checkpoints)
    if cfg.tracking.log_model:  # log_model's imports (torch.export needs dynamo: ~2 s), while clients train
        tracker.warm_up("mlflow.pytorch", "torch._dynamo")
    spec = DataSpec.from_config(cfg)
    data = build_image_data(spec)
    if not checkpoints.resumed:
        tracker.log_datasets(lambda: mlflow_ui.image_datasets(spec, data))  # the UI's Dataset column
        tracker.log_text(_class_counts_csv(data.class_counts()), "data/client_class_counts.csv")
        tracker.log_metrics(
            {
                "data_train_samples": float(sum(data.client_sizes())),
                "data_realised_rho": _realised_rho(data.class_counts().sum(axis=0)),
            },
            step=0,
        )

    model = build_model(str(cfg.task.model), spec.num_classes, seed=int(cfg.seed))

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        return {f"test_{k}": v for k, v in evaluate(model, data.test, spec.num_classes).items()}

    wire = protection.accounting_grid(grid, cfg)  # bytes per round; compression if configured

    def on_round(server_round: int, metrics: dict[str, float]) -> None:
        metrics = {**metrics, "elapsed_wall_time_s": time.perf_counter() - started}
        if server_round > 0:
            metrics.update(wire.take_round_counts())
        checkpoint_then_log(tracker, checkpoints, driver, history, server_round, metrics)
        progress.emit("round", round=server_round, **{k: metrics[k] for k in metrics if k in _SHOWN})

    fleet, devices = _fleet(cfg, spec)
    tracker.log_text(
        "client,device\n" + "".join(f"{i},{d}\n" for i, d in enumerate(devices)), "data/client_devices.csv"
    )
    driver_cls, driver_extra = protection.round_driver(cfg, data.client_sizes())  # SecAgg+ or plain
    driver = driver_cls(
        strategy=protection.protect_strategy(build_strategy(cfg, _public_scorer(cfg, spec, data)), cfg),
        grid=wire,
        train_config=train_config(cfg, spec),
        evaluate_fn=evaluate_global,
        on_round=on_round,
        **driver_settings(cfg, tracker, spec.num_clients, FleetAvailability(fleet, devices, spec.seed)),
        **driver_extra,
    )
    final_arrays = checkpoints.run(driver, ArrayRecord(model.state_dict()), int(cfg.num_rounds))

    tracker.log_text(_history_csv(history), "metrics/rounds.csv")
    tracker.log_figure(lambda: _accuracy_plot(history, run_name), "plots/accuracy_vs_round.png")
    if cfg.tracking.log_model:
        tracker.log_torch_state(final_arrays.to_torch_state_dict(), "model/final_state_dict.pt")
    final = {k: history[-1][k] for k in HEADLINE if k in history[-1]}
    final["wall_time_s"] = time.perf_counter() - started
    tracker.log_metrics({f"final_{k}": v for k, v in final.items()}, step=int(cfg.num_rounds))
    if cfg.tracking.log_model:  # an MLflow model (the UI's Models column), linked to the final metrics
        tracker.log_pytorch_model(lambda: mlflow_ui.trained_model(
            str(cfg.task.model), spec.num_classes, final_arrays, data.test.x[:2]), step=int(cfg.num_rounds))
    tracker.finish()
    progress.emit("finished", mlflow_run_id=tracker.run_id, **final)
    return final


def _public_scorer(cfg: DictConfig, spec: DataSpec, data) -> Callable[[ArrayRecord], np.ndarray]:
    """Per-class accuracy of a (client) model on the server's public validation set."""
    scorer = build_model(str(cfg.task.model), spec.num_classes)

    def per_class(arrays: ArrayRecord) -> np.ndarray:
        scorer.load_state_dict(arrays.to_torch_state_dict())
        y_pred, _ = predict(scorer, data.public_val)
        return per_class_accuracy(data.public_val.y, y_pred, spec.num_classes)

    return per_class


def _fleet(cfg: DictConfig, spec: DataSpec) -> tuple[Fleet, list[str]]:
    """The device fleet (refused if a device cannot hold model and batch) and
    each client's device."""
    fleet = Fleet.from_config(cfg.devices)
    check_memory(fleet, str(cfg.task.model), spec.num_classes, int(cfg.train.batch_size))
    return fleet, fleet.assign(spec.num_clients, spec.seed)


class FleetAvailability:
    """Which partitions' devices are online at a virtual time (for the driver)."""

    def __init__(self, fleet: Fleet, devices: list[str], seed: int) -> None:
        self.fleet, self.devices, self.seed = fleet, devices, seed

    def is_online(self, partition_id: int, virtual_time_s: float, server_round: int) -> bool:
        profile = self.fleet.profiles[self.devices[partition_id]]
        return is_online(profile, virtual_time_s, self.seed, partition_id, server_round)


_SHOWN = (
    "test_accuracy",
    "test_macro_f1",
    "test_weakest_class_recall",
    "train_loss",
    "clients_replied",
    "clients_failed",
    "round_wall_time_s",
)


def _realised_rho(class_totals: np.ndarray) -> float:
    present = class_totals[class_totals > 0]
    return float(present.max() / present.min()) if len(present) else float("nan")


def _class_counts_csv(counts: np.ndarray) -> str:
    header = "client," + ",".join(f"class_{c}" for c in range(counts.shape[1]))
    rows = [f"{i}," + ",".join(str(int(v)) for v in row) for i, row in enumerate(counts)]
    return "\n".join([header, *rows]) + "\n"
