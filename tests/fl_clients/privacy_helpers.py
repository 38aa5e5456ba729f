"""Helpers for the privacy / compression / SecAgg+ tests: in-process clients
that run the real ClientApp (mods included) with a persistent
``context.state`` per node and messages copied as over the wire."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from tests.conftest import stateful_clients, wire  # noqa: F401  (the privacy tests' in-process clients)


def only_run(uri: str):
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return client, runs[0]


def history(client: MlflowClient, run, key: str) -> list[float]:
    """A metric's values by round (step order)."""
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
