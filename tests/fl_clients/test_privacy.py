"""Differential privacy: DP-SGD with Opacus and per-client epsilon budgets
(fl_clients/privacy.py), Flower's central-DP wrappers (strategies/central_dp.py)
and the configuration checks (fl_server/config.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fl_clients import privacy
from fl_server.experiments.config import ConfigError, compose_config
from fl_server.experiments.experiment import run_experiment
from strategies.central_dp import CentralDP, wrap_central_dp
from tests.conftest import run_module
from tests.fake_grid import FakeGrid, ensure_task_identity
from tests.fl_clients.privacy_helpers import history, only_run, stateful_clients

DELTA = 1e-5


def opacus_epsilon(sigma: float, rate: float, steps: int, delta: float = DELTA) -> float:
    """Opacus's own RDP accountant, fresh, for one (sigma, q, steps) entry."""
    accountant = RDPAccountant()
    accountant.history = [(sigma, rate, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return accountant.get_epsilon(delta)


def tiny_task(n: int = 64, seed: int = 0):
    """A 4-feature, 2-class problem and a linear model: DP-SGD in milliseconds."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 2), x, y


def persisted(state: RecordDict) -> RecordDict:
    """``context.state`` as Flower stores it between rounds (serialised)."""
    return recorddict_from_proto(recorddict_to_proto(state))


# ---------------------------------------------------------------- accounting
def test_epsilon_after_n_rounds_equals_opacus_rdp_accountant():
    # Prepare: 64 samples, batch 16 -> q = 1/4, 4 steps per round; 3 rounds
    settings = privacy.DPSettings(noise_multiplier=1.1, max_grad_norm=1.0, delta=DELTA, total_rounds=3)
    state = RecordDict()
    reported = []
    # Execute: a new model object each round (clients are re-created), the
    # accountant only lives in the (serialised) state
    for server_round in range(3):
        model, x, y = tiny_task()
        outcome = privacy.train_private(model, x, y, torch.nn.CrossEntropyLoss(), epochs=1, batch_size=16,
                                        lr=0.1, momentum=0.0, seed=server_round, settings=settings, state=state)
        state = persisted(state)
        reported.append(outcome.epsilon)
    # Assert: after N rounds = Opacus's accountant for sigma 1.1, q 0.25, 4N steps
    assert privacy.sample_rate(64, 16) == 0.25 and privacy.steps_per_round(64, 16, 1) == 4
    for rounds, epsilon in enumerate(reported, start=1):
        assert epsilon == pytest.approx(opacus_epsilon(1.1, 0.25, 4 * rounds), abs=1e-6)
    assert privacy.load_accountant(state).history == [(1.1, 0.25, 12)]


def test_target_epsilon_mode_plans_sigma_with_opacus_for_the_whole_run():
    # Prepare: 5 rounds of 4 steps at q = 1/4 must spend at most epsilon 3
    settings = privacy.DPSettings(noise_multiplier=0.0, max_grad_norm=1.0, delta=DELTA,
                                  target_epsilon=3.0, total_rounds=5)
    expected_sigma = get_noise_multiplier(target_epsilon=3.0, target_delta=DELTA, sample_rate=0.25,
                                          steps=20, accountant="rdp", epsilon_tolerance=0.01)
    state = RecordDict()
    # Execute
    for server_round in range(5):
        model, x, y = tiny_task()
        outcome = privacy.train_private(model, x, y, torch.nn.CrossEntropyLoss(), epochs=1, batch_size=16,
                                        lr=0.1, momentum=0.0, seed=server_round, settings=settings, state=state)
        assert not outcome.declined
    # Assert
    assert outcome.noise_multiplier == expected_sigma
    assert outcome.epsilon == pytest.approx(opacus_epsilon(expected_sigma, 0.25, 20), abs=1e-6)
    assert 3.0 - 0.01 <= outcome.epsilon <= 3.0


def test_a_client_over_budget_declines_without_training_and_says_so():
    # Prepare: one round (4 steps, sigma 1.1) costs opacus_epsilon(1.1, 0.25, 4);
    # a budget just below it forbids the first round
    first_round = opacus_epsilon(1.1, 0.25, 4)
    settings = privacy.DPSettings(noise_multiplier=1.1, max_grad_norm=1.0, delta=DELTA,
                                  epsilon_budget=first_round - 1e-3)
    model, x, y = tiny_task()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = RecordDict()
    # Execute
    outcome = privacy.train_private(model, x, y, torch.nn.CrossEntropyLoss(), epochs=1, batch_size=16,
                                    lr=0.1, momentum=0.0, seed=0, settings=settings, state=state)
    ensure_task_identity()
    request = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=3, message_type=MessageType.TRAIN)
    reply = privacy.declined_reply(request, outcome, partition_id=3, server_round=1)
    # Assert
    assert outcome.declined and outcome.epsilon == 0.0 and outcome.steps == 0
    assert outcome.epsilon_next == pytest.approx(first_round, abs=1e-9)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not trained
    assert privacy.ACCOUNTANT_KEY not in state  # nothing spent
    metrics = reply.content["metrics"]
    assert len(reply.content["arrays"]) == 0
    assert metrics["dp_declined"] == 1 and metrics["num-examples"] == 0 and metrics["partition-id"] == 3
    assert privacy.is_declined(reply)


def test_budget_exhaustion_stops_that_client_and_nothing_else(tracking_uri):
    # Prepare: 4 clients of 950 samples, batch 32 -> q = 1/30, 30 steps a round,
    # sigma 1. Client 1's budget lies between what 1 and 2 rounds cost, so it
    # trains in round 1 and declines from round 2 on; the others have no cap.
    one, two, three = (opacus_epsilon(1.0, 1 / 30, 30 * r) for r in (1, 2, 3))
    budget = (one + two) / 2
    cfg = compose_config(["num_rounds=3", "clients.num=4", "seed=1", "privacy=dpsgd",
                          "privacy.dpsgd.epsilon_budget=null", f"privacy.dpsgd.client_budgets={{1:{budget}}}"])
    # Execute
    final = run_experiment(FakeGrid(range(4), stateful_clients(4)), cfg, tracking_uri)
    # Assert
    client, run = only_run(tracking_uri)
    assert run.info.status == "FINISHED"
    assert history(client, run, "clients_declined") == [0, 1, 1]
    assert history(client, run, "clients_replied") == [4, 4, 4]
    assert history(client, run, "clients_failed") == [0, 0, 0]
    assert history(client, run, "updates_applied") == [4, 3, 3]
    assert history(client, run, "epsilon_p1") == pytest.approx([one, one, one], abs=1e-6)
    for partition in (0, 2, 3):
        assert history(client, run, f"epsilon_p{partition}") == pytest.approx([one, two, three], abs=1e-6)
    assert history(client, run, "epsilon_max") == pytest.approx([one, two, three], abs=1e-6)
    assert history(client, run, "epsilon_mean") == pytest.approx(
        [one, (3 * two + one) / 4, (3 * three + one) / 4], abs=1e-6)
    accuracy = history(client, run, "test_accuracy")
    assert accuracy[3] > accuracy[0] and final["test_accuracy"] > 0.2  # the others still learn


# ---------------------------------------------------------------- central DP
@pytest.mark.parametrize(
    ("mode", "flower_class"),
    [
        ("server-fixed", DifferentialPrivacyServerSideFixedClipping),
        ("server-adaptive", DifferentialPrivacyServerSideAdaptiveClipping),
        ("client-fixed", DifferentialPrivacyClientSideFixedClipping),
        ("client-adaptive", DifferentialPrivacyClientSideAdaptiveClipping),
    ],
)
def test_central_dp_mode_selects_flowers_wrapper(mode, flower_class):
    # Prepare: 10 clients, fraction 0.5 -> 5 sampled per round
    cfg = compose_config(["privacy=central", f"privacy.central.mode={mode}", "clients.fraction_train=0.5",
                          "privacy.central.noise_multiplier=0.3", "privacy.central.clipping_norm=2.0"])
    # Execute
    wrapped = wrap_central_dp(FedAvg(), cfg)
    # Assert
    assert isinstance(wrapped, CentralDP) and isinstance(wrapped.wrapper, flower_class)
    assert wrapped.wrapper.num_sampled_clients == 5 and wrapped.wrapper.clipping_norm == 2.0


def test_no_central_dp_leaves_the_strategy_alone():
    strategy = FedAvg()
    assert wrap_central_dp(strategy, compose_config([])) is strategy


def test_central_dp_noise_and_clipping_parameters_are_logged(tracking_uri):
    # Prepare: sigma 0.2, C 0.5, 4 of 4 clients -> Flower's noise std = sigma * C / m = 0.025
    cfg = compose_config(["num_rounds=2", "clients.num=4", "seed=1", "privacy=central",
                          "privacy.central.mode=client-fixed", "privacy.central.noise_multiplier=0.2",
                          "privacy.central.clipping_norm=0.5"])
    # Execute
    run_experiment(FakeGrid(range(4), stateful_clients(4)), cfg, tracking_uri)
    # Assert
    client, run = only_run(tracking_uri)
    assert history(client, run, "central_dp_noise_std") == pytest.approx([0.025, 0.025])
    assert history(client, run, "central_dp_clip_norm") == [0.5, 0.5]
    assert history(client, run, "clients_failed") == [0, 0]  # the mod ran on every client
    assert run.data.params["privacy.central.mode"] == "client-fixed"


def _train_message(config: dict) -> Message:
    ensure_task_identity()
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(2, np.float32))}), "config": ConfigRecord(config)})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def _trained_to(values, **metrics):
    def call_next(msg: Message, ctxt: Context) -> Message:
        content = RecordDict({"arrays": ArrayRecord({"w": Array(np.asarray(values, np.float32))}),
                              "metrics": MetricRecord({"num-examples": 10, **metrics})})
        return Message(content, reply_to=msg)

    return call_next


def test_client_clipping_mod_clips_only_when_the_run_uses_it():
    # Prepare: an update of [3, 4] (norm 5) from a model of zeros
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    configured = _train_message({privacy.CENTRAL_MODE_KEY: "client-fixed", "clipping_norm": 1.0})
    plain = _train_message({"lr": 0.1})
    # Execute
    clipped = privacy.central_clipping_mod(configured, context, _trained_to([3.0, 4.0]))
    untouched = privacy.central_clipping_mod(plain, context, _trained_to([3.0, 4.0]))
    declined = privacy.central_clipping_mod(configured, context, _trained_to([3.0, 4.0], dp_declined=1))
    # Assert: clipped to norm 1 -> [0.6, 0.8]; the others pass through
    assert clipped.content["arrays"]["w"].numpy() == pytest.approx([0.6, 0.8])
    assert untouched.content["arrays"]["w"].numpy().tolist() == [3.0, 4.0]
    assert declined.content["arrays"]["w"].numpy().tolist() == [3.0, 4.0]


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy=dpsgd", "privacy.dpsgd.noise_multiplier=-0.5"], r"privacy.dpsgd.noise_multiplier=-0.5 is invalid: "
         r"the noise multiplier must be >= 0"),
        (["privacy=central", "privacy.central.noise_multiplier=-1"], r"privacy.central.noise_multiplier=-1 is invalid"),
        (["privacy=dpsgd", "privacy.dpsgd.max_grad_norm=0"], r"privacy.dpsgd.max_grad_norm=0 is invalid: "
         r"the per-sample clipping norm must be > 0"),
        (["privacy=central", "privacy.central.clipping_norm=-1.0"], r"privacy.central.clipping_norm=-1.0 is invalid: "
         r"the clipping norm must be > 0"),
        (["privacy=dpsgd", "privacy.dpsgd.delta=0"], r"privacy.dpsgd.delta=0 is invalid: delta must lie in \(0, 1\)"),
        (["privacy=dpsgd", "privacy.dpsgd.delta=1.5"], r"privacy.dpsgd.delta=1.5 is invalid"),
        (["privacy=dpsgd", "privacy.dpsgd.epsilon_budget=0"], r"privacy.dpsgd.epsilon_budget=0 is invalid: "
         r"an epsilon must be > 0"),
        (["privacy=dpsgd", "privacy.dpsgd.client_budgets={2:-1}"], r"privacy.dpsgd.client_budgets\[2\]=-1 is invalid"),
        (["privacy=dpsgd", "privacy.dpsgd.target_epsilon=-3"], r"privacy.dpsgd.target_epsilon=-3 is invalid"),
        (["compression=topk8", "compression.k=0"], r"compression.k=0 is invalid: the top-k fraction must lie in \(0, 1\]"),
        (["compression=topk8", "compression.k=1.2"], r"compression.k=1.2 is invalid"),
        (["compression=topk8", "compression.quantise_bits=16"], r"compression.quantise_bits=16 is invalid"),
    ],
)
def test_bad_privacy_and_compression_input_gives_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy=secagg", "strategy=ass"], r"does not compose with strategy=ass"),
        (["privacy=secagg", "compression=topk8"], r"does not compose with compression=topk8"),
        (["privacy=secagg", "privacy.central.mode=server-fixed"], r"does not compose with privacy.central.mode=server-fixed"),
        (["privacy=secagg", "devices.deadline_s=0.1"], r"needs synchronous rounds"),
        (["privacy=central", "privacy.central.mode=client-fixed", "compression=topk8"], r"does not compose with compression"),
        (["privacy=central", "strategy=staleness_clustered"], r"does not compose with strategy=staleness_clustered"),
        (["privacy=dpsgd", "privacy.dpsgd.noise_multiplier=0"], r"without noise epsilon is infinite"),
    ],
)
def test_combinations_that_cannot_work_are_refused_with_the_reason(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(overrides)


def test_the_launcher_reports_bad_privacy_input_in_one_line_with_exit_2():
    result = run_module("fl_server.runtime.launch", "privacy=dpsgd", "privacy.dpsgd.delta=2", timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stdout.splitlines() + result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("error: privacy.dpsgd.delta=2 is invalid: delta must lie in (0, 1)")


def test_default_run_sends_no_privacy_or_compression_keys():
    from fl_server.experiments.experiment import train_config

    cfg = compose_config([])
    keys = set(train_config(cfg).keys())
    assert not {k for k in keys if k.startswith(("dp-", "compress-", "central-dp"))}
