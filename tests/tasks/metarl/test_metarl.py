"""DQN + first-order MAML task (paper 002): FOMAML by hand, steps to stable return,
the DQN against random actions in the twin, and config errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from fl_server.experiments.config import ConfigError, compose_config
from tasks.metarl import dqn
from tasks.metarl.fomaml import fomaml_gradients
from tasks.metarl.spec import MetaSpec
from tasks.rl.deploy import run_controlled_episode
from tasks.rl.spec import build_scenario


class Scalar(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(value))


def quadratic(a: float, c: float):
    """L(theta) = a / 2 (theta - c)^2."""
    return lambda model: 0.5 * a * (model.theta - c) ** 2


def test_one_fomaml_outer_step_on_two_quadratics_matches_the_hand_computation():
    # Prepare: theta = 1; tasks L1 = 1/2 (theta - 3)^2, L2 = (theta + 1)^2; alpha = 0.1, one inner step, beta = 0.5.
    # Task 1: theta_1 = 1 - 0.1 * 1 * (1 - 3) = 1.2;  g_1 = 1 * (1.2 - 3) = -1.8
    # Task 2: theta_2 = 1 - 0.1 * 2 * (1 + 1) = 0.6;  g_2 = 2 * (0.6 + 1) = 3.2
    # Meta-gradient (first order) = (-1.8 + 3.2) / 2 = 0.7;  theta' = 1 - 0.5 * 0.7 = 0.65
    model = Scalar(1.0)
    tasks = [(quadratic(1.0, 3.0), quadratic(1.0, 3.0)), (quadratic(2.0, -1.0), quadratic(2.0, -1.0))]
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    # Execute
    stats = fomaml_gradients(model, tasks, inner_lr=0.1, inner_steps=1)
    unchanged = float(model.theta.detach())
    optimiser.step()
    # Assert
    assert unchanged == 1.0  # the meta-weights move only by the optimiser
    assert float(model.theta.grad) == pytest.approx(0.7)
    assert float(model.theta.detach()) == pytest.approx(0.65)
    assert stats["support_loss"] == pytest.approx((0.5 * 4 + 1.0 * 4) / 2)  # before adaptation: 2 and 4
    assert stats["query_loss"] == pytest.approx((0.5 * 1.8**2 + 1.0 * 1.6**2) / 2)  # at theta_i: 1.62 and 2.56


def test_fomaml_with_no_inner_step_is_the_mean_gradient():
    # theta = 0; gradients a (theta - c): 1 * (0 - 3) = -3 and 2 * (0 + 1) = 2 -> mean -0.5
    model = Scalar(0.0)
    fomaml_gradients(model, [(quadratic(1.0, 3.0),) * 2, (quadratic(2.0, -1.0),) * 2], inner_lr=0.1, inner_steps=0)
    assert float(model.theta.grad) == pytest.approx(-0.5)


def test_steps_to_stable_is_the_first_episode_after_which_the_moving_average_stays_in_the_band():
    # window 2: moving averages -10, -7.5, -4.5, -4, -4, -4; final -4, band 5 % = 0.2;
    # episodes 0-2 are outside, 3.. inside -> stable after episode 3, i.e. 4 x 100 steps.
    assert dqn.steps_to_stable([-10, -5, -4, -4, -4, -4], episode_steps=100, window=2) == 400
    # a late excursion moves it: episode 4 is outside again (-4 - (-6 - 4) / 2 = 1 > 0.2)
    assert dqn.steps_to_stable([-10, -5, -4, -4, -6, -4, -4, -4], episode_steps=100, window=2) == 700
    assert dqn.steps_to_stable([-3, -3, -3], episode_steps=50) == 50  # stable from the start


class RandomMenu:
    """Uniformly random menu actions on every node (the random baseline)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def reset(self, twin) -> None:
        from edgesim.actions import discrete_menu

        self.menu, _ = discrete_menu(twin.scenario.shield.max_replica_step)

    def act(self, twin) -> np.ndarray:
        return self.menu[self.rng.integers(0, len(self.menu), size=twin.num_nodes)]


def small_spec(seed: int) -> MetaSpec:
    cfg = compose_config(["task=dqn", "clients.num=2", "task.episode_s=100", f"seed={seed}", "task.eval_seeds=[900,901]"])
    return MetaSpec.from_config(cfg)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dqn_beats_random_actions_on_the_unseen_regime(seed):
    # Prepare: a fresh 3 x 128 DQN, 6 online episodes on the trace regime (TorchRL DQNLoss, replay, HardUpdate)
    spec = small_spec(seed)
    rl = spec.regime(spec.unseen_regime)
    qnet = dqn.build_qnet(spec, seed=seed)
    # Execute
    hyper = dataclasses.replace(spec.dqn, adapt_warmup=200, adapt_lr=1e-3)  # learning from scratch
    dqn.adapt(qnet, rl, episodes=6, hyper=hyper, seed=seed + 50)
    from tasks.metarl.server import deployed_scores

    learned = deployed_scores(spec, qnet.eval())["return"]
    scenario = build_scenario(rl)
    random = np.mean([run_controlled_episode(scenario, RandomMenu(s), s)["return"] for s in rl.eval_seeds])
    # Assert: greedy DQN on held-out seeds scores a higher (less negative) return than random actions
    assert learned > random


def test_a_round_of_fomaml_and_of_reactive_dqn_change_the_weights_and_report_losses():
    spec = small_spec(0)
    spec = MetaSpec(**{**spec.__dict__, "steps_per_regime": 128, "hyper": {**spec.hyper, "meta_iterations": 2.0}})
    for meta, key in ((True, "train_query_loss"), (False, "train_td_loss")):
        qnet = dqn.build_qnet(spec, seed=0)
        before = [p.detach().clone() for p in qnet.parameters()]
        arm = MetaSpec(**{**spec.__dict__, "meta": meta})
        metrics = dqn.train_round(qnet, arm, site=1, server_round=1, seed=3)
        assert np.isfinite(metrics[key]) and metrics["train_epsilon"] == 1.0
        assert any(not torch.equal(a, b) for a, b in zip(before, qnet.parameters()))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task.unseen_regime=bursty-high"], r"task.unseen_regime=bursty-high is also a training regime"),
        (["task.train_regimes=[diurnal-medium,monsoon]"], r"task regime monsoon is unknown: use one of steady-low"),
        (["+task.hyper.lamda=0.9"], r"task.hyper.lamda is unknown for dqn: valid keys are gamma"),
        (["task.steps_per_regime=0"], r"task.steps_per_regime=0 is invalid: use an integer >= 1"),
        (["clients.num=13"], r"clients.num=13 is too many for task=dqn: twin bitbrains has 12 edge nodes"),
        (["task.forecaster=lstm"], r"task.forecaster=lstm is unknown"),
        (["privacy=dpsgd"], r"privacy=dpsgd \(DP-SGD\) does not apply to task=dqn"),
        (["task.meta=maybe"], r"task.meta=maybe is invalid: use true or false"),
        (["task.hyper.gamma=1.5"], r"task.hyper.gamma=1.5 is invalid: use a discount in \(0, 1\]"),
        (["task.hyper.inner_lr=0"], r"task.hyper.inner_lr=0.0 is invalid: use a step size > 0"),
        (["task.hyper.eps_end=0.5", "task.hyper.eps_start=0.1"], r"need 0 <= eps_end <= eps_start <= 1"),
    ],
)
def test_bad_settings_are_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(["task=dqn", "clients.num=4", *overrides])


@pytest.mark.e2e
def test_a_real_flower_simulation_meta_trains_and_adapts(tmp_path):
    from mlflow.tracking import MlflowClient

    from tests.conftest import run_module, sqlite_uri

    # Prepare / Execute: the launcher, Ray, 2 sites, 2 rounds of FOMAML, then the adaptation study
    uri = sqlite_uri(tmp_path)
    result = run_module("fl_server.runtime.launch", "task=dqn", "clients.num=2", "num_rounds=2", "task.episode_s=60",
                        "task.steps_per_regime=64", "task.hyper.meta_iterations=2", "task.hyper.batch_size=32",
                        "task.hyper.adapt_warmup=100", "task.adapt_episodes=2", "task.eval_seeds=[7]",
                        f"checkpoint.dir={tmp_path / 'ck'}", env={"MLFLOW_TRACKING_URI": uri})
    # Assert
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.data.tags["arm"] == "fomaml-fluct"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "clients_replied")] == [2, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "adapt_return")] == [0, 1]
    metrics = run.data.metrics
    assert {"final_adapt_steps_to_stable", "final_scratch_steps_to_stable", "final_static_mean_latency_ms",
            "final_adapted_gpu_util"} <= set(metrics)
