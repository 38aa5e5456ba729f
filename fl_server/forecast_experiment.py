"""The federated workload-forecasting experiment (``task.kind == forecast``).

Each edge site is one client training the global TCN / LSTM on its own
series; the configured strategy (FedAvg, FedAvgM, staleness-aware clustered…)
aggregates. After every round the server scores the global model on every
site's validation and test windows, in original units: MAE, RMSE, sMAPE and
MASE per site and their mean over sites ("overall"), next to the seasonal-naive
(one season) and last-value baselines on the very same windows.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from omegaconf import DictConfig, OmegaConf

from fl_clients.devices import Fleet, check_memory, forecaster_costs
from fl_clients.forecast_task import evaluate_baselines, evaluate_forecaster, predict
from fl_clients.forecasters import build_forecaster
from fl_datasets.forecast_data import FederatedForecastData, ForecastSpec, build_forecast_data
from fl_server import progress, protection
from fl_server.checkpoint import RunCheckpoints
from fl_server.rounds import RoundDriver
from fl_server.tracking import RunTracker
from strategies import build_strategy

METRICS = ("mae", "rmse", "smape", "mase")
BASELINES = ("seasonal_naive", "last_value")
HEADLINE = ("test_mase", "test_mae", "test_rmse", "test_smape", "val_mase", "train_loss")
SHOWN = ("test_mase", "test_mae", "test_smape", "train_loss", "clients_replied", "clients_failed", "round_wall_time_s")


def forecast_tags(cfg: DictConfig) -> dict[str, str]:
    """Tags that let the MLflow UI group and compare forecasting runs."""
    return {
        "task": cfg.task.name,
        "kind": "forecast",
        "model": cfg.task.model,
        "strategy": cfg.strategy.name,
        "sites": str(cfg.clients.num),
        "seed": str(cfg.seed),
        "deadline": "sync" if cfg.devices.deadline_s is None else f"{cfg.devices.deadline_s:g}s",
    }


def forecast_train_config(cfg: DictConfig, spec: ForecastSpec) -> ConfigRecord:
    """The ConfigRecord every forecasting client receives."""
    return ConfigRecord(
        {
            "forecast-spec": spec.to_json(),
            "forecaster": json.dumps(forecaster_settings(cfg)),
            "devices": json.dumps(OmegaConf.to_container(cfg.devices, resolve=True)),
            "local-epochs": int(cfg.train.local_epochs),
            "seed": int(cfg.seed),
            **protection.client_config(cfg),  # DP-SGD keys when privacy=dpsgd; none by default
        }
    )


def forecaster_settings(cfg: DictConfig) -> dict[str, Any]:
    task = cfg.task
    return {
        "model": str(task.model),
        "level_centred": bool(task.level_centred),
        "lr": float(task.optimizer.lr),
        "batch_size": int(task.optimizer.batch_size),
        "dp_lr": float(task.dp_sgd.lr),
        "dp_momentum": float(task.dp_sgd.momentum),
    }


def score_sites(model, data: FederatedForecastData, season: int, split: str) -> dict[str, dict[str, float]]:
    """Per-site metrics of ``model`` on one split (``"val"`` or ``"test"``)."""
    return {
        site.site: evaluate_forecaster(model, *getattr(site, split), site.y_train, season, site.normaliser)
        for site in data.sites
    }


def score_baselines(data: FederatedForecastData, season: int, split: str) -> dict[str, dict[str, dict[str, float]]]:
    """``{baseline: {site: metrics}}`` on the same windows as the model."""
    per_site = {
        site.site: evaluate_baselines(*getattr(site, split), site.y_train, season, site.normaliser)
        for site in data.sites
    }
    return {b: {s: scores[b] for s, scores in per_site.items()} for b in BASELINES}


def flat_metrics(per_site: dict[str, dict[str, float]], prefix: str, per_site_keys: bool = True) -> dict[str, float]:
    """Overall (mean over sites) as ``<prefix>_<metric>``, and per site as
    ``site<id>_<prefix>_<metric>``."""
    out = {f"{prefix}_{m}": float(np.mean([s[m] for s in per_site.values()])) for m in METRICS}
    if per_site_keys:
        for site, scores in per_site.items():
            out.update({f"site{site}_{prefix}_{m}": float(v) for m, v in scores.items()})
    return out


def run_forecast_tracked(
    grid: Grid, cfg: DictConfig, tracker: RunTracker, run_name: str, checkpoints: RunCheckpoints
) -> dict[str, float]:
    """Drive the federated forecasting rounds and record everything."""
    from fl_server.experiment import (
        FleetAvailability, _history_csv, checkpoint_then_log, driver_settings, start_tracking,
    )

    started = time.perf_counter()
    history = start_tracking(cfg, tracker, checkpoints)
    spec = ForecastSpec.from_config(cfg)
    data = build_forecast_data(spec)
    tracker.log_text(_sites_csv(data), "data/client_sites.csv")
    baselines = {b: score_baselines(data, spec.season, "test")[b] for b in BASELINES}
    baseline_metrics = {}
    for name, per_site in baselines.items():
        baseline_metrics.update(flat_metrics(per_site, f"baseline_{name}_test"))

    model = _forecaster(cfg, spec, seed=int(cfg.seed))

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics = flat_metrics(score_sites(model, data, spec.season, "test"), "test")
        metrics.update(flat_metrics(score_sites(model, data, spec.season, "val"), "val", per_site_keys=False))
        if server_round in (0, int(cfg.num_rounds)):  # flat lines in the UI's charts
            metrics.update(baseline_metrics)
        return metrics

    def on_round(server_round: int, metrics: dict[str, float]) -> None:
        metrics = {**metrics, "elapsed_wall_time_s": time.perf_counter() - started}
        checkpoint_then_log(tracker, checkpoints, driver, history, server_round, metrics)
        progress.emit("round", round=server_round, **{k: metrics[k] for k in SHOWN if k in metrics})

    fleet = Fleet.from_config(cfg.devices)
    costs = forecaster_costs(str(cfg.task.model), len(spec.columns), spec.window, spec.horizon, bool(cfg.task.level_centred))
    check_memory(fleet, str(cfg.task.model), 0, int(cfg.task.optimizer.batch_size), costs=costs)
    devices = fleet.assign(spec.num_clients, spec.seed)
    tracker.log_text("client,device\n" + "".join(f"{i},{d}\n" for i, d in enumerate(devices)), "data/client_devices.csv")
    driver = RoundDriver(
        strategy=build_strategy(cfg),
        grid=grid,
        train_config=forecast_train_config(cfg, spec),
        evaluate_fn=evaluate_global,
        on_round=on_round,
        **driver_settings(cfg, tracker, spec.num_clients, FleetAvailability(fleet, devices, spec.seed)),
    )
    final_arrays = checkpoints.run(driver, ArrayRecord(model.state_dict()), int(cfg.num_rounds))

    tracker.log_text(_history_csv(history), "metrics/rounds.csv")
    tracker.log_text(_site_table(history[-1], data, baselines), "report/site_metrics.md")
    tracker.log_figure(lambda: _mase_plot(history, baseline_metrics, run_name), "plots/mase_vs_round.png")
    model.load_state_dict(final_arrays.to_torch_state_dict())
    tracker.log_figure(lambda: _forecast_plot(model, data, spec), "plots/test_forecasts.png")
    if cfg.tracking.log_model:
        tracker.log_torch_state(final_arrays.to_torch_state_dict(), "model/final_state_dict.pt")
    final = {k: history[-1][k] for k in HEADLINE if k in history[-1]}
    for name in BASELINES:
        final[f"baseline_{name}_test_mase"] = baseline_metrics[f"baseline_{name}_test_mase"]
    final["wall_time_s"] = time.perf_counter() - started
    tracker.log_metrics({f"final_{k}": v for k, v in final.items()}, step=int(cfg.num_rounds))
    tracker.finish()
    progress.emit("finished", mlflow_run_id=tracker.run_id, **final)
    return final


def _forecaster(cfg: DictConfig, spec: ForecastSpec, seed: int | None = None):
    return build_forecaster(
        str(cfg.task.model), in_channels=len(spec.columns), horizon=spec.horizon, seed=seed,
        level_steps=spec.window if cfg.task.level_centred else None,
    )


def _sites_csv(data: FederatedForecastData) -> str:
    rows = [f"{i},{s.site},{len(s.train[0])},{len(s.val[0])},{len(s.test[0])}" for i, s in enumerate(data.sites)]
    return "client,site,train_windows,val_windows,test_windows\n" + "\n".join(rows) + "\n"


def _site_table(last: dict[str, Any], data: FederatedForecastData, baselines) -> str:
    """Markdown: final per-site test metrics of the model and both baselines."""
    lines = [
        "| site | model MAE | model RMSE | model sMAPE % | model MASE | s-naive MASE | last-value MASE |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in data.site_ids():
        lines.append(
            f"| {s} | " + " | ".join(f"{last[f'site{s}_test_{m}']:.3f}" for m in METRICS)
            + f" | {baselines['seasonal_naive'][s]['mase']:.3f} | {baselines['last_value'][s]['mase']:.3f} |"
        )
    lines.append(
        "| **overall (mean)** | " + " | ".join(f"{last[f'test_{m}']:.3f}" for m in METRICS)
        + f" | {np.mean([v['mase'] for v in baselines['seasonal_naive'].values()]):.3f}"
        + f" | {np.mean([v['mase'] for v in baselines['last_value'].values()]):.3f} |"
    )
    return "\n".join(lines) + "\n"


def _mase_plot(history: list[dict[str, Any]], baseline_metrics: dict[str, float], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [row["round"] for row in history]
    ax.plot(rounds, [row.get("test_mase", np.nan) for row in history], marker="o", label="federated model (test)")
    ax.plot(rounds, [row.get("val_mase", np.nan) for row in history], marker=".", ls=":", label="federated model (val)")
    for name, style in zip(BASELINES, ("--", "-.")):
        ax.axhline(baseline_metrics[f"baseline_{name}_test_mase"], ls=style, color="grey", label=name.replace("_", "-"))
    ax.set_xlabel("round")
    ax.set_ylabel("MASE, mean over sites (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _forecast_plot(model, data: FederatedForecastData, spec: ForecastSpec, sites: int = 3):
    """First-step-ahead forecasts against the truth over each site's test tail."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = data.sites[:sites]
    fig, axes = plt.subplots(len(shown), 1, figsize=(8, 2.2 * len(shown)), squeeze=False)
    for ax, site in zip(axes[:, 0], shown):
        X, Y = site.test
        pred = site.normaliser.inverse_transform(predict(model, X))[:, 0, 0]
        truth = site.normaliser.inverse_transform(Y)[:, 0, 0]
        ax.plot(truth, lw=0.8, label="observed")
        ax.plot(pred, lw=0.8, label="forecast (t+1)")
        ax.set_ylabel(f"site {site.site}\n{data.columns[0]}")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper right")
    axes[-1, 0].set_xlabel(f"test window (step = {data.step_s} s)")
    fig.tight_layout()
    return fig
