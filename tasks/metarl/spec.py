"""The DQN + MAML task's settings and its workload regimes.

A regime is a twin workload (``twin.workload`` overrides): synthetic
generators of paper 002 §4.2 (Poisson + diurnal cycle + bursts, at three
levels) for meta-training, and the real Bitbrains GWA-T-12 trace as the
unseen regime the study adapts to. Regimes differ in source, burstiness
(``profile``: bursts per day) and level (``mean_load``: mean demand per
node as a fraction of its cluster's mean node capacity). Every number is our
choice; paper 002 names only Low / Medium / High.

Everything a client needs travels as one JSON string (``metarl-spec``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from tasks.rl.spec import RLSpec, _twin_config, hyper_from_dict

REGIMES: dict[str, dict[str, object]] = {
    "steady-low": {"source": "synthetic", "profile": "low", "mean_load": 0.3},
    "diurnal-medium": {"source": "synthetic", "profile": "medium", "mean_load": 0.5},
    "bursty-high": {"source": "synthetic", "profile": "high", "mean_load": 0.8, "burst_cap": 6.0},
    "flash-crowd": {"source": "synthetic", "profile": "high", "mean_load": 1.1, "burst_cap": 8.0},
    "trace": {"source": "trace", "mean_load": 0.6},  # real Bitbrains VMs (synthetic if the folder is absent)
}


@dataclass
class DQNHyper:
    """DQN and FOMAML hyper-parameters (``task.hyper``; defaults are ours unless noted).

    ``meta_iterations`` FOMAML steps per round, each over every training
    regime with ``inner_steps`` SGD steps at ``inner_lr`` on a support batch and
    the query gradient applied by Adam at ``lr``. The reactive arm (no meta)
    spends the same number of TD gradient steps on mixed-regime batches.
    """

    gamma: float = 0.99
    lr: float = 1e-3                 # Adam (outer step of FOMAML; the DQN's optimiser otherwise)
    batch_size: int = 64
    buffer_size: int = 20_000
    target_update: int = 50          # HardUpdate period in gradient steps (paper 002: a target network)
    eps_start: float = 1.0
    eps_end: float = 0.05
    meta_iterations: int = 40
    inner_steps: int = 3             # FOMAML inner SGD steps per regime
    inner_lr: float = 0.01           # FOMAML inner SGD step size
    adapt_eps: float = 0.05          # exploration while adapting to the unseen regime
    adapt_lr: float = 3e-4           # Adam while adapting (smaller: fine-tuning, not learning anew)
    adapt_warmup: int = 2400         # transitions before the first adaptation update (one 200-s episode x 12 nodes)

    @classmethod
    def from_dict(cls, values: dict[str, float]) -> "DQNHyper":
        return hyper_from_dict(cls, values, "dqn", integers=("batch_size", "buffer_size", "target_update",
                                                             "meta_iterations", "inner_steps", "adapt_warmup"))


@dataclass(frozen=True)
class MetaSpec:
    """What a DQN + MAML client needs.

    Attributes
    ----------
    rl : str
        The twin side as an :class:`tasks.rl.spec.RLSpec` JSON (one edge site
        per client, the forecaster, background policy, eval seeds, episode length).
    meta : bool
        True: FOMAML over ``train_regimes``; False: the reactive DQN arm
        (same DQN, same data and gradient steps, no meta-learning).
    train_regimes : tuple of str
    unseen_regime : str
        The regime the study adapts to (never trained on).
    steps_per_regime : int
        Environment steps per training regime per round.
    num_rounds : int
        For the exploration schedule (epsilon decays linearly over the rounds).
    hidden, layers : int
        The Q-network: ``layers`` x ``hidden`` ReLU (paper 002: 3 x 128).
    adapt_episodes : int
        Episodes of online DQN on the unseen regime after the last round.
    baselines : bool
        The final study also scores scratch DQN, static allocation and the
        autoscaler (a study computes them once per seed, in one arm).
    hyper : dict
        :class:`DQNHyper` values.
    """

    rl: str
    meta: bool = True
    train_regimes: tuple[str, ...] = ("steady-low", "diurnal-medium", "bursty-high")
    unseen_regime: str = "trace"
    steps_per_regime: int = 600
    num_rounds: int = 5
    hidden: int = 128
    layers: int = 3
    adapt_episodes: int = 20
    baselines: bool = True
    hyper: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg) -> "MetaSpec":
        from omegaconf import OmegaConf

        task = cfg.task
        rl = RLSpec(
            algo="ppo",  # one edge site per client, as tasks.rl's PPO agents (deployment and env helpers)
            scenario=str(cfg.twin.name),
            twin=json.dumps(OmegaConf.to_container(cfg.twin, resolve=True), sort_keys=True),
            episode_s=float(task.episode_s), steps_per_round=int(task.steps_per_regime) * len(task.train_regimes),
            num_clients=int(cfg.clients.num), seed=int(cfg.seed), federated=True, personal_head=False,
            local_mixer=False, use_forecast=bool(task.use_forecast), forecaster=str(task.forecaster),
            shield=True, faults=str(task.faults), background=str(task.background),
            eval_seeds=tuple(int(s) for s in task.eval_seeds), hidden=int(task.hidden),
            trace_dir=str(task.trace_dir) if task.trace_dir else None,
            devices=json.dumps(OmegaConf.to_container(cfg.devices, resolve=True), sort_keys=True),
        )
        return cls(
            rl=rl.to_json(), meta=bool(task.meta), train_regimes=tuple(str(r) for r in task.train_regimes),
            unseen_regime=str(task.unseen_regime), steps_per_regime=int(task.steps_per_regime),
            num_rounds=int(cfg.num_rounds), hidden=int(task.hidden), layers=int(task.layers),
            adapt_episodes=int(task.adapt_episodes), baselines=bool(task.baselines),
            hyper={k: float(v) for k, v in OmegaConf.to_container(task.hyper, resolve=True).items()},
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MetaSpec":
        raw = json.loads(text)
        raw["train_regimes"] = tuple(raw["train_regimes"])
        return cls(**raw)

    @property
    def base(self) -> RLSpec:
        return RLSpec.from_json(self.rl)

    @property
    def dqn(self) -> DQNHyper:
        return DQNHyper.from_dict(self.hyper)

    def regime(self, name: str) -> RLSpec:
        """The twin side with regime ``name``'s workload (``build_scenario`` of it is that twin)."""
        base = self.base
        twin = _twin_config(base.scenario, base.twin)  # the composed twin, or conf/twin/<name>.yaml
        twin["workload"] = {**twin.get("workload", {}), **REGIMES[name]}
        return replace(base, twin=json.dumps(twin, sort_keys=True))
