"""Shared fixtures: a throw-away MLflow store, the shared real data, and one
end-to-end launcher run reused by several tests (each simulation costs ~15 s
of Ray start-up and ~1.5 GB)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import Context, Message, MessageType, RecordDict

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


def persistent_clients(num_clients: int):
    """A fake Grid answered by the real ClientApp; each node keeps its Context
    (``context.state``) across rounds, as Flower does."""
    from fl_clients import app as client_app
    from tests.fake_grid import FakeGrid

    contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": n, "num-partitions": num_clients},
                           state=RecordDict(), run_config={}) for n in range(num_clients)}

    def reply(message: Message) -> Message:
        context = contexts[message.metadata.dst_node_id]
        if message.metadata.message_type == MessageType.QUERY:
            return client_app.query(message, context)
        if message.metadata.message_type == MessageType.EVALUATE:
            return client_app.evaluate_local(message, context)
        return client_app.train(message, context)

    return FakeGrid(range(num_clients), reply), contexts
