"""The CDIO study's jobs and tables, on hand-made grids (no simulation)."""

from __future__ import annotations

import argparse

import pandas as pd
import pytest

from fl_server.experiments.config import compose_config
from scripts.cdio_study import COLUMNS, POLICY_ORDER, ablation_table, jobs, main, policy_table, relative_table, summarise


def test_every_job_is_a_valid_config_per_deployment_and_seed():
    args = argparse.Namespace(deployments=["v1", "v2"], seeds=[0, 1, 2], rounds=5, sites=4, slots=1000,
                              experiment="x", overrides=[])
    planned = dict(jobs(args))
    assert len(planned) == 6
    cfg = compose_config(planned["v2-s1"])
    assert cfg.task.kind == "cdio" and cfg.task.deployment == "v2" and cfg.seed == 1 and cfg.clients.num == 4
    assert cfg.task.placement.slots == 1000 and cfg.num_rounds == 5


def _grid() -> pd.DataFrame:
    rows = []
    for seed, value in ((0, 0.6), (1, 0.8)):
        for dep in ("v1",):
            for bw in ("stable", "fluctuating"):
                for i, policy in enumerate(POLICY_ORDER):
                    rows.append({"deployment": dep, "bandwidth": bw, "policy": policy, "seed": seed,
                                 **{key: value + 0.01 * i for key, *_ in COLUMNS}})
    return pd.DataFrame(rows)


def test_summaries_are_mean_and_sd_over_seeds_and_regret_is_per_slot():
    # Prepare: two seeds at 0.6 and 0.8 (+ 0.01 per policy)
    table = summarise(_grid(), slots=10)
    row = table[(table["policy"] == "cdio") & (table["bandwidth"] == "stable")].iloc[0]
    # Assert: mean 0.7, population sd 0.1; regret divided by the 10 slots
    assert row["success_both"] == pytest.approx(0.7) and row["success_both_sd"] == pytest.approx(0.1)
    assert row["regret"] == pytest.approx(0.07) and row["seeds"] == 2
    assert "| cdio | 70.0 ± 10.0 |" in policy_table(table, "v1", "stable")
    # every baseline is 0.01 x its index above cdio: all-edge (index 3) -> cdio / all-edge - 1 = 0.7 / 0.73 - 1 = -4 %
    assert "| v1 | stable | all-edge | -4 % | -4 % | -4 % | -3.0 |" in relative_table(table)
    assert ablation_table(table).count("|") > 30


def test_bad_study_arguments_are_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["--slots", "0"])
    assert "--slots=0 is invalid: use a whole number >= 1" in capsys.readouterr().err


@pytest.mark.e2e
def test_the_quick_study_runs_real_simulations_and_reports_on_its_parent(tmp_path):
    from mlflow.tracking import MlflowClient

    from tests.conftest import run_module, sqlite_uri

    # Prepare / Execute: --quick = 1 seed, v1, 2 rounds, 100 slots, through the launcher on Ray
    uri = sqlite_uri(tmp_path)
    result = run_module("scripts.cdio_study", "--quick", "--reports-dir", str(tmp_path / "reports"),
                        f"checkpoint.dir={tmp_path / 'ck'}", env={"MLFLOW_TRACKING_URI": uri})
    # Assert
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("fedcontinuum-cdio-study")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`fc.kind` = 'cdio-study'")
    (child,) = client.search_runs([exp.experiment_id], "tags.kind = 'cdio'")
    assert child.info.status == "FINISHED" and child.data.metrics["rpp_exact_acc"] > child.data.metrics["rpp_majority_acc"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/cdio_study.md", "report/cdio_regret.png", "report/cdio_policies_v1.png"} <= artifacts
    text = (tmp_path / "reports" / "cdio_study.md").read_text()
    assert "## v1, fluctuating bandwidth" in text and "| rpp-only |" in text and "paper RPP+CDCO" in text
