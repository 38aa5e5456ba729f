"""Update compression (fl_clients/compression.py, fl_server/comm.py): top-k +
8-bit quantisation round trips within their bound, error feedback carries the
residual, and the bytes logged are the serialised payloads."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, RecordDict

from fl_common import compression as comp
from fl_server.experiments.config import compose_config
from fl_server.experiments.experiment import run_experiment
from tests.fake_grid import FakeGrid
from tests.fl_clients.privacy_helpers import history, only_run, stateful_clients

SETTINGS = comp.CompressionSettings(k=0.1, bits=8, error_feedback=True)


def test_top_k_keeps_the_largest_magnitudes_in_index_order():
    # Prepare: 10 entries, k = 0.3 keeps ceil(3.0) = 3 of them
    x = np.array([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 4.0, 0.05, -0.01, 1.0], dtype=np.float32)
    # Execute
    kept = comp.top_k_indices(x, 0.3)
    # Assert: |-5|, |4|, |3| at positions 1, 6, 3, listed in index order
    assert kept.tolist() == [1, 3, 6]
    assert comp.kept_count(10, 0.3) == 3 and comp.kept_count(10, 0.01) == 1  # at least one entry


def test_quantiser_is_exact_on_its_grid_and_within_half_a_step_elsewhere():
    # Prepare: 2 bits = 4 levels on [0, 3] -> step 1, so 0, 1, 2, 3 are exact
    on_grid = np.array([0.0, 1.0, 2.0, 3.0], dtype=np.float32)
    off_grid = np.array([-1.0, 0.26, 0.74, 1.0], dtype=np.float32)  # step 2/3
    # Execute
    codes, low_step = comp.quantise(on_grid, bits=2)
    back = comp.dequantise(*comp.quantise(off_grid, bits=2))
    # Assert
    assert codes.tolist() == [0, 1, 2, 3] and low_step.tolist() == [0.0, 1.0]
    assert comp.dequantise(codes, low_step).tolist() == [0.0, 1.0, 2.0, 3.0]
    # -1 -> code 0; 0.26 -> code round(1.89) = 2 -> 1/3; 0.74 -> code round(2.61) = 3 -> 1
    assert back == pytest.approx([-1.0, 1 / 3, 1.0, 1.0], abs=1e-6)
    assert np.abs(back - off_grid).max() <= (2 / 3) / 2 + 1e-6


def test_round_trip_error_is_within_the_bound_of_top_k_and_8_bit_quantisation():
    # Prepare: model-sized random tensors (the SmallCNN's shapes)
    rng = np.random.default_rng(0)
    delta = {"conv.w": rng.normal(0, 0.01, (16, 1, 5, 5)).astype(np.float32),
             "fc.w": rng.normal(0, 0.01, (160, 512)).astype(np.float32),
             "fc.b": rng.normal(0, 0.01, (160,)).astype(np.float32)}
    # Execute
    record, decoded = comp.round_trip(delta, SETTINGS)
    # Assert, per tensor: dropped entries cost at most (1 - kept/n) of the energy
    # (they are the smallest), kept ones at most half a quantisation step each
    for name, x in delta.items():
        flat, back = x.ravel(), decoded[name].ravel()
        kept = comp.top_k_indices(flat, SETTINGS.k)
        step = float(record[f"{name}|r"].numpy()[1])
        assert kept.size == int(np.ceil(0.1 * flat.size))
        assert step == pytest.approx((flat[kept].max() - flat[kept].min()) / 255, rel=1e-5)
        assert np.abs(back[kept] - flat[kept]).max() <= step / 2 * (1 + 1e-5)
        dropped = np.setdiff1d(np.arange(flat.size), kept)
        assert np.all(back[dropped] == 0)
        assert np.abs(flat[dropped]).max() <= np.abs(flat[kept]).min()
        bound = np.sqrt((1 - kept.size / flat.size) * np.sum(flat**2) + kept.size * (step / 2) ** 2)
        assert np.linalg.norm(back - flat) <= bound
    dense = sum(x.nbytes for x in delta.values())
    assert record.count_bytes() < dense / 6  # 10 % of entries at 1 byte + a 2-byte index


def test_error_feedback_carries_the_residual_into_the_next_update():
    # Prepare: 4 entries, k = 0.25 keeps one; no quantisation so the numbers are exact
    config = comp.CompressionSettings(k=0.25, bits=None, error_feedback=True).to_config()
    state = RecordDict()
    start = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
    trained = ArrayRecord({"w": Array(np.array([4.0, -3.0, 2.0, 1.0], dtype=np.float32))})
    # Execute: round 1 sends the update, round 2 an update of zero
    first = comp.client_send(trained, start, config, state)
    residual_1 = state[comp.RESIDUAL_KEY]["w"].numpy().tolist()
    second = comp.client_send(start, start, config, state)
    residual_2 = state[comp.RESIDUAL_KEY]["w"].numpy().tolist()
    # Assert: round 1 sends 4 and keeps [0, -3, 2, 1]; round 2 sends the -3
    # it had kept back, leaving [0, 0, 2, 1]
    assert comp.decode(first, {"w": np.zeros(4, np.float32)})["w"].tolist() == [4.0, 0, 0, 0]
    assert residual_1 == [0.0, -3.0, 2.0, 1.0]
    assert comp.decode(second, {"w": np.zeros(4, np.float32)})["w"].tolist() == [0, -3.0, 0, 0]
    assert residual_2 == [0.0, 0.0, 2.0, 1.0]


def test_without_error_feedback_nothing_is_carried():
    config = comp.CompressionSettings(k=0.25, bits=None, error_feedback=False).to_config()
    state = RecordDict()
    zeros = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
    comp.client_send(ArrayRecord({"w": Array(np.array([4.0, -3.0, 2.0, 1.0], np.float32))}), zeros, config, state)
    assert comp.RESIDUAL_KEY not in state


def _deflated_bytes(content: RecordDict) -> int:
    """The object tree Flower pushes, walked by hand: the RecordDict, each
    record, and for ArrayRecords each Array and each of its chunks (unique
    objects once, as the SuperLink stores them)."""
    objects = {content.object_id: content}
    for record in content.values():
        objects[record.object_id] = record
        if isinstance(record, ArrayRecord):
            for array in record.values():
                objects[array.object_id] = array
                objects.update({cid: chunk for cid, chunk in array.children.items()})
    return sum(len(obj.deflate()) for obj in objects.values())


def test_accounted_bytes_equal_the_serialised_payloads_and_feed_the_virtual_clock(tracking_uri):
    # Prepare: record each reply's payload size as the client produced it
    cfg = compose_config(["num_rounds=2", "clients.num=4", "seed=1", "compression=topk8"])
    uplink, downlink, payloads = {1: 0, 2: 0}, {1: 0, 2: 0}, []
    clients = stateful_clients(4)

    def reply(message):
        out = clients(message)
        if message.metadata.message_type == MessageType.TRAIN:
            rnd = int(message.content["config"]["server-round"])
            downlink[rnd] += _deflated_bytes(message.content)
            uplink[rnd] += _deflated_bytes(out.content)
            payloads.append(out.content["arrays"])
        return out

    # Execute
    run_experiment(FakeGrid(range(4), reply), cfg, tracking_uri)
    # Assert
    client, run = only_run(tracking_uri)
    assert history(client, run, "uplink_bytes") == [uplink[1], uplink[2]]
    assert history(client, run, "downlink_bytes") == [downlink[1], downlink[2]]
    assert history(client, run, "uplink_bytes_total") == [uplink[1], uplink[1] + uplink[2]]
    assert all(set(k.rpartition("|")[2] for k in p.keys()) == {"i", "q", "r"} for p in payloads)
    assert uplink[1] < 4 * 70_000  # 4 clients x ~57 kB instead of ~392 kB each
    # the virtual clock is charged the compressed payload
    assert run.data.metrics["vc_up_bytes"] == pytest.approx(np.mean([p.count_bytes() for p in payloads[-4:]]))


def test_downlink_compression_keeps_client_and_server_views_identical(tracking_uri):
    # Prepare
    cfg = compose_config(["num_rounds=3", "clients.num=4", "seed=1", "compression=topk8",
                          "compression.downlink=true"])
    clients = stateful_clients(4)
    grid = FakeGrid(range(4), clients)
    # Execute
    final = run_experiment(grid, cfg, tracking_uri)
    # Assert: round 1 sends full models, later rounds deltas to what each node holds
    client, run = only_run(tracking_uri)
    down = history(client, run, "downlink_bytes")
    assert down[1] < down[0] / 5 and down[2] < down[0] / 5
    for node, context in clients.contexts.items():
        held = comp.tensors(context.state[comp.VIEW_KEY])
        assert int(context.state[comp.VIEW_META_KEY]["version"]) == 3
        sent_last = [m for m in grid.sent if m.metadata.dst_node_id == node][-1]
        assert int(sent_last.content["config"][comp.DOWNLINK_BASE]) == 2
        assert set(held) == set(comp.tensors(ArrayRecord(_model_keys())))
    assert final["test_accuracy"] > 0.3


def _model_keys():
    from tasks.image.models import build_model

    return build_model("cnn", 10).state_dict()


def test_server_decodes_replies_into_models_with_the_sent_keys_in_order():
    # Prepare: the server sent `sent`; the client trained it to `trained`
    from fl_server.engine.comm import AccountingGrid
    from tests.fake_grid import train_reply

    sent = ArrayRecord({"b": Array(np.zeros(3, np.float32)), "a": Array(np.ones(2, np.float32))})
    settings = comp.CompressionSettings(k=1.0, bits=None)
    encoded = comp.encode({"b": np.array([1.0, 2.0, 3.0], np.float32), "a": np.array([0.5, -0.5], np.float32)}, settings)
    reply = train_reply(encoded, 10, node_id=7)
    # Execute
    AccountingGrid(FakeGrid([7]), settings)._decode_uplink(reply, sent)
    # Assert: sent + delta, keys in the order the strategy sent them
    decoded = reply.content["arrays"]
    assert list(decoded.keys()) == ["b", "a"]
    assert decoded["b"].numpy().tolist() == [1.0, 2.0, 3.0]
    assert decoded["a"].numpy().tolist() == [1.5, 0.5]


def test_compression_settings_travel_in_the_client_config():
    settings = comp.CompressionSettings(k=0.1, bits=8, error_feedback=True, downlink=False)
    assert comp.CompressionSettings.from_config(ConfigRecord(settings.to_config())) == settings
    assert comp.CompressionSettings.from_config(ConfigRecord({"lr": 0.1})) is None
