"""The learned Cluster Orchestrator Agents (``task.control.coa: qmix``): QMIX over the COAs of all clusters.

Paper 001 §4.2/§5.3: ESAs act sub-second, COAs every few seconds, the COAs
trained as QMIX over clusters. In the twin the ESAs are the task's PPO / QMIX
agents (every step); here the COA of every cluster is one agent of a QMIX
team that decides every ``control.coa_every`` steps
(:class:`edgesim.control.ControlLayer` calls it at exactly those steps):

* observation: :meth:`~edgesim.control.ControlLayer.coa_observation`, (C, 6 + modes), through
  ``log1p`` (:func:`team_input`);
* action: one row of :data:`edgesim.control.COA_MENU` per cluster (slice
  budget share x link share x rebalancing migration on/off); the auctions
  clear the ESAs' bids against the chosen capacities;
* team reward: the sum over clusters of the existing COA reward of the
  k-step window (the cluster's mean ESA reward before prices minus the
  migration charge), so ``Q_tot`` is the whole twin's;
* networks: :class:`tasks.rl.qmix.QMixLearner` as it is, with C agents:
  one shared Q-network with a one-hot agent (cluster) id and TorchRL's
  ``QMixer`` on the concatenated COA observations as state; the TD loss is
  :func:`tasks.rl.qmix.td_loss` and the replay :class:`tasks.rl.qmix.Replay`.

Training runs inside a client's training call: :class:`COATrainer` attaches
an epsilon-greedy policy to the control layer of each twin the ESAs train in
and makes one TD update per decision after a warm-up. The team's parameters
live in the task's model under :data:`COA_PREFIX` (``coa.agent.*``,
``coa.mixer.*``) and are federated like the rest; every client's team covers
all C clusters of its own twin, so the mixer is averaged too (it does not
stay local with ``local_mixer``, which concerns the ESA mixer of one cluster).
Evaluation uses the greedy team (:func:`greedy_policy`).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from edgesim.control import COA_MENU

from .qmix import QMixHyper, QMixLearner, Replay, td_loss

COA_PREFIX = "coa."
# Our choice, counted in COA decisions (a 1024-step round at k = 3 makes 341): a short warm-up, one
# update per decision, epsilon down to 0.05 over a client's first 1000 decisions (across rounds).
COA_HYPER = QMixHyper(batch_size=32, train_every=1, warmup=32, target_every=50, eps_decay_steps=1000)
REPLAY_DECISIONS = 4096  # per round; a round of 1024 steps at k >= 1 fits, older ones are overwritten


def build_team(num_clusters: int, obs_dim: int, hidden: int, seed: int | None = None) -> QMixLearner:
    """The COA team: a QMIX learner with one agent per cluster."""
    if seed is not None:
        torch.manual_seed(seed + 1)  # not the ESA's stream: the same seed must not give twin networks
    return QMixLearner(obs_dim, num_clusters, num_clusters, len(COA_MENU), hidden, "qmix", COA_HYPER.embed_dim)


def attach_team(model: nn.Module, team: QMixLearner) -> nn.Module:
    """``model`` with the team as its ``coa`` submodule (state-dict keys ``coa.*``)."""
    model.add_module(COA_PREFIX[:-1], team)
    return model


def team_input(obs: np.ndarray) -> np.ndarray:
    """What the team sees of the COA observation: ``log1p`` of it. The prices in it are pressures
    capped at 50, next to ratios in [0, 1]; raw, they blow up the hypernetworks' mixing weights
    (TD losses of ~1e5 in a first 2-round launcher run), log1p keeps every entry in [0, 3.9]."""
    return np.log1p(np.asarray(obs, dtype=np.float32))


def greedy_policy(team: QMixLearner):
    """Evaluation: the argmax COA_MENU row of every cluster."""
    return lambda obs, reward: team.greedy(team_input(obs))


class COATrainer:
    """Epsilon-greedy COA decisions and online QMIX updates during one training call.

    Parameters
    ----------
    team : QMixLearner
        The model's ``coa`` submodule, trained in place.
    coa_every : int
        k: the per-decision discount is ``gamma ** k`` (the ESAs' horizon in seconds).
    seed : int
    decisions_before : int
        COA decisions of this client's earlier rounds (where epsilon's decay stands).
    hyper : QMixHyper
    """

    def __init__(self, team: QMixLearner, coa_every: int, seed: int, decisions_before: int = 0,
                 hyper: QMixHyper = COA_HYPER) -> None:
        self.team, self.hyper = team, hyper
        self.gamma = hyper.gamma ** coa_every
        self.target = copy.deepcopy(team)
        self.optimiser = torch.optim.Adam(team.parameters(), lr=hyper.lr)
        obs_dim = team.agent.net[0].in_features - team.agent.num_ids
        self.replay = Replay(REPLAY_DECISIONS, team.n_agents, obs_dim)
        self.rng = np.random.default_rng([seed, 17])
        self.decisions_before, self.decisions, self.updates, self.losses = decisions_before, 0, 0, []

    def attach(self, layer) -> None:
        """Make this trainer the COA policy of ``layer`` (one per twin: each keeps its own last decision)."""
        pending: dict[str, np.ndarray] = {}
        layer.coa_policy = lambda obs, reward: self.decide(pending, obs, reward)

    def decide(self, pending: dict, obs: np.ndarray, reward: np.ndarray | None) -> np.ndarray:
        """Store the transition the window just closed, maybe update, then act epsilon-greedily."""
        obs = team_input(obs)
        if reward is not None and pending:  # None: a new episode, the previous one's last window is dropped
            self.replay.add(pending["obs"], pending["actions"], float(np.sum(reward)), obs)
            self._maybe_update()
        epsilon = self.hyper.epsilon(self.decisions_before + self.decisions)
        actions = self.team.greedy(obs)
        explore = self.rng.random(len(actions)) < epsilon
        actions[explore] = self.rng.integers(0, len(COA_MENU), size=int(explore.sum()))
        pending["obs"], pending["actions"] = obs, actions
        self.decisions += 1
        return actions

    def _maybe_update(self) -> None:
        if self.replay.size < self.hyper.warmup or self.replay.size % self.hyper.train_every:
            return
        loss = td_loss(self.team, self.target, self.replay.sample(self.hyper.batch_size, self.rng), self.gamma)
        self.optimiser.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(self.team.parameters(), self.hyper.max_grad_norm)
        self.optimiser.step()
        self.optimiser.zero_grad(set_to_none=True)  # no COA gradient left for the ESA optimiser to see
        self.losses.append(float(loss.detach()))
        self.updates += 1
        if self.updates % self.hyper.target_every == 0:
            self.target.load_state_dict(self.team.state_dict())

    def metrics(self) -> dict[str, float]:
        """``train_coa_*`` figures of this call (NaN loss: no update yet; the task drops NaNs)."""
        return {
            "train_coa_decisions": float(self.decisions),
            "train_coa_td_loss": float(np.mean(self.losses)) if self.losses else float("nan"),
            "train_coa_epsilon": self.hyper.epsilon(self.decisions_before + self.decisions),
        }


def team_for(spec, seed: int | None = None) -> QMixLearner:
    """The COA team sized for the spec's twin: one agent per cluster, the COA observation's width."""
    from edgesim.modes import mode_names

    from .spec import build_scenario

    return build_team(len(build_scenario(spec).clusters), 6 + len(mode_names()), spec.hidden, seed)


def uses_learned_coa(spec) -> bool:
    from .spec import control_config

    control = control_config(spec)
    return control is not None and control.coa == "qmix"
