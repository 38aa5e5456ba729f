"""Federated DQN + first-order MAML allocators in the twin (paper 002), ``task.kind == metarl``.

Each client is one edge site (node ``partition-id`` of the twin). Each round
it collects epsilon-greedy episodes on its site under every training regime
(:data:`tasks.metarl.spec.REGIMES`) and either meta-trains the Q-network with
FOMAML (``task.meta: true``) or trains it as a plain DQN on the same data
(the reactive arm); the server averages the clients' weights (FedAvg), so
the global Q-network is a federated meta-initialisation. What a client
needs arrives as ``metarl-spec`` (:class:`tasks.metarl.spec.MetaSpec`), with
the trained forecaster's bytes when the observations use a federated one.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord
from omegaconf import DictConfig

from fl_common import protocol
from fl_common.costs import module_costs
from tasks.base import ClientRound, LocalUpdate, ServerTask, Task

SPEC_KEY = "metarl-spec"
FORECASTER_KEY = "metarl-forecaster"
BACKGROUNDS = ("heuristic", "hold")
INTEGER_KEYS = ("steps_per_regime", "hidden", "layers", "adapt_episodes")


class MetaRLTask(Task):
    kind = "metarl"
    uses_twin = True
    dp_sgd_refusal = ("DP-SGD bounds each training sample's influence; a DQN / FOMAML update is computed from "
                      "correlated replay of the client's own twin episodes, so there is no per-sample unit for "
                      "Opacus to clip and account")

    # ------------------------------------------------------------ config
    def validate(self, cfg: DictConfig) -> None:
        from edgesim import EdgeSimError
        from tasks.metarl.spec import REGIMES, MetaSpec
        from tasks.rl.spec import FAULT_SCENARIOS, build_scenario, check_forecaster_name

        task = cfg.task
        known = ", ".join(REGIMES)
        _check(len(task.train_regimes) >= 1, f"task.train_regimes is empty: give at least one of {known}")
        for name in list(task.train_regimes) + [task.unseen_regime]:
            _check(name in REGIMES, f"task regime {name} is unknown: use one of {known} (tasks/metarl/spec.py)")
        _check(task.unseen_regime not in task.train_regimes,
               f"task.unseen_regime={task.unseen_regime} is also a training regime: the adaptation study needs a "
               f"regime the meta-training never saw; take it out of task.train_regimes")
        for key in ("meta", "baselines", "use_forecast"):
            _check(isinstance(task[key], bool), f"task.{key}={task[key]} is invalid: use true or false")
        for key in INTEGER_KEYS:
            _check(isinstance(task[key], int) and not isinstance(task[key], bool) and task[key] >= 1,
                   f"task.{key}={task[key]} is invalid: use an integer >= 1")
        _check(isinstance(task.episode_s, (int, float)) and not isinstance(task.episode_s, bool) and task.episode_s >= 10,
               f"task.episode_s={task.episode_s} is invalid: use at least 10 simulated seconds")
        _check(task.background in BACKGROUNDS,
               f"task.background={task.background} is unknown: use {' or '.join(BACKGROUNDS)}")
        _check(task.faults == "default" or task.faults in FAULT_SCENARIOS,
               f"task.faults={task.faults} is unknown: use default or one of {', '.join(FAULT_SCENARIOS)}")
        _check(len(task.eval_seeds) >= 1, "task.eval_seeds is empty: give at least one held-out twin seed")
        check_forecaster_name(str(task.forecaster))
        spec = MetaSpec.from_config(cfg)
        hyper = spec.dqn  # unknown task.hyper keys are refused here
        _check(hyper.inner_steps >= 0 and hyper.meta_iterations >= 1 and hyper.batch_size >= 1,
               f"task.hyper.meta_iterations={hyper.meta_iterations}, inner_steps={hyper.inner_steps}, "
               f"batch_size={hyper.batch_size}: use meta_iterations >= 1, inner_steps >= 0, batch_size >= 1")
        _check(0.0 < hyper.gamma <= 1.0, f"task.hyper.gamma={hyper.gamma} is invalid: use a discount in (0, 1]")
        for key in ("lr", "inner_lr", "adapt_lr"):
            _check(getattr(hyper, key) > 0, f"task.hyper.{key}={getattr(hyper, key)} is invalid: use a step size > 0")
        _check(0.0 <= hyper.eps_end <= hyper.eps_start <= 1.0,
               f"task.hyper.eps_start={hyper.eps_start}, eps_end={hyper.eps_end}: need 0 <= eps_end <= eps_start <= 1")
        _check(task.steps_per_regime >= hyper.batch_size,
               f"task.steps_per_regime={task.steps_per_regime} is below task.hyper.batch_size={hyper.batch_size}: "
               "a regime's replay must hold one batch")
        try:
            scenario = build_scenario(spec.regime(spec.unseen_regime))
        except EdgeSimError as err:
            raise ValueError(f"twin={cfg.twin.name} with task.episode_s={task.episode_s}: {err}") from None
        _check(cfg.clients.num <= scenario.num_nodes,
               f"clients.num={cfg.clients.num} is too many for task={task.name}: twin {cfg.twin.name} has "
               f"{scenario.num_nodes} edge nodes (one site per client)")

    def tags(self, cfg: DictConfig) -> dict[str, str]:
        task = cfg.task
        return {"task": task.name, "kind": self.kind, "arm": arm(cfg), "meta": str(bool(task.meta)).lower(),
                "unseen_regime": str(task.unseen_regime), "forecaster": str(task.forecaster) if task.use_forecast
                else "none", "bandwidth_fluctuation": str(cfg.devices.get("bandwidth_fluctuation", 0.0)),
                "strategy": cfg.strategy.name, "clients": str(cfg.clients.num), "seed": str(cfg.seed)}

    def run_name(self, cfg: DictConfig) -> str:
        return f"{cfg.task.name}-{arm(cfg)}-{cfg.strategy.name}-n{cfg.clients.num}-s{cfg.seed}"

    def prepare(self, cfg: DictConfig, tracking_uri: str) -> None:
        from tasks.metarl.spec import MetaSpec
        from tasks.rl.spec import forecaster_payload

        forecaster_payload(MetaSpec.from_config(cfg).base, tracking_uri)  # a trained forecaster must load

    def summary_columns(self) -> dict[str, str]:
        return {"steps to stable": "adapt_steps_to_stable", "adapted return": "adapt_final_return",
                "latency ms": "adapted_mean_latency_ms", "GPU util.": "adapted_gpu_util"}

    # ------------------------------------------------------------ server
    def server(self, cfg: DictConfig, tracking_uri: str) -> ServerTask:
        from tasks.metarl.server import MetaRLServer

        return MetaRLServer(cfg, tracking_uri)

    # ------------------------------------------------------------ client
    def train(self, arrays: ArrayRecord, run: ClientRound) -> LocalUpdate:
        """One round of FOMAML (or reactive DQN) on this client's site, in every training regime."""
        from tasks.metarl import dqn

        torch.set_num_threads(1)
        spec = _spec(run.config)
        qnet = dqn.build_qnet(spec)
        qnet.load_state_dict(arrays.to_torch_state_dict())
        metrics = dqn.train_round(qnet, spec, run.partition_id, run.server_round, run.seed)
        steps = spec.steps_per_regime * len(spec.train_regimes)
        return LocalUpdate(arrays=ArrayRecord(qnet.state_dict()), num_examples=steps,
                           train_flops=train_flops(spec, qnet), metrics=metrics)

    def evaluate(self, arrays: ArrayRecord, run: ClientRound) -> dict[str, float]:
        """Federated evaluation: one greedy episode of the global Q-network on this site, unseen regime."""
        import numpy as np

        from tasks.metarl import dqn

        spec = _spec(run.config)
        qnet = dqn.build_qnet(spec)
        qnet.load_state_dict(arrays.to_torch_state_dict())
        env = dqn.site_env(spec.regime(spec.unseen_regime), run.partition_id)
        episode = dqn.collect(env, qnet, env.twin.scenario.episode_steps, 0.0, np.random.default_rng(run.seed))
        return {"eval_return": float(episode.episode_returns[0]), protocol.NUM_EXAMPLES: 1}


def arm(cfg: DictConfig) -> str:
    """``fomaml`` (meta-learned) or ``reactive`` (plain DQN), plus ``fluct`` under fluctuating bandwidth."""
    name = "fomaml" if cfg.task.meta else "reactive"
    return name + ("-fluct" if float(cfg.devices.get("bandwidth_fluctuation", 0.0)) > 0 else "")


def train_flops(spec, qnet) -> float:
    """FLOPs of one round: a Q-network forward per environment step; per TD step, the batch through the
    online network forward + backward (3x) and the target network forward (1x). FOMAML's inner copies
    cost the same TD steps (counted in :func:`tasks.metarl.dqn.gradient_steps`)."""
    from tasks.metarl.dqn import gradient_steps

    per_sample = module_costs(qnet.net, torch.zeros(1, qnet.net[0].in_features))[0]
    steps = spec.steps_per_regime * len(spec.train_regimes)
    return per_sample * (steps + gradient_steps(spec) * spec.dqn.batch_size * 4)


def _spec(config: ConfigRecord):
    from tasks.metarl.spec import MetaSpec
    from tasks.rl.spec import install_forecaster

    spec = MetaSpec.from_json(str(config[SPEC_KEY]))
    install_forecaster(spec.base, config[FORECASTER_KEY] if FORECASTER_KEY in config else None)
    return spec


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
