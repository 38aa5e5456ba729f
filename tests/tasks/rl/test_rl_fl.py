"""Federated PPO / QMIX in the twin: the experiment with the real ClientApp
through a fake Grid (per-round learning curves, policy artifacts, local
parts kept in context.state, resume), and one real 2-round Flower simulation
each through the launcher."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import MessageType
from mlflow.tracking import MlflowClient

from fl_server.experiments.config import ConfigError, compose_config
from fl_server.experiments.experiment import run_experiment
from tasks.rl.task import LOCAL_KEY
from tests.conftest import persistent_clients, run_module, sqlite_uri

# 60-s episodes, 128 steps per client per round, one held-out evaluation seed
TINY = ["task.episode_s=60", "task.steps_per_round=128", "task.eval_seeds=[7]", "num_rounds=2", "seed=1"]


def only_run(uri: str):
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return client, run


def test_federated_ppo_logs_learning_curves_and_policy_checkpoints(tracking_uri, tmp_path):
    # Prepare
    cfg = compose_config(["task=ppo", "strategy=fedavgm", "clients.num=2", *TINY, f"checkpoint.dir={tmp_path}"])
    grid, _ = persistent_clients(2)
    # Execute
    final = run_experiment(grid, cfg, tracking_uri)
    # Assert
    client, run = only_run(tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.data.tags["kind"] == "rl" and run.data.tags["arm"] == "mafl" and run.data.tags["algo"] == "ppo"
    steps = lambda key: [m.step for m in client.get_metric_history(run.info.run_id, key)]  # noqa: E731
    for key in ("eval_return", "eval_slo_violation_rate", "eval_shield_interventions", "eval_p95_ms",
                "eval_p99_ms", "eval_energy_j_per_request", "eval_cost_per_1k_usd"):
        assert steps(key) == [0, 1, 2], key
    for key in ("train_return", "train_shield_interventions", "train_loss_objective"):
        assert steps(key) == [1, 2], key
    artifacts = {a.path for d in ("policy", "plots", "metrics", "model") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"policy/round_001.pt", "policy/round_002.pt", "plots/learning_curves.png", "metrics/rounds.csv",
            "model/final_state_dict.pt"} <= artifacts
    assert final["eval_return"] < 0 and 0 <= final["rounds_to_95pct_best"] <= 2


def test_non_federated_qmix_clients_continue_from_their_own_weights(tracking_uri, tmp_path):
    # Prepare: 3 clusters, no federation, VDN mixer (the ablation switch)
    cfg = compose_config(["task=qmix", "clients.num=3", "task.federated=false", "task.mixer=vdn", *TINY,
                          "task.hyper.warmup=32", f"checkpoint.dir={tmp_path}"])
    grid, contexts = persistent_clients(3)
    # Execute
    run_experiment(grid, cfg, tracking_uri)
    # Assert: every client holds its own weights, and they differ between clients
    client, run = only_run(tracking_uri)
    assert run.info.status == "FINISHED" and run.data.tags["arm"] == "marl-vdn"
    kept = [contexts[n].state[LOCAL_KEY].to_torch_state_dict() for n in range(3)]
    assert not torch.equal(kept[0]["agent.net.0.weight"], kept[1]["agent.net.0.weight"])
    # the server still sent round 2's global model; the clients did not take it
    train = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    global_2 = next(m for m in train if m.content["config"]["server-round"] == 2).content["arrays"].to_torch_state_dict()
    assert all(not torch.equal(global_2["agent.net.0.weight"], k["agent.net.0.weight"]) for k in kept)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_return")] == [0, 1, 2]


def test_qmix_local_mixer_stays_on_the_client(tracking_uri, tmp_path):
    cfg = compose_config(["task=qmix", "clients.num=2", "task.local_mixer=true", *TINY, "num_rounds=1",
                          "task.hyper.warmup=32", f"checkpoint.dir={tmp_path}"])
    grid, contexts = persistent_clients(2)
    run_experiment(grid, cfg, tracking_uri)
    mixers = [contexts[n].state[LOCAL_KEY].to_torch_state_dict()["mixer.hyper_w_1.weight"] for n in range(2)]
    assert not torch.equal(mixers[0], mixers[1])  # each cluster trained its own mixer


def test_an_interrupted_rl_run_resumes_from_its_last_checkpoint(tracking_uri, tmp_path):
    # Prepare: one round, then the same run continued to round 2
    base = ["task=ppo", "clients.num=2", *TINY, f"checkpoint.dir={tmp_path}"]
    run_experiment(persistent_clients(2)[0], compose_config([*base, "num_rounds=1"]), tracking_uri)
    _, first = only_run(tracking_uri)
    # Execute
    resumed = compose_config([*base, "num_rounds=2", f"checkpoint.resume={first.info.run_id}"])
    run_experiment(persistent_clients(2)[0], resumed, tracking_uri)
    # Assert: the same MLflow run, rounds 0-2 logged once each
    client, run = only_run(tracking_uri)
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_return")] == [0, 1, 2]
    assert run.data.tags["fc.resumed_after_round"] == "1"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["task=ppo", "clients.num=13"], r"clients.num=13 is too many for task=ppo: twin bitbrains has 12 edge nodes"),
        (["task=qmix", "clients.num=4"], r"clients.num=4 is too many for task=qmix: twin bitbrains has 3 edge clusters"),
        (["task=qmix", "task.mixer=sum"], r"task.mixer=sum is unknown"),
        (["task=ppo", "task.faults=quake"], r"task.faults=quake is unknown"),
        (["task=ppo", "strategy=ass"], r"strategy=ass weighs clients by per-class accuracy on public data, which task=ppo"),
        (["task=ppo", "task.forecaster=tcn"], r"task.forecaster=tcn is unknown: use seasonal-naive or federated:"),
        (["task=ppo", "+arm=vdn"], r"task.mixer=vdn \(\+arm=vdn\) needs task=qmix"),
        (["task=qmix", "clients.num=3", "+arm=ph"], r"task.personal_head=true \(\+arm=ph\) needs task=ppo"),
        (["task=ppo", "+arm=nofl"],
         r"unknown arm 'nofl': choose one of cml, coaqmix, costcap, ctl, eml, fair, hybrid, mafl, marl, nofc, noprice, "
         r"noshield, ph, vdn"),
        (["task=ppo", "+arm=ctl", "task.control.coa_every=0"], r"task.control.coa_every=0 is invalid: the COA cadence"),
        (["task=ppo", "+arm=ctl", "task.control.mode=turbo"], r"task.control.mode=turbo is unknown"),
        (["task=qmix", "clients.num=3", "task.control.price_weight=-0.5"], r"task.control.price_weight=-0.5 is invalid"),
        (["task=ppo", "+arm=ctl", "task.control.coa=foo"], r"task.control.coa=foo is invalid: use rule or qmix"),
        (["task=ppo", "task.control.coa=qmix"], r"task.control.coa=qmix needs task.control.enabled=true"),
        (["task=ppo", "+arm=coaqmix", "task.federated=false"],
         r"task.control.coa=qmix \(\+arm=coaqmix\) needs task.federated=true"),
        (["task=ppo", "clients.num=4", "+arm=cml"], r"task.centralised=true \(\+arm=cml\) is one centralised PPO learner: "
                                                    r"use task=ppo clients.num=1"),
        (["task=qmix", "clients.num=3", "+arm=eml"], r"task.edge_only=true \(\+arm=eml\) needs task=ppo"),
        (["task=ppo", "task.faults=density20"], r"task.faults=density20 changes the edge-node density .* needs twin=regions"),
        (["task=ppo", "twin=regions", "twin.fairness.lambda=2"], r"twin.fairness.lambda=2 is outside \[0, 1\]"),
        (["task=ppo", "twin=regions", "twin.fairness.omega=sine"], r"twin.fairness.omega='sine' is an unknown Omega"),
        (["task=ppo", "twin=regions", "twin.regions.density=0"], r"twin.regions.density=0 deploys no edge node"),
    ],
)
def test_bad_rl_config_is_one_clear_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        compose_config(overrides)


def test_regions_sites_are_dealt_round_robin_over_the_regions():
    from edgesim import load_scenario
    from tasks.rl.spec import site_node

    # regions of 5, 5, 5, 3, 3, 3, 2, 2, 2 nodes start at 0, 5, 10, 15, 18, 21, 24, 26, 28
    scenario = load_scenario("regions", {"episode_s": 60, "faults": [], "workload": {"source": "synthetic"}})
    assert [site_node(scenario, k) for k in range(11)] == [0, 5, 10, 15, 18, 21, 24, 26, 28, 1, 6]
    assert site_node(load_scenario("synthetic"), 3) == 3  # other twins: site k is node k


def test_centralised_learner_on_the_regions_twin_is_one_model_on_every_site(tracking_uri, tmp_path):
    # Prepare: C-ML, one client pooling 3 sites (regions A, B, C), fairness on (lambda 1, spread)
    cfg = compose_config(["task=ppo", "twin=regions", "clients.num=1", "clients.min_train=1", "task.sites=3",
                          "+arm=cml", "twin.fairness.lambda=1.0", "twin.fairness.omega=spread", *TINY,
                          "num_rounds=1", f"checkpoint.dir={tmp_path}"])
    grid, _ = persistent_clients(1)
    # Execute
    run_experiment(grid, cfg, tracking_uri)
    # Assert: FedAvg (the arm's default strategy), 3 sites x 128 steps in the one update, Table 4 scored
    client, run = only_run(tracking_uri)
    metrics = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.tags["arm"] == "cml" and run.data.tags["strategy"] == "fedavg"
    assert metrics["train_episodes"] == 6  # 3 sites x 128 steps of 60-step episodes: 2 whole episodes each
    for name in ("density10", "density50", "node20", "outage60"):
        assert 0.0 <= metrics[f"fault_{name}_completion"] <= 1.0
        assert f"baseline_mpc_fault_{name}_completion" in metrics
    assert 0.0 <= metrics["eval_fairness_variance"] <= 0.25 and 0.0 <= metrics["eval_satisfaction"] <= 1.0


# ----------------------------------------------------------- real Flower runs


@pytest.mark.e2e
@pytest.mark.parametrize("task, clients", [("qmix", 2)])  # PPO: tests/test_rl_study.py runs it in a sweep
def test_a_real_flower_simulation_trains_rl_agents(task, clients, tmp_path):
    uri = sqlite_uri(tmp_path)
    result = run_module("fl_server.runtime.launch", f"task={task}", "strategy=fedavgm", f"clients.num={clients}", *TINY,
                        f"checkpoint.dir={tmp_path / 'ck'}", env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client, run = only_run(uri)
    assert run.info.status == "FINISHED" and run.data.tags["algo"] == task
    assert [m.value for m in client.get_metric_history(run.info.run_id, "clients_replied")] == [clients, clients]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_return")] == [0, 1, 2]


@pytest.mark.e2e
@pytest.mark.parametrize("arm", ["ctl", "coaqmix"])
def test_a_real_flower_simulation_runs_the_control_hierarchy_arms(tmp_path, arm):
    # Prepare: PPO ESAs under paper 001's hierarchy (+arm=ctl: COA rule every 3 steps, auctions, mode schedule;
    # +arm=coaqmix: the same with the learned COA team, a QMIX team of the 3 clusters' COAs)
    uri = sqlite_uri(tmp_path)
    # Execute
    result = run_module("fl_server.runtime.launch", "task=ppo", f"+arm={arm}", "clients.num=2", *TINY,
                        "task.final_study=false", f"checkpoint.dir={tmp_path / 'ck'}", env={"MLFLOW_TRACKING_URI": uri})
    # Assert: the run is tagged with the arm; every evaluation saw the COA decide at steps 0, 3, ..., 57
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client, run = only_run(uri)
    assert run.info.status == "FINISHED" and run.data.tags["arm"] == {"ctl": "mafl-ctl", "coaqmix": "mafl-ctl-coaqmix"}[arm]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "eval_coa_decisions")] == [20.0, 20.0, 20.0]
    if arm == "ctl":
        assert run.data.metrics["eval_control_cpu_us"] > 0
    else:  # the learned team also decided in training, every round (128 // 3 + 1 per client and round)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_coa_decisions")] == [1, 2]


def test_ppo_observes_a_trained_federated_forecaster_shipped_to_the_clients(tracking_uri, tmp_path):
    # Prepare: a logged forecasting run (window 48, horizon 6) as task.forecaster
    from tasks.forecast.trained import load_from_mlflow
    from tasks.rl import spec as rl_spec
    from tasks.rl import task as rl_task
    from tests.tasks.forecast.test_trained_forecaster import logged_forecasting_run

    run_id, _ = logged_forecasting_run(tracking_uri)
    cfg = compose_config(["task=ppo", "clients.num=2", *TINY, "num_rounds=1", f"task.forecaster=federated:{run_id}",
                          f"checkpoint.dir={tmp_path}"])
    grid, _ = persistent_clients(2)
    # Execute
    run_experiment(grid, cfg, tracking_uri)
    # Assert: every training message carries the model; a fresh process rebuilds the same forecaster from it
    train = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert train and all(rl_task.FORECASTER_KEY in m.content["config"] for m in train)
    rl_spec._INSTALLED.clear()  # as in a new Ray worker
    spec = rl_task._spec(train[0].content["config"])
    history = np.abs(np.random.default_rng(1).normal(20, 5, size=(12, 300, 1)))
    expected = load_from_mlflow(run_id, tracking_uri).forecast_fn(rl_spec.FORECAST_HORIZON)(history)
    np.testing.assert_array_equal(rl_spec.forecast_fn(spec)(history), expected)
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.kind = 'rl'")
    assert run.info.status == "FINISHED" and run.data.tags["forecaster"] == f"federated:{run_id}"


def test_an_rl_run_ends_with_fault_scenarios_and_baselines(tracking_uri, tmp_path):
    # Prepare
    from tasks.rl.evaluation import BASELINE_KEYS, BASELINES, FAULT_MEASURES, FAULTS

    cfg = compose_config(["task=ppo", "clients.num=2", *TINY, "num_rounds=1", f"checkpoint.dir={tmp_path}"])
    # Execute
    run_experiment(persistent_clients(2)[0], cfg, tracking_uri)
    # Assert: every study figure is a metric of the run
    _, run = only_run(tracking_uri)
    metrics = run.data.metrics
    for fault in FAULTS:
        for measure in FAULT_MEASURES:
            assert f"fault_{fault}_{measure}" in metrics and f"baseline_heuristic_fault_{fault}_{measure}" in metrics
        assert 0 <= metrics[f"fault_{fault}_completion"] <= 1 and 0 <= metrics[f"fault_{fault}_drift"] <= 1
    assert metrics["fault_none_drift"] == 0.0  # the fault-free episode is the reference
    assert {f"baseline_{b}_{k}" for b in BASELINES for k in BASELINE_KEYS} <= set(metrics)
    assert metrics["final_final_study_s"] > 0


def test_an_unknown_forecasting_run_is_one_clear_error(tracking_uri):
    from tasks.rl.spec import RLSpec, forecaster_payload

    cfg = compose_config(["task=ppo", "task.forecaster=federated:0123456789abcdef"])
    with pytest.raises(ValueError, match=r"federated:0123456789abcdef: no such MLflow run"):
        forecaster_payload(RLSpec.from_config(cfg), tracking_uri)


def test_the_learned_coa_arm_is_named_in_the_run():
    from tasks.rl.task import rl_arm

    cfg = compose_config(["task=qmix", "clients.num=3", "+arm=coaqmix"])
    assert cfg.task.control.coa == "qmix" and rl_arm(cfg) == "mafl-ctl-coaqmix"
