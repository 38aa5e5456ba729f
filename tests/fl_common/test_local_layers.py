"""Layers that stay on the client: deploying with them, replying without them."""

from __future__ import annotations

from fl_common.local_layers import deployed, local_part, uplink

IS_HEAD = lambda key: key.startswith("head.")  # noqa: E731


def test_deployed_takes_the_local_values_only_where_local():
    global_state = {"trunk.w": 1, "head.w": 2, "head.b": 3}
    assert deployed(global_state, {"head.w": 20, "head.b": 30, "trunk.w": 10}, IS_HEAD) == {
        "trunk.w": 1, "head.w": 20, "head.b": 30}
    assert deployed(global_state, None, IS_HEAD) == global_state  # nothing kept yet: the global model
    assert deployed(global_state, {"head.w": 20}, IS_HEAD)["head.b"] == 3  # a key it does not hold stays global


def test_uplink_sends_back_what_it_received_in_place_of_the_local_layers():
    trained, received = {"trunk.w": 10, "head.w": 20}, {"trunk.w": 1, "head.w": 2}
    assert uplink(trained, received, IS_HEAD) == {"trunk.w": 10, "head.w": 2}
    assert local_part(trained, IS_HEAD) == {"head.w": 20}
