"""QMIX (Rashid et al. 2018) and VDN for one edge cluster: its nodes' agents as one team.

(With ``task.control.coa: qmix`` the same learner, td_loss and replay also
make the COA level's team, one agent per cluster: :mod:`tasks.rl.coa`.)

Every node of the cluster is an agent on
:class:`edgesim.envs.ClusterParallelEnv` with the discrete action menu and
the cluster's shared reward. The agents share one Q-network (parameter
sharing, as in PyMARL), told apart by a one-hot agent id appended to the
observation; it is what the federation averages across clusters. The mixer:

* ``qmix``: :class:`torchrl.modules.QMixer`, hypernetworks on the global
  state (all agents' observations) produce non-negative (``abs``) mixing
  weights, so ``dQ_tot / dQ_a >= 0`` (monotonic factorisation);
* ``vdn``: :class:`torchrl.modules.VDNMixer`, ``Q_tot = sum_a Q_a`` (the ablation).

We use TorchRL's mixers but write the TD loss out (below) rather than
:class:`torchrl.objectives.multiagent.QMixerLoss`: the latter expects a
TorchRL collector's nested multi-agent tensordicts, and the replay here is
a few plain arrays; the loss is five lines and reads as the paper's eq. 1.

One training call (one round on one client): ``steps`` epsilon-greedy
environment steps into a replay of this round's transitions; every
``train_every`` steps after ``warmup`` one minibatch TD update
``(r + gamma Q_tot^-(s', argmax_a' Q_a^-(o', a')) - Q_tot(s, a))^2``, the target
networks ``^-`` copied every ``target_every`` updates.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchrl.modules import QMixer, VDNMixer

from edgesim.envs import ClusterParallelEnv

from .spec import RLSpec, background_policy, build_scenario, control_config, forecast_fn, hyper_from_dict, mlp, prior_weight

MIXER_PREFIX = "mixer."  # with ``local_mixer`` these parameters stay on the client


class AgentQNet(nn.Module):
    """Q-values over the action menu from an observation and a one-hot agent id."""

    def __init__(self, obs_dim: int, num_ids: int, num_actions: int, hidden: int = 64,
                 prior_weight: float = 0.0) -> None:
        super().__init__()
        self.num_ids = num_ids
        self.num_actions = num_actions
        self.prior_weight = float(prior_weight)  # hybrid: obs ends with the MPC proposal one-hot
        self.net = mlp(obs_dim + num_ids, hidden, num_actions, activation=nn.ReLU)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """``obs``: (..., n_agents, obs_dim) -> (..., n_agents, num_actions)."""
        n = obs.shape[-2]
        ids = torch.eye(self.num_ids, dtype=obs.dtype)[:n].expand(*obs.shape[:-1], self.num_ids)
        q = self.net(torch.cat((obs, ids), dim=-1))
        if self.prior_weight:
            q = q + self.prior_weight * obs[..., -self.num_actions :]
        return q


class QMixLearner(nn.Module):
    """Agent network + mixer; one state dict (``agent.*``, ``mixer.*``) for the federation."""

    def __init__(self, obs_dim: int, n_agents: int, num_ids: int, num_actions: int, hidden: int = 64,
                 mixer: str = "qmix", embed_dim: int = 32, prior_weight: float = 0.0) -> None:
        super().__init__()
        self.n_agents = n_agents
        self.agent = AgentQNet(obs_dim, num_ids, num_actions, hidden, prior_weight)
        if mixer == "qmix":
            self.mixer = QMixer(state_shape=(n_agents * obs_dim,), mixing_embed_dim=embed_dim, n_agents=n_agents, device="cpu")
        elif mixer == "vdn":
            self.mixer = VDNMixer(n_agents=n_agents, device="cpu")
        else:
            raise ValueError(f"unknown mixer {mixer!r}: use qmix or vdn")

    def q_tot(self, chosen_q: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Mix the chosen agent Q-values, (B, n_agents) -> (B,)."""
        if self.mixer.needs_state:
            return self.mixer(chosen_q.unsqueeze(-1), state).squeeze(-1)
        return self.mixer(chosen_q.unsqueeze(-1)).squeeze(-1)  # VDN: the state plays no part

    @torch.no_grad()
    def greedy(self, obs: np.ndarray) -> np.ndarray:
        """Argmax actions of all agents, ``obs`` (n_agents, obs_dim)."""
        return self.agent(torch.as_tensor(obs, dtype=torch.float32)).argmax(-1).numpy()


@dataclass
class QMixHyper:
    gamma: float = 0.985
    lr: float = 5e-4
    batch_size: int = 64
    train_every: int = 2
    warmup: int = 128
    target_every: int = 100
    eps_start: float = 1.0
    eps_end: float = 0.05
    eps_decay_steps: float = 4000
    max_grad_norm: float = 10.0
    embed_dim: int = 32

    @classmethod
    def from_dict(cls, values: dict[str, float]) -> "QMixHyper":
        return hyper_from_dict(cls, values, "qmix", integers=("batch_size", "train_every", "warmup", "target_every", "embed_dim"))

    def epsilon(self, step: int) -> float:
        """Linearly decayed exploration rate after ``step`` steps of this client's training."""
        fraction = min(1.0, step / max(self.eps_decay_steps, 1.0))
        return self.eps_start + fraction * (self.eps_end - self.eps_start)


def make_cluster_env(spec: RLSpec, cluster: int, faults: str | None = None) -> ClusterParallelEnv:
    return ClusterParallelEnv(
        build_scenario(spec, faults), cluster=cluster, forecast_fn=forecast_fn(spec), horizon=spec.horizon,
        background_policy=background_policy(spec), discrete_actions=True, shared_reward=True,
        control=control_config(spec),
    )


def build_learner(spec: RLSpec, seed: int | None = None, cluster: int = 0) -> QMixLearner:
    """A learner sized for the spec's cluster ``cluster`` (agent ids cover the largest cluster)."""
    env = make_cluster_env(spec, cluster)
    hyper = QMixHyper.from_dict(spec.hyper)
    num_ids = max(len(c.nodes) for c in env.twin.scenario.clusters)
    if seed is not None:
        torch.manual_seed(seed)
    return QMixLearner(env.observation_space(env.possible_agents[0]).shape[0], len(env.possible_agents), num_ids,
                       int(env.action_space(env.possible_agents[0]).n), spec.hidden, spec.mixer, hyper.embed_dim,
                       prior_weight(spec) or 0.0)


class Replay:
    """Transitions of one round: agents' observations (the state is their concatenation)."""

    def __init__(self, capacity: int, n_agents: int, obs_dim: int) -> None:
        self.obs = np.zeros((capacity, n_agents, obs_dim), dtype=np.float32)
        self.next_obs = np.zeros_like(self.obs)
        self.actions = np.zeros((capacity, n_agents), dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.size = 0

    def add(self, obs, actions, reward, next_obs) -> None:
        i = self.size % len(self.rewards)
        self.obs[i], self.actions[i], self.rewards[i], self.next_obs[i] = obs, actions, reward, next_obs
        self.size += 1

    def sample(self, batch_size: int, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        index = rng.integers(0, min(self.size, len(self.rewards)), size=batch_size)
        return (torch.as_tensor(self.obs[index]), torch.as_tensor(self.actions[index]),
                torch.as_tensor(self.rewards[index]), torch.as_tensor(self.next_obs[index]))


def td_loss(learner: QMixLearner, target: QMixLearner, batch: tuple[torch.Tensor, ...], gamma: float) -> torch.Tensor:
    """Mean squared TD error of Q_tot (episodes never terminate: always bootstrap)."""
    obs, actions, rewards, next_obs = batch
    state, next_state = obs.flatten(1), next_obs.flatten(1)
    chosen = learner.agent(obs).gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # (B, n_agents)
    q_tot = learner.q_tot(chosen, state)
    with torch.no_grad():
        next_best = target.agent(next_obs).max(-1).values
        y = rewards + gamma * target.q_tot(next_best, next_state)
    return ((q_tot - y) ** 2).mean()


def _joint_obs(env: ClusterParallelEnv, observations: dict) -> np.ndarray:
    return np.stack([observations[a] for a in env.possible_agents])


def train_qmix(learner: QMixLearner, env: ClusterParallelEnv, steps: int, hyper: QMixHyper, seed: int,
               steps_before: int = 0) -> dict[str, float]:
    """One round of local QMIX/VDN on ``env``; ``steps_before`` sets where epsilon's decay stands."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    target = copy.deepcopy(learner)
    optimiser = torch.optim.Adam(learner.parameters(), lr=hyper.lr)
    replay = Replay(steps, learner.n_agents, learner.agent.net[0].in_features - learner.agent.num_ids)
    observations, _ = env.reset(seed=int(rng.integers(2**31 - 1)))
    obs = _joint_obs(env, observations)
    episode_return, returns, summaries, interventions, losses, updates = 0.0, [], [], 0, [], 0
    num_actions = int(env.action_space(env.possible_agents[0]).n)
    for t in range(steps):
        epsilon = hyper.epsilon(steps_before + t)
        actions = learner.greedy(obs)
        explore = rng.random(len(actions)) < epsilon
        actions[explore] = rng.integers(0, num_actions, size=int(explore.sum()))
        next_observations, rewards, _, truncated, info = env.step(dict(zip(env.possible_agents, actions)))
        first = env.possible_agents[0]
        next_obs = _joint_obs(env, next_observations)
        replay.add(obs, actions, rewards[first], next_obs)
        episode_return += rewards[first]
        interventions += info[first]["shield_interventions"]
        obs = next_obs
        if truncated[first]:
            returns.append(episode_return)
            summaries.append(info[first]["episode"])
            episode_return = 0.0
            observations, _ = env.reset(seed=int(rng.integers(2**31 - 1)))
            obs = _joint_obs(env, observations)
        if replay.size >= hyper.warmup and t % hyper.train_every == 0:
            loss = td_loss(learner, target, replay.sample(hyper.batch_size, rng), hyper.gamma)
            optimiser.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(learner.parameters(), hyper.max_grad_norm)
            optimiser.step()
            losses.append(float(loss.detach()))
            updates += 1
            if updates % hyper.target_every == 0:
                target.load_state_dict(learner.state_dict())
    metrics = {
        "train_return": float(np.mean(returns)) if returns else episode_return * env.twin.scenario.episode_steps / max(steps, 1),
        "train_episodes": float(len(returns)),
        "train_shield_interventions": float(interventions),
        "train_td_loss": float(np.mean(losses)) if losses else float("nan"),
        "train_epsilon": hyper.epsilon(steps_before + steps),
    }
    if summaries:
        metrics["train_slo_violation_rate"] = float(np.mean([s["slo_violation_rate"] for s in summaries]))
    return metrics
