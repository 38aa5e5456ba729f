"""Fault handling: reply screening, retries, fault injection, failure counts in MLflow.

Unit tests run on hand-made arrays and a fake Grid; the experiment tests use
the real ClientApp in-process (no Ray); one e2e test runs a real simulation.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import FedAvg
from mlflow.tracking import MlflowClient

from fl_clients import app as client_app
from fl_common.faults import FaultPlan, InjectedFault, corrupt, planned_fault
from fl_server.engine.reply_checks import check_update, screen_replies
from fl_server.engine.rounds import RoundDriver, RoundFailedError
from fl_server.experiments.config import compose_config
from fl_server.experiments.experiment import run_experiment
from tests.conftest import run_module, sqlite_uri
from tests.fake_grid import FakeGrid, arrays, ensure_task_identity, train_reply

GLOBAL = arrays([1.0, 2.0], [[3.0]])  # the model a round sends: a (2,) and a (1, 1) array


def _content(*values, num_examples=1, **metrics) -> RecordDict:
    return RecordDict({"arrays": arrays(*values), "metrics": MetricRecord({"num-examples": num_examples, **metrics})})


# --------------------------------------------------------------- screening
@pytest.mark.parametrize(
    ("update", "kind", "words"),
    [
        (([np.nan, 2.0], [[3.0]]), "nan", "array '0' has 1 non-finite"),
        (([1.0, 2.0], [[np.inf]]), "nan", "array '1' has 1 non-finite"),
        (([1.0, 2.0, 3.0], [[3.0]]), "shape", "array '0' has shape (3,), the global model (2,)"),
        (([1.0, 2.0],), "shape", "missing ['1']"),
        (([1.0, 2.0], [[3.0]], [0.0]), "shape", "unexpected ['2']"),
    ],
)
def test_an_update_that_cannot_be_aggregated_is_named(update, kind, words):
    found_kind, reason = check_update(_content(*update), GLOBAL)
    assert found_kind == kind and words in reason


def test_dtype_weight_and_metric_problems_are_rejected():
    as_float32 = RecordDict({"arrays": ArrayRecord([np.array([1.0, 2.0], np.float32), np.array([[3.0]])]),
                             "metrics": MetricRecord({"num-examples": 1})})
    assert check_update(as_float32, GLOBAL)[0] == "shape"
    assert check_update(_content([1.0, 2.0], [[3.0]], num_examples=0), GLOBAL)[0] == "shape"
    assert check_update(_content([1.0, 2.0], [[3.0]], train_loss=float("nan")), GLOBAL)[0] == "nan"
    assert check_update(_content([1.5, -2.0], [[0.0]]), GLOBAL) is None  # values may change, structure not


def test_screening_sorts_replies_into_accepted_errors_and_failures():
    ensure_task_identity()
    sent = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN) for n in (1, 2, 3, 4, 5)]
    for message in sent:  # ids, as Flower's Grid sets them when it pushes
        message.metadata.__dict__["_message_id"] = f"msg-{message.metadata.dst_node_id}"
    good = train_reply(arrays([0.0, 0.0], [[0.0]]), 1, node_id=1)
    nan = train_reply(arrays([np.nan, 0.0], [[0.0]]), 1, node_id=2)
    raised = _error_reply(3, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "boom")
    # the SuperLink answers for a node that stopped sending heartbeats, from its own node id (1)
    gone = _error_reply(4, ErrorCode.NODE_UNAVAILABLE, "node 4 is offline", request=sent[3], src=1)
    # node 5 never answers
    accepted, errors, failures = screen_replies(sent, [good, nan, raised, gone], GLOBAL, {1: 10, 2: 11, 5: 14})
    assert accepted == [good] and errors == [raised, gone]
    assert [(f.node_id, f.kind, f.partition_id) for f in failures] == [
        (2, "nan", 11), (3, "error", None), (4, "unavailable", None), (5, "timeout", 14)]
    assert failures[1].reason == "boom"


def _error_reply(node: int, code: int, reason: str, request: Message | None = None, src: int | None = None) -> Message:
    ensure_task_identity()
    request = request or Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    reply = Message(Error(code=code, reason=reason), reply_to=request)
    reply.metadata.__dict__["_src_node_id"] = node if src is None else src
    return reply


# ------------------------------------------------------------- the driver
def _driver(reply_fn, nodes=(1, 2, 3, 4), **kwargs):
    logged: list[tuple[int, list]] = []
    driver = RoundDriver(
        strategy=FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2),
        grid=FakeGrid(nodes, reply_fn),
        train_config=ConfigRecord({}),
        evaluate_fn=lambda r, a: {},
        on_round=lambda r, m: None,
        timeout_s=1.0,
        min_train=2,
        on_failures=lambda r, failures: logged.append((r, failures)),
        **kwargs,
    )
    return driver, logged


def test_nan_and_wrong_shape_updates_never_reach_aggregation():
    # Prepare: node 1 -> [0, 4] / [[1]] (n=1); node 2 -> [2, 0] / [[5]] (n=3);
    # node 3 NaN, node 4 a (3,) array. Weighted mean of 1 and 2:
    #   [(0*1 + 2*3) / 4, (4*1 + 0*3) / 4] = [1.5, 1.0];  [[(1*1 + 5*3) / 4]] = [[4.0]]
    updates = {1: (([0.0, 4.0], [[1.0]]), 1), 2: (([2.0, 0.0], [[5.0]]), 3),
               3: (([np.nan, 0.0], [[5.0]]), 1), 4: (([1.0, 2.0, 3.0], [[5.0]]), 1)}

    def reply(msg):
        values, n = updates[msg.metadata.dst_node_id]
        return train_reply(arrays(*values), n, node_id=msg.metadata.dst_node_id)

    driver, logged = _driver(reply, min_replies=2)
    # Execute
    result = driver.run_round(1, GLOBAL)
    # Assert
    new = result.arrays.to_numpy_ndarrays()
    np.testing.assert_allclose(new[0], [1.5, 1.0])
    np.testing.assert_allclose(new[1], [[4.0]])
    m = result.metrics
    assert (m["clients_replied"], m["clients_failed"], m["clients_failed_nan"], m["clients_failed_shape"]) == (2, 2, 1, 1)
    assert m["round_attempts"] == 1
    assert [(f.node_id, f.kind) for f in logged[0][1]] == [(3, "nan"), (4, "shape")]


def test_a_round_short_of_min_replies_is_retried_then_proceeds():
    # attempt 1: only node 1 replies usefully; attempt 2 (round-attempt=2): all do
    def reply(msg):
        node = msg.metadata.dst_node_id
        retry = int(msg.content["config"].get("round-attempt", 1)) > 1
        if node != 1 and not retry:
            return _error_reply(node, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "transient")
        return train_reply(arrays([float(node), 0.0], [[0.0]]), 1, node_id=node)

    driver, logged = _driver(reply, min_replies=3, round_retries=2)
    result = driver.run_round(1, GLOBAL)
    np.testing.assert_allclose(result.arrays.to_numpy_ndarrays()[0], [2.5, 0.0])  # mean of 1, 2, 3, 4
    assert result.metrics["round_attempts"] == 2
    assert result.metrics["clients_failed_error"] == 3  # attempt 1's failures are counted
    assert {f.attempt for f in logged[0][1]} == {1}


def test_a_round_that_stays_short_fails_the_run_after_bounded_retries():
    def reply(msg):
        return _error_reply(msg.metadata.dst_node_id, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "always")

    driver, logged = _driver(reply, min_replies=2, round_retries=2)
    with pytest.raises(RoundFailedError, match=r"round 1 failed after 3 attempt\(s\): 0 of 4 sampled clients"):
        driver.run_round(1, GLOBAL)
    assert len(driver.grid.sent) == 3 * 4  # 1 + 2 retries, 4 nodes each
    assert len(logged[0][1]) == 12  # every attempt's failures are recorded before failing


# -------------------------------------------------------- fault injection
def test_fault_plan_gives_disjoint_seeded_shares_of_the_partitions():
    plan = FaultPlan({"error": [0.1, 0.2, 0.5], "nan": 0.2}, seed=3)
    for server_round, errors in ((1, 1), (2, 2), (3, 5), (7, 5)):  # the last value holds
        failing = plan.faulty("error", server_round, 10)
        nan = plan.faulty("nan", server_round, 10)
        assert len(failing) == errors and len(nan) == 2 and not set(failing) & set(nan)
        assert [plan.fault_for(p, server_round, 10) for p in failing] == ["error"] * errors
    assert plan.faulty("error", 3, 10) == FaultPlan({"error": [0.1, 0.2, 0.5], "nan": 0.2}, seed=3).faulty("error", 3, 10)
    assert plan.faulty("error", 3, 10, attempt=2) != plan.faulty("error", 3, 10)  # a retry draws anew
    assert FaultPlan({"error": 0.15}).faulty("error", 1, 10) and len(FaultPlan({"error": 0.15}).faulty("error", 1, 10)) == 2


def test_corrupted_replies_hand_computed():
    plan = FaultPlan({"nan": 0.5}, scale_factor=-2.0)
    config = ConfigRecord({"faults": plan.to_json(), "server-round": 1})
    received, trained = arrays([1.0, 1.0], [[0.0]]), arrays([2.0, 0.0], [[1.0]])
    nan = corrupt("nan", config, trained, received).to_numpy_ndarrays()
    assert np.isnan(nan[0]).all() and nan[1][0, 0] == 1.0
    assert np.isposinf(corrupt("inf", config, trained, received).to_numpy_ndarrays()[0]).all()
    assert corrupt("shape", config, trained, received).to_numpy_ndarrays()[0].shape == (1,)
    # scale: received + (-2) * (trained - received) = [1 - 2, 1 + 2], [[0 - 2]]
    scaled = corrupt("scale", config, trained, received).to_numpy_ndarrays()
    np.testing.assert_allclose(scaled[0], [-1.0, 3.0])
    np.testing.assert_allclose(scaled[1], [[-2.0]])
    assert corrupt(None, config, trained, received) is trained
    assert planned_fault(ConfigRecord({"server-round": 1}), 0, 10) is None  # no plan, no fault


# ------------------------------------------- the experiment, real ClientApp
def in_process_client(num_partitions: int):
    """The real ClientApp in this process; an exception becomes an error reply, as in Flower."""

    def reply(message: Message) -> Message:
        node = message.metadata.dst_node_id
        context = Context(run_id=1, node_id=node, node_config={"partition-id": node, "num-partitions": num_partitions},
                          state=RecordDict(), run_config={})
        if message.metadata.message_type == MessageType.QUERY:
            return client_app.query(message, context)
        try:
            answer = client_app.train(message, context)
        except InjectedFault as err:
            answer = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(err)), reply_to=message)
        answer.metadata.__dict__["_src_node_id"] = node
        return answer

    return reply


def _only_run(uri: str):
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return client, runs[0]


def _history(client, run, key):
    return [m.value for m in client.get_metric_history(run.info.run_id, key)]


def test_failure_rates_of_10_20_and_50_percent_complete_and_are_counted(tracking_uri):
    # 10 clients; rounds 1, 2, 3 fail 10 %, 20 %, 50 % of them: 1, 2 and 5 clients
    cfg = compose_config(["clients.num=10", "num_rounds=3", "faults.fraction.error=[0.1,0.2,0.5]", "seed=2"])
    run_experiment(FakeGrid(range(10), in_process_client(10)), cfg, tracking_uri)
    client, run = _only_run(tracking_uri)
    assert run.info.status == "FINISHED"
    assert _history(client, run, "clients_failed_error") == [1.0, 2.0, 5.0]
    assert _history(client, run, "clients_replied") == [9.0, 8.0, 5.0]
    assert _history(client, run, "round_aggregated") == [1.0, 1.0, 1.0]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "failures")}
    assert artifacts == {"failures/round_001.csv", "failures/round_002.csv", "failures/round_003.csv"}
    text = client.download_artifacts(run.info.run_id, "failures/round_003.csv")
    with open(text) as f:
        lines = f.read().splitlines()
    assert len(lines) == 1 + 5 and "injected fault 'error' in round 3" in lines[1]


def test_nan_and_wrong_shape_updates_from_real_clients_are_rejected(tracking_uri):
    cfg = compose_config(["clients.num=10", "num_rounds=1", "faults.fraction.nan=0.1", "faults.fraction.inf=0.1",
                          "faults.fraction.shape=0.2"])
    final = run_experiment(FakeGrid(range(10), in_process_client(10)), cfg, tracking_uri)
    client, run = _only_run(tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["clients_failed_nan"] == 2 and run.data.metrics["clients_failed_shape"] == 2
    assert run.data.metrics["clients_replied"] == 6
    assert np.isfinite(final["test_accuracy"]) and final["test_accuracy"] > 0.3  # the aggregate stayed clean


def test_a_run_whose_rounds_keep_failing_is_marked_failed_with_the_reason(tracking_uri):
    cfg = compose_config(["clients.num=4", "num_rounds=2", "faults.fraction.error=1.0", "clients.round_retries=1"])
    with pytest.raises(RoundFailedError):
        run_experiment(FakeGrid(range(4), in_process_client(4)), cfg, tracking_uri)
    client, run = _only_run(tracking_uri)
    assert run.info.status == "FAILED"
    reason = run.data.tags["fc.failure_reason"]
    assert "round 1 failed after 2 attempt(s)" in reason and "8 error" in reason
    assert "failures/round_001.csv" in {a.path for a in client.list_artifacts(run.info.run_id, "failures")}


# ------------------------------------------------ a real simulation (Ray)
@pytest.mark.e2e
def test_failure_rates_in_a_real_simulation_are_counted_in_mlflow(tmp_path):
    uri = sqlite_uri(tmp_path)
    result = run_module(
        "fl_server.runtime.launch", "clients.num=10", "num_rounds=3", "faults.fraction.error=[0.1,0.2,0.5]",
        "faults.fraction.nan=0.1", env={"MLFLOW_TRACKING_URI": uri}, timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client, run = _only_run(uri)
    assert run.info.status == "FINISHED"
    assert _history(client, run, "clients_failed_error") == [1.0, 2.0, 5.0]
    assert _history(client, run, "clients_failed_nan") == [1.0, 1.0, 1.0]
    assert _history(client, run, "clients_replied") == [8.0, 7.0, 4.0]
