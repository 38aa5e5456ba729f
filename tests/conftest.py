"""Shared fixtures: a throw-away MLflow store, the shared real data, and one
end-to-end launcher run reused by several tests (each simulation costs ~15 s
of Ray start-up and ~1.5 GB)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto

PROJECT_DIR = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_DIR.parent / "shared" / "data"
BREASTMNIST = SHARED_DATA / "medmnist" / "breastmnist.npz"
GWA_DIR = SHARED_DATA / "gwa-t-12-rnd" / "2013-8"


def sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path / 'mlflow.db'}"


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    return sqlite_uri(tmp_path)


def run_module(module: str, *args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` from the project dir; capture everything."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=PROJECT_DIR,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def e2e_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, str]:
    """One real simulation through the launcher: 2 rounds, 4 clients."""
    store = tmp_path_factory.mktemp("mlflow-e2e")
    uri = sqlite_uri(store)
    result = run_module(
        "fl_server.runtime.launch", "num_rounds=2", "clients.num=4", env={"MLFLOW_TRACKING_URI": uri}
    )
    return result, uri


requires_breastmnist = pytest.mark.skipif(
    not BREASTMNIST.exists(), reason=f"real BreastMNIST not found at {BREASTMNIST} (../shared/data absent)"
)

requires_gwa = pytest.mark.skipif(
    not GWA_DIR.is_dir(), reason=f"real GWA-T-12 traces not found at {GWA_DIR} (../shared/data absent)"
)


def wire(message: Message) -> Message:
    """A copy of ``message`` as the other side receives it (serialised and
    parsed), so neither side shares objects with the other."""
    return message_from_proto(message_to_proto(message))


class stateful_clients:  # noqa: N801 - used like a function
    """Reply as the real ClientApp (with its mods) would, keeping each node's
    Context — and so its ``context.state`` — across rounds, as Flower does
    (issue #2216). Partition id = node id."""

    def __init__(self, num_partitions: int) -> None:
        self.num_partitions = num_partitions
        self.contexts: dict[int, Context] = {}

    def context(self, node: int) -> Context:
        if node not in self.contexts:
            self.contexts[node] = Context(
                run_id=1, node_id=node, state=RecordDict(), run_config={},
                node_config={"partition-id": node, "num-partitions": self.num_partitions},
            )
        return self.contexts[node]

    def __call__(self, message: Message) -> Message:
        from fl_clients import app as client_app

        node = message.metadata.dst_node_id
        try:
            return wire(client_app.app(wire(message), self.context(node)))
        except Exception as err:  # noqa: BLE001 - Flower turns a raising ClientApp into an error reply
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err).__name__}: {err}"),
                            reply_to=message)
            reply.metadata.__dict__["_src_node_id"] = node
            return reply


def persistent_clients(num_clients: int):
    """A fake Grid answered by the real ClientApp (its mods included, messages
    copied as over the wire); each node keeps its Context (``context.state``)
    across rounds, as Flower does. Returns the grid and the nodes' Contexts."""
    from tests.fake_grid import FakeGrid

    clients = stateful_clients(num_clients)
    for node in range(num_clients):
        clients.context(node)
    return FakeGrid(range(num_clients), clients), clients.contexts


def run_in_process(tracking_uri: str, overrides: list[str]):
    """Compose ``overrides`` and run the experiment skeleton behind :func:`persistent_clients`.

    Returns every metric's per-round values of the (finished) run, its MLflow
    run id and the nodes' Contexts.
    """
    from mlflow.tracking import MlflowClient

    from fl_server.experiments.config import compose_config
    from fl_server.experiments.experiment import run_experiment

    cfg = compose_config(overrides)
    grid, contexts = persistent_clients(int(cfg.clients.num))
    run_experiment(grid, cfg, tracking_uri)
    client = MlflowClient(tracking_uri)
    (latest, *_) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                      order_by=["attributes.start_time DESC"])
    assert latest.info.status == "FINISHED"
    metrics = {key: [m.value for m in sorted(client.get_metric_history(latest.info.run_id, key), key=lambda m: m.step)]
               for key in latest.data.metrics}
    return metrics, latest.info.run_id, contexts
