"""scripts.regions_study: the jobs it plans and its tables, from hand-made rows (no simulation)."""

from __future__ import annotations

import argparse

import pandas as pd

from scripts import regions_study as study


def args(**kw) -> argparse.Namespace:
    base = dict(seeds=[0, 1], arms=list(study.ARMS), rounds=5, steps=256, sites=9, episode_s=288.0,
                eval_seeds=[10000, 10001], experiment="x", overrides=[])
    return argparse.Namespace(**{**base, **kw})


def test_every_arm_and_seed_is_one_job_and_cml_is_one_client_over_all_sites():
    planned = dict(study.jobs(args()))
    assert sorted(planned) == sorted(f"{a}-s{s}" for a in study.ARMS for s in (0, 1))
    assert {"clients.num=1", "clients.min_train=1", "task.sites=9", "+arm=cml"} <= set(planned["cml-s1"])
    assert {"clients.num=9", "+arm=fair", "twin=regions", "task.final_baselines=false"} <= set(planned["fair-s0"])


def test_tables_are_mean_and_sd_over_seeds_by_hand():
    # Prepare: MA-FL at 0.90 and 0.96 fulfillment -> 93.0 ± 4.2 (sd = 0.06 / sqrt(2) = 0.0424)
    keys = [k for k, *_ in study.MAIN]
    runs = pd.DataFrame([{"arm": "mafl", "seed": s, "run_id": str(s), **{f"eval_{k}": 0.5 for k in keys},
                          "eval_fulfillment_rate": f, "fault_node20_completion": f - 0.1} for s, f in ((0, 0.9), (1, 0.96))])
    baselines = {f"baseline_heuristic_{k}": 0.25 for k in keys}
    # Execute
    rows = study.method_rows(runs, baselines)
    table = study.main_table(rows)
    faults = study.scenario_table(rows, ("node20",), drift=True)
    # Assert
    assert list(rows) == ["heuristic", "mpc", "mafl"]
    assert "| MA-FL | 2 | 93.0 ± 4.2 |" in table
    assert "| Heuristic (HPA + FFD) | 1 | 25.0 ± 0.0 |" in table
    assert "| MA-FL | node20 | 83.00 ± 4.24 |" in faults
