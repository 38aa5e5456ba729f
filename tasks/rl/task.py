"""Federated RL in the edge-cloud twin: PPO edge-site agents or QMIX/VDN cluster agents.

PPO: each client is one edge site (node ``partition-id`` of the twin);
QMIX: each client is one edge cluster (cluster ``partition-id``). Everything
a client needs arrives in the ConfigRecord as ``rl-spec``
(:class:`tasks.rl.spec.RLSpec`), with the trained forecaster's bytes when the
observations use one.

What stays on the client lives in ``context.state`` (simulated clients are
re-created every round, Flower issue #2216; the context survives):

* ``personal_head`` (PPO) / ``local_mixer`` (QMIX): the local layers replace
  the global ones before training;
* ``federated: false`` (the non-federated MARL arm): the client ignores the
  global model after round 1 and continues from its own weights.

The reply always carries the full trained model, so the server can evaluate
what each site actually deploys. Training FLOPs (acting, GAE / TD targets,
updates) and the policy's bytes feed the virtual clock like any task's.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord
from omegaconf import DictConfig

from fl_common import protocol
from fl_common.costs import module_costs
from fl_common.local_layers import deployed
from tasks.base import ClientRound, LocalUpdate, ServerTask, Task
from tasks.rl.spec import RLSpec, install_forecaster

SPEC_KEY = "rl-spec"
FORECASTER_KEY = "rl-forecaster"  # ConfigRecord: a trained forecaster's bytes (task.forecaster=federated:...)
LOCAL_KEY = "rl-local"            # context.state: this client's last trained weights
ALGOS = ("ppo", "qmix")
MIXERS = ("qmix", "vdn")
BACKGROUNDS = ("heuristic", "hold")


class RLTask(Task):
    kind = "rl"
    uses_twin = True
    dp_sgd_refusal = ("DP-SGD bounds each training sample's influence; an RL update is computed from "
                      "one correlated trajectory of the client's own twin episodes, so there is no per-sample "
                      "unit for Opacus to clip and account")

    # ------------------------------------------------------------ config
    def validate(self, cfg: DictConfig) -> None:
        from edgesim import EdgeSimError
        from tasks.rl.density import DENSITY_SCENARIOS
        from tasks.rl.spec import FAULT_SCENARIOS, build_scenario, check_forecaster_name, check_hyper

        task = cfg.task
        _check(task.algo in ALGOS, f"task.algo={task.algo} is unknown: use {' or '.join(ALGOS)}")
        check_forecaster_name(str(task.forecaster))
        if task.algo == "qmix":
            _check(task.mixer in MIXERS, f"task.mixer={task.mixer} is unknown: use qmix or vdn")
        else:
            _check("mixer" not in task, f"task.mixer={task.get('mixer')} (+arm=vdn) needs task=qmix; "
                   f"task={task.name} has no mixer")
        _check(task.algo == "ppo" or "personal_head" not in task,
               f"task.personal_head=true (+arm=ph) needs task=ppo; task={task.name} keeps its mixer local "
               "instead (task.local_mixer)")
        scenarios = [*FAULT_SCENARIOS, *DENSITY_SCENARIOS]
        _check(task.faults == "default" or task.faults in scenarios,
               f"task.faults={task.faults} is unknown: use default or one of {', '.join(scenarios)}")
        _check(not task.get("centralised", False) or (task.algo == "ppo" and cfg.clients.num == 1),
               f"task.centralised=true (+arm=cml) is one centralised PPO learner: use task=ppo clients.num=1 "
               f"(got task={task.name} clients.num={cfg.clients.num}) and task.sites=<sites it learns from>")
        _check(not task.get("edge_only", False) or task.algo == "ppo",
               f"task.edge_only=true (+arm=eml) needs task=ppo; task={task.name}'s cluster agents have no edge-only menu")
        _check(isinstance(task.get("sites", 0), int) and task.get("sites", 0) >= 0,
               f"task.sites={task.get('sites')} is invalid: use 0 (= clients.num) or the number of sites")
        _check(task.background in BACKGROUNDS,
               f"task.background={task.background} is unknown: use {' or '.join(BACKGROUNDS)}")
        for key in ("steps_per_round", "hidden"):
            _check(isinstance(task[key], int) and not isinstance(task[key], bool) and task[key] >= 1,
                   f"task.{key}={task[key]} is invalid: use an integer >= 1")
        _check(_is_number(task.episode_s) and task.episode_s >= 10,
               f"task.episode_s={task.episode_s} is invalid: use at least 10 simulated seconds")
        _check(len(task.eval_seeds) >= 1, "task.eval_seeds is empty: give at least one held-out twin seed")
        _check_control(task)
        _check(task.federated or task.get("control") is None or task.control.get("coa", "rule") != "qmix",
               "task.control.coa=qmix (+arm=coaqmix) needs task.federated=true: one COA team drives every cluster "
               "of the evaluation twin, and without federation each client trains its own")
        spec = RLSpec.from_config(cfg)
        check_hyper(spec)
        _check(not cfg.privacy.secagg.enabled or (spec.federated and not spec.personal_head and not spec.local_mixer),
               f"privacy.secagg.enabled=true does not compose with task={task.name}'s local layers (personal head, "
               "local mixer or the non-federated arm): the server evaluates what each site deploys and SecAgg+ "
               "hides each client's model; use task.local_mixer=false / task.personal_head=false, or privacy=none")
        try:
            scenario = build_scenario(spec)
        except EdgeSimError as err:
            raise ValueError(f"twin={cfg.twin.name} with task.episode_s={task.episode_s}: {err}") from None
        units = scenario.num_nodes if task.algo == "ppo" else len(scenario.clusters)
        what = "edge nodes (one site per client)" if task.algo == "ppo" else "edge clusters (one cluster per client)"
        _check(cfg.clients.num <= units,
               f"clients.num={cfg.clients.num} is too many for task={task.name}: twin {cfg.twin.name} has {units} {what}")
        _check(spec.agent_sites <= units,
               f"task.sites={spec.sites} is too many: twin {cfg.twin.name} has {units} edge nodes")

    def tags(self, cfg: DictConfig) -> dict[str, str]:
        task = cfg.task
        return {
            "task": task.name, "kind": self.kind, "algo": task.algo, "arm": rl_arm(cfg),
            "federated": str(bool(task.federated)).lower(), "shield": str(bool(task.shield)).lower(),
            "use_forecast": str(bool(task.use_forecast)).lower(),
            "forecaster": str(task.forecaster) if task.use_forecast else "none",
            "faults": str(task.faults), "strategy": cfg.strategy.name, "clients": str(cfg.clients.num),
            "seed": str(cfg.seed),
        }

    def run_name(self, cfg: DictConfig) -> str:
        return f"{cfg.task.name}-{rl_arm(cfg)}-{cfg.strategy.name}-n{cfg.clients.num}-s{cfg.seed}"

    def prepare(self, cfg: DictConfig, tracking_uri: str) -> None:
        from tasks.rl.spec import forecaster_payload

        forecaster_payload(RLSpec.from_config(cfg), tracking_uri)  # a trained forecaster must load

    def summary_columns(self) -> dict[str, str]:
        return {"return": "eval_return", "SLO viol.": "eval_slo_violation_rate", "p95 ms": "eval_p95_ms",
                "J/req": "eval_energy_j_per_request"}

    # ------------------------------------------------------------ server
    def server(self, cfg: DictConfig, tracking_uri: str) -> ServerTask:
        from tasks.rl.server import RLServer

        return RLServer(cfg, tracking_uri)

    # ------------------------------------------------------------ client
    def train(self, arrays: ArrayRecord, run: ClientRound) -> LocalUpdate:
        """One round of local PPO (one site) or QMIX/VDN (one cluster); with ``control.coa: qmix``
        the COA team learns in the same twins, at its own cadence (:mod:`tasks.rl.coa`)."""
        from tasks.rl import ppo, qmix

        spec = _spec(run.config)
        model = build_model(spec, run.partition_id)
        model.load_state_dict(deployed_state(spec, arrays.to_torch_state_dict(), _local_state(run)))
        if spec.centralised:  # C-ML: the one learner pools every site's experience
            envs = [ppo.make_site_env(spec, site) for site in range(spec.agent_sites)]
        elif spec.algo == "ppo":
            envs = [ppo.make_site_env(spec, run.partition_id)]
        else:
            envs = [qmix.make_cluster_env(spec, run.partition_id)]
        trainer = _coa_trainer(spec, model, envs, run)
        if spec.algo == "ppo":  # one env: plain local PPO; C-ML pools them
            metrics = ppo.train_ppo_pooled(model, envs, spec.steps_per_round, ppo.PPOHyper.from_dict(spec.hyper),
                                           run.seed)
        else:
            metrics = qmix.train_qmix(model, envs[0], spec.steps_per_round, qmix.QMixHyper.from_dict(spec.hyper),
                                      run.seed, steps_before=(run.server_round - 1) * spec.steps_per_round)
        if trainer is not None:
            metrics.update(trainer.metrics())
        run.state[LOCAL_KEY] = ArrayRecord(model.state_dict())
        metrics = {k: v for k, v in metrics.items() if v == v}  # no NaN (e.g. no TD update yet) into MLflow
        return LocalUpdate(
            arrays=ArrayRecord(model.state_dict()),
            num_examples=spec.steps_per_round,  # FedAvg weighs clients by environment steps (one C-ML client: moot)
            train_flops=train_flops(spec, model),
            metrics=metrics,
        )

    def evaluate(self, arrays: ArrayRecord, run: ClientRound) -> dict[str, float]:
        """Federated evaluation: the policy this client would deploy, alone on its site/cluster."""
        from tasks.rl.deploy import evaluate_deployment

        spec = _spec(run.config)
        model = build_model(spec, run.partition_id)
        model.load_state_dict(deployed_state(spec, arrays.to_torch_state_dict(), _local_state(run)))
        scores, _ = evaluate_deployment(spec, {run.partition_id: model}, spec.eval_seeds[:1])
        return {"eval_return": scores["return"], "eval_slo_violation_rate": scores["slo_violation_rate"],
                protocol.NUM_EXAMPLES: 1}


def _coa_trainer(spec: RLSpec, model: torch.nn.Module, envs: list, run: ClientRound):
    """The learned COA team's trainer, attached to every training twin (None with the rule COA)."""
    from tasks.rl import coa

    if not coa.uses_learned_coa(spec):
        return None
    k = envs[0].twin.control.k
    decisions_before = (run.server_round - 1) * len(envs) * (spec.steps_per_round // k)
    trainer = coa.COATrainer(model.coa, k, run.seed, decisions_before)
    for env in envs:
        trainer.attach(env.twin.control)
    return trainer


def rl_arm(cfg: DictConfig) -> str:
    """Short name of the study arm: mafl / marl, plus the ablations that differ from the default."""
    task = cfg.task
    if task.get("centralised", False):
        return "cml"
    if task.get("edge_only", False):
        return "eml" if not task.federated else "mafl-edge"
    parts = ["mafl" if task.federated else "marl"]
    if float((cfg.get("twin") or {}).get("fairness", {}).get("lambda", 0.0)) > 0:
        parts.append("fair")
    if task.algo == "qmix" and task.mixer == "vdn":
        parts.append("vdn")
    if task.algo == "ppo" and task.personal_head:
        parts.append("ph")
    if not task.shield:
        parts.append("noshield")
    if not task.use_forecast:
        parts.append("nofc")
    if task.faults != "default":
        parts.append(str(task.faults))
    control = task.get("control")
    if control is not None and control.enabled:  # paper 001's hierarchy: +arm=ctl|noprice|costcap|hybrid
        parts.append("ctl")
        if not control.pricing:
            parts.append("noprice")
        if control.mode != "balanced" and control.mode != "schedule":
            parts.append(str(control.mode).replace("-", ""))
        if control.hybrid:
            parts.append("hybrid")
        if control.get("coa", "rule") == "qmix":  # +arm=coaqmix: the learned COA team
            parts.append("coaqmix")
    return "-".join(parts)


def _check_control(task: DictConfig) -> None:
    """``task.control`` must be a valid :class:`edgesim.control.ControlConfig` (one clear line)."""
    from omegaconf import OmegaConf

    from edgesim import EdgeSimError
    from edgesim.control import ControlConfig

    if task.get("control") is None:
        return
    try:
        ControlConfig.from_dict(OmegaConf.to_container(task.control, resolve=True))
    except EdgeSimError as err:
        raise ValueError(str(err)) from None


def build_model(spec: RLSpec, client: int = 0, seed: int | None = None) -> torch.nn.Module:
    """The spec's agent (PPO actor-critic, or the QMIX learner of cluster ``client``)."""
    from tasks.rl import coa, ppo, qmix

    model = ppo.build_agent(spec, seed=seed) if spec.algo == "ppo" else qmix.build_learner(spec, seed=seed, cluster=client)
    if coa.uses_learned_coa(spec):  # the COA team travels in the same record, under coa.*
        coa.attach_team(model, coa.team_for(spec, seed))
    return model


def local_prefixes(spec: RLSpec) -> tuple[str, ...]:
    """State-dict key prefixes that never take the global values."""
    from tasks.rl import ppo, qmix

    if spec.algo == "ppo" and spec.personal_head:
        return ppo.HEAD_PREFIXES
    if spec.algo == "qmix" and spec.local_mixer:
        return (qmix.MIXER_PREFIX,)
    return ()


def deployed_state(spec: RLSpec, global_state: dict, local_state: dict | None) -> dict:
    """The weights a client acts with: global, with its local parts (or all of it) kept."""
    if local_state is not None and not spec.federated:
        return dict(local_state)
    prefixes = local_prefixes(spec)
    return deployed(global_state, local_state, lambda key: bool(prefixes) and key.startswith(prefixes))


def train_flops(spec: RLSpec, model: torch.nn.Module) -> float:
    """FLOPs of one round of local training, counted on the agent's layers.

    PPO: acting and GAE run policy and value once per step (2 forward passes
    of the pair), then ``epochs`` passes over the rollout at forward + 2x
    backward. QMIX: every agent's Q-net acts once per step; every
    ``train_every`` steps one TD update on ``batch_size`` transitions runs the
    online nets forward + backward (3x) and the target nets forward (1x), per
    agent. The mixer's hypernetworks are small next to the agent nets and are
    left out.
    """
    from tasks.rl import ppo, qmix

    steps = spec.steps_per_round * (spec.agent_sites if spec.centralised else 1)
    if spec.algo == "ppo":
        hyper = ppo.PPOHyper.from_dict(spec.hyper)
        obs = model.actor.trunk[0].in_features
        per_obs = module_costs(model.actor, torch.zeros(1, obs))[0] + module_costs(model.critic, torch.zeros(1, obs))[0]
        return per_obs * steps * (2 + 3 * hyper.epochs) + coa_flops(spec, model, steps)
    hyper = qmix.QMixHyper.from_dict(spec.hyper)
    net = model.agent.net
    per_agent = module_costs(net, torch.zeros(1, net[0].in_features))[0]
    updates = steps // hyper.train_every
    return per_agent * model.n_agents * (steps + updates * hyper.batch_size * 4) + coa_flops(spec, model, steps)


def coa_flops(spec: RLSpec, model: torch.nn.Module, steps: int) -> float:
    """The learned COA team's share, counted as the ESA QMIX's: every decision (every k steps) the team
    net acts for each cluster, and one TD update per decision on ``batch_size`` transitions (4x forward)."""
    from tasks.rl import coa
    from tasks.rl.spec import control_config

    if not hasattr(model, "coa"):
        return 0.0
    team = model.coa
    net = team.agent.net
    per_agent = module_costs(net, torch.zeros(1, net[0].in_features))[0]
    decisions = steps // control_config(spec).coa_every
    return per_agent * team.n_agents * decisions * (1 + coa.COA_HYPER.batch_size * 4 / coa.COA_HYPER.train_every)


def _spec(config: ConfigRecord) -> RLSpec:
    """The run's spec, with its trained forecaster (if any) installed in this process."""
    spec = RLSpec.from_json(str(config[SPEC_KEY]))
    install_forecaster(spec, config[FORECASTER_KEY] if FORECASTER_KEY in config else None)
    return spec


def _local_state(run: ClientRound) -> dict | None:
    return run.state[LOCAL_KEY].to_torch_state_dict() if LOCAL_KEY in run.state else None


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
