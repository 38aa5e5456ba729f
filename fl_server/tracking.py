"""MLflow tracking: one run per simulation, one parent run per sweep.

We use ``MlflowClient`` rather than the fluent API: several runs (a sweep's
parent in the launcher, its children in ServerApp processes) are written from
different processes, and explicit run ids keep each write where it belongs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fl_server.config import PROJECT_DIR

DEFAULT_STORE_DIR = PROJECT_DIR / "mlruns"
PARENT_TAG = "mlflow.parentRunId"
FAILURE_TAG = "fc.failure_reason"


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the project's local SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE_DIR / 'mlflow.db'}"


def _local_artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of a local SQLite store live beside it, not under the cwd."""
    if tracking_uri.startswith("sqlite:///"):
        db_path = Path(tracking_uri[len("sqlite:///") :])
        return (db_path.parent / "artifacts").resolve().as_uri()
    return None


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Id of experiment ``name``, created if missing (safe under races)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    root = _local_artifact_root(tracking_uri)
    try:
        return client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)
    except MlflowException:  # another process created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _client(tracking_uri: str) -> MlflowClient:
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri)


class RunTracker:
    """One MLflow run: params, per-round metrics, artifacts, final status.

    Parameters
    ----------
    tracking_uri : str
        MLflow tracking URI (see :func:`default_tracking_uri`).
    experiment : str
        Experiment name; created if missing.
    run_name : str
        Display name of the run.
    tags : dict, optional
        Run tags (e.g. strategy, rho) for grouping in the MLflow UI.
    parent_run_id : str, optional
        Makes this run a child of a sweep's parent run.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        tags: dict[str, str] | None = None,
        parent_run_id: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.client = _client(tracking_uri)
        experiment_id = ensure_experiment(self.client, experiment, tracking_uri)
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        self.run_id: str = run.info.run_id
        self.experiment_id = experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_torch_state(self, state_dict: dict[str, Any], artifact_file: str) -> None:
        import torch

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            torch.save(state_dict, path)
            self.log_file(path, str(Path(artifact_file).parent) or None)

    def finish(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED")

    def fail(self, reason: str) -> None:
        """Mark the run FAILED with its reason; keeps everything already logged."""
        self.client.set_tag(self.run_id, FAILURE_TAG, reason[:5000])
        self.client.set_terminated(self.run_id, status="FAILED")


def mark_failed(tracking_uri: str, run_id: str, reason: str) -> None:
    """Mark a run FAILED from outside its process, unless it already ended."""
    client = _client(tracking_uri)
    run = client.get_run(run_id)
    if run.info.status in ("RUNNING", "SCHEDULED"):
        client.set_tag(run_id, FAILURE_TAG, reason[:5000])
        client.set_terminated(run_id, status="FAILED")
