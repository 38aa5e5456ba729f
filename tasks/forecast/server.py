"""The server side of federated workload forecasting (``task.kind == forecast``).

Each edge site is one client training the global TCN / LSTM on its own
series; the configured strategy (FedAvg, FedAvgM, staleness-aware clustered…)
aggregates. After every round the server scores the global model on every
site's validation and test windows, in original units: MAE, RMSE, sMAPE and
MASE per site and their mean over sites ("overall"), each also per horizon
step (``test_mase_h12``), with the pinball loss and 80 % interval coverage of a
quantile forecaster, next to the baselines on the very same windows
(:data:`BASELINES`: last value, seasonal-naive over ``task.season`` (a day by
default) and over a week, a one-hour
moving average, the validation-tuned ETS of :mod:`tasks.forecast.classical`).

What each site *deploys* (its cluster's model, or the shared trunk with its
personal head) is scored by the clients themselves on their own validation
and test tails (federated evaluation, ``clients.fraction_evaluate``), logged
as ``fed_test_*``: the mean over sites, each site weighing one. A run with
personal heads (``task.personal_head``) has no meaningful global model, so
the server scores only the baselines and reports the clients' scores.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from omegaconf import DictConfig

from fl_common.per_client import sample_clients
from fl_datasets.forecast_data import FederatedForecastData, ForecastSpec, SiteData, build_forecast_data, site_layout
from tasks.base import ServerTask
from tasks.forecast.models import anchor_level_steps, forecaster_costs, forecaster_from_settings
from tasks.forecast.training import evaluate_forecaster, forecast_metrics, predict

SPEC_KEY = "forecast-spec"   # ConfigRecord: the ForecastSpec JSON
MODEL_KEY = "forecaster"     # ConfigRecord: model and optimiser settings (JSON)
METRICS = ("mae", "rmse", "smape", "mase")
# Every baseline, scored on the model's own test windows; "seasonal_naive" is the one-season (daily) one.
BASELINES = ("last_value", "seasonal_naive", "seasonal_naive_week", "moving_average", "ets")
HEADLINE = ("test_mase", "test_mae", "test_rmse", "test_smape", "val_mase", "train_loss")
SHOWN = ("test_mase", "test_mae", "test_smape", "train_loss", "clients_replied", "clients_failed", "round_wall_time_s")
WEEK_S = 7 * 86_400  # the weekly seasonal-naive's period


def forecaster_settings(cfg: DictConfig) -> dict[str, Any]:
    task = cfg.task
    return {
        "model": str(task.model),
        "level_steps": anchor_level_steps(str(task.anchor), int(task.window)),
        "quantiles": [float(q) for q in task.quantiles],
        "zero_head": bool(task.zero_head),
        "personal_head": bool(task.personal_head),
        "finetune_epochs": int(task.finetune_epochs),
        "num_rounds": int(cfg.num_rounds),
        "local_epochs": int(cfg.train.local_epochs),
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


def baseline_forecasts_of(site: SiteData, spec: ForecastSpec, split: str, step_s: int,
                          ets: bool = True) -> dict[str, np.ndarray]:
    """Every baseline's forecasts (N, H, C), original units, for one site's windows of ``split``."""
    from fl_datasets.naive_forecasts import forecasts_from_origins

    seasons = {"seasonal_naive": spec.season, "seasonal_naive_week": max(1, round(WEEK_S / step_s))}
    average = max(1, round(3600 / step_s))  # one hour
    out = forecasts_from_origins(site.series, site.origins[split], spec.horizon, seasons, average)
    if ets:
        from tasks.forecast.classical import tuned_ets_forecasts

        val_truth = site.normaliser.inverse_transform(site.val[1])
        out["ets"], _ = tuned_ets_forecasts(site.series, site.train_slice, site.origins["val"], val_truth,
                                            site.origins[split], spec.horizon, spec.season)
    return out


def persistence_quantiles(site: SiteData, levels: tuple[float, ...], horizon: int) -> np.ndarray:
    """Empirical quantiles (H, C, Q) of the h-step change ``y[t+h] - y[t]`` over
    the training slice: added to the last value they make persistence a
    probabilistic forecast, the pinball baseline."""
    y = site.y_train
    return np.stack([np.nanquantile(y[h:] - y[:-h], levels, axis=0).T for h in range(1, horizon + 1)])


def score_baselines(data: FederatedForecastData, spec: ForecastSpec, split: str = "test",
                    levels: tuple[float, ...] = (0.1, 0.5, 0.9), ets: bool = True,
                    ) -> dict[str, dict[str, dict[str, float]]]:
    """``{baseline: {site: metrics}}`` on the same windows as the model; the
    last value also as a quantile forecast (pinball, coverage)."""
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for site in data.sites:
        truth = site.normaliser.inverse_transform(getattr(site, split)[1])
        for name, pred in baseline_forecasts_of(site, spec, split, data.step_s, ets).items():
            quantiles = None
            if name == "last_value" and len(levels) >= 2:
                quantiles = pred[..., None] + persistence_quantiles(site, levels, spec.horizon)[None]
            scores.setdefault(name, {})[site.site] = forecast_metrics(truth, pred, site.y_train, spec.season,
                                                                      quantiles, levels)
    return scores


def flat_metrics(per_site: dict[str, dict[str, float]], prefix: str, per_site_keys: bool = True) -> dict[str, float]:
    """Overall (mean over sites) as ``<prefix>_<metric>`` for every metric the
    sites have (per horizon step included), and per site the four overall
    ones and the last step's MASE as ``site<id>_<prefix>_<metric>``."""
    first = next(iter(per_site.values()))
    out = {f"{prefix}_{m}": float(np.mean([s[m] for s in per_site.values()])) for m in first}
    if per_site_keys:
        last_step = max((k for k in first if k.startswith("mase_h")), key=lambda k: int(k[6:]), default=None)
        for site, scores in per_site.items():
            out.update({f"site{site}_{prefix}_{m}": float(scores[m]) for m in (*METRICS, last_step) if m})
    return out


class ForecastServer(ServerTask):
    """The server side of one forecasting run: per-site scores every round,
    the baselines on the same windows, and the report."""

    headline = HEADLINE
    shown = SHOWN

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.spec = ForecastSpec.from_config(cfg)
        self.num_clients = self.spec.num_clients
        # the sites scored every round: all, or a fixed sample above task.eval_sites (a 1,000-site
        # federation would cut ~2 GB of windows and score ~1,000 test windows per site per round)
        self.eval_clients = sample_clients(self.num_clients, cfg.task.get("eval_sites"))
        self.data = build_forecast_data(self.spec, self.eval_clients)
        self.model_name = str(cfg.task.model)
        # every client's training-window count without cutting its windows (SecAgg+'s weight bound)
        self.client_sizes = [train for train, _, _ in site_layout(self.spec).windows]
        self.settings = forecaster_settings(cfg)
        self.personal = self.settings["personal_head"]
        if self.personal:  # the deployed models live on the clients
            self.headline = tuple(f"fed_{k}" for k in HEADLINE if k.startswith("test_")) + ("train_loss",)
            self.shown = tuple(f"fed_{k}" if k.startswith("test_") else k for k in SHOWN)
        self.baselines = score_baselines(self.data, self.spec, "test", tuple(self.settings["quantiles"]))
        self.baseline_metrics: dict[str, float] = {}
        for name, per_site in self.baselines.items():
            self.baseline_metrics.update(flat_metrics(per_site, f"baseline_{name}_test"))
        self.model = _forecaster(cfg, self.spec, seed=int(cfg.seed))

    def initial_arrays(self) -> ArrayRecord:
        return ArrayRecord(self.model.state_dict())

    def train_config(self) -> dict[str, Any]:
        return {SPEC_KEY: self.spec.to_json(), MODEL_KEY: json.dumps(self.settings)}

    def model_costs(self):
        return forecaster_costs(self.settings["model"], len(self.spec.columns), self.spec.window,
                                self.spec.horizon, self.settings["level_steps"], tuple(self.settings["quantiles"]))

    def batch_size(self) -> int:
        return int(self.cfg.task.optimizer.batch_size)

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if not self.personal:  # with personal heads the global model is only a shared trunk
            self.model.load_state_dict(arrays.to_torch_state_dict())
            season = self.spec.season
            metrics = flat_metrics(score_sites(self.model, self.data, season, "test"), "test")
            metrics.update(flat_metrics(score_sites(self.model, self.data, season, "val"), "val", per_site_keys=False))
        if server_round in (0, int(self.cfg.num_rounds)):  # flat lines in the UI's charts
            metrics.update(self.baseline_metrics)
        return metrics

    def validation_score(self, arrays: ArrayRecord) -> float:
        """Minus the mean MASE over sites on the held-out validation window (after the
        training slice, before the test tail; clients never train on it)."""
        self.model.load_state_dict(arrays.to_torch_state_dict())
        per_site = score_sites(self.model, self.data, self.spec.season, "val")
        return -float(np.mean([s["mase"] for s in per_site.values()]))

    def log_inputs(self, tracker: Any) -> None:
        if self.cfg.tracking.log_model:  # log_model's imports (torch.export needs dynamo: ~2 s), while clients train
            tracker.warm_up("mlflow.pytorch", "torch._dynamo")
        tracker.log_datasets(lambda: _site_datasets(self.cfg, self.data))  # the MLflow UI's Dataset column
        tracker.log_text(_sites_csv(self.spec, self.eval_clients), "data/client_sites.csv")
        if self.eval_clients is not None:  # the UI says the test_* / val_* means are over a sample
            tracker.log_metrics({"eval_sites": float(len(self.eval_clients))}, step=0)
        if self.data.left_out:  # VMs that do not cover the common window (fl_datasets.traces)
            tracker.log_text(self.data.left_out_note + "\n", "data/vms_left_out.txt")
            tracker.log_metrics({"data_vms_left_out": float(len(self.data.left_out))}, step=0)

    def report(self, tracker: Any, history: list[dict[str, Any]], final: ArrayRecord, run_name: str) -> dict[str, float]:
        extra = {f"baseline_{name}_test_mase": self.baseline_metrics[f"baseline_{name}_test_mase"] for name in BASELINES}
        extra[f"baseline_last_value_test_mase_h{self.spec.horizon}"] = \
            self.baseline_metrics[f"baseline_last_value_test_mase_h{self.spec.horizon}"]
        tracker.log_figure(lambda: _mase_plot(history, self.baseline_metrics, run_name), "plots/mase_vs_round.png")
        if self.personal:  # what the sites deploy, as they scored it
            return {**extra, **{k.removeprefix("fed_"): v for k, v in history[-1].items()
                                if k.startswith("fed_test_") and k.count("_") == 2}}
        tracker.log_text(_site_table(history[-1], self.data, self.baselines), "report/site_metrics.md")
        self.model.load_state_dict(final.to_torch_state_dict())
        tracker.log_figure(lambda: _forecast_plot(self.model, self.data, self.spec), "plots/test_forecasts.png")
        if self.cfg.tracking.log_model:  # an MLflow model (the UI's Models column): windows (N, W, C) -> (N, H, C)
            tracker.log_pytorch_model(lambda: (self.model, self.data.sites[0].test[0][:2]), step=int(self.cfg.num_rounds))
        return extra


def _forecaster(cfg: DictConfig, spec: ForecastSpec, seed: int | None = None):
    return forecaster_from_settings(forecaster_settings(cfg), len(spec.columns), spec.horizon, seed=seed)


def _site_datasets(cfg: DictConfig, data: FederatedForecastData) -> list[tuple[Any, str]]:
    """The sites' training and test windows as ``mlflow.data`` data sets (digest of the arrays)."""
    import warnings

    import mlflow.data

    source = str(cfg.task.trace_dir) if cfg.task.trace_dir else None  # synthetic series: no file source
    parts = [(f"{cfg.task.name}-sites-train", "train", f"train: {len(data.sites)} sites, {', '.join(data.columns)}"),
             (f"{cfg.task.name}-sites-test", "test", "eval")]
    datasets = []
    with warnings.catch_warnings():  # "source can be interpreted in multiple ways": a local folder
        warnings.simplefilter("ignore", UserWarning)
        for name, split, context in parts:
            x = np.concatenate([getattr(site, split)[0] for site in data.sites])
            y = np.concatenate([getattr(site, split)[1] for site in data.sites])
            datasets.append((mlflow.data.from_numpy(x, targets=y, source=source, name=name), context))
    return datasets


def _sites_csv(spec: ForecastSpec, scored: tuple[int, ...] | None) -> str:
    """Every client's site and window counts, and whether the server scores it each round."""
    layout = site_layout(spec)
    rows = [f"{i},{site},{train},{val},{test},{int(scored is None or i in scored)}"
            for i, (site, (train, val, test)) in enumerate(zip(layout.site_ids, layout.windows))]
    return "client,site,train_windows,val_windows,test_windows,scored\n" + "\n".join(rows) + "\n"


def _site_table(last: dict[str, Any], data: FederatedForecastData, baselines) -> str:
    """Markdown: final per-site test metrics of the model, and every baseline's MASE."""
    lines = [
        "| site | model MAE | model RMSE | model sMAPE % | model MASE | "
        + " | ".join(f"{b.replace('_', '-')} MASE" for b in BASELINES) + " |",
        "|---|---|---|---|---|" + "---|" * len(BASELINES),
    ]
    for s in data.site_ids():
        lines.append(
            f"| {s} | " + " | ".join(f"{last[f'site{s}_test_{m}']:.3f}" for m in METRICS)
            + " | " + " | ".join(f"{baselines[b][s]['mase']:.3f}" for b in BASELINES) + " |"
        )
    lines.append(
        "| **overall (mean)** | " + " | ".join(f"{last[f'test_{m}']:.3f}" for m in METRICS)
        + " | " + " | ".join(f"{np.mean([v['mase'] for v in baselines[b].values()]):.3f}" for b in BASELINES) + " |"
    )
    return "\n".join(lines) + "\n"


def _mase_plot(history: list[dict[str, Any]], baseline_metrics: dict[str, float], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [row["round"] for row in history]
    ax.plot(rounds, [row.get("test_mase", np.nan) for row in history], marker="o", label="global model (test)")
    ax.plot(rounds, [row.get("val_mase", np.nan) for row in history], marker=".", ls=":", label="global model (val)")
    ax.plot(rounds, [row.get("fed_test_mase", np.nan) for row in history], marker="s", label="deployed, site-scored (test)")
    for name, style in zip(BASELINES, ("--", "-.", ":", (0, (1, 3)), (0, (5, 2)))):
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
