"""The RL study's tables from a sweep's child runs (hand-computed), and one real study sweep."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from scripts.rl_study import (
    COLUMNS,
    ablation_table,
    arm_results,
    control_table,
    fault_results,
    faults_figure,
    main_table,
    methods_figure,
)
from tasks.rl.evaluation import FAULTS
from tests.conftest import run_module, sqlite_uri


def child(arm: str, seed: int, p95: float, viol: float, energy: float, rounds: float) -> dict:
    """One finished run's row: eval_* metrics, baselines (on the MA-FL runs) and fault measures."""
    row = {"arm": arm, "seed": str(seed), "run_id": f"{arm}{seed}", "algo": "ppo",
           **{f"eval_{k}": 1.0 for k, *_ in COLUMNS}, "final_rounds_to_95pct_best": rounds}
    row.update({"eval_p95_ms": p95, "eval_slo_violation_rate": viol, "eval_energy_j_per_request": energy})
    row.update({f"baseline_{b}_{k}": 2.0 + seed for b in ("heuristic", "mpc") for k, *_ in COLUMNS})
    for name in FAULTS:
        row.update({f"fault_{name}_completion": 0.9, f"fault_{name}_drift": 0.1 * seed,
                    f"fault_{name}_response_ms": 100.0, f"fault_{name}_slo_violation_rate": 0.2})
        row.update({f"baseline_heuristic_fault_{name}_{m}": 0.5 for m in
                    ("completion", "drift", "response_ms", "slo_violation_rate")})
    return row


@pytest.fixture
def runs() -> pd.DataFrame:
    return pd.DataFrame([
        child("mafl", 0, p95=100.0, viol=0.10, energy=0.20, rounds=2),
        child("mafl", 1, p95=200.0, viol=0.10, energy=0.40, rounds=4),
        child("marl", 0, p95=400.0, viol=0.30, energy=0.50, rounds=5),
        child("marl", 1, p95=600.0, viol=0.20, energy=0.50, rounds=5),
    ])


def test_tables_1_to_3_are_mean_and_sd_over_seeds(runs):
    # Execute
    results = arm_results(runs)
    table = main_table(results).splitlines()
    # Assert: methods in order; MA-FL p95 (100, 200) -> 150 ± 70.7; heuristic from the MA-FL runs: 2, 3 -> 2.5 ± 0.7
    assert list(results) == ["heuristic", "mpc", "mafl", "marl"]
    p95 = [t for _, t, *_ in COLUMNS].index("p95 (ms)") + 1
    cells = {row.split(" | ")[0].lstrip("| "): row.split(" | ") for row in table[2:]}
    assert cells["MA-FL (ours)"][p95] == "150 ± 71"
    assert cells["Non-federated MARL"][p95] == "500 ± 141"
    assert cells["Heuristic (HPA + FFD)"][p95] == "2 ± 1"  # 2.5 ± 0.707 at 0 decimals


def test_table_5_is_deltas_against_mafl(runs):
    # Execute
    table = ablation_table(arm_results(runs)).splitlines()
    # Assert: p95 500 - 150 = +350; energy 0.50 - 0.30 = +0.200; violations 0.25 / 0.10 - 1 = +150 %; rounds 5 ± 0
    assert table[2] == "| No FL (MARL only) | +350 | +0.200 | +150 % | 5.0 ± 0.0 |"
    assert table[3] == "| MA-FL (ours) | +0 | +0.000 | +0 % | 3.0 ± 1.4 |"


def control_child(arm: str, seed: int, p95: float, viol: float, energy: float, cpu: float, served: float = 100.0) -> dict:
    row = child(arm, seed, p95, viol, energy, rounds=3)
    row.update({"eval_control_cpu_us": cpu, "eval_served": served})
    return row


def test_the_control_table_is_deltas_against_ctl_with_the_cpu_ratio():
    # Prepare: ctl p95 200, viol 0.20, 0.30 J, 900 µs; noprice p95 250, viol 0.25; MA-FL 600 µs
    runs = pd.DataFrame([
        control_child("mafl", 0, p95=150.0, viol=0.10, energy=0.25, cpu=600.0),
        control_child("mafl-ctl", 0, p95=200.0, viol=0.20, energy=0.30, cpu=900.0),
        control_child("mafl-ctl-noprice", 0, p95=250.0, viol=0.25, energy=0.35, cpu=750.0),
    ])
    # Execute
    rows = {r.split(" | ")[0].lstrip("| "): r.split(" | ") for r in control_table(arm_results(runs)).splitlines()[2:]}
    # Assert: noprice +50 ms, +0.050 J, 0.25 / 0.20 - 1 = +25 %, 750 / 600 = 1.25x; ctl 900 / 600 = 1.50x
    assert rows["No pricing/auction"][1:4] == ["+50", "+0.050", "+25 %"]
    assert rows["No pricing/auction"][5:7] == ["750", "1.25x |"]
    assert rows["ctl (cadences + pricing + modes)"][1:4] == ["+0", "+0.000", "+0 %"]
    assert rows["ctl (cadences + pricing + modes)"][6] == "1.50x |"
    assert rows["No hierarchy (MA-FL)"][1] == "-50"


def test_energy_per_request_is_a_dash_when_nothing_was_served():
    # an episode that served nothing has no J/request (the twin divides by ~0): the cell is "–"
    runs = pd.DataFrame([control_child("mafl-ctl-costcap", 0, p95=float("nan"), viol=1.0, energy=3e9, cpu=1.0,
                                       served=0.0)])
    table = main_table(arm_results(runs)).splitlines()
    energy = [t for _, t, *_ in COLUMNS].index("J/req") + 1
    assert table[-1].split(" | ")[energy] == "–"


def test_fault_table_rows_come_from_each_arms_runs(runs):
    faults = fault_results(runs)
    assert list(faults) == ["heuristic", "mafl", "marl"]
    assert [s["node10"]["drift"] for s in faults["mafl"]] == [0.0, 0.1]
    assert faults["heuristic"][0]["none"] == {"completion": 0.5, "drift": 0.5, "response_ms": 0.5,
                                              "slo_violation_rate": 0.5}


def bar_heights(ax) -> list[float]:
    return [round(bar.get_height(), 6) for bar in ax.patches]


def test_the_methods_plot_shows_the_table_means(runs):
    # Execute
    fig = methods_figure(arm_results(runs))
    violations, p95 = fig.axes[0], fig.axes[1]
    # Assert: heuristic, MPC (2 and 3 -> 2.5, x100 for %), MA-FL (0.10, 0.10), MARL (0.30, 0.20) in %
    assert bar_heights(violations) == [250.0, 250.0, 10.0, 25.0]
    assert bar_heights(p95) == [2.5, 2.5, 150.0, 500.0]
    assert [t.get_text() for t in violations.get_xticklabels()][2:] == ["MA-FL (ours)", "Non-federated MARL"]


def test_the_fault_plot_groups_each_scenario_by_method(runs):
    # Execute
    fig = faults_figure(fault_results(runs))
    completion = fig.axes[0]
    # Assert: per method one bar per fault scenario; heuristic 50 %, the learned arms 90 %
    assert bar_heights(completion) == [50.0] * len(FAULTS) + [90.0] * (2 * len(FAULTS))
    assert [t.get_text() for t in completion.get_xticklabels()] == list(FAULTS)


@pytest.mark.e2e
def test_a_study_is_one_hydra_multirun_with_the_report_on_its_parent(tmp_path):
    # Prepare: 2 arms x 1 seed, tiny PPO (2 sites, 2 rounds, 60-s episodes)
    uri = sqlite_uri(tmp_path)
    # Execute
    result = run_module("scripts.rl_study", "--algo", "ppo", "--seeds", "0", "--arms", "mafl", "marl", "--rounds", "2",
                        "--steps", "64", "--episode-s", "60", "--clients", "2", "--out", str(tmp_path / "reports"),
                        "task.eval_seeds=[7]", f"checkpoint.dir={tmp_path / 'ck'}", env={"MLFLOW_TRACKING_URI": uri})
    # Assert
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("fedcontinuum-rl-study")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`fc.kind` = 'sweep'")
    children = client.search_runs([exp.experiment_id], "tags.kind = 'rl'")
    assert sorted(r.data.tags["arm"] for r in children) == ["mafl", "marl"]
    assert all(r.info.status == "FINISHED" and r.data.tags["strategy"] == "fedavgm" for r in children)
    steps = [[m.step for m in client.get_metric_history(r.info.run_id, "eval_return")] for r in children]
    assert steps == [[0, 1, 2], [0, 1, 2]]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/rl_study.md", "report/learning_curves.png", "report/methods.png",
            "report/fault_scenarios.png"} <= artifacts
    (report,) = (tmp_path / "reports").glob("rl-study-*.md")
    text = report.read_text()
    assert "| MA-FL (ours) |" in text and "| No FL (MARL only) |" in text and "| Heuristic (HPA + FFD) | loss20 |" in text


def test_a_hydra_escaped_override_survives_flowers_run_config():
    # Hydra hands sweep jobs 'task.forecaster=federated\:<id>'; flwr parses each --run-config pair as TOML
    from flwr.common.config import parse_config_args

    from fl_server.experiments.config import split_overrides
    from fl_server.runtime.launch import run_config

    overrides = ["task.forecaster=federated\\:abc123", "seed=1"]
    args = run_config(overrides, "sqlite:///x.db", None)
    parsed = parse_config_args([args[i + 1] for i in range(0, len(args), 2)])
    assert split_overrides(parsed["overrides"]) == overrides
