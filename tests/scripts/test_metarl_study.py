"""The DQN + FOMAML study's jobs and tables, on hand-made runs (no simulation)."""

from __future__ import annotations

import argparse

import pandas as pd
import pytest

from fl_server.experiments.config import compose_config
from scripts.metarl_study import claims_table, jobs, main, methods_table, paired_change


def planned_jobs() -> dict[str, list[str]]:
    args = argparse.Namespace(seeds=[0, 1, 2], clients=3, rounds=4, steps=400, meta_iterations=30, adapt_episodes=15,
                              episode_s=200.0, experiment="x", overrides=[])
    planned = jobs(args, "federated:abc123")
    assert len(planned) == 3 * 2 * 2  # seeds x bandwidths x arms
    return dict(planned)


def test_every_job_is_a_valid_config_with_its_arm_seed_and_bandwidth():
    planned = planned_jobs()
    ours, reactive = compose_config(planned["fomaml-fluct-s2"]), compose_config(planned["reactive-stable-s1"])
    assert ours.task.meta and ours.task.baselines and ours.seed == 2 and ours.devices.bandwidth_fluctuation == 0.2
    assert not reactive.task.meta and not reactive.task.baselines and reactive.seed == 1
    assert reactive.devices.bandwidth_fluctuation == 0.0
    assert ours.task.forecaster == "federated:abc123" and ours.num_rounds == 4 and ours.task.hyper.meta_iterations == 30


def test_a_bad_forecaster_is_refused_by_the_command_line(capsys):
    with pytest.raises(SystemExit):
        main(["--forecaster", "arima", "--report", "x"])
    assert "--forecaster arima is unknown: use lstm, seasonal-naive or federated:<MLflow run id>" in capsys.readouterr().err


def runs() -> pd.DataFrame:
    # two seeds; FOMAML runs carry the baselines, reactive runs only their own adaptation
    rows = []
    for seed, (ours_ms, reactive_ms, static_ms) in enumerate(((90.0, 100.0, 200.0), (80.0, 100.0, 100.0))):
        rows.append({"run_id": f"o{seed}", "arm": "fomaml", "bandwidth": "stable", "seed": seed,
                     "final_adapted_mean_latency_ms": ours_ms, "final_static_mean_latency_ms": static_ms,
                     "final_adapted_gpu_util": 0.5, "final_static_gpu_util": 0.3,
                     "final_adapt_steps_to_stable": 1000.0, "final_scratch_steps_to_stable": 2000.0})
        rows.append({"run_id": f"r{seed}", "arm": "reactive", "bandwidth": "stable", "seed": seed,
                     "final_adapted_mean_latency_ms": reactive_ms, "final_adapted_gpu_util": 0.4,
                     "final_adapt_steps_to_stable": 2000.0})
    return pd.DataFrame(rows)


def test_paired_changes_are_per_seed_percentages_then_mean_and_sd():
    table = runs()
    ours, reactive = table[table["arm"] == "fomaml"], table[table["arm"] == "reactive"]
    # latency vs reactive: seed 0 (90 - 100) / 100 = -10 %, seed 1 -20 % -> -15 ± 7.07 (sample sd)
    assert paired_change(ours, reactive, "final_adapted_mean_latency_ms") == "-15.0 ± 7.1%"
    # utilisation: 0.5 - 0.4 = +10 points on both seeds
    assert paired_change(ours, reactive, "final_adapted_gpu_util", relative=False) == "+10.0 ± 0.0 pp"


def test_the_claims_table_sets_the_paper_beside_the_measured_change():
    text = claims_table(runs(), "stable")
    # vs static: (90 - 200) / 200 = -55 %, (80 - 100) / 100 = -20 % -> -37.5 ± 24.7
    assert "| mean latency vs static allocation | −10 to −12 % | -37.5 ± 24.7% |" in text
    assert "| steps to stable return vs reactive DQN | 50 % faster (−50 %) | -50.0 ± 0.0% |" in text
    assert "| mean latency vs reactive DQN | −8 to −10 % | -15.0 ± 7.1% |" in text
    assert "| steps to stable return vs scratch DQN | (not compared) | -50.0 ± 0.0% |" in text


def test_the_methods_table_reads_each_method_from_its_arm():
    text = methods_table(runs(), "stable")
    assert "| Static allocation | 150.0 ± 70.7 |" in text  # mean of 200 and 100
    assert "| Reactive DQN (federated, no meta) | 100.0 ± 0.0 |" in text
    assert text.rstrip().endswith("| 1000 ± 0 |")  # FOMAML's steps to stable, last column of the last row
