"""RL agents in the twin: PPO learns, the QMIX mixer is monotonic, weights
round-trip through Flower's ArrayRecord, the shield's output is feasible,
and the study helpers compute what they say (hand-computed numbers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from edgesim import Action, EdgeCloudTwin
from tasks.rl import deploy, ppo, qmix
from tasks.rl.server import rounds_to_fraction_of_best
from tasks.rl.spec import RLSpec, build_scenario, fault_list
from tasks.rl.task import deployed_state

torch.set_num_threads(1)
TINY = dict(episode_s=64.0, faults="none", background="hold")  # one node failure-free minute of the twin


# ------------------------------------------------------------------ PPO


def test_ppo_beats_a_random_policy_within_2560_seeded_steps():
    # Prepare: site 1 (a Xavier NX) of a 64-step episode; the untrained net
    # (near-uniform logits, CleanRL init) sampled is the random policy.
    spec = RLSpec(**TINY)
    env = ppo.make_site_env(spec, site=1)
    agent, untrained = ppo.build_agent(spec, seed=0), ppo.build_agent(spec, seed=0)
    hyper = ppo.PPOHyper(lr=1e-3, minibatch=128)
    held_out = [101, 102, 103]
    # Execute: 5 rounds x 512 steps of local PPO
    for round_seed in range(5):
        ppo.train_ppo(agent, env, 512, hyper, seed=round_seed)
    trained = np.mean([ppo.evaluate_site(agent, env, s, greedy=True)[0] for s in held_out])
    random = np.mean([ppo.evaluate_site(untrained, env, s, greedy=False)[0] for s in held_out])
    # Assert: returns are negative costs; trained is clearly better
    assert trained > random + 10.0, (trained, random)


def test_ppo_uses_torchrl_losses_and_updates_every_parameter():
    spec = RLSpec(**TINY)
    env = ppo.make_site_env(spec, site=0)
    agent = ppo.build_agent(spec, seed=1)
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    metrics = ppo.train_ppo(agent, env, 128, ppo.PPOHyper(minibatch=64, epochs=1), seed=0)
    assert all(not torch.equal(before[k], v) for k, v in agent.state_dict().items())
    assert {"train_loss_objective", "train_loss_critic", "train_loss_entropy", "train_return"} <= set(metrics)
    assert metrics["train_episodes"] == 2  # 128 steps = two 64-step episodes


# ------------------------------------------------------------------ QMIX


def test_qmix_mixer_is_monotonic_in_every_agent_q():
    # Prepare: random states and agent Q-values through the hypernetwork mixer
    torch.manual_seed(0)
    learner = qmix.QMixLearner(obs_dim=5, n_agents=4, num_ids=4, num_actions=3, hidden=16, mixer="qmix")
    chosen = torch.randn(256, 4, requires_grad=True)
    state = torch.randn(256, 20) * 3
    # Execute
    (grad,) = torch.autograd.grad(learner.q_tot(chosen, state).sum(), chosen)
    # Assert: dQ_tot/dQ_a >= 0 for every sample and agent (abs() on the hypernetwork weights)
    assert (grad >= 0).all()
    assert (grad > 0).any()


def test_vdn_is_the_sum_of_agent_qs():
    learner = qmix.QMixLearner(obs_dim=5, n_agents=3, num_ids=3, num_actions=2, mixer="vdn")
    chosen = torch.tensor([[1.0, -2.0, 0.5]], requires_grad=True)
    q_tot = learner.q_tot(chosen, torch.zeros(1, 15))
    assert q_tot.item() == pytest.approx(-0.5)  # 1 - 2 + 0.5
    (grad,) = torch.autograd.grad(q_tot.sum(), chosen)
    assert torch.equal(grad, torch.ones(1, 3))


def test_qmix_td_loss_hand_computed_with_vdn():
    # Prepare: 1 agent, 2 actions, a zeroed net whose last bias gives Q = (1, 3)
    learner = qmix.QMixLearner(obs_dim=2, n_agents=1, num_ids=1, num_actions=2, hidden=4, mixer="vdn")
    with torch.no_grad():
        for p in learner.parameters():
            p.zero_()
        learner.agent.net[4].bias.copy_(torch.tensor([1.0, 3.0]))
    batch = (torch.zeros(1, 1, 2), torch.tensor([[0]]), torch.tensor([0.5]), torch.zeros(1, 1, 2))
    # Execute
    loss = qmix.td_loss(learner, learner, batch, gamma=0.9)
    # Assert: y = 0.5 + 0.9 * max(1, 3) = 3.2; Q(s, a=0) = 1 -> (1 - 3.2)^2 = 4.84
    assert loss.item() == pytest.approx(4.84)


def test_qmix_round_trains_and_decays_epsilon():
    spec = RLSpec(algo="qmix", **TINY)
    env = qmix.make_cluster_env(spec, cluster=0)
    learner = qmix.build_learner(spec, seed=0)
    hyper = qmix.QMixHyper(warmup=32, eps_decay_steps=1000)
    metrics = qmix.train_qmix(learner, env, 128, hyper, seed=0, steps_before=500)
    assert metrics["train_epsilon"] == pytest.approx(1.0 + (628 / 1000) * (0.05 - 1.0))
    assert np.isfinite(metrics["train_td_loss"]) and metrics["train_episodes"] == 2


# ------------------------------------------------------ Flower ArrayRecord


@pytest.mark.parametrize("algo", ["ppo", "qmix"])
def test_parameters_round_trip_exactly_through_array_record(algo):
    spec = RLSpec(algo=algo, **TINY)
    model = ppo.build_agent(spec, seed=3) if algo == "ppo" else qmix.build_learner(spec, seed=3)
    state = model.state_dict()
    restored = ArrayRecord(state).to_torch_state_dict()
    assert list(restored) == list(state)
    assert all(torch.equal(restored[k], state[k]) and restored[k].dtype == state[k].dtype for k in state)
    # and through the wire format (bytes) of each Array
    record = ArrayRecord(state)
    again = ArrayRecord({k: type(a)(dtype=a.dtype, shape=a.shape, stype=a.stype, data=bytes(a.data))
                         for k, a in record.items()}).to_torch_state_dict()
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_deployed_state_keeps_the_personal_head_or_the_whole_local_model():
    global_state = {"actor.trunk.0.weight": 1, "actor.head.weight": 2, "critic.head.bias": 3}
    local_state = {"actor.trunk.0.weight": 10, "actor.head.weight": 20, "critic.head.bias": 30}
    shared = RLSpec(algo="ppo")
    personal = RLSpec(algo="ppo", personal_head=True)
    alone = RLSpec(algo="ppo", federated=False)
    assert deployed_state(shared, global_state, local_state) == global_state
    assert deployed_state(personal, global_state, local_state) == {
        "actor.trunk.0.weight": 1, "actor.head.weight": 20, "critic.head.bias": 30}
    assert deployed_state(alone, global_state, local_state) == local_state
    assert deployed_state(alone, global_state, None) == global_state  # round 1 starts from the global init


# ------------------------------------------------------------------ shield


def test_every_shielded_action_is_feasible():
    # Prepare: faults on (a node failure, a cloud outage) and wild random
    # actions; every projection the twin makes is checked where it happens
    # (inside step, after this step's faults are applied).
    spec = RLSpec(episode_s=120.0, faults="default")
    scenario = build_scenario(spec)
    twin = EdgeCloudTwin(scenario)
    twin.reset(5)
    rng = np.random.default_rng(0)
    region, project, checked = twin.shield.region_of_node, twin.shield.project, []

    def project_and_check(action, state):
        safe, counts = project(action, state)
        # Assert: bounds, simplex, no cloud while it is down, replicas within the limit, none on a dead node
        assert ((safe.admit >= 0) & (safe.admit <= 1)).all()
        assert (safe.placement >= 0).all() and np.allclose(safe.placement.sum(axis=1), 1.0)
        # (a cloud share on a node that admits nothing carries no request)
        assert (safe.admit * safe.placement[:, 2])[~state.cloud_up[region]].max(initial=0.0) == 0.0
        target = state.replicas + state.pending_total + safe.replica_delta
        assert (target >= 0).all() and (target <= twin.replica_limit()).all()
        assert (target[~state.alive] == 0).all()
        checked.append((bool((~state.alive).any()), bool((~state.cloud_up).any()), int(counts.sum())))
        return safe, counts

    twin.shield.project = project_and_check
    # Execute
    while not twin.done:
        twin.step(Action.from_env(rng.uniform(-3, 3, size=(twin.num_nodes, 6)), scenario.shield.max_replica_step))
    # Assert: every step was checked, faults happened, and the shield had work to do
    assert len(checked) == scenario.episode_steps
    assert any(dead for dead, _, _ in checked) and any(down for _, down, _ in checked)
    assert all(clipped > 0 for _, _, clipped in checked)


# ------------------------------------------------------------ study helpers


def test_fault_scenarios_keep_the_paper_proportions():
    # a 30-minute outage of a 6-hour run is 1/12 of it: 600 s -> 50 s, from the middle
    assert fault_list("outage30", 600.0, 1.0) == [{"type": "cloud_outage", "start_s": 300.0, "duration_s": 50.0}]
    assert fault_list("node20", 600.0, 1.0) == [{"type": "node_failure", "fraction": 0.2, "at_step": 200}]
    assert fault_list("loss10", 600.0, 1.0) == [{"type": "packet_loss", "rate": 0.1}]
    with pytest.raises(ValueError, match="unknown fault scenario 'quake'"):
        fault_list("quake", 600.0, 1.0)


def test_rounds_to_95_percent_of_best_hand_computed():
    # gap 0 -> best: -10 -> -2 (8); 95 % closes at -10 + 7.6 = -2.4: round 3 (-2.3)
    assert rounds_to_fraction_of_best([-10.0, -6.0, -3.0, -2.3, -2.0]) == 3
    assert rounds_to_fraction_of_best([-1.0, -2.0, -3.0]) == 0  # never improved


def test_policy_drift_is_total_variation():
    assert deploy.policy_drift([0.5, 0.5, 0.0], [0.25, 0.25, 0.5]) == pytest.approx(0.5)
    assert deploy.policy_drift([1.0, 0.0], [1.0, 0.0]) == 0.0


def test_learned_agents_and_baselines_share_one_evaluation_loop():
    from edgesim.baselines import ThresholdAutoscaler

    spec = RLSpec(algo="qmix", **TINY)
    scenario = build_scenario(spec)
    learned, dist = deploy.evaluate_deployment(spec, {0: qmix.build_learner(spec, seed=0)}, [1])
    heuristic = deploy.run_controlled_episode(scenario, ThresholdAutoscaler(), 1, np.arange(4))
    for metrics in (learned, heuristic):
        assert {"return", "p95_ms", "slo_violation_rate", "energy_j_per_request"} <= set(metrics)
        assert metrics["steps"] == 64
    assert dist.sum() == pytest.approx(1.0)


# ------------------------------------------------------------------ paper 001's control hierarchy


def test_hybrid_prior_adds_beta_times_the_mpc_proposal_to_the_logits():
    # Prepare: a policy head with zero weights, so the learned logits are 0; beta = 2
    head = ppo.PriorHead(inputs=4, hidden=8, outputs=2, weight=2.0)
    torch.nn.init.zeros_(head.head.weight), torch.nn.init.zeros_(head.head.bias)
    # Execute: the observation ends with the MPC's proposal one-hot (action 1)
    logits = head(torch.tensor([0.3, 0.1, 0.0, 1.0]))
    # Assert
    torch.testing.assert_close(logits, torch.tensor([0.0, 2.0]))


def test_a_control_spec_gives_the_esa_prices_modes_and_the_mpc_proposal():
    import json

    spec = RLSpec(**TINY, control=json.dumps({"enabled": True, "hybrid": True, "mode": "cost-cap"}))
    env = ppo.make_site_env(spec, site=0)
    obs, _ = env.reset(seed=0)
    names = env.observer.names
    assert names[-14 - 9:-14] == ("price_slice", "price_link", "alloc_slice", "alloc_link", "coa_phase",
                                  "mode[balanced]", "mode[energy-saver]", "mode[burst-absorber]", "mode[cost-cap]")
    assert obs[names.index("mode[cost-cap]")] == 1.0 and obs[-14:].sum() == 1.0  # one MPC proposal
    agent = ppo.build_agent(spec, seed=0)
    assert isinstance(agent.actor, ppo.PriorHead) and agent.actor.weight == 2.0
    scores, _ = deploy.evaluate_deployment(spec, {0: agent}, [3])
    assert scores["coa_decisions"] == 64 / 3 // 1 + 1  # steps 0, 3, ..., 63
    assert scores["control_cpu_us"] > 0


# ------------------------------------------------------------------ the learned COA team (control.coa: qmix)

COA_SPEC = dict(**TINY, control='{"enabled": true, "coa": "qmix"}')


def test_coa_td_target_hand_computed_through_the_qmix_mixer():
    # Prepare: 2 COAs, 12 menu actions; zeroed nets whose biases give Q_a = (1, 3, 0, ...) for both
    # agents and a mixer with Q_tot = elu(q_1 + q_2) + V: |w1| = 1, b1 = 0, |w_final| = 1/embed, V = 0.5
    from tasks.rl import coa

    team = coa.build_team(num_clusters=2, obs_dim=3, hidden=4, seed=0)
    with torch.no_grad():
        for p in team.parameters():
            p.zero_()
        team.agent.net[4].bias[:2] = torch.tensor([1.0, 3.0])
        team.mixer.hyper_w_1.bias.fill_(1.0)
        team.mixer.hyper_w_final.bias.fill_(1.0 / team.mixer.embed_dim)
        team.mixer.V[2].bias.fill_(0.5)
    # one window: both COAs chose row 0, the team reward (sum over clusters) 0.4
    batch = (torch.zeros(1, 2, 3), torch.tensor([[0, 0]]), torch.tensor([0.4]), torch.zeros(1, 2, 3))
    gamma = 0.985 ** 3  # per decision at k = 3
    # Execute
    loss = qmix.td_loss(team, team, batch, gamma)
    # Assert: Q_tot(s, (0, 0)) = elu(1 + 1) + 0.5 = 2.5; y = 0.4 + gamma (elu(3 + 3) + 0.5) = 0.4 + 6.5 gamma
    y = 0.4 + gamma * 6.5
    assert loss.item() == pytest.approx((2.5 - y) ** 2, rel=1e-5)


def test_the_coa_team_trains_on_its_window_rewards_inside_an_esa_round():
    # Prepare: PPO ESA on site 0, the COA team attached to its twin (k = 3)
    from tasks.rl import coa

    spec = RLSpec(**COA_SPEC)
    model = ppo.build_agent(spec, seed=0)
    coa.attach_team(model, coa.team_for(spec, seed=0))
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("coa.")}
    env = ppo.make_site_env(spec, site=0)
    trainer = coa.COATrainer(model.coa, env.twin.control.k, seed=0)
    trainer.attach(env.twin.control)
    # Execute: one 64-step episode by hand, then a 128-step PPO round (two more episodes)
    env.reset(seed=0)
    for _ in range(64):
        env.step(0)
    windows = trainer.replay.rewards[: trainer.replay.size].copy()
    closed = env.twin.control.coa_return.sum()  # (C,) summed over the closed windows, before the next reset
    ppo.train_ppo(model, env, 128, ppo.PPOHyper(minibatch=64, epochs=1), seed=0)
    # Assert: 22 decisions per episode (steps 0, 3, ..., 63); its 21 closed windows reach the replay, each
    # with the sum over clusters of the layer's COA reward, so they add up to the layer's COA return
    assert len(windows) == 21
    np.testing.assert_allclose(windows.sum(), closed, rtol=1e-5)
    assert trainer.decisions == 66 and trainer.replay.size == 63
    assert trainer.updates == 63 - coa.COA_HYPER.warmup + 1 and np.isfinite(trainer.metrics()["train_coa_td_loss"])
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)


@pytest.mark.parametrize("algo", ["ppo", "qmix"])
def test_coa_parameters_travel_in_the_model_record_and_are_federated(algo):
    from tasks.rl.task import build_model, local_prefixes

    spec = RLSpec(algo=algo, **COA_SPEC)
    state = build_model(spec, seed=3).state_dict()
    coa_keys = [k for k in state if k.startswith("coa.")]
    assert {"coa.agent.net.0.weight", "coa.mixer.hyper_w_1.weight"} <= set(coa_keys)
    restored = ArrayRecord(state).to_torch_state_dict()
    assert all(torch.equal(restored[k], state[k]) for k in state)
    # no local prefix catches them (a QMIX ESA's local mixer is "mixer.", not "coa.mixer.")
    local = local_prefixes(RLSpec(algo=algo, local_mixer=algo == "qmix", **COA_SPEC))
    assert not any(k.startswith(local) for k in coa_keys) if local else True
    glob = {k: torch.ones_like(v) for k, v in state.items()}
    kept = deployed_state(RLSpec(algo=algo, local_mixer=algo == "qmix", **COA_SPEC), glob, state)
    assert all(torch.equal(kept[k], glob[k]) for k in coa_keys)


def test_evaluation_drives_the_clusters_with_the_greedy_coa_team():
    from tasks.rl.task import build_model

    spec = RLSpec(**COA_SPEC)
    model = build_model(spec, seed=0)
    scores, _ = deploy.evaluate_deployment(spec, {0: model}, [3])
    assert scores["coa_decisions"] == 22
    obs = np.random.default_rng(0).uniform(0, 1, size=(model.coa.n_agents, 10))
    np.testing.assert_array_equal(deploy.deployed_coa(spec, {0: model})(obs, None), model.coa.greedy(np.log1p(obs)))
