"""The CDIO task's server: scores the federated preference predictor and places requests in the twin (see task.py)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from omegaconf import DictConfig

from tasks.base import ServerTask
from tasks.cdio.placement import MEASURES, POLICIES, PlacementSettings, evaluate
from tasks.cdio.rpp import build_rpp, predict_proba, rpp_flops, scores
from tasks.cdio.spec import CDIOSpec
from tasks.cdio.task import PREFIX, complexity_scale, load_rpp, site_data, spec_config
from tasks.cdio.workload import build_stream, features, windows

BANDWIDTHS = ("stable", "fluctuating")
HEADLINE = ("rpp_exact_acc", "rpp_majority_acc", "rpp_bce", PREFIX + "success_both", PREFIX + "compute_tflop",
            PREFIX + "bandwidth_mb", PREFIX + "energy_j", PREFIX + "delay_ms")
SHOWN = ("rpp_exact_acc", "rpp_bce", PREFIX + "success_both", "round_wall_time_s")
TWIN_SEED_OFFSET = 104_729  # the twin's request streams: digits of the test split, a seed of their own


class CDIOServer(ServerTask):
    headline = HEADLINE
    shown = SHOWN
    model_name = "preference LSTM"

    def __init__(self, cfg: DictConfig) -> None:
        torch.set_num_threads(1)
        self.spec = spec = CDIOSpec.from_config(cfg)
        self.measured = spec.measured()
        self.num_clients = spec.num_sites
        self.client_sizes = [spec.train_tasks] * spec.num_sites
        self.client_models = {}
        self.model = build_rpp(spec.hidden, spec.layers, seed=spec.seed)
        held = [site_data(spec, site, "holdout") for site in range(spec.num_sites)]
        self.holdout = np.concatenate([x for x, _ in held]), np.concatenate([y for _, y in held])
        self._validation: tuple[np.ndarray, np.ndarray] | None = None
        self.twins = {"stable": spec.twin(0.0, self.measured), "fluctuating": spec.twin(spec.fluctuation, self.measured)}
        length = spec.placement.slots * spec.placement.tasks_per_site
        self.streams = [build_stream(spec.stream, self.measured, site, spec.num_sites, length,
                                     spec.seed + TWIN_SEED_OFFSET, "test") for site in range(spec.num_sites)]
        scale = complexity_scale(self.measured)
        self.stream_windows = [np.ascontiguousarray(windows(features(s, spec.stream, scale), spec.window))
                               for s in self.streams]

    def initial_arrays(self) -> ArrayRecord:
        return ArrayRecord(self.model.state_dict())

    def train_config(self) -> dict[str, Any]:
        return spec_config(self.spec)

    def model_costs(self):
        params = sum(p.numel() for p in self.model.parameters())
        return rpp_flops(self.spec.hidden, self.spec.layers, self.spec.window), params, 4 * self.spec.hidden * self.spec.window

    def batch_size(self) -> int:
        return self.spec.batch_size

    def place(self, arrays: ArrayRecord, bandwidth: str, slots: int, policies: tuple[str, ...]):
        """Every policy of ``policies`` over ``slots`` slots of the twin, with the predictor ``arrays``."""
        model = load_rpp(self.spec, arrays)
        predicted = [predict_proba(model, w) for w in self.stream_windows]
        settings = PlacementSettings(**{**self.spec.placement.__dict__, "slots": slots})
        return evaluate(self.twins[bandwidth], self.streams, predicted, settings, policies, seed=self.spec.seed)

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        metrics = {f"rpp_{k}": v for k, v in scores(load_rpp(self.spec, arrays), *self.holdout).items()}
        summary, curves = self.place(arrays, "stable", self.spec.round_slots, ("cdio",))
        metrics.update({PREFIX + k: float(v) for k, v in summary["cdio"].items()})
        return metrics

    def validation_score(self, arrays: ArrayRecord) -> float:
        """Minus the BCE on every site's validation tasks (the rollout guard; higher is better)."""
        if self._validation is None:
            parts = [site_data(self.spec, site, "validation") for site in range(self.spec.num_sites)]
            self._validation = np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])
        return -scores(load_rpp(self.spec, arrays), *self._validation)["bce"]

    def log_inputs(self, tracker: Any) -> None:
        y = self.holdout[1]
        tracker.log_metrics({"data_holdout_tasks": float(len(y)), "data_delay_sensitive": float(y[:, 0].mean()),
                             "data_accuracy_sensitive": float(y[:, 1].mean()),
                             "data_rpp_pre_ms": 1000 * self.spec.placement.rpp_s}, step=0)

    def final_grid(self, final: ArrayRecord) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every policy under both bandwidths: summary rows and the per-slot cumulative regret."""
        rows, regret = [], []
        for bandwidth in BANDWIDTHS:
            summary, curves = self.place(final, bandwidth, self.spec.placement.slots, POLICIES)
            for policy in POLICIES:
                rows.append({"deployment": self.spec.deployment, "bandwidth": bandwidth, "policy": policy,
                             **{k: float(summary[policy][k]) for k in MEASURES}})
                regret.extend({"bandwidth": bandwidth, "policy": policy, "slot": t + 1, "cumulative_regret": float(r)}
                              for t, r in enumerate(curves[policy]))
        return rows, regret

    def log_regret(self, tracker: Any, regret: list[dict[str, Any]], every: int = 10) -> None:
        """The learning policies' cumulative regret as MLflow series (step = slot, every ``every`` slots)."""
        series: dict[int, dict[str, float]] = {}
        for r in regret:
            if r["policy"] in ("cdio", "cdco-only") and (r["slot"] % every == 0 or r["slot"] == 1):
                key = f"regret_{r['bandwidth']}_{r['policy'].replace('-', '_')}"
                series.setdefault(int(r["slot"]), {})[key] = r["cumulative_regret"]
        for slot, metrics in sorted(series.items()):
            tracker.log_metrics(metrics, step=slot)

    def report(self, tracker: Any, history: list[dict[str, Any]], final: ArrayRecord, run_name: str) -> dict[str, float]:
        if not self.spec.final_study:
            return {}
        from tasks.cdio.plots import grid_figure, regret_figure

        rows, regret = self.final_grid(final)
        tracker.log_text(_csv(rows), "cdio/grid.csv")
        tracker.log_text(_csv(regret), "cdio/regret.csv")
        tracker.log_figure(lambda: grid_figure(rows, run_name), "plots/cdio_policies.png")
        tracker.log_figure(lambda: regret_figure(regret, run_name), "plots/cdio_regret.png")
        self.log_regret(tracker, regret)
        return {f"final_{r['bandwidth']}_{r['policy'].replace('-', '_')}_success_both": r["success_both"] for r in rows}


def _csv(rows: list[dict[str, Any]]) -> str:
    import csv

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
