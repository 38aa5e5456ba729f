"""Hydra sweeps: every combination runs as its own Flower simulation.

    python -m scripts.sweep --multirun partition.rho=1,10,100 strategy=fedavg,fedavgm seed=0,1,2

Each job is composed by Hydra from ``conf/`` and submitted with ``flwr run``
(through the launcher) to one SuperLink shared by the whole sweep, whose
simulations all join one private Ray head started with it
(``simulation.shared_ray=false``: every job starts its own Ray). In MLflow
the sweep is one parent run; each job is a child run tagged with its task,
strategy, partition, rho and seed, so the MLflow UI can compare strategies at
each rho. When the sweep ends, the parent gets a markdown table and a plot of
the final metrics (mean ± sd over seeds), also printed here.
"""

from __future__ import annotations

import os
import time

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fl_server.experiments.config import compose_config, finalize_config
from fl_server.runtime.launch import JobOutcome, preflight, run_job
from scripts.sweep_parent import PARENT_ENV, console, interrupted, outcomes, shared_superlink


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(job_cfg: DictConfig) -> float:
    """One sweep job: Hydra composed it from the overrides the ServerApp gets."""
    began_at = time.time()
    overrides = list(HydraConfig.get().overrides.task)
    try:
        # a task's own default strategy (RL: FedAvgM) is applied by compose_config, as the ServerApp does
        cfg = compose_config(overrides) if job_cfg.task.get("default_strategy") else finalize_config(job_cfg)
        superlink = shared_superlink(bool(cfg.simulation.shared_ray))  # the first job starts it (and Ray)
        preflight(cfg, superlink.cache_dir)
    except ValueError as err:  # ConfigError / DataError: report, keep sweeping
        console.print(f"[bold red]error:[/bold red] {' '.join(overrides)}: {err}", highlight=False)
        outcomes.append(JobOutcome(ok=False, status="invalid config", run_name=" ".join(overrides), reason=str(err)))
        return float("nan")
    try:
        outcome = run_job(
            cfg,
            overrides,
            superlink,
            parent_run_id=os.environ.get(PARENT_ENV),
            console=console,
            began_at=began_at,
        )
    except (KeyboardInterrupt, SystemExit) as stop:  # Ctrl-C, or SIGTERM (superlink.unwind_on_sigterm)
        code = 130 if isinstance(stop, KeyboardInterrupt) else stop.code
        console.print("[bold red]interrupted[/bold red]: the sweep's SuperLink, Ray head and simulations are "
                      "stopped; MLflow keeps the rounds logged so far", highlight=False)
        interrupted(f"interrupted (exit {code}) during {' '.join(overrides)}")
        raise SystemExit(code) from None
    outcomes.append(outcome)
    return float(outcome.final.get("test_accuracy", float("nan")))


if __name__ == "__main__":
    main()
