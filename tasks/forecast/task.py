"""Federated workload forecasting: each client is one edge site training the
global TCN / LSTM on its own series (real GWA-T-12 traces or synthetic)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord
from omegaconf import DictConfig

from tasks.base import ClientRound, LocalUpdate, ServerTask, Task
from tasks.forecast.models import FORECASTERS, build_forecaster, forecaster_costs

# The forecasting data (pandas, trace loading) is imported by the handlers
# that use it: the registry imports this module only for forecasting runs,
# but a ClientApp process of such a run still should not pay twice.
if TYPE_CHECKING:
    from fl_datasets.forecast_data import ForecastSpec, SiteData

SPEC_KEY = "forecast-spec"
MODEL_KEY = "forecaster"
SITE_SELECTIONS = ("busiest", "first")


class ForecastTask(Task):
    kind = "forecast"
    dp_sgd_refusal = None  # the TCN trains per window: Opacus applies (the LSTM is refused in validate)

    # ------------------------------------------------------------ config
    def validate(self, cfg: DictConfig) -> None:
        task = cfg.task
        for key in ("window", "horizon", "season", "train_stride"):
            _check(isinstance(task[key], int) and not isinstance(task[key], bool) and task[key] >= 1,
                   f"task.{key}={task[key]} is invalid: use a whole number of steps >= 1")
        _check(task.season <= task.window,
               f"task.season={task.season} is longer than task.window={task.window}: the seasonal-naive "
               "baseline needs one full season inside the window; raise task.window or lower task.season")
        _check(task.model in FORECASTERS, f"task.model={task.model} is unknown: choose one of {', '.join(FORECASTERS)}")
        _check(_is_number(task.optimizer.lr) and task.optimizer.lr > 0,
               f"task.optimizer.lr={task.optimizer.lr} is invalid: the learning rate must be > 0")
        _check(isinstance(task.optimizer.batch_size, int) and task.optimizer.batch_size >= 1,
               f"task.optimizer.batch_size={task.optimizer.batch_size} is invalid: use an integer >= 1")
        eval_sites = task.get("eval_sites")
        _check(eval_sites is None or (isinstance(eval_sites, int) and not isinstance(eval_sites, bool) and eval_sites >= 1),
               f"task.eval_sites={eval_sites} is invalid: use a whole number of sites >= 1, or null (every site)")
        _check(task.site_selection in SITE_SELECTIONS,
               f"task.site_selection={task.site_selection} is unknown: use {' or '.join(SITE_SELECTIONS)}")
        trace_dir = task.get("trace_dir")
        if trace_dir is not None:
            _check(Path(trace_dir).is_dir(),
                   f"task.trace_dir={trace_dir} does not exist: point it at a GWA-T-12 month folder "
                   "(e.g. task.trace_dir=../shared/data/gwa-t-12-rnd/2013-8), or use task=workload "
                   "for synthetic series")
            _check(any(Path(trace_dir).glob("*.csv")),
                   f"task.trace_dir={trace_dir} holds no *.csv traces: point it at a GWA-T-12 month "
                   "folder with <vm>.csv files")
        _check(not (cfg.privacy.dpsgd.enabled and task.model != "tcn"),
               f"privacy=dpsgd with task.model={task.model}: Opacus computes per-sample gradients "
               "of torch's nn.LSTM only through its own DPLSTM; use task.model=tcn with DP-SGD")

    def tags(self, cfg: DictConfig) -> dict[str, str]:
        return {"task": cfg.task.name, "kind": self.kind, "model": cfg.task.model, "strategy": cfg.strategy.name,
                "sites": str(cfg.clients.num), "seed": str(cfg.seed)}

    def run_name(self, cfg: DictConfig) -> str:
        return f"{cfg.task.name}-{cfg.task.model}-{cfg.strategy.name}-n{cfg.clients.num}-s{cfg.seed}"

    def prepare(self, cfg: DictConfig, tracking_uri: str) -> None:
        from fl_datasets.forecast_data import ForecastSpec, build_site

        build_site(ForecastSpec.from_config(cfg), 0)  # checks series, split and selection; caches parsed traces

    def summary_columns(self) -> dict[str, str]:
        return {"MASE": "test_mase", "MAE": "test_mae", "sMAPE %": "test_smape",
                "s-naive MASE": "baseline_seasonal_naive_test_mase"}

    # ------------------------------------------------------------ server
    def server(self, cfg: DictConfig, tracking_uri: str) -> ServerTask:
        from tasks.forecast.server import ForecastServer

        return ForecastServer(cfg)

    # ------------------------------------------------------------ client
    def train(self, arrays: ArrayRecord, run: ClientRound) -> LocalUpdate:
        """Local Adam epochs on this site's training windows (or DP-SGD on the MSE)."""
        from tasks.forecast.training import train_forecaster

        spec, settings, site = _site(run)
        model = _forecaster(spec, settings, arrays)
        epochs = int(settings["local_epochs"])
        metrics: dict[str, float] = {}
        if run.train_private is None:
            loss = train_forecaster(model, *site.train, epochs=epochs, batch_size=int(settings["batch_size"]),
                                    lr=float(settings["lr"]), seed=run.seed)[-1]
        else:  # accountant kept in context.state across rounds
            outcome = run.train_private(
                model, torch.as_tensor(site.train[0]), torch.as_tensor(site.train[1]), torch.nn.MSELoss(),
                epochs=epochs, batch_size=int(settings["batch_size"]), lr=float(settings["dp_lr"]),
                momentum=float(settings["dp_momentum"]), seed=run.seed,
            )
            if outcome.declined:
                return LocalUpdate(ArrayRecord(), 0, 0.0, declined=outcome)
            loss, metrics = outcome.loss, outcome.metrics()
        forward_flops = forecaster_costs(settings["model"], len(spec.columns), spec.window, spec.horizon,
                                         bool(settings["level_centred"]))[0]
        return LocalUpdate(
            arrays=ArrayRecord(model.state_dict()),
            num_examples=len(site),
            train_flops=3 * forward_flops * len(site) * epochs,  # fwd + 2x bwd per window
            metrics={"train_loss": loss, **metrics},
        )

    def evaluate(self, arrays: ArrayRecord, run: ClientRound) -> dict[str, float]:
        """Federated evaluation on this site's validation windows (original units)."""
        from tasks.forecast.training import evaluate_forecaster

        spec, settings, site = _site(run)
        scores = evaluate_forecaster(_forecaster(spec, settings, arrays), *site.val, site.y_train, spec.season,
                                     site.normaliser)
        return {**{f"eval_{k}": v for k, v in scores.items()}, "num-examples": len(site.val[0])}


def _site(run: ClientRound) -> tuple[ForecastSpec, dict, SiteData]:
    from fl_datasets.forecast_data import ForecastSpec, build_site

    spec = ForecastSpec.from_json(str(run.config[SPEC_KEY]))
    return spec, json.loads(str(run.config[MODEL_KEY])), build_site(spec, run.partition_id)  # only its own windows


def _forecaster(spec: ForecastSpec, settings: dict, arrays: ArrayRecord) -> torch.nn.Module:
    model = build_forecaster(settings["model"], in_channels=len(spec.columns), horizon=spec.horizon,
                             level_steps=spec.window if settings["level_centred"] else None)
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
