"""Image classification under class imbalance: MNIST 5k (embedded) or a MedMNIST npz.

Each client trains the global CNN on its partition with plain SGD (or DP-SGD);
the server scores every global model on the class-balanced test set
(accuracy, macro-F1, per-class and weakest-class recall) and, for ASS, each
client's model on its public validation set.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from omegaconf import DictConfig

from fl_common import protocol
from fl_datasets.federated import DataSpec, FederatedImageData, build_image_data
from fl_datasets.sources import LabelledImages
from tasks.base import ClientRound, LocalUpdate, ServerTask, Task

# The models and their training need torch (~2 s to import here): they are imported where they are
# used, so the launcher's config check and data check (this module's validate / prepare) run without it.
MODEL_NAMES = ("cnn", "cnn-wide")  # the keys of tasks.image.models.MODELS (a test checks they agree)

SPEC_KEY = "data-spec"      # ConfigRecord: the DataSpec JSON
TRAIN_KEY = "image-train"   # ConfigRecord: model and local SGD settings (JSON)
HEADLINE = ("test_accuracy", "test_macro_f1", "test_weakest_class_recall", "train_loss")
SHOWN = ("test_accuracy", "test_macro_f1", "test_weakest_class_recall", "train_loss",
         "clients_replied", "clients_failed", "round_wall_time_s")
PARTITIONS = ("iid", "dirichlet")


@dataclass
class LocalPlan:
    """A subclass's say in one round of local training.

    Attributes
    ----------
    weights : numpy.ndarray, optional
        Per-sample loss weights of the local epochs (None: unweighted).
    metrics : dict
        Extra training metrics of the round.
    forward_passes : int
        Samples the plan itself ran forward (charged to the virtual clock).
    uploads : dict of str to ArrayRecord
        Data sent beside the model (:attr:`tasks.base.LocalUpdate.uploads`).
    """

    weights: np.ndarray | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    forward_passes: int = 0
    uploads: dict[str, ArrayRecord] = field(default_factory=dict)


def _partition(spec: DataSpec, partition_id: int):
    return build_image_data(spec).clients[partition_id]


class ImageTask(Task):
    kind = "image"

    # ------------------------------------------------------------ config
    def validate(self, cfg: DictConfig) -> None:
        task = cfg.task
        _check(task.model in MODEL_NAMES, f"task.model={task.model} is unknown: choose one of {', '.join(MODEL_NAMES)}")
        _check(isinstance(task.num_classes, int) and task.num_classes >= 2,
               f"task.num_classes={task.num_classes} is invalid: use an integer >= 2")
        path = task.get("path")
        _check(path is None or Path(path).is_file(),
               f"task.path={path} does not exist: point task.path at a MedMNIST .npz "
               "(e.g. task.path=../shared/data/medmnist/breastmnist.npz)")

    def tags(self, cfg: DictConfig) -> dict[str, str]:
        tags = {
            "task": cfg.task.name,
            "kind": self.kind,
            "strategy": cfg.strategy.name,
            "partition": cfg.partition.name,
            "rho": f"{cfg.partition.rho:g}",
            "seed": str(cfg.seed),
        }
        if cfg.partition.name == "dirichlet":
            tags["alpha"] = f"{cfg.partition.alpha:g}"
        if cfg.strategy.name == "ass":  # the ablation's axes
            tags["ass_abg"] = f"{cfg.strategy.alpha:g}/{cfg.strategy.beta:g}/{cfg.strategy.gamma:g}"
        return tags

    def run_name(self, cfg: DictConfig) -> str:
        part = cfg.partition.name
        if part == "dirichlet":
            part += f"{cfg.partition.alpha:g}"
        return f"{cfg.task.name}-{cfg.strategy.name}-{part}-rho{cfg.partition.rho:g}-s{cfg.seed}"

    def prepare(self, cfg: DictConfig, tracking_uri: str) -> None:
        build_image_data(DataSpec.from_config(cfg))  # bad data fails before Ray starts; cached for the run

    def summary_columns(self) -> dict[str, str]:
        return {"accuracy": "test_accuracy", "macro-F1": "test_macro_f1", "weakest recall": "test_weakest_class_recall"}

    # ------------------------------------------------------------ server
    def server(self, cfg: DictConfig, tracking_uri: str) -> ServerTask:
        return ImageServer(cfg)

    # ------------------------------------------------------------ client
    def local_plan(self, model, data: LabelledImages, run: ClientRound) -> LocalPlan:
        """What this round's local training draws (before it starts, from the received model)."""
        return LocalPlan()

    def train(self, arrays: ArrayRecord, run: ClientRound) -> LocalUpdate:
        from tasks.image.models import model_costs
        from tasks.image.training import train_local

        spec = DataSpec.from_json(str(run.config[SPEC_KEY]))
        settings = json.loads(str(run.config[TRAIN_KEY]))
        data = _partition(spec, run.partition_id)
        model = _model(settings["model"], spec, arrays)
        plan = self.local_plan(model, data, run)
        hyper = dict(epochs=settings["local_epochs"], batch_size=settings["batch_size"], lr=settings["lr"],
                     momentum=settings["momentum"], seed=run.seed)
        metrics: dict[str, float] = dict(plan.metrics)
        if run.train_private is None:
            loss = train_local(model, data, **hyper, weights=plan.weights)
        elif plan.weights is not None:
            raise ValueError("DP-SGD samples uniformly: a weighted local plan cannot run under privacy=dpsgd")
        else:
            import torch

            outcome = run.train_private(model, torch.from_numpy(data.x), torch.from_numpy(data.y),
                                        torch.nn.CrossEntropyLoss(), **hyper)
            if outcome.declined:
                return LocalUpdate(ArrayRecord(), 0, 0.0, declined=outcome)
            loss, metrics = outcome.loss, {**metrics, **outcome.metrics()}
        forward_flops = model_costs(settings["model"], spec.num_classes)[0]
        return LocalUpdate(
            arrays=ArrayRecord(model.state_dict()),
            num_examples=len(data),
            # fwd + 2x bwd per training sample, plus the plan's own forward passes
            train_flops=forward_flops * (3 * len(data) * settings["local_epochs"] + plan.forward_passes),
            metrics={"train_loss": loss, **metrics},
            uploads=plan.uploads,
        )

    def evaluate(self, arrays: ArrayRecord, run: ClientRound) -> dict[str, float]:
        from tasks.image.training import evaluate

        spec = DataSpec.from_json(str(run.config[SPEC_KEY]))
        settings = json.loads(str(run.config[TRAIN_KEY]))
        data = _partition(spec, run.partition_id)
        result = evaluate(_model(settings["model"], spec, arrays), data, spec.num_classes)
        return {"eval_loss": result["loss"], "eval_accuracy": result["accuracy"], protocol.NUM_EXAMPLES: len(data)}


def _model(name: str, spec: DataSpec, arrays: ArrayRecord | None = None):
    from tasks.image.models import build_model

    model = build_model(name, spec.num_classes)
    if arrays is not None:
        model.load_state_dict(arrays.to_torch_state_dict())
    return model


class ImageServer(ServerTask):
    headline = HEADLINE
    shown = SHOWN

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.spec = DataSpec.from_config(cfg)
        self.data: FederatedImageData = build_image_data(self.spec)
        self.num_clients = self.spec.num_clients
        self.model_name = str(cfg.task.model)
        self.client_sizes = self.data.client_sizes()
        from tasks.image.models import build_model

        self.model = build_model(str(cfg.task.model), self.spec.num_classes, seed=int(cfg.seed))

    def initial_arrays(self) -> ArrayRecord:
        return ArrayRecord(self.model.state_dict())

    def train_config(self) -> dict[str, Any]:
        cfg = self.cfg
        settings = {"model": str(cfg.task.model), "local_epochs": int(cfg.train.local_epochs),
                    "batch_size": int(cfg.train.batch_size), "lr": float(cfg.train.lr),
                    "momentum": float(cfg.train.momentum)}
        return {SPEC_KEY: self.spec.to_json(), TRAIN_KEY: json.dumps(settings)}

    def model_costs(self):
        from tasks.image.models import model_costs

        return model_costs(str(self.cfg.task.model), self.spec.num_classes)

    def batch_size(self) -> int:
        return int(self.cfg.train.batch_size)

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        from tasks.image.training import evaluate

        self.model.load_state_dict(arrays.to_torch_state_dict())
        return {f"test_{k}": v for k, v in evaluate(self.model, self.data.test, self.spec.num_classes).items()}

    def public_scorer(self) -> Callable[[ArrayRecord], np.ndarray]:
        """Per-class accuracy of a (client) model on the server's public validation set."""
        from tasks.image.models import build_model
        from tasks.image.training import per_class_accuracy, predict

        scorer = build_model(str(self.cfg.task.model), self.spec.num_classes)
        public_val, num_classes = self.data.public_val, self.spec.num_classes

        def per_class(arrays: ArrayRecord) -> np.ndarray:
            scorer.load_state_dict(arrays.to_torch_state_dict())
            y_pred, _ = predict(scorer, public_val)
            return per_class_accuracy(public_val.y, y_pred, num_classes)

        return per_class

    def validation_score(self, arrays: ArrayRecord) -> float:
        """Accuracy on the server's public class-balanced validation set (disjoint from test and clients)."""
        from tasks.image.training import evaluate

        self.model.load_state_dict(arrays.to_torch_state_dict())
        return float(evaluate(self.model, self.data.public_val, self.spec.num_classes)["accuracy"])

    def log_inputs(self, tracker: Any) -> None:
        from tasks.image.mlflow_inputs import image_datasets

        if self.cfg.tracking.log_model:  # log_model's imports (torch.export needs dynamo: ~2 s), while clients train
            tracker.warm_up("mlflow.pytorch", "torch._dynamo")
        tracker.log_datasets(lambda: image_datasets(self.spec, self.data))  # the UI's Dataset column
        counts = self.data.class_counts()
        tracker.log_text(_class_counts_csv(counts), "data/client_class_counts.csv")
        tracker.log_metrics({"data_train_samples": float(sum(self.client_sizes)),
                             "data_realised_rho": _realised_rho(counts.sum(axis=0))}, step=0)

    def report(self, tracker: Any, history: list[dict[str, Any]], final: ArrayRecord, run_name: str) -> dict[str, float]:
        tracker.log_figure(lambda: _accuracy_plot(history, run_name), "plots/accuracy_vs_round.png")
        if self.cfg.tracking.log_model:  # an MLflow model (the UI's Models column)
            from tasks.image.mlflow_inputs import trained_model

            tracker.log_pytorch_model(lambda: trained_model(str(self.cfg.task.model), self.spec.num_classes, final,
                                                            self.data.test.x[:2]), step=int(self.cfg.num_rounds))
        return {}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _realised_rho(class_totals: np.ndarray) -> float:
    present = class_totals[class_totals > 0]
    return float(present.max() / present.min()) if len(present) else float("nan")


def _class_counts_csv(counts: np.ndarray) -> str:
    header = "client," + ",".join(f"class_{c}" for c in range(counts.shape[1]))
    rows = [f"{i}," + ",".join(str(int(v)) for v in row) for i, row in enumerate(counts)]
    return "\n".join([header, *rows]) + "\n"


def _accuracy_plot(history: list[dict[str, Any]], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [row["round"] for row in history]
    for key, label in (("test_accuracy", "accuracy"), ("test_macro_f1", "macro-F1"),
                       ("test_weakest_class_recall", "weakest-class recall")):
        ax.plot(rounds, [row.get(key, np.nan) for row in history], marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("server-side test metric")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
