"""Collaborative edge->cloud inference, closed back into federated training (paper 003 §3.2, §4.1).

The image task (:mod:`tasks.image.task`) trains the edge model, the
federated CNN, on the clients' long-tailed partitions. On top of it:

* server side, every round (round 0 included), the test split arrives as
  request streams, one per edge site (= client, on its device profile), and
  is served by the configured policy (:mod:`tasks.offload.policy`) with the
  round's global model at the edge and the cloud model
  (:mod:`tasks.offload.cloud`) in the cloud (:mod:`tasks.offload.serving`);
  the round's metrics get ``offload_*`` (accuracy of the answers, fraction
  offloaded, hard cases, edge / cloud accuracy on offloaded vs kept
  requests, latency percentiles, energy, listening, blocked requests);
* client side, the hard-case cache (:mod:`tasks.offload.hard_cases`): the
  samples the received model is unsure of weigh more in the client's next
  round of training;
* after the last round, the final study: every policy, θ_c over
  ``task.thetas`` and every link scenario (no fault, 10 % and 20 % packet
  loss, a cloud outage) on the final model, logged as ``offload/grid.csv``
  with ``plots/offload_tradeoff.png`` (:mod:`scripts.offload_study` reads
  them from every run of a study).
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from omegaconf import DictConfig

from edgesim.devices import Fleet
from fl_datasets.federated import DataSpec, build_image_data
from fl_datasets.sources import LabelledImages
from tasks.base import ClientRound, ServerTask
from tasks.image.models import model_costs
from tasks.image.task import HEADLINE, SHOWN, ImageServer, ImageTask, LocalPlan
from tasks.image.training import classification_metrics, probabilities
from tasks.offload import hard_cases
from tasks.offload.cloud import CloudSettings, cloud_model, finetuned
from tasks.offload.hard_cases import HardCaseSettings
from tasks.offload.policy import MODES, PolicySettings, check, number, settings_from
from tasks.offload.serving import (
    LINK_FAULTS,
    Endpoints,
    LinkSettings,
    Stream,
    StreamSettings,
    build_stream,
    serve,
    summarise,
)

HARD_KEY = "offload-hard-cases"  # ConfigRecord: θ_c and the cache settings (JSON)
SOURCES = ("mnist", "breastmnist")
PREFIX = "offload_"
FINAL_STREAM = 1_000_000  # stream ids of the final study (rounds use their number)
OFFLOAD_HEADLINE = tuple(PREFIX + k for k in ("accuracy", "macro_f1", "fraction", "latency_p50_ms", "latency_p95_ms",
                                              "energy_mj"))


@dataclass(frozen=True)
class OffloadSettings:
    """Everything of ``task.*`` the offload task adds to the image task's settings."""

    policy: PolicySettings
    stream: StreamSettings
    link: LinkSettings
    hard_cases: HardCaseSettings
    cloud: CloudSettings
    thetas: tuple[float, ...]
    final_study: bool
    final_repeats: int

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "OffloadSettings":
        task = cfg.task
        parts = {name: settings_from(kind, task[name], f"task.{name}") for name, kind in (
            ("policy", PolicySettings), ("stream", StreamSettings), ("link", LinkSettings),
            ("hard_cases", HardCaseSettings), ("cloud", CloudSettings))}
        thetas = tuple(task.thetas)
        for theta in thetas:
            check(number(theta) and theta >= 0,
                  f"task.thetas has {theta}: every θ_c of the final study must be a number >= 0, e.g. [0.5, 0.9, 0.99]")
        check(isinstance(task.final_repeats, int) and task.final_repeats >= 1,
              f"task.final_repeats={task.final_repeats} is invalid: use a whole number >= 1 (requests per test sample)")
        return cls(**parts, thetas=thetas, final_study=bool(task.final_study), final_repeats=int(task.final_repeats))


class OffloadTask(ImageTask):
    kind = "offload"

    # ------------------------------------------------------------ config
    def validate(self, cfg: DictConfig) -> None:
        super().validate(cfg)
        task = cfg.task
        check(task.source in SOURCES, f"task.source={task.source} is unknown: choose one of {', '.join(SOURCES)}")
        check(isinstance(task.cloud_per_class, int) and task.cloud_per_class >= 1,
              f"task.cloud_per_class={task.cloud_per_class} is invalid: the cloud model needs its own data, "
              "use a whole number of samples per class >= 1")
        settings = OffloadSettings.from_config(cfg)
        devices = sorted(cfg.devices.profiles)
        check(settings.cloud.device in devices,
              f"task.cloud.device={settings.cloud.device} is unknown: choose one of {', '.join(devices)} (devices.profiles)")
        check(not (settings.hard_cases.cloud_store and cfg.privacy.secagg.enabled),
              "task.hard_cases.cloud_store=true sends raw hard cases in the clear beside the model, which SecAgg+ "
              "is meant to hide: set task.hard_cases.cloud_store=false or privacy=none")
        check(not (settings.hard_cases.enabled and cfg.privacy.dpsgd.enabled),
              "task.hard_cases.enabled=true weighs hard cases up, which DP-SGD's per-sample accounting does not cover: "
              "set task.hard_cases.enabled=false or privacy=none")

    def tags(self, cfg: DictConfig) -> dict[str, str]:
        tags = super().tags(cfg)
        tags.update({"source": str(cfg.task.source), "policy": str(cfg.task.policy.mode),
                     "theta": f"{cfg.task.policy.theta:g}", "link_faults": str(cfg.task.link.faults),
                     "hard_cases": "on" if cfg.task.hard_cases.enabled else "off"})
        return tags

    def run_name(self, cfg: DictConfig) -> str:
        task = cfg.task
        cache = "hc" if task.hard_cases.enabled else "nohc"
        return f"{super().run_name(cfg)}-{task.policy.mode}-th{task.policy.theta:g}-{cache}"

    def prepare(self, cfg: DictConfig, tracking_uri: str) -> None:
        super().prepare(cfg, tracking_uri)
        spec = DataSpec.from_config(cfg)  # the cloud model, into the launcher's cache for the ServerApp
        cloud_model(spec, build_image_data(spec), OffloadSettings.from_config(cfg).cloud, int(cfg.seed))

    def summary_columns(self) -> dict[str, str]:
        return {"served acc": "offload_accuracy", "offloaded": "offload_fraction", "p95 ms": "offload_latency_p95_ms",
                **super().summary_columns()}

    # ------------------------------------------------------------ server
    def server(self, cfg: DictConfig, tracking_uri: str) -> ServerTask:
        return OffloadServer(cfg)

    # ------------------------------------------------------------ client
    def local_plan(self, model, data: LabelledImages, run: ClientRound) -> LocalPlan:
        """Weigh up last round's hard cases; cache this round's (the received model's)."""
        settings = json.loads(str(run.config[HARD_KEY]))
        if not settings["enabled"]:
            return LocalPlan()
        previous = hard_cases.cached(run.state, len(data))
        probs = probabilities(model, data.x)
        confidence = probs.max(axis=1)
        found = hard_cases.collect(confidence, settings["theta"], settings["max_fraction"])
        hard_cases.store(run.state, found, confidence[found], probs.argmax(axis=1)[found], run.server_round)
        size = max(len(data), 1)
        uploads = {}
        if settings.get("cloud_store"):  # the config lets raw hard cases leave the client
            uploads[hard_cases.UPLOAD] = hard_cases.as_upload(data.x[found], data.y[found])
        return LocalPlan(
            weights=hard_cases.loss_weights(len(data), previous, settings["boost"]) if len(previous) else None,
            metrics={"hard_cases_used_fraction": len(previous) / size, "hard_cases_found_fraction": len(found) / size},
            forward_passes=len(data),  # the scoring pass
            uploads=uploads,
        )


class OffloadServer(ImageServer):
    headline = HEADLINE + OFFLOAD_HEADLINE
    shown = SHOWN + (PREFIX + "accuracy", PREFIX + "fraction", PREFIX + "latency_p95_ms")

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.settings = OffloadSettings.from_config(cfg)
        self.seed = int(cfg.seed)
        fleet = Fleet.from_config(cfg.devices)
        cloud = self.settings.cloud
        self.endpoints = Endpoints(
            sites=tuple(fleet.profiles[d] for d in fleet.assign(self.num_clients, self.seed)),
            cloud=fleet.profiles[cloud.device],
            fleet=fleet,
            edge_flops=model_costs(str(cfg.task.model), self.spec.num_classes)[0],
            cloud_flops=model_costs(cloud.model, self.spec.num_classes)[0],
        )
        self.cloud_base = cloud_model(self.spec, self.data, cloud, self.seed)
        self.cloud_pred = probabilities(self.cloud_base, self.data.test.x).argmax(axis=1)
        # task.hard_cases.cloud_store: each client's latest uploaded hard cases, and whether the
        # cloud model has been fine-tuned on the current ones
        self.receives_uploads = self.settings.hard_cases.cloud_store
        self.stored: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.stored_changed = False

    def receive_uploads(self, partition: int, server_round: int, uploads: dict[str, ArrayRecord]) -> None:
        if hard_cases.UPLOAD in uploads:
            self.stored[partition] = hard_cases.from_upload(uploads[hard_cases.UPLOAD])
            self.stored_changed = True

    def _refresh_cloud(self, server_round: int) -> dict[str, float]:
        """Fine-tune the cloud model on its set + the stored hard cases, when they changed."""
        if not self.receives_uploads:
            return {}
        count = sum(len(y) for _, y in self.stored.values())
        if self.stored_changed and count:
            x = np.concatenate([x for x, _ in self.stored.values()])
            y = np.concatenate([y for _, y in self.stored.values()])
            stored = LabelledImages(x, y, np.full(len(y), -1))
            model = finetuned(self.cloud_base, self.data.cloud, stored, self.settings.cloud, self.seed + server_round)
            self.cloud_pred = probabilities(model, self.data.test.x).argmax(axis=1)
            self.stored_changed = False
        cloud = classification_metrics(self.data.test.y, self.cloud_pred, self.spec.num_classes)
        return {"cloud_store_samples": float(count), "cloud_test_accuracy": cloud["accuracy"]}

    def train_config(self) -> dict[str, Any]:
        serving = {"theta": float(self.settings.policy.theta), **asdict(self.settings.hard_cases)}
        return {**super().train_config(), HARD_KEY: json.dumps(serving)}

    def _edge(self, arrays: ArrayRecord) -> tuple[np.ndarray, np.ndarray]:
        """Max softmax and prediction of the edge model ``arrays`` on every test sample."""
        self.model.load_state_dict(arrays.to_torch_state_dict())
        probs = probabilities(self.model, self.data.test.x)
        return probs.max(axis=1), probs.argmax(axis=1)

    def stream(self, link: LinkSettings, stream_id: int, repeats: int = 1) -> Stream:
        """The test split as request streams, one per edge site."""
        return build_stream(len(self.data.test), self.endpoints, self.settings.stream, link, self.seed, stream_id, repeats)

    def serve_test(self, confidence: np.ndarray, edge_pred: np.ndarray, policy: PolicySettings,
                   stream: Stream) -> dict[str, float]:
        """Serve ``stream`` under ``policy``; the stream's figures."""
        served = serve(policy, stream, self.endpoints, confidence)
        return summarise(served, stream, self.data.test.y, edge_pred, self.cloud_pred, confidence, policy.theta,
                         self.spec.num_classes)

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        metrics = super().evaluate(server_round, arrays)
        metrics.update(self._refresh_cloud(server_round))
        confidence, edge_pred = self._edge(arrays)
        figures = self.serve_test(confidence, edge_pred, self.settings.policy, self.stream(self.settings.link, server_round))
        metrics.update({PREFIX + k: v for k, v in figures.items()})
        return metrics

    def log_inputs(self, tracker: Any) -> None:
        super().log_inputs(tracker)
        cloud = classification_metrics(self.data.test.y, self.cloud_pred, self.spec.num_classes)
        tracker.log_metrics({"data_cloud_samples": float(len(self.data.cloud)),
                             **{f"cloud_test_{k}": cloud[k] for k in ("accuracy", "macro_f1", "weakest_class_recall")}},
                            step=0)

    def final_grid(self, arrays: ArrayRecord) -> list[dict[str, Any]]:
        """Every link scenario x policy x θ_c (edge- and cloud-only once) on ``arrays``."""
        confidence, edge_pred = self._edge(arrays)
        rows = []
        for fault in LINK_FAULTS:
            stream = self.stream(replace(self.settings.link, faults=fault), FINAL_STREAM, self.settings.final_repeats)
            for mode in MODES:
                for theta in (self.settings.thetas if mode in ("confidence", "confidence+load") else (float("nan"),)):
                    policy = replace(self.settings.policy, mode=mode, theta=self.settings.policy.theta
                                     if np.isnan(theta) else float(theta))
                    figures = self.serve_test(confidence, edge_pred, policy, stream)
                    rows.append({"source": self.spec.task, "fault": fault, "mode": mode, "theta": theta, **figures})
        return rows

    def report(self, tracker: Any, history: list[dict[str, Any]], final: ArrayRecord, run_name: str) -> dict[str, float]:
        from tasks.offload.plots import rounds_figure, tradeoff_figure

        super().report(tracker, history, final, run_name)
        tracker.log_figure(lambda: rounds_figure(history, run_name), "plots/offload_rounds.png")
        if not self.settings.final_study:
            return {}
        rows = self.final_grid(final)
        tracker.log_text(grid_csv(rows), "offload/grid.csv")
        tracker.log_figure(lambda: tradeoff_figure(rows, run_name), "plots/offload_tradeoff.png")
        return {}


def grid_csv(rows: list[dict[str, Any]]) -> str:
    """The final study's rows as CSV."""
    import csv

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
