"""Gymnasium and PettingZoo front ends pass their libraries' own API checkers."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from pettingzoo.test import parallel_api_test

from edgesim.envs import ClusterParallelEnv, EdgeSiteEnv, feature_names

from .helpers import synthetic

FAULTS = [
    {"type": "node_failure", "fraction": 0.25, "at_step": 100},
    {"type": "cloud_outage", "start_s": 150, "duration_s": 100},
    {"type": "packet_loss", "rate": 0.1},
]


@pytest.fixture(scope="module")
def scenario():
    return synthetic(episode_s=300, faults=FAULTS)


@pytest.mark.parametrize("discrete", [False, True])
def test_gymnasium_check_env(scenario, discrete):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checker's warnings count as failures
        env = gym.make("edgesim/EdgeSite-v0", scenario=scenario, site=2, discrete_actions=discrete)
        check_env(env.unwrapped)


@pytest.mark.parametrize(("discrete", "shared"), [(False, True), (True, False)])
def test_pettingzoo_parallel_api_test(scenario, discrete, shared):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = ClusterParallelEnv(scenario, cluster=1, discrete_actions=discrete, shared_reward=shared)
        parallel_api_test(env, num_cycles=400)  # runs each episode to truncation (300 steps); raises on a breach
        # and after the checker, a fresh episode still starts with every agent's observation in its space
        observations, _ = env.reset(seed=0)
        assert sorted(observations) == sorted(env.possible_agents)
        assert all(env.observation_space(agent).contains(observations[agent]) for agent in env.possible_agents)


def test_site_episode_runs_to_truncation_with_a_forecaster(scenario):
    calls = []

    def forecast_fn(history):
        calls.append(history.shape)
        return np.repeat(history[:, -1:, :], 3, axis=1) * 2.0

    env = EdgeSiteEnv(scenario, site=0, forecast_fn=forecast_fn, horizon=3)
    obs, info = env.reset(seed=3)
    assert obs.shape == (len(feature_names(4, 3)),) and info["twin_seed"] == 3
    assert calls and calls[0] == (12, 576, 1)
    forecast = obs[-3:]
    full_rate = env.twin.nodes.full_rate[0]
    np.testing.assert_allclose(forecast, 2.0 * env.twin.demand_history()[0, -1, 0] / full_rate, rtol=1e-5)
    steps, truncated = 0, False
    while not truncated:
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert not terminated and -1.2 - 1e-9 <= reward <= 0 and env.observation_space.contains(obs)
        steps += 1
    assert steps == 300 and "episode" in info and len(calls) == 2  # at reset, then when the 300-s interval completes


def test_same_seed_same_observations(scenario):
    def rollout():
        env = EdgeSiteEnv(scenario, site=5)
        env.action_space.seed(0)
        observations = [env.reset(seed=9)[0]]
        for _ in range(50):
            observations.append(env.step(env.action_space.sample())[0])
        return np.array(observations)

    np.testing.assert_array_equal(rollout(), rollout())


def test_cluster_state_and_agents(scenario):
    env = ClusterParallelEnv(scenario, cluster=2)
    obs, _ = env.reset(seed=0)
    assert env.agents == env.possible_agents and len(env.agents) == 4
    assert env.state().shape == env.state_space.shape == (4 * env.observation_space(env.agents[0]).shape[0],)
    assert env.observation_space("x") is env.observation_space("y")
    _, rewards, *_ = env.step({agent: env.action_space(agent).sample() for agent in env.agents})
    assert len(set(rewards.values())) == 1  # shared team reward
