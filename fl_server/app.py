"""fedcontinuum ServerApp.

Run-config keys (see ``[tool.flwr.app.config]`` in pyproject.toml):

``overrides``      Hydra overrides composed onto ``conf/config.yaml``.
``project-dir``    Directory relative data paths are resolved against
                   (the launcher passes the checkout; default: the app's own).
``tracking-uri``   MLflow tracking URI (default: ``$MLFLOW_TRACKING_URI`` or
                   the project's ``mlruns/mlflow.db``).
``parent-run-id``  MLflow parent run (set by sweeps).
``tier``, ``regions``, ``clients-per-region``, ``region``, ``global-round``, ``handoff-dir``
                   A regional deployment (``scripts/deploy_regions.py``,
                   :mod:`fl_common.regions`); "" everywhere for a flat run.
"""

from __future__ import annotations

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_server.experiments import progress
from fl_server.experiments.config import compose_config
from fl_server.experiments.experiment import run_experiment
from fl_server.experiments.regions import TierPlan
from fl_server.experiments.tracking import default_tracking_uri

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Compose the config from the run-config, then run the experiment."""
    progress.reset_marks()
    progress.mark("serverapp_main")  # after the process's and this module's imports
    torch.set_num_threads(1)  # the server shares the CPUs with the clients
    run_config = context.run_config
    cfg = compose_config(
        str(run_config.get("overrides", "")),
        project_dir=str(run_config.get("project-dir", "")) or None,
    )
    run_experiment(
        grid,
        cfg,
        tracking_uri=str(run_config.get("tracking-uri", "")) or default_tracking_uri(),
        parent_run_id=str(run_config.get("parent-run-id", "")) or None,
        tier=TierPlan.from_run_config(run_config),
    )
