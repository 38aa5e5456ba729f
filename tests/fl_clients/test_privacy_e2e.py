"""Privacy, compression and SecAgg+ end to end through `flwr run` on Ray.

Two simulations (~40-90 s, ~1.5 GB each). They check what only a real
simulation shows: Flower re-creates clients every round, so epsilon can only
grow as Opacus says if the accountant really survives in ``context.state``
(Flower issue #2216); SecAgg+'s four stages need each node's state between
messages too.
"""

from __future__ import annotations

import warnings

import pytest
from mlflow.tracking import MlflowClient
from opacus.accountants import RDPAccountant

from tests.conftest import run_module, sqlite_uri
from tests.fl_clients.privacy_helpers import history

pytestmark = pytest.mark.e2e


def _epsilon(steps: int) -> float:
    accountant = RDPAccountant()
    accountant.history = [(1.0, 1 / 30, steps)]  # sigma 1, 950 samples / batch 32 -> q = 1/30
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return accountant.get_epsilon(1e-5)


def _launch(tmp_path, *overrides: str):
    uri = sqlite_uri(tmp_path)
    result = run_module("fl_server.runtime.launch", *overrides, env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    return client, run


def test_dp_budgets_survive_client_recreation_with_compression_on(tmp_path):
    # Prepare: client 1 may spend what 1.5 rounds cost: it declines from round 2
    one, two, three = _epsilon(30), _epsilon(60), _epsilon(90)
    # Execute
    client, run = _launch(tmp_path, "num_rounds=3", "clients.num=4", "privacy=dpsgd", "compression=topk8",
                          "privacy.dpsgd.epsilon_budget=null", f"privacy.dpsgd.client_budgets={{1:{(one + two) / 2}}}")
    # Assert
    assert history(client, run, "epsilon_p0") == pytest.approx([one, two, three], abs=1e-6)
    assert history(client, run, "epsilon_p1") == pytest.approx([one, one, one], abs=1e-6)
    assert history(client, run, "clients_declined") == [0, 1, 1]
    assert history(client, run, "clients_failed") == [0, 0, 0]
    uplink = history(client, run, "uplink_bytes")
    assert uplink[0] < 4 * 70_000 and uplink[1] < 3 * 70_000  # compressed (~57 kB per client, not ~392 kB)


def test_secagg_with_client_side_central_dp_runs_on_ray(tmp_path):
    client, run = _launch(tmp_path, "num_rounds=2", "clients.num=3", "privacy=secagg",
                          "privacy.central.mode=client-fixed", "privacy.central.noise_multiplier=0.01")
    assert history(client, run, "secagg_survivors") == [3, 3]
    assert history(client, run, "central_dp_noise_std") == pytest.approx([0.01 / 3, 0.01 / 3])
    assert history(client, run, "test_accuracy")[-1] > 0.5
