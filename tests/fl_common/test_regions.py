"""The regional deployment's contract: layout, hand-off files, run-config quoting (hand-computed)."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fl_common import regions as contract


def _record(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(v)) for k, v in arrays.items()))


def test_partitions_are_region_major():
    # Prepare: 3 regions x 2 clients = 6 partitions
    layout = contract.RegionLayout(3, 2)
    # Execute / Assert: region r holds 2r, 2r + 1
    assert layout.num_partitions == 6
    assert [list(layout.partitions(r)) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert [layout.region_of(p) for p in range(6)] == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(("regions", "clients", "message"), [
    (0, 2, "--regions 0 is invalid: use an integer >= 1"),
    (2, -1, "--clients-per-region -1 is invalid: use an integer >= 1"),
    (True, 2, "--regions True is invalid"),
])
def test_a_bad_layout_is_refused_naming_the_value(regions, clients, message):
    with pytest.raises(ValueError, match=message):
        contract.RegionLayout(regions, clients)


def test_a_region_or_partition_out_of_range_is_refused():
    layout = contract.RegionLayout(2, 2)
    with pytest.raises(ValueError, match=r"region 2 is invalid: use 0 \.\. 1"):
        layout.partitions(2)
    with pytest.raises(ValueError, match=r"partition 4 is invalid: use 0 \.\. 3"):
        layout.region_of(4)


def test_handoff_round_trips_arrays_in_order_with_the_example_count(tmp_path):
    # Prepare: keys deliberately not in alphabetical order; float32 and int64
    record = _record(w=np.array([[1.5, -2.0]], dtype=np.float32), b=np.array([3], dtype=np.int64))
    folder = contract.regional_model_folder(tmp_path, 2, 1)
    # Execute
    contract.write_handoff(folder, record, 120, region=1, mlflow_run_id="abc")
    back = contract.read_handoff(folder)
    # Assert
    assert folder == tmp_path / "round-002" / "region-1" / "regional"
    assert list(back.arrays.keys()) == ["w", "b"]
    assert back.arrays["w"].numpy().tolist() == [[1.5, -2.0]] and back.arrays["w"].numpy().dtype == np.float32
    assert back.arrays["b"].numpy().tolist() == [3] and back.arrays["b"].numpy().dtype == np.int64
    assert back.num_examples == 120 and back.info == {"region": 1, "mlflow_run_id": "abc"}
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["format"] == "fedcontinuum-handoff/1" and meta["keys"] == ["w", "b"]
    assert not list(folder.glob("*.partial"))  # written atomically


def test_reading_a_missing_or_foreign_handoff_says_what_is_wrong(tmp_path):
    with pytest.raises(contract.HandoffError, match="meta.json does not exist: nothing was handed over"):
        contract.read_handoff(tmp_path / "nothing")
    (tmp_path / "meta.json").write_text(json.dumps({"format": "other/9", "keys": [], "num_examples": 0}))
    with pytest.raises(contract.HandoffError, match="has format 'other/9', expected 'fedcontinuum-handoff/1'"):
        contract.read_handoff(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"format": contract.HANDOFF_FORMAT, "keys": ["w"],
                                                    "num_examples": 1}))
    with pytest.raises(contract.HandoffError, match="model.npz does not hold the 1 arrays"):
        contract.read_handoff(tmp_path)


def test_run_config_args_quote_each_value_and_double_backslashes():
    assert contract.run_config_args({"tier": "region", "overrides": r"a=1 b=x\:y"}) == [
        "--run-config", 'tier="region"', "--run-config", 'overrides="a=1 b=x\\\\:y"']
    with pytest.raises(ValueError, match='overrides may not contain a double quote: a="b"'):
        contract.run_config_args({"overrides": 'a="b"'})
