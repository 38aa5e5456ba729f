"""Clipped PPO with GAE for one edge site (paper 001's Edge Service Agent).

CleanRL-style: one file, every step named. The agent acts on
:class:`edgesim.envs.EdgeSiteEnv` with the discrete action menu
(:func:`edgesim.actions.discrete_menu`: placement preset x replica step, plus
migrate and admit-half), so the policy is a categorical distribution over
``K`` actions. The objective and the advantages are TorchRL's:
:class:`torchrl.objectives.ClipPPOLoss` (clipped surrogate + value loss +
entropy bonus) and :class:`torchrl.objectives.value.GAE`.

One training call (one federated round on one client):

1. roll out ``steps`` environment steps with the current policy, starting a
   new seeded episode whenever one is truncated;
2. GAE(gamma, lambda) advantages and value targets over the whole batch
   (a truncated episode bootstraps from the value of its last observation);
3. ``epochs`` passes of shuffled minibatches through the clipped loss, Adam,
   gradient-norm clipping.

Hyper-parameters (``conf/task/ppo.yaml``): gamma 0.985, lambda 0.95, clip
0.2, entropy 0.01 (paper 001 §5.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torch.distributions import Categorical
from torchrl.modules import ProbabilisticActor, ValueOperator
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE

from edgesim.envs import EdgeSiteEnv

from .spec import (
    RLSpec,
    background_policy,
    build_scenario,
    control_config,
    edge_only_menu,
    forecast_fn,
    hyper_from_dict,
    mlp,
    prior_weight,
    site_node,
)

# Output layers: with ``personal_head`` they stay on the client.
HEAD_PREFIXES = ("actor.head.", "critic.head.")


class Head(nn.Module):
    """A trunk (shared, federated) and a linear head (optionally personal)."""

    def __init__(self, inputs: int, hidden: int, outputs: int) -> None:
        super().__init__()
        self.trunk = mlp(inputs, hidden)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class PriorHead(Head):
    """A policy head whose logits get ``weight`` x the last ``size`` observation entries:
    the forecast-MPC's proposal one-hot (hybrid RL + MPC, :mod:`edgesim.control`), a prior
    the learned logits can outweigh. No extra parameters: the state dict is a Head's."""

    def __init__(self, inputs: int, hidden: int, outputs: int, weight: float) -> None:
        super().__init__(inputs, hidden, outputs)
        self.size, self.weight = outputs, float(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x)) + self.weight * x[..., -self.size :]


class ActorCritic(nn.Module):
    """Separate policy (logits over the menu) and value networks, 2 x ``hidden`` tanh MLPs.

    Initialisation as in CleanRL: orthogonal, gain sqrt(2) in the trunks,
    0.01 on the policy head (near-uniform first policy), 1 on the value head.
    """

    def __init__(self, obs_dim: int, num_actions: int, hidden: int = 64, prior_weight: float | None = None) -> None:
        super().__init__()
        # hybrid RL + MPC: the observation ends with the MPC's proposal, added to the logits
        self.actor = Head(obs_dim, hidden, num_actions) if prior_weight is None else \
            PriorHead(obs_dim, hidden, num_actions, prior_weight)
        self.critic = Head(obs_dim, hidden, 1)
        for net, head_gain in ((self.actor, 0.01), (self.critic, 1.0)):
            for layer in net.trunk:
                if isinstance(layer, nn.Linear):
                    nn.init.orthogonal_(layer.weight, np.sqrt(2))
                    nn.init.zeros_(layer.bias)
            nn.init.orthogonal_(net.head.weight, head_gain)
            nn.init.zeros_(net.head.bias)

    @torch.no_grad()
    def greedy(self, obs: np.ndarray) -> np.ndarray:
        """Most likely action per row of ``obs`` (evaluation)."""
        return self.actor(torch.as_tensor(obs, dtype=torch.float32)).argmax(-1).numpy()


@dataclass
class PPOHyper:
    gamma: float = 0.985
    lmbda: float = 0.95
    clip: float = 0.2
    entropy: float = 0.01
    value_coef: float = 0.5
    lr: float = 3e-4
    epochs: int = 4
    minibatch: int = 256
    max_grad_norm: float = 0.5

    @classmethod
    def from_dict(cls, values: dict[str, float]) -> "PPOHyper":
        return hyper_from_dict(cls, values, "ppo", integers=("epochs", "minibatch"))


def make_site_env(spec: RLSpec, site: int, faults: str | None = None) -> EdgeSiteEnv:
    """The edge site ``site`` of the spec's twin (:func:`~tasks.rl.spec.site_node`), discrete actions;
    E-ML (``edge_only``) removes the cloud from the action menu."""
    scenario = build_scenario(spec, faults)
    env = EdgeSiteEnv(
        scenario, site=site_node(scenario, site), forecast_fn=forecast_fn(spec), horizon=spec.horizon,
        background_policy=background_policy(spec), discrete_actions=True, control=control_config(spec),
    )
    if spec.edge_only:
        env.menu = edge_only_menu(env.menu)
    return env


def build_agent(spec: RLSpec, seed: int | None = None) -> ActorCritic:
    """An agent sized for the spec's observation and action menu."""
    env = make_site_env(spec, 0)
    if seed is not None:
        torch.manual_seed(seed)
    return ActorCritic(env.observation_space.shape[0], int(env.action_space.n), spec.hidden, prior_weight(spec))


def torchrl_modules(agent: ActorCritic) -> tuple[ProbabilisticActor, ValueOperator]:
    """The agent's networks as TorchRL modules (shared parameters, no copies)."""
    policy = ProbabilisticActor(
        TensorDictModule(agent.actor, in_keys=["observation"], out_keys=["logits"]),
        in_keys=["logits"], out_keys=["action"], distribution_class=Categorical, return_log_prob=True,
    )
    value = ValueOperator(agent.critic, in_keys=["observation"])
    return policy, value


@dataclass
class Rollout:
    """A batch of transitions and what the episodes in it scored."""

    batch: TensorDict
    episode_returns: list[float]
    episode_summaries: list[dict[str, float]]
    interventions: int


def collect_rollout(env: EdgeSiteEnv, agent: ActorCritic, steps: int, episode_seeds: list[int], log_prob_key: str) -> Rollout:
    """``steps`` transitions with the stochastic policy; episodes restart from ``episode_seeds``."""
    seeds = iter(episode_seeds)
    obs, _ = env.reset(seed=next(seeds))
    observations, actions, log_probs, rewards, next_obs, truncs = [], [], [], [], [], []
    episode_return, returns, summaries, interventions = 0.0, [], [], 0
    for _ in range(steps):
        with torch.no_grad():
            dist = Categorical(logits=agent.actor(torch.as_tensor(obs)))
            action = dist.sample()
        new_obs, reward, _, truncated, info = env.step(int(action))
        observations.append(obs), actions.append(int(action)), log_probs.append(float(dist.log_prob(action)))
        rewards.append(reward), next_obs.append(new_obs), truncs.append(truncated)
        episode_return += reward
        interventions += info["shield_interventions"]
        obs = new_obs
        if truncated:
            returns.append(episode_return)
            summaries.append(info["episode"])
            episode_return = 0.0
            obs, _ = env.reset(seed=next(seeds))
    # The batch's last transition is cut off mid-episode: mark it truncated so GAE bootstraps there.
    truncs[-1] = True
    n = len(actions)
    batch = TensorDict(
        {
            "observation": torch.as_tensor(np.array(observations)),
            "action": torch.as_tensor(actions),
            log_prob_key: torch.as_tensor(log_probs, dtype=torch.float32),
            "next": {
                "observation": torch.as_tensor(np.array(next_obs)),
                "reward": torch.as_tensor(rewards, dtype=torch.float32).unsqueeze(-1),
                # episodes never terminate; done marks a truncation (trajectory boundary)
                "done": torch.as_tensor(truncs).unsqueeze(-1),
                "terminated": torch.zeros(n, 1, dtype=torch.bool),
                "truncated": torch.as_tensor(truncs).unsqueeze(-1),
            },
        },
        batch_size=[n],
    )
    return Rollout(batch, returns, summaries, interventions)


def ppo_update(agent: ActorCritic, rollout: TensorDict, hyper: PPOHyper, loss: ClipPPOLoss, gae: GAE,
               optimiser: torch.optim.Optimizer, generator: torch.Generator,
               advantages_ready: bool = False) -> dict[str, float]:
    """GAE over the rollout (unless done already), then ``epochs`` x minibatches of the clipped PPO loss."""
    if not advantages_ready:
        with torch.no_grad():
            gae(rollout)  # writes "advantage" and "value_target"
    n = rollout.batch_size[0]
    totals = {"loss_objective": 0.0, "loss_critic": 0.0, "loss_entropy": 0.0, "approx_kl": 0.0}
    updates = 0
    for _ in range(hyper.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, hyper.minibatch):
            minibatch = rollout[order[start : start + hyper.minibatch]]
            losses = loss(minibatch)
            total = losses["loss_objective"] + losses["loss_critic"] + losses["loss_entropy"]
            optimiser.zero_grad()
            total.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), hyper.max_grad_norm)
            optimiser.step()
            for key in ("loss_objective", "loss_critic", "loss_entropy"):
                totals[key] += float(losses[key].detach())
            totals["approx_kl"] += float(losses.get("kl_approx", torch.tensor(0.0)).detach())
            updates += 1
    return {k: v / max(updates, 1) for k, v in totals.items()}


def train_ppo(agent: ActorCritic, env: EdgeSiteEnv, steps: int, hyper: PPOHyper, seed: int) -> dict[str, float]:
    """One round of local PPO on ``env``; returns training metrics.

    Metrics: ``train_return`` (mean return of the episodes completed this
    round, else the per-step reward x episode length of the partial one),
    ``train_slo_violation_rate``, ``train_shield_interventions`` and the losses.
    """
    return train_ppo_pooled(agent, [env], steps, hyper, seed)


def train_ppo_pooled(agent: ActorCritic, envs: list[EdgeSiteEnv], steps: int, hyper: PPOHyper,
                     seed: int) -> dict[str, float]:
    """One PPO update on the pooled rollouts of ``steps`` steps from each env (one env: plain local PPO).

    C-ML (paper 000's centralised learner) pools every site's experience
    into each update of one model; GAE runs per site's trajectory (each
    rollout ends truncated, so advantages never cross from one site to the next).
    """
    policy, value = torchrl_modules(agent)
    loss = ClipPPOLoss(policy, value, clip_epsilon=hyper.clip, entropy_coeff=hyper.entropy,
                       critic_coeff=hyper.value_coef, loss_critic_type="smooth_l1", normalize_advantage=True)
    gae = GAE(gamma=hyper.gamma, lmbda=hyper.lmbda, value_network=value)
    optimiser = torch.optim.Adam(agent.parameters(), lr=hyper.lr, eps=1e-5)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    episode_steps = envs[0].twin.scenario.episode_steps
    torch.manual_seed(seed)  # action sampling
    rollouts = []
    for env in envs:
        episode_seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=steps // episode_steps + 2)]
        rollouts.append(collect_rollout(env, agent, steps, episode_seeds, loss.tensor_keys.sample_log_prob))
    with torch.no_grad():  # GAE per site's rollout, so that no trajectory runs into another site's
        for rollout in rollouts:
            gae(rollout.batch)  # writes "advantage" and "value_target"
    batch = rollouts[0].batch if len(rollouts) == 1 else torch.cat([r.batch for r in rollouts], 0)
    stats = ppo_update(agent, batch, hyper, loss, gae, optimiser, generator, advantages_ready=True)
    returns = [r for rollout in rollouts for r in rollout.episode_returns]
    summaries = [s for rollout in rollouts for s in rollout.episode_summaries]
    metrics = {
        "train_return": float(np.mean(returns)) if returns else float(batch["next", "reward"].mean()) * episode_steps,
        "train_episodes": float(len(returns)),
        "train_shield_interventions": float(sum(r.interventions for r in rollouts)),
        **{f"train_{k}": v for k, v in stats.items()},
    }
    if summaries:
        metrics["train_slo_violation_rate"] = float(np.mean([s["slo_violation_rate"] for s in summaries]))
    return metrics


def evaluate_site(agent: ActorCritic, env: EdgeSiteEnv, seed: int, greedy: bool = True) -> tuple[float, dict[str, float]]:
    """One episode on ``env`` (greedy or sampled actions): (return, twin summary)."""
    obs, _ = env.reset(seed=seed)
    total, generator = 0.0, torch.Generator().manual_seed(seed)
    while True:
        with torch.no_grad():
            logits = agent.actor(torch.as_tensor(obs))
        if greedy:
            action = int(logits.argmax())
        else:
            action = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        obs, reward, _, truncated, info = env.step(action)
        total += reward
        if truncated:
            return total, info["episode"]
