"""The DQN allocator of paper 002 and its training: reactive (plain DQN) or FOMAML over regimes.

The Q-network (paper 002: 3 x 128) scores the twin's discrete action menu
(:func:`edgesim.actions.discrete_menu`: placement preset x replica step,
migrate, admit-half) from one edge node's observation, which carries the
forecast of the next three demand intervals (:mod:`tasks.rl.spec`'s
forecaster: a federated LSTM run, or seasonal-naive). The TD objective is
TorchRL's :class:`~torchrl.objectives.DQNLoss` (smooth-L1, one-step TD
targets from a target network), the replay is TorchRL's
:class:`~torchrl.data.ReplayBuffer` on a :class:`~torchrl.data.LazyTensorStorage`,
and the target network is refreshed by :class:`~torchrl.objectives.HardUpdate`.

One federated round on one client (its edge site, in every training regime):

1. epsilon-greedy episodes of ``steps_per_regime`` steps per regime into one
   replay buffer per regime (epsilon decays linearly over the rounds);
2. ``meta``: ``meta_iterations`` FOMAML steps (:mod:`tasks.metarl.fomaml`),
   each regime a task whose support and query losses are TD losses on two
   independent replay batches of that regime; the outer step is Adam;
   reactive: the same number of TD gradient steps (``meta_iterations`` x
   regimes x (inner_steps + 1)) on batches of all regimes' transitions, Adam.

The server averages the clients' weights (FedAvg): with every client starting
from the same global weights, that is the mean of their meta-updates.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from tensordict import TensorDict
from torch import nn
from torchrl.data import LazyTensorStorage, ReplayBuffer
from torchrl.modules import QValueActor
from torchrl.objectives import DQNLoss, HardUpdate

from edgesim import Action, EdgeCloudTwin
from edgesim.actions import discrete_menu
from edgesim.envs import EdgeSiteEnv, Observer
from tasks.metarl.fomaml import fomaml_gradients
from tasks.metarl.spec import DQNHyper, MetaSpec
from tasks.rl.spec import RLSpec, background_policy, build_scenario, forecast_fn

MAX_GRAD_NORM = 10.0  # our choice (a common DQN clip)
# FOMAML's fast copies take their target weights by hand (_td_loss_fn), without a TorchRL updater.
NO_UPDATER_WARNING = "No target network updater has been associated"


class QNet(nn.Module):
    """``layers`` x ``hidden`` ReLU layers and a linear output per menu action (paper 002: 3 x 128)."""

    def __init__(self, obs_dim: int, num_actions: int, hidden: int = 128, layers: int = 3) -> None:
        super().__init__()
        sizes = [obs_dim] + [hidden] * layers
        blocks: list[nn.Module] = []
        for inputs, outputs in zip(sizes[:-1], sizes[1:]):
            blocks += [nn.Linear(inputs, outputs), nn.ReLU()]
        self.net = nn.Sequential(*blocks, nn.Linear(hidden, num_actions))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)

    @torch.no_grad()
    def greedy(self, obs: np.ndarray) -> np.ndarray:
        """argmax-Q action per row of ``obs`` (the deployment interface of :mod:`tasks.rl.deploy`)."""
        return self.net(torch.as_tensor(obs, dtype=torch.float32)).argmax(-1).numpy()


def site_env(spec: RLSpec, site: int) -> EdgeSiteEnv:
    """Edge node ``site`` of ``spec``'s twin (a regime's :meth:`MetaSpec.regime`), discrete actions."""
    return EdgeSiteEnv(build_scenario(spec), site=site, forecast_fn=forecast_fn(spec), horizon=spec.horizon,
                       background_policy=background_policy(spec), discrete_actions=True)


def build_qnet(spec: MetaSpec, seed: int | None = None) -> QNet:
    """A Q-network sized for the twin's observation and action menu."""
    env = site_env(spec.regime(spec.train_regimes[0]), 0)
    if seed is not None:
        torch.manual_seed(seed)
    return QNet(env.observation_space.shape[0], int(env.action_space.n), spec.hidden, spec.layers)


def dqn_loss(qnet: QNet, gamma: float) -> DQNLoss:
    """TorchRL's DQN loss on ``qnet`` (its own target copy, refreshed by :class:`HardUpdate`)."""
    actor = QValueActor(qnet.net, in_keys=["observation"], action_space="categorical")
    loss = DQNLoss(actor, loss_function="smooth_l1", delay_value=True, action_space="categorical")
    loss.make_value_estimator(gamma=gamma)
    return loss


def new_buffer(size: int, batch_size: int, seed: int) -> ReplayBuffer:
    """TorchRL replay of up to ``size`` transitions, sampling ``batch_size`` uniformly with its own seeded generator."""
    buffer = ReplayBuffer(storage=LazyTensorStorage(size), batch_size=batch_size)
    buffer.set_rng(torch.Generator().manual_seed(seed))
    return buffer


def transitions(obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, next_obs: np.ndarray,
                truncated: np.ndarray) -> TensorDict:
    """A batch of transitions as TorchRL expects them; episodes are truncated, never terminated."""
    n = len(actions)
    cut = torch.as_tensor(truncated, dtype=torch.bool).reshape(n, 1)
    return TensorDict({
        "observation": torch.as_tensor(np.asarray(obs), dtype=torch.float32),
        "action": torch.as_tensor(np.asarray(actions), dtype=torch.int64),
        "next": {"observation": torch.as_tensor(np.asarray(next_obs), dtype=torch.float32),
                 "reward": torch.as_tensor(np.asarray(rewards), dtype=torch.float32).reshape(n, 1),
                 "done": cut, "terminated": torch.zeros(n, 1, dtype=torch.bool), "truncated": cut},
    }, batch_size=[n])


def epsilon_greedy(qnet: QNet, obs: np.ndarray, eps: float, rng: np.random.Generator) -> np.ndarray:
    """Greedy actions for the rows of ``obs``, each replaced by a uniform one with probability ``eps``."""
    actions = qnet.greedy(np.atleast_2d(obs))
    explore = rng.random(len(actions)) < eps
    num_actions = qnet.net[-1].out_features
    actions[explore] = rng.integers(0, num_actions, size=int(explore.sum()))
    return actions


@dataclass
class Collected:
    batch: TensorDict
    episode_returns: list[float]
    summaries: list[dict[str, float]]


def collect(env: EdgeSiteEnv, qnet: QNet, steps: int, eps: float, rng: np.random.Generator) -> Collected:
    """``steps`` epsilon-greedy transitions on one site; a truncated episode restarts on a fresh seed."""
    obs, _ = env.reset(seed=int(rng.integers(2**31 - 1)))
    rows: dict[str, list] = {"obs": [], "action": [], "reward": [], "next": [], "cut": []}
    returns, summaries, total = [], [], 0.0
    for _ in range(steps):
        action = int(epsilon_greedy(qnet, obs, eps, rng)[0])
        new_obs, reward, _, truncated, info = env.step(action)
        for key, value in zip(rows, (obs, action, reward, new_obs, truncated)):
            rows[key].append(value)
        total += reward
        obs = new_obs
        if truncated:
            returns.append(total)
            summaries.append(info["episode"])
            total = 0.0
            obs, _ = env.reset(seed=int(rng.integers(2**31 - 1)))
    batch = transitions(np.array(rows["obs"]), np.array(rows["action"]), np.array(rows["reward"]),
                        np.array(rows["next"]), np.array(rows["cut"]))
    return Collected(batch, returns, summaries)


def exploration(spec: MetaSpec, server_round: int) -> float:
    """Epsilon of a round: linear from ``eps_start`` (round 1) to ``eps_end`` (last round)."""
    hyper = spec.dqn
    progress = min(1.0, (server_round - 1) / max(spec.num_rounds - 1, 1))
    return hyper.eps_start + (hyper.eps_end - hyper.eps_start) * progress


def gradient_steps(spec: MetaSpec) -> int:
    """TD gradient steps of one round, the same for both arms."""
    hyper = spec.dqn
    return hyper.meta_iterations * len(spec.train_regimes) * (hyper.inner_steps + 1)


def train_round(qnet: QNet, spec: MetaSpec, site: int, server_round: int, seed: int) -> dict[str, float]:
    """One federated round of local training (FOMAML or reactive DQN); returns training metrics."""
    hyper = spec.dqn
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    eps = exploration(spec, server_round)
    buffers, returns, slo = {}, [], []
    for number, name in enumerate(spec.train_regimes):
        collected = collect(site_env(spec.regime(name), site), qnet, spec.steps_per_regime, eps, rng)
        buffers[name] = new_buffer(hyper.buffer_size, hyper.batch_size, seed + number)
        buffers[name].extend(collected.batch)
        returns += collected.episode_returns
        slo += [s["slo_violation_rate"] for s in collected.summaries]
    optimiser = torch.optim.Adam(qnet.parameters(), lr=hyper.lr)
    stats = (_meta_updates if spec.meta else _reactive_updates)(qnet, buffers, hyper, optimiser)
    metrics = {"train_epsilon": eps, **{f"train_{k}": v for k, v in stats.items()}}
    if returns:
        metrics["train_return"] = float(np.mean(returns))
        metrics["train_slo_violation_rate"] = float(np.mean(slo))
    return metrics


def _meta_updates(qnet: QNet, buffers: dict[str, ReplayBuffer], hyper: DQNHyper,
                  optimiser: torch.optim.Optimizer) -> dict[str, float]:
    """``meta_iterations`` FOMAML steps; each regime is one task (support and query: two TD batches).

    The TD targets of a FOMAML step come from a target network (a frozen copy
    of the meta-weights) refreshed every ``target_update`` TD gradient steps.
    """
    target = copy.deepcopy(qnet)
    per_iteration = len(buffers) * (hyper.inner_steps + 1)
    refresh_every = max(1, hyper.target_update // per_iteration)
    totals = {"support_loss": 0.0, "query_loss": 0.0}
    for iteration in range(hyper.meta_iterations):
        if iteration % refresh_every == 0:
            target.load_state_dict(qnet.state_dict())
            target_params = dqn_loss(target, hyper.gamma).value_network_params.detach().clone()
        tasks = [(_td_loss_fn(buffer, target_params, hyper.gamma), _td_loss_fn(buffer, target_params, hyper.gamma))
                 for buffer in buffers.values()]
        stats = fomaml_gradients(qnet, tasks, hyper.inner_lr, hyper.inner_steps)
        nn.utils.clip_grad_norm_(qnet.parameters(), MAX_GRAD_NORM)
        optimiser.step()
        for key in totals:
            totals[key] += stats[key] / hyper.meta_iterations
    return totals


def _td_loss_fn(buffer: ReplayBuffer, target_params: TensorDict, gamma: float):
    """A task loss for FOMAML: TorchRL's DQN loss of the given (fast) network on a fresh replay batch,
    its TD targets from the target network's weights ``target_params``."""
    losses: dict[int, DQNLoss] = {}

    def loss_of(net: QNet) -> torch.Tensor:
        if id(net) not in losses:  # one DQNLoss per fast copy, its target weights set to the target network's
            loss = dqn_loss(net, gamma)
            loss.target_value_network_params.update_(target_params)
            losses[id(net)] = loss
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=NO_UPDATER_WARNING)
            return losses[id(net)](buffer.sample())["loss"]

    return loss_of


def _reactive_updates(qnet: QNet, buffers: dict[str, ReplayBuffer], hyper: DQNHyper,
                      optimiser: torch.optim.Optimizer) -> dict[str, float]:
    """Plain DQN: the same number of TD steps as FOMAML, on batches mixing every regime equally."""
    loss = dqn_loss(qnet, hyper.gamma)
    updater = HardUpdate(loss, value_network_update_interval=hyper.target_update)
    steps = hyper.meta_iterations * len(buffers) * (hyper.inner_steps + 1)
    total = 0.0
    for step in range(steps):
        buffer = list(buffers.values())[step % len(buffers)]
        value = loss(buffer.sample())["loss"]
        optimiser.zero_grad()
        value.backward()
        nn.utils.clip_grad_norm_(qnet.parameters(), MAX_GRAD_NORM)
        optimiser.step()
        updater.step()
        total += float(value.detach()) / steps
    return {"td_loss": total}


# ------------------------------------------------------------- adaptation to an unseen regime


def adapt(qnet: QNet, spec: RLSpec, episodes: int, hyper: DQNHyper, seed: int) -> list[float]:
    """Online DQN on every edge node of ``spec``'s twin at once (one shared Q-network, one replay).

    Every episode replays the same twin seed (one unseen site workload), so
    the return curve shows learning rather than workload noise. Epsilon is
    ``adapt_eps``; one TD step (Adam at ``adapt_lr``) per twin step after
    ``adapt_warmup`` transitions (by default the first episode: it scores the initialisation).

    Returns
    -------
    list of float
        Each episode's return (sum over steps of the mean node reward).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    scenario = build_scenario(spec)
    twin = EdgeCloudTwin(scenario)
    observer = Observer(twin, forecast_fn(spec), spec.horizon, arrival_lags=4)
    menu, _ = discrete_menu(scenario.shield.max_replica_step)
    loss = dqn_loss(qnet, hyper.gamma)
    updater = HardUpdate(loss, value_network_update_interval=hyper.target_update)
    optimiser = torch.optim.Adam(qnet.parameters(), lr=hyper.adapt_lr)
    buffer = new_buffer(hyper.buffer_size, hyper.batch_size, seed)
    returns = []
    for _ in range(episodes):
        twin.reset(seed)
        observer.reset()
        obs, total = observer.observe(), 0.0
        while not twin.done:
            actions = epsilon_greedy(qnet, obs, hyper.adapt_eps, rng)
            result = twin.step(Action.from_env(menu[actions], scenario.shield.max_replica_step))
            observer.after_step()
            next_obs = observer.observe()
            buffer.extend(transitions(obs, actions, result.reward, next_obs, np.full(len(actions), result.truncated)))
            total += float(result.reward.mean())
            obs = next_obs
            if len(buffer) >= hyper.adapt_warmup:
                value = loss(buffer.sample())["loss"]
                optimiser.zero_grad()
                value.backward()
                nn.utils.clip_grad_norm_(qnet.parameters(), MAX_GRAD_NORM)
                optimiser.step()
                updater.step()
        returns.append(total)
    return returns


def steps_to_stable(returns: list[float], episode_steps: int, window: int = 5, tolerance: float = 0.05) -> int:
    """Environment steps until the return is stable.

    Stable: the trailing ``window``-episode moving average stays within
    ``tolerance`` x |final moving average| of its final value from that
    episode to the last. The count is the steps up to the end of the first
    such episode (episode k, 0-based -> ``(k + 1) * episode_steps``).
    """
    values = np.asarray(returns, dtype=float)
    average = np.array([values[max(0, k - window + 1): k + 1].mean() for k in range(len(values))])
    inside = np.abs(average - average[-1]) <= tolerance * abs(average[-1])
    outside = np.flatnonzero(~inside)
    first = 0 if outside.size == 0 else int(outside[-1]) + 1
    return (first + 1) * episode_steps
