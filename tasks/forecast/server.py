"""The server side of federated workload forecasting (``task.kind == forecast``).

Each edge site is one client training the global TCN / LSTM on its own
series; the configured strategy (FedAvg, FedAvgM, staleness-aware clustered…)
aggregates. After every round the server scores the global model on every
site's validation and test windows, in original units: MAE, RMSE, sMAPE and
MASE per site and their mean over sites ("overall"), next to the seasonal-naive
(one season) and last-value baselines on the very same windows. Above
``task.eval_sites`` sites it scores a fixed sample of that many, and above
``tracking.per_client_limit`` it logs per-site keys for a fixed sample only.
"""

from __future__ import annotations

import json
from collections.abc import Container
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from omegaconf import DictConfig

from fl_common.per_client import sample_clients
from fl_datasets.forecast_data import FederatedForecastData, ForecastSpec, SiteLayout, build_forecast_data, site_layout
from tasks.base import ServerTask
from tasks.forecast.models import build_forecaster, forecaster_costs
from tasks.forecast.training import evaluate_baselines, evaluate_forecaster, predict

SPEC_KEY = "forecast-spec"   # ConfigRecord: the ForecastSpec JSON
MODEL_KEY = "forecaster"     # ConfigRecord: model and optimiser settings (JSON)
METRICS = ("mae", "rmse", "smape", "mase")
BASELINES = ("seasonal_naive", "last_value")
HEADLINE = ("test_mase", "test_mae", "test_rmse", "test_smape", "val_mase", "train_loss")
SHOWN = ("test_mase", "test_mae", "test_smape", "train_loss", "clients_replied", "clients_failed", "round_wall_time_s")


def forecaster_settings(cfg: DictConfig) -> dict[str, Any]:
    task = cfg.task
    return {
        "model": str(task.model),
        "level_centred": bool(task.level_centred),
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


def score_baselines(data: FederatedForecastData, season: int, split: str) -> dict[str, dict[str, dict[str, float]]]:
    """``{baseline: {site: metrics}}`` on the same windows as the model."""
    per_site = {
        site.site: evaluate_baselines(*getattr(site, split), site.y_train, season, site.normaliser)
        for site in data.sites
    }
    return {b: {s: scores[b] for s, scores in per_site.items()} for b in BASELINES}


def flat_metrics(per_site: dict[str, dict[str, float]], prefix: str, per_site_keys: bool = True,
                 logged: Container[str] | None = None) -> dict[str, float]:
    """Overall (mean over sites) as ``<prefix>_<metric>``, and per site as
    ``site<id>_<prefix>_<metric>`` (only the sites in ``logged``, if given)."""
    out = {f"{prefix}_{m}": float(np.mean([s[m] for s in per_site.values()])) for m in METRICS}
    if per_site_keys:
        for site, scores in per_site.items():
            if logged is None or site in logged:
                out.update({f"site{site}_{prefix}_{m}": float(v) for m, v in scores.items()})
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
        self.layout = site_layout(self.spec)  # every client's site and window counts, no windows cut
        # the sites scored every round: all, or a fixed sample above task.eval_sites
        self.eval_clients = sample_clients(self.num_clients, cfg.task.get("eval_sites"))
        self.data = build_forecast_data(self.spec, self.eval_clients)
        # per-site metric keys: every scored site, or a fixed sample above tracking.per_client_limit
        logged = sample_clients(self.num_clients, cfg.tracking.get("per_client_limit"))
        scored = set(range(self.num_clients) if self.eval_clients is None else self.eval_clients)
        self.logged_sites = None if logged is None and self.eval_clients is None else frozenset(
            self.layout.site_ids[c] for c in (scored if logged is None else scored & set(logged)))
        self.model_name = str(cfg.task.model)
        self.client_sizes = [train for train, _, _ in self.layout.windows]
        self.baselines = {b: score_baselines(self.data, self.spec.season, "test")[b] for b in BASELINES}
        self.baseline_metrics: dict[str, float] = {}
        for name, per_site in self.baselines.items():
            self.baseline_metrics.update(flat_metrics(per_site, f"baseline_{name}_test", logged=self.logged_sites))
        self.model = _forecaster(cfg, self.spec, seed=int(cfg.seed))

    def initial_arrays(self) -> ArrayRecord:
        return ArrayRecord(self.model.state_dict())

    def train_config(self) -> dict[str, Any]:
        return {SPEC_KEY: self.spec.to_json(), MODEL_KEY: json.dumps(forecaster_settings(self.cfg))}

    def model_costs(self):
        return forecaster_costs(str(self.cfg.task.model), len(self.spec.columns), self.spec.window,
                                self.spec.horizon, bool(self.cfg.task.level_centred))

    def batch_size(self) -> int:
        return int(self.cfg.task.optimizer.batch_size)

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        self.model.load_state_dict(arrays.to_torch_state_dict())
        season = self.spec.season
        metrics = flat_metrics(score_sites(self.model, self.data, season, "test"), "test", logged=self.logged_sites)
        metrics.update(flat_metrics(score_sites(self.model, self.data, season, "val"), "val", per_site_keys=False))
        if server_round in (0, int(self.cfg.num_rounds)):  # flat lines in the UI's charts
            metrics.update(self.baseline_metrics)
        return metrics

    def log_inputs(self, tracker: Any) -> None:
        tracker.log_text(_sites_csv(self.layout), "data/client_sites.csv")
        if self.eval_clients is not None:
            tracker.log_metrics({"eval_sites": float(len(self.eval_clients))}, step=0)
        if self.data.left_out:  # VMs that do not cover the common window (fl_datasets.traces)
            tracker.log_text(self.data.left_out_note + "\n", "data/vms_left_out.txt")
            tracker.log_metrics({"data_vms_left_out": float(len(self.data.left_out))}, step=0)

    def report(self, tracker: Any, history: list[dict[str, Any]], final: ArrayRecord, run_name: str) -> dict[str, float]:
        tracker.log_text(_site_table(history[-1], self.data, self.baselines, self.logged_sites), "report/site_metrics.md")
        tracker.log_figure(lambda: _mase_plot(history, self.baseline_metrics, run_name), "plots/mase_vs_round.png")
        self.model.load_state_dict(final.to_torch_state_dict())
        tracker.log_figure(lambda: _forecast_plot(self.model, self.data, self.spec), "plots/test_forecasts.png")
        return {f"baseline_{name}_test_mase": self.baseline_metrics[f"baseline_{name}_test_mase"] for name in BASELINES}


def _forecaster(cfg: DictConfig, spec: ForecastSpec, seed: int | None = None):
    return build_forecaster(
        str(cfg.task.model), in_channels=len(spec.columns), horizon=spec.horizon, seed=seed,
        level_steps=spec.window if cfg.task.level_centred else None,
    )


def _sites_csv(layout: SiteLayout) -> str:
    rows = [f"{i},{site},{train},{val},{test}" for i, (site, (train, val, test)) in
            enumerate(zip(layout.site_ids, layout.windows))]
    return "client,site,train_windows,val_windows,test_windows\n" + "\n".join(rows) + "\n"


def _site_table(last: dict[str, Any], data: FederatedForecastData, baselines, logged: Container[str] | None = None) -> str:
    """Markdown: final per-site test metrics of the model and both baselines
    (the sites with per-site metrics; the overall row is over every scored site)."""
    lines = [
        "| site | model MAE | model RMSE | model sMAPE % | model MASE | s-naive MASE | last-value MASE |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in data.site_ids():
        if logged is not None and s not in logged:
            continue
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
