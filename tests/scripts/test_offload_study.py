"""The offload study's jobs and tables, on hand-made grids and runs (no simulation)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from fl_server.experiments.config import compose_config
from scripts.offload_study import MEASURES, closed_loop_table, curve_table, fault_table, jobs, main, summarise
from tests.conftest import requires_breastmnist


def planned_jobs() -> dict[str, list[str]]:
    import argparse

    args = argparse.Namespace(datasets=["mnist", "breastmnist"], seeds=[0, 1, 2], rounds=8, local_epochs=3, clients=10,
                              rho={"mnist": 10.0, "breastmnist": 1.0}, load_profile=None, thetas=[0.5, 0.99], repeats=3,
                              experiment="x", overrides=[])
    planned = jobs(args)
    assert len(planned) == 2 * 3 * 2
    return dict(planned)


def test_every_job_is_a_valid_config_with_both_cache_arms():
    cfg = compose_config(planned_jobs()["mnist-s2-cache-off"])
    assert cfg.task.name == "offload" and cfg.seed == 2 and not cfg.task.hard_cases.enabled
    assert cfg.partition.rho == 10.0 and list(cfg.task.thetas) == [0.5, 0.99] and cfg.train.local_epochs == 3
    assert compose_config(planned_jobs()["mnist-s0-cache-on"]).task.hard_cases.enabled


@requires_breastmnist
def test_breastmnist_jobs_keep_its_own_imbalance():
    cfg = compose_config(planned_jobs()["breastmnist-s1-cache-on"])
    assert cfg.task.name == "offload-breastmnist" and cfg.partition.rho == 1.0


def test_bad_rho_pairs_are_refused_by_the_command_line(capsys):
    with pytest.raises(SystemExit):
        main(["--rho", "mnist:10", "--report", "x"])
    assert "--rho takes DATA=RHO pairs" in capsys.readouterr().err


def row(seed: int, fault: str, mode: str, theta: float, accuracy: float) -> dict:
    return {"source": "mnist", "fault": fault, "mode": mode, "theta": theta, "seed": seed,
            **dict.fromkeys(MEASURES, 1.0), "accuracy": accuracy, "requests": 100.0, "outage_blocked": 25.0}


def test_summaries_are_mean_and_sd_over_seeds_per_policy_and_threshold():
    grid = pd.DataFrame([row(0, "none", "edge", math.nan, 0.6), row(1, "none", "edge", math.nan, 0.8),
                         row(0, "none", "confidence", 0.8, 0.9), row(1, "none", "confidence", 0.8, 0.7)])
    table = summarise(grid).set_index("mode")
    assert table.loc["edge", "accuracy"] == pytest.approx(0.7) and math.isnan(table.loc["edge", "theta"])
    assert table.loc["edge", "accuracy_sd"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert table.loc["confidence", "theta"] == 0.8 and table.loc["confidence", "seeds"] == 2
    text = curve_table(summarise(grid), "mnist")
    assert "| edge only | – | 0.700 ± 0.141 |" in text and "| confidence-gated | 0.8 | 0.800 ± 0.141 |" in text


def test_the_fault_table_shows_the_configured_threshold_or_the_nearest_swept_one():
    grid = pd.DataFrame([row(0, "outage", "confidence", t, t) for t in (0.5, 0.9)])
    text = fault_table(summarise(grid), "mnist", theta=0.8)
    assert "| cloud outage | confidence-gated | 0.900 ± 0.000 |" in text and "0.500 ±" not in text
    assert "| 0.250 |" in text  # outage-blocked share of the requests


def test_the_closed_loop_compares_the_cache_arms_per_seed():
    runs = pd.DataFrame([{"source": "mnist", "seed": s, "cache": c, "final_test_accuracy": a}
                         for s, c, a in ((0, "on", 0.8), (0, "off", 0.7), (1, "on", 0.6), (1, "off", 0.7))])
    text = closed_loop_table(runs)
    assert "| mnist | edge model accuracy | 0.700 ± 0.141 | 0.700 ± 0.000 | +0.000 ± 0.141 (1/2 seeds > 0) |" in text
