"""CDIO (paper 004): cross-domain inference optimisation, federated.

* Clients are edge sites. Each trains the resource-preference prediction
  (:mod:`tasks.cdio.rpp`, an LSTM on the BCE) on its own task stream
  (:mod:`tasks.cdio.workload`: MNIST 5k clips with spatial complexity and
  accuracy / delay requirements, labels from the twin's nominal costs); the
  strategy aggregates (FedAvg by default) through the usual ClientApp.
* The server scores the global predictor on every site's held-out tasks
  (``rpp_*``: BCE, exact-match accuracy against the majority class) and, each
  round, places ``round_slots`` slots of requests with CDIO in the twin
  (``cdio_*``).
* After the last round (``task.final_study``), every placement policy
  (:mod:`tasks.cdio.placement`) under stable and +-20 % fluctuating
  bandwidth: ``cdio/grid.csv``, ``cdio/regret.csv`` and plots;
  :mod:`scripts.cdio_study` collects them over seeds and deployments.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from omegaconf import DictConfig

from fl_common import protocol
from tasks.base import ClientRound, LocalUpdate, ServerTask, Task

SPEC_KEY = "cdio-spec"
PREFIX = "cdio_"


class CDIOTask(Task):
    kind = "cdio"
    dp_sgd_refusal = ("the preference LSTM is torch's nn.LSTM, whose per-sample gradients Opacus computes only "
                      "through its own DPLSTM")
    uses_twin = False  # the inference twin is configured under task.* (not the cluster twin's conf/twin)

    def validate(self, cfg: DictConfig) -> None:
        from tasks.cdio.spec import CDIOSpec

        CDIOSpec.from_config(cfg)

    def tags(self, cfg: DictConfig) -> dict[str, str]:
        return {"task": str(cfg.task.name), "kind": self.kind, "strategy": str(cfg.strategy.name),
                "sites": str(cfg.clients.num), "seed": str(cfg.seed), "deployment": str(cfg.task.deployment)}

    def run_name(self, cfg: DictConfig) -> str:
        return f"cdio-{cfg.task.deployment}-{cfg.strategy.name}-n{cfg.clients.num}-s{cfg.seed}"

    def summary_columns(self) -> dict[str, str]:
        return {"RPP acc": "rpp_exact_acc", "majority": "rpp_majority_acc", "CDIO success": "cdio_success_both"}

    def server(self, cfg: DictConfig, tracking_uri: str) -> ServerTask:
        from tasks.cdio.server import CDIOServer

        return CDIOServer(cfg)

    def train(self, arrays: ArrayRecord, run: ClientRound) -> LocalUpdate:
        """Local Adam epochs on the BCE over this site's training tasks."""
        from tasks.cdio.rpp import rpp_flops, train_rpp
        from tasks.cdio.spec import CDIOSpec

        spec = CDIOSpec.from_json(str(run.config[SPEC_KEY]))
        x, y = site_data(spec, run.partition_id, "train")
        model = load_rpp(spec, arrays)
        loss = train_rpp(model, x, y, epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr, seed=run.seed)
        flops = 3 * rpp_flops(spec.hidden, spec.layers, spec.window) * len(y) * spec.epochs  # fwd + 2x bwd
        return LocalUpdate(arrays=ArrayRecord(model.state_dict()), num_examples=len(y), train_flops=flops,
                           metrics={"train_loss": loss})

    def evaluate(self, arrays: ArrayRecord, run: ClientRound) -> dict[str, float]:
        """The global predictor on this site's held-out tasks."""
        from tasks.cdio.rpp import scores
        from tasks.cdio.spec import CDIOSpec

        spec = CDIOSpec.from_json(str(run.config[SPEC_KEY]))
        x, y = site_data(spec, run.partition_id, "holdout")
        return {**{f"rpp_{k}": v for k, v in scores(load_rpp(spec, arrays), x, y).items()}, protocol.NUM_EXAMPLES: len(y)}


def load_rpp(spec, arrays: ArrayRecord):
    from tasks.cdio.rpp import build_rpp

    model = build_rpp(spec.hidden, spec.layers)
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


def site_data(spec, site: int, part: str) -> tuple[np.ndarray, np.ndarray]:
    """(windows, labels) of one site's ``train``, ``holdout`` (the logged scores) or ``validation``
    tasks (the rollout guard's replay: other seeds, never trained on, never logged)."""
    from tasks.cdio.workload import build_stream, features, labels, windows

    measured = spec.measured()
    length = spec.train_tasks if part == "train" else spec.holdout_tasks
    offset = {"train": 0, "holdout": 7919, "validation": 15_485_863}[part]
    stream = build_stream(spec.stream, measured, site, spec.num_sites, length, spec.seed + offset,
                          "train" if part == "train" else "test")
    x = windows(features(stream, spec.stream, complexity_scale(measured)), spec.window)
    return np.ascontiguousarray(x), labels(stream, spec.twin(0.0, measured), spec.stream.frames)


def complexity_scale(measured) -> float:
    """Scale of the complexity feature: twice the top inner bin edge (about the digits' maximum)."""
    return 2.0 * measured.bin_edges[-1]


def spec_config(spec) -> dict[str, Any]:
    return {SPEC_KEY: spec.to_json()}



