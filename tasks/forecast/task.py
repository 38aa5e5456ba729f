"""Federated workload forecasting: each client is one edge site training the
global TCN / LSTM on its own series (real GWA-T-12 traces or synthetic).

Personalisation (what stays on the client lives in ``context.state``):

* ``task.personal_head=true``, FedPer-style (Arivazhagan et al. 2019): the
  output layer (``head``) is personal. The client trains the global trunk
  with its own head and keeps that head under :data:`PERSONAL_KEY`; its reply
  carries the head it *received* in its place, so the personal weights never
  leave the site and the aggregated head stays as it was.
* ``task.finetune_epochs=k``: in the last round's federated evaluation each
  site also fine-tunes what it deploys for k epochs on its own training
  windows (the weights of the best validation epoch kept) and scores that
  (``fed_ft_test_*``): local fine-tuning after federation.

The federated evaluation scores the deployed model on the site's validation
and test tails and weighs every site as one (``num-examples`` = 1), so the
aggregate is the mean over sites, like the server's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord
from omegaconf import DictConfig

from fl_common import protocol
from fl_common.local_layers import deployed, local_part, uplink
from tasks.base import ClientRound, LocalUpdate, ServerTask, Task
from tasks.forecast.models import (
    ANCHORS,
    FORECASTERS,
    check_quantile_levels,
    forecaster_costs,
    forecaster_from_settings,
    is_head_key,
)

# The forecasting data (pandas, trace loading) is imported by the handlers
# that use it: the registry imports this module only for forecasting runs,
# but a ClientApp process of such a run still should not pay twice.
if TYPE_CHECKING:
    from fl_datasets.forecast_data import ForecastSpec, SiteData

SPEC_KEY = "forecast-spec"
MODEL_KEY = "forecaster"
PERSONAL_KEY = "forecast-personal-head"  # context.state: this site's own output layer
SITE_SELECTIONS = ("busiest", "first")
SYNTHETIC_KINDS = ("vm", "functions")


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
        _check(task.anchor in ANCHORS, f"task.anchor={task.anchor} is unknown: choose one of {', '.join(ANCHORS)} "
               "(last_value: the residual on top of persistence)")
        if len(task.quantiles):
            try:
                check_quantile_levels(list(task.quantiles))
            except (ValueError, TypeError) as err:
                raise ValueError(f"task.quantiles={list(task.quantiles)}: {err}; or [] for a point forecast") from None
        _check(isinstance(task.finetune_epochs, int) and not isinstance(task.finetune_epochs, bool)
               and task.finetune_epochs >= 0,
               f"task.finetune_epochs={task.finetune_epochs} is invalid: use a whole number of epochs >= 0")
        _check(not (task.personal_head or task.finetune_epochs) or cfg.clients.fraction_evaluate > 0,
               f"task.personal_head={task.personal_head} / task.finetune_epochs={task.finetune_epochs} with "
               f"clients.fraction_evaluate={cfg.clients.fraction_evaluate}: what the sites deploy is scored only "
               "by their federated evaluation; set clients.fraction_evaluate=1.0")
        _check(_is_number(task.optimizer.lr) and task.optimizer.lr > 0,
               f"task.optimizer.lr={task.optimizer.lr} is invalid: the learning rate must be > 0")
        _check(isinstance(task.optimizer.batch_size, int) and task.optimizer.batch_size >= 1,
               f"task.optimizer.batch_size={task.optimizer.batch_size} is invalid: use an integer >= 1")
        eval_sites = task.get("eval_sites")
        _check(eval_sites is None or (isinstance(eval_sites, int) and not isinstance(eval_sites, bool) and eval_sites >= 1),
               f"task.eval_sites={eval_sites} is invalid: use a whole number of sites >= 1, or null (every site)")
        _check(task.site_selection in SITE_SELECTIONS,
               f"task.site_selection={task.site_selection} is unknown: use {' or '.join(SITE_SELECTIONS)}")
        _check(task.synthetic.kind in SYNTHETIC_KINDS,
               f"task.synthetic.kind={task.synthetic.kind} is unknown: use {' or '.join(SYNTHETIC_KINDS)}")
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
                "sites": str(cfg.clients.num), "seed": str(cfg.seed), "anchor": str(cfg.task.anchor),
                "personal_head": str(bool(cfg.task.personal_head)).lower()}

    def run_name(self, cfg: DictConfig) -> str:
        personal = "-fedper" if cfg.task.personal_head else ""
        return f"{cfg.task.name}-{cfg.task.model}{personal}-{cfg.strategy.name}-n{cfg.clients.num}-s{cfg.seed}"

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
        received = arrays.to_torch_state_dict()
        model = _forecaster(spec, settings, _deployed(settings, received, run))
        epochs = int(settings["local_epochs"])
        metrics: dict[str, float] = {}
        if run.train_private is None:
            loss = train_forecaster(model, *site.train, epochs=epochs, batch_size=int(settings["batch_size"]),
                                    lr=float(settings["lr"]), seed=run.seed)[-1]
        else:  # accountant kept in context.state across rounds
            # a quantile forecaster's point output is its median: the absolute error is its loss
            loss_fn = torch.nn.L1Loss() if settings["quantiles"] else torch.nn.MSELoss()
            outcome = run.train_private(
                model, torch.as_tensor(site.train[0]), torch.as_tensor(site.train[1]), loss_fn,
                epochs=epochs, batch_size=int(settings["batch_size"]), lr=float(settings["dp_lr"]),
                momentum=float(settings["dp_momentum"]), seed=run.seed,
            )
            if outcome.declined:
                return LocalUpdate(ArrayRecord(), 0, 0.0, declined=outcome)
            loss, metrics = outcome.loss, outcome.metrics()
        forward_flops = forecaster_costs(settings["model"], len(spec.columns), spec.window, spec.horizon,
                                         settings["level_steps"], tuple(settings["quantiles"]))[0]
        trained = model.state_dict()
        if settings["personal_head"]:  # the head stays here; the reply carries the received one
            run.state[PERSONAL_KEY] = ArrayRecord(local_part(trained, is_head_key))
            trained = uplink(trained, received, is_head_key)
        return LocalUpdate(
            arrays=ArrayRecord(trained),
            num_examples=len(site),
            train_flops=3 * forward_flops * len(site) * epochs,  # fwd + 2x bwd per window
            metrics={"train_loss": loss, **metrics},
        )

    def evaluate(self, arrays: ArrayRecord, run: ClientRound) -> dict[str, float]:
        """Federated evaluation of what this site deploys, on its validation and
        test tails (original units); after the last round also fine-tuned."""
        from tasks.forecast.training import train_forecaster

        spec, settings, site = _site(run)
        model = _forecaster(spec, settings, _deployed(settings, arrays.to_torch_state_dict(), run))
        metrics = _scores(model, site, spec, ("val", "test"))
        if settings["finetune_epochs"] and run.server_round >= int(settings["num_rounds"]):
            train_forecaster(model, *site.train, epochs=int(settings["finetune_epochs"]),
                             batch_size=int(settings["batch_size"]), lr=float(settings["lr"]), seed=run.seed,
                             val=site.val)
            metrics.update({f"ft_{k}": v for k, v in _scores(model, site, spec, ("test",)).items()})
        return {**metrics, protocol.NUM_EXAMPLES: 1}  # each site weighs one: the aggregate is the mean over sites


def _scores(model: torch.nn.Module, site: SiteData, spec: ForecastSpec, splits: tuple[str, ...]) -> dict[str, float]:
    from tasks.forecast.training import evaluate_forecaster

    out = {}
    for split in splits:
        scores = evaluate_forecaster(model, *getattr(site, split), site.y_train, spec.season, site.normaliser)
        keep = scores if split == "test" else {k: v for k, v in scores.items() if "_h" not in k}
        out.update({f"{split}_{k}": v for k, v in keep.items()})
    return out


def _deployed(settings: dict, received: dict, run: ClientRound) -> dict:
    """The received model, with this site's personal head when it has one."""
    if not settings["personal_head"] or PERSONAL_KEY not in run.state:
        return received
    return deployed(received, run.state[PERSONAL_KEY].to_torch_state_dict(), is_head_key)


def _site(run: ClientRound) -> tuple[ForecastSpec, dict, SiteData]:
    from fl_datasets.forecast_data import ForecastSpec, build_site

    spec = ForecastSpec.from_json(str(run.config[SPEC_KEY]))
    return spec, json.loads(str(run.config[MODEL_KEY])), build_site(spec, run.partition_id)  # only its own windows


def _forecaster(spec: ForecastSpec, settings: dict, state: dict) -> torch.nn.Module:
    model = forecaster_from_settings(settings, len(spec.columns), spec.horizon)
    model.load_state_dict(state)
    return model


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
