"""MLflow tracking: one run per simulation, one parent run per sweep.

We use ``MlflowClient`` rather than the fluent API: several runs (a sweep's
parent in the launcher, its children in ServerApp processes) are written from
different processes, and explicit run ids keep each write where it belongs.

A :class:`RunTracker` does its MLflow work on one background thread, in
order: importing MLflow (~1.4 s), opening the store and creating the run
overlap with Ray starting the clients, and rounds never wait on the store.
``flush``, ``finish`` and ``fail`` wait for everything queued before them.

What the MLflow UI makes of it (experiment kind, the "Compare strategies"
view, source tags, data set inputs, the logged model) is in
:mod:`fl_server.experiments.mlflow_ui`.
"""

from __future__ import annotations

import queue
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from fl_server.experiments import mlflow_ui
from fl_server.experiments.config import default_tracking_uri

__all__ = ["RunTracker", "default_tracking_uri", "ensure_experiment", "mark_failed", "attach_log"]

PARENT_TAG = "mlflow.parentRunId"
FAILURE_TAG = "fc.failure_reason"


def _local_artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of a local SQLite store live beside it, not under the cwd."""
    if tracking_uri.startswith("sqlite:///"):
        db_path = Path(tracking_uri[len("sqlite:///") :])
        return (db_path.parent / "artifacts").resolve().as_uri()
    return None


def ensure_experiment(client: Any, name: str, tracking_uri: str) -> str:
    """Id of experiment ``name``, created if missing (safe under races), as a
    model-training experiment with the "Compare strategies" runs view; an
    existing experiment gets whichever of those tags it lacks."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        mlflow_ui.prepare_experiment(client, experiment)
        return experiment.experiment_id
    root = _local_artifact_root(tracking_uri)
    try:
        return client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None,
                                        tags=mlflow_ui.experiment_tags())
    except MlflowException:  # another process created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        mlflow_ui.prepare_experiment(client, experiment)
        return experiment.experiment_id


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

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
    on_created : callable, optional
        Called (on the tracker's thread) with the run id once the run exists.
    deferred : bool
        Queue everything but write nothing until :meth:`start_writing` (or
        ``flush``/``finish``/``fail``): lets a caller keep MLflow's import and
        store set-up (~2.5 s of CPU) out of a busy start-up phase.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        tags: dict[str, str] | None = None,
        parent_run_id: str | None = None,
        on_created: Callable[[str, str], None] | None = None,
        deferred: bool = False,
        resume_run_id: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self._go = threading.Event()
        if not deferred:
            self._go.set()
        self._ops: queue.Queue[tuple[Callable[[], Any], Future] | None] = queue.Queue()
        self._ready = False  # the run exists
        self._creation_error: BaseException | None = None
        self._first_error: BaseException | None = None
        self._worker = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._worker.start()
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id

        def create() -> tuple[str, str]:
            self.client = _client(tracking_uri)
            if resume_run_id:  # a resumed run continues its own MLflow run
                run = self.client.get_run(resume_run_id)
                experiment_id = run.info.experiment_id
                self.client.update_run(resume_run_id, status="RUNNING")
                self.client.set_tag(resume_run_id, "fc.resumed", "true")
            else:
                experiment_id = ensure_experiment(self.client, experiment, tracking_uri)
                tags = {**mlflow_ui.source_tags(), **all_tags}  # entry point, git commit
                run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
            self._ready = True
            if on_created is not None:
                on_created(run.info.run_id, experiment_id)
            return run.info.run_id, experiment_id

        self._created = self._submit(create)

    # -- the worker ---------------------------------------------------------
    def start_writing(self) -> None:
        """Let a deferred tracker start writing what it has queued."""
        self._go.set()

    def _work(self) -> None:
        self._go.wait()
        while (item := self._ops.get()) is not None:
            operation, future = item
            if self._creation_error is not None:  # no run: everything after fails too
                future.set_exception(self._creation_error)
                continue
            try:
                future.set_result(operation())
            except BaseException as err:  # noqa: BLE001 - handed to the waiting caller
                if not self._ready:
                    self._creation_error = err
                self._first_error = self._first_error or err
                future.set_exception(err)

    def _submit(self, operation: Callable[[], Any], urgent: bool = False) -> Future:
        if urgent:
            self._go.set()
        future: Future = Future()
        self._ops.put((operation, future))
        return future

    # -- identity -----------------------------------------------------------
    @property
    def run_id(self) -> str:
        """The MLflow run id (waits until the run exists)."""
        self._go.set()
        return self._created.result()[0]

    @property
    def experiment_id(self) -> str:
        self._go.set()
        return self._created.result()[1]

    # -- logging (queued) ---------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        def log() -> None:
            from mlflow.entities import Param

            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for start in range(0, len(items), 100):  # MLflow takes 100 params per batch
                self.client.log_batch(self.run_id, params=items[start : start + 100])

        self._submit(log)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        values = {k: float(v) for k, v in metrics.items()}

        def log() -> None:
            from mlflow.entities import Metric

            items = [Metric(k, v, now, step) for k, v in values.items()]
            for start in range(0, len(items), 1000):
                self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

        self._submit(log)

    def log_missing_rounds(self, rows: list[dict[str, Any]], sentinel: str = "elapsed_wall_time_s") -> None:
        """Log those of ``rows`` (``{"round": k, metric: value}``) whose step
        has no ``sentinel`` metric yet: a resumed run's rounds that were
        checkpointed but never reached MLflow. Each round is one batch, so a
        logged sentinel means the whole round was logged."""
        rows = [dict(row) for row in rows]  # as they are now: the caller's list grows

        def log() -> None:
            from mlflow.entities import Metric

            logged = {m.step for m in self.client.get_metric_history(self.run_id, sentinel)}
            now = int(time.time() * 1000)
            for row in rows:
                if row["round"] not in logged:
                    items = [Metric(k, float(v), now, int(row["round"])) for k, v in row.items() if k != "round"]
                    self.client.log_batch(self.run_id, metrics=items)

        self._submit(log)

    def set_tags(self, tags: dict[str, str]) -> None:
        def log() -> None:
            from mlflow.entities import RunTag

            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

        self._submit(log)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit(lambda: self.client.log_text(self.run_id, text, artifact_file))

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        """Log ``data`` as the artifact ``artifact_file`` (e.g. ``profile/server.pstats``)."""

        def log() -> None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / Path(artifact_file).name
                path.write_bytes(data)
                self.client.log_artifact(self.run_id, str(path), str(Path(artifact_file).parent) or None)

        self._submit(log)

    def log_figure(self, make_figure: Callable[[], Any], artifact_file: str) -> None:
        """Queue ``make_figure()`` (it runs on the tracker's thread) and log it."""

        def log() -> None:
            import matplotlib.pyplot as plt

            figure = make_figure()
            self.client.log_figure(self.run_id, figure, artifact_file)
            plt.close(figure)

        self._submit(log)

    def log_torch_state(self, state_dict: dict[str, Any], artifact_file: str) -> None:
        def log() -> None:
            import torch

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / Path(artifact_file).name
                torch.save(state_dict, path)
                self.client.log_artifact(self.run_id, str(path), str(Path(artifact_file).parent) or None)

        self._submit(log)

    def log_datasets(self, make_datasets: Callable[[], list[tuple[Any, str]]]) -> None:
        """Queue ``make_datasets()`` (run on the tracker's thread): ``mlflow.data``
        data sets with their context (``train``, ``eval``, ...), logged as the
        run's inputs (the UI's Dataset column)."""

        def log() -> None:
            from mlflow.entities import DatasetInput, InputTag

            try:  # what the UI shows: a failure here is reported, it does not fail the run
                inputs = [
                    DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(mlflow_ui.CONTEXT_TAG, context)])
                    for dataset, context in make_datasets()
                ]
                self.client.log_inputs(self.run_id, datasets=inputs)
            except Exception as err:  # noqa: BLE001
                self._log_ui_failure("data sets", err)

        self._submit(log)

    def log_pytorch_model(self, make_model: Callable[[], tuple[Any, Any]], step: int = 0) -> None:
        """Queue ``make_model()`` -> ``(torch module, input example)`` (run on
        the tracker's thread) and log it with ``mlflow.pytorch.log_model``
        (signature, input example; the UI's Models column), linked to this
        run's metrics at ``step``."""

        def log() -> None:
            try:  # the UI's Models column; model/final_state_dict.pt is logged either way
                model, example = make_model()
                mlflow_ui.log_pytorch_model(self.client, self.run_id, model, example, step=step)
            except Exception as err:  # noqa: BLE001
                self._log_ui_failure("model", err)

        self._submit(log)

    def _log_ui_failure(self, what: str, err: Exception) -> None:
        """On the tracker's thread: say why the UI lacks ``what`` (an artifact and a tag)."""
        reason = f"{type(err).__name__}: {err}"
        self.client.set_tag(self.run_id, f"fc.ui_{what.replace(' ', '_')}_failed", reason[:500])
        self.client.log_text(self.run_id, reason + "\n", f"failure/ui_{what.replace(' ', '_')}.txt")

    def warm_up(self, *modules: str) -> None:
        """Import ``modules`` on the tracker's thread while it is idle."""
        import importlib

        for module in modules:
            self._submit(lambda m=module: importlib.import_module(m))

    # -- waiting ------------------------------------------------------------
    def flush(self) -> None:
        """Wait for every queued operation; re-raise the first that failed."""
        self._submit(lambda: None, urgent=True).exception()
        if self._first_error is not None:
            raise self._first_error

    def finish(self) -> None:
        """Write everything queued, then mark the run FINISHED.

        Raises the first failed MLflow operation instead (the caller then
        marks the run FAILED: a run with missing records is not FINISHED).
        """
        self.flush()
        self._submit(lambda: self.client.set_terminated(self.run_id, status="FINISHED")).result()
        self._stop()

    def fail(self, reason: str) -> None:
        """Write everything queued, then mark the run FAILED with its reason."""

        def mark() -> None:
            self.client.set_tag(self.run_id, FAILURE_TAG, reason[:5000])
            self.client.set_terminated(self.run_id, status="FAILED")

        try:
            self._submit(mark, urgent=True).result()
        finally:
            self._stop()

    def _stop(self) -> None:
        self._ops.put(None)
        self._worker.join(timeout=60)


def mark_failed(tracking_uri: str, run_id: str, reason: str) -> None:
    """Mark a run FAILED from outside its process, unless it already ended."""
    client = _client(tracking_uri)
    run = client.get_run(run_id)
    if run.info.status in ("RUNNING", "SCHEDULED"):
        client.set_tag(run_id, FAILURE_TAG, reason[:5000])
        client.set_terminated(run_id, status="FAILED")


def attach_log(tracking_uri: str, run_id: str, log_path: Path | None) -> None:
    """Attach a log file to a run; never fail the caller over it."""
    if log_path is None or not log_path.exists():
        return
    try:
        _client(tracking_uri).log_artifact(run_id, str(log_path), "logs")
    except Exception:  # the log is also on disk
        pass
