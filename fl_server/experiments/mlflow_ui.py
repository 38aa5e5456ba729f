"""What the MLflow UI shows a researcher: experiment kind, a saved runs view,
source tags, data set inputs and the logged model.

MLflow 3.17's UI opens an experiment on the GenAI "Overview" page unless told
otherwise, and its runs table shows only Dataset, Source and Model columns by
default. This module is what we write so that the runs table is where one lands
and what it shows compares strategies:

* the experiment tag ``mlflow.experimentKind = custom_model_development`` (what
  the UI's own "Model training" selector writes). MLflow 3.17.2's UI ignores it
  for navigation (its workflow-based navigation is on: the *GenAI / Model
  training* switch at the top left decides, remembered per browser, default
  GenAI), so :func:`runs_url` also carries ``workflowType=machine_learning``;
* a saved runs view "Compare strategies" (experiment tag
  ``mlflow.sharedViewState.<id>``, the UI's own format) with the sweep axes and
  headline metrics as columns, listed under *Views* and opened by
  :func:`runs_url`;
* ``mlflow.source.*`` tags (entry point, git commit and branch);
* the data sets as MLflow inputs (``mlflow.data`` from the arrays) and the final
  model through ``mlflow.pytorch.log_model``.

``python -m fl_server.experiments.mlflow_ui`` tags a store's existing experiments, prints
the link to each one's runs table and starts ``mlflow ui`` (``make mlflow-ui``).
Nothing here imports MLflow or torch at module level: the ServerApp imports it
at start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from fl_server.experiments.config import PROJECT_DIR, default_tracking_uri

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"  # the UI's "Model training" kind
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # the UI's saved views (one tag each)
COMPARE_VIEW_ID = "fedcontinuum-compare-v1"
COMPARE_VIEW_NAME = "Compare strategies"
CONTEXT_TAG = "mlflow.data.context"

# The sweep axes (run tags, see fl_server.experiment.run_tags) and the headline
# metrics (latest value = final round) shown by the saved view, in this order.
SWEEP_AXES = ("strategy", "rho", "alpha", "partition", "seed", "task", "deadline")
HEADLINE_METRICS = ("test_accuracy", "test_macro_f1", "test_weakest_class_recall")
# Columns of other tasks (forecasting, RL); the UI leaves out those no run has.
OTHER_TASK_METRICS = ("test_mase", "eval_return")
VIEW_ATTRIBUTES = ("Dataset", "Models", "Version")


def view_columns() -> list[str]:
    """The saved view's columns in the UI's column-key format, in display
    order: sweep axes, headline metrics, then data set, model and commit."""
    return (
        [f"tags.`{key}`" for key in SWEEP_AXES]
        + [f"metrics.`{key}`" for key in (*HEADLINE_METRICS, *OTHER_TASK_METRICS)]
        + [f"attributes.`{name}`" for name in VIEW_ATTRIBUTES]
    )


def compare_view(now_ms: int | None = None) -> str:
    """The "Compare strategies" view as the UI stores a saved view: an envelope
    ``{name, createdAt, updatedAt, state}`` whose ``state`` is the JSON of the
    runs page's search facets and UI state (uncompressed, which it also reads)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    columns = view_columns()
    widths = {"attributes.`Run Name`": 260, **{c: 84 for c in columns if c.startswith("tags.")},
              **{c: 136 for c in columns if c.startswith("metrics.")}}
    state = {
        "selectedColumns": columns,
        "columnOrder": ["attributes.`Run Name`", *columns],  # else the UI puts attributes, metrics, then tags
        "columnWidths": widths,
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "searchFilter": "",
    }
    return json.dumps({"name": COMPARE_VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms, "state": json.dumps(state)})


def experiment_tags(existing: dict[str, str] | None = None) -> dict[str, str]:
    """Experiment tags to set: those of ours that ``existing`` lacks (a kind
    or view someone changed in the UI is theirs to keep)."""
    existing = existing or {}
    wanted = {EXPERIMENT_KIND_TAG: MODEL_TRAINING, VIEW_TAG_PREFIX + COMPARE_VIEW_ID: None}
    return {
        key: value if value is not None else compare_view()
        for key, value in wanted.items()
        if key not in existing
    }


def prepare_experiment(client: Any, experiment: Any) -> None:
    """Give an existing experiment the tags it lacks (kind, saved view)."""
    for key, value in experiment_tags(experiment.tags).items():
        client.set_experiment_tag(experiment.experiment_id, key, value)


def runs_url(experiment_id: str, base_url: str = "http://127.0.0.1:5000") -> str:
    """The experiment's runs table with the "Compare strategies" view."""
    return (
        f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
        f"?workflowType=machine_learning&viewStateShareKey={COMPARE_VIEW_ID}"
    )


def hint(tracking_uri: str) -> str:
    """How to open the UI on a store (the launcher's last line)."""
    ours = "make mlflow-ui" if tracking_uri == default_tracking_uri() else \
        f"python -m fl_server.experiments.mlflow_ui --backend-store-uri {tracking_uri}"
    return (f"mlflow ui --backend-store-uri {tracking_uri}   (then open http://127.0.0.1:5000; "
            f"`{ours}` prints a link straight to the runs table)")


# -- run tags -----------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(PROJECT_DIR), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else None


@lru_cache(maxsize=1)
def source_tags() -> dict[str, str]:
    """``mlflow.source.*`` tags: where the run's code came from.

    The name is the entry script if it lies in the project (``scripts/sweep.py``,
    ``fl_server/launch.py``), else the ServerApp (Flower's ``flwr-simulation``
    process runs ``fl_server/app.py``). Git tags only inside a git checkout;
    ``fc.git_dirty`` says whether tracked files differed from that commit.
    """
    entry = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if entry is not None and entry.is_file() and PROJECT_DIR in entry.parents:
        name = entry.relative_to(PROJECT_DIR).as_posix()
    else:
        name = "fl_server/app.py"
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": name}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        if (branch := _git("rev-parse", "--abbrev-ref", "HEAD")) and branch != "HEAD":
            tags["mlflow.source.git.branch"] = branch
        if remote := _git("remote", "get-url", "origin"):
            tags["mlflow.source.git.repoURL"] = remote
        tags["fc.git_dirty"] = "true" if _git("status", "--porcelain", "--untracked-files=no") else "false"
    return tags


# -- data sets and model --------------------------------------------------------
MODEL_NAME = "global-model"  # not "model": MLflow lists a run's "model/" artifacts through a model of that name


def log_pytorch_model(client: Any, run_id: str, model: Any, input_example: Any, step: int = 0) -> Any:
    """``mlflow.pytorch.log_model`` into run ``run_id`` (through ``client``'s
    store) with a signature inferred from ``input_example`` (a few inputs) and
    the model's outputs.

    The LoggedModel is created first in the run's own experiment: left to
    itself, ``log_model`` without an active run files it under experiment 0,
    whose artifacts go to ``./mlruns/0`` of whatever the working directory is.
    Saved in PyTorch's ``pt2`` (torch.export) format, MLflow's default: the
    model loads without this project's code, and the batch dimension stays
    dynamic when the example has two or more rows. Kept cheap (~0.5 s once the
    imports are warm): requirements are given, not inferred (inference
    re-imports the model in a subprocess), and the serving-input check, which
    loads the model again, is skipped (the tests load it).
    """
    from importlib.metadata import version

    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                        params=dict(run.data.params))
    model = model.eval()
    with torch.no_grad():
        output = model(torch.as_tensor(input_example)).numpy()
    with _use_tracking_uri(client.tracking_uri):
        return mlflow.pytorch.log_model(
            model,
            name=MODEL_NAME,
            model_id=logged.model_id,
            run_id=run_id,
            signature=infer_signature(input_example, output),
            input_example=input_example,
            pip_requirements=[f"torch=={version('torch')}", f"mlflow=={version('mlflow')}"],
            step=step,
            serialization_format="pt2",
            validate_serving_input=False,  # re-loads the model to predict once; only ever warns
        )


# -- python -m fl_server.experiments.mlflow_ui ------------------------------------------------
class UIError(ValueError):
    """A bad argument for the UI command; the message names it and the fix."""


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def prepare_store(tracking_uri: str) -> list[tuple[str, str]]:
    """Tag every active experiment of the store; ``[(name, id)]`` of those with runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = []
    for experiment in client.search_experiments():
        if not client.search_runs([experiment.experiment_id], max_results=1):
            continue  # e.g. MLflow's empty "Default"
        prepare_experiment(client, experiment)
        found.append((experiment.name, experiment.experiment_id))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fl_server.experiments.mlflow_ui",
        description="Open the MLflow UI on the runs table: tag the store's experiments as model "
        "training, add the 'Compare strategies' view, print each experiment's link, run `mlflow ui`.",
    )
    parser.add_argument("--backend-store-uri", default=None, help="default: $MLFLOW_TRACKING_URI or mlruns/mlflow.db")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1, help="server processes (mlflow's own default is 4)")
    parser.add_argument("--no-serve", action="store_true", help="tag and print the links only")
    args = parser.parse_args(argv)
    uri = args.backend_store_uri or default_tracking_uri()
    try:
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
            raise UIError(f"--backend-store-uri {uri}: no MLflow store there yet: run `make run` first, "
                          "or pass the store a run wrote (its summary prints it)")
        if not 0 < args.port < 65536:
            raise UIError(f"--port {args.port} is invalid: use a port in 1-65535, e.g. --port 5000")
        if args.workers < 1:
            raise UIError(f"--workers {args.workers} is invalid: use 1 or more, e.g. --workers 1")
        if not args.no_serve and not _port_free(args.host, args.port):
            raise UIError(f"--port {args.port} is in use on {args.host}: pass a free one, e.g. --port {args.port + 1}")
        try:
            experiments = prepare_store(uri)
        except Exception as err:  # an unreachable server, a store of another MLflow version, ...
            raise UIError(f"--backend-store-uri {uri} cannot be read ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200] if str(err) else ''}): check the URI") from None
    except UIError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    base = f"http://{args.host}:{args.port}"
    for name, experiment_id in experiments:
        print(f"{name}: {runs_url(experiment_id, base)}")
    if not experiments:
        print(f"no runs in {uri} yet; the UI is at {base}")
    if args.no_serve:
        return 0
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_cli) if mlflow_cli.exists() else "mlflow", "ui", "--backend-store-uri", uri,
               "--host", args.host, "--port", str(args.port), "--workers", str(args.workers)]
    print(" ".join(command), flush=True)
    os.execvp(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
