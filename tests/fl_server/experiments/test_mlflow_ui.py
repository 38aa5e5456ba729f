"""The MLflow UI as a researcher meets it.

Store-level tests check what we write for the UI (experiment kind, the
"Compare strategies" view, source tags, data set inputs, the logged model).
The browser test runs a real 2-job sweep, starts the UI the way the README
does (``python -m fl_server.experiments.mlflow_ui``, which tags the store and runs
``mlflow ui``) on a free loopback port, opens the printed link in headless
Chromium and checks the runs table: both jobs nested under their sweep parent,
with the strategy and accuracy columns on screen. It saves a screenshot
(``FC_UPDATE_SCREENSHOT=1`` also writes the README's ``docs/mlflow-ui-runs*.png``).

Chromium is Debian's ``chromium`` package (installed here by the test when
missing and we are root with apt-get); it is driven over the DevTools protocol
on a pipe (``--remote-debugging-pipe``), so no extra Python package is needed.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fl_server.experiments import mlflow_ui
from fl_server.experiments.mlflow_ui import COMPARE_VIEW_ID, EXPERIMENT_KIND_TAG, MODEL_TRAINING, VIEW_TAG_PREFIX
from fl_server.experiments.tracking import RunTracker
from tasks.image.mlflow_inputs import image_datasets, trained_model
from tests.conftest import PROJECT_DIR, run_module, sqlite_uri

SCREENSHOTS = PROJECT_DIR / "docs"  # mlflow-ui-runs.png, mlflow-ui-runs-right.png (FC_UPDATE_SCREENSHOT=1)


def saved_view(experiment_tags: dict[str, str]) -> tuple[dict, dict]:
    envelope = json.loads(experiment_tags[VIEW_TAG_PREFIX + COMPARE_VIEW_ID])
    return envelope, json.loads(envelope["state"])


# -- what the store holds ----------------------------------------------------------
def test_a_new_experiment_is_model_training_with_the_compare_view(tracking_uri):
    tracker = RunTracker(tracking_uri, "exp", "run", tags={"strategy": "fedavg"})
    tracker.finish()
    experiment = MlflowClient(tracking_uri).get_experiment(tracker.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    envelope, state = saved_view(experiment.tags)
    # the envelope the UI parses (name, numeric createdAt, state as a string)
    assert envelope["name"] == "Compare strategies" and isinstance(envelope["createdAt"], int)
    assert state["columnOrder"][0] == "attributes.`Run Name`"
    for column in ("tags.`strategy`", "tags.`rho`", "tags.`alpha`", "tags.`seed`", "tags.`task`",
                   "tags.`deadline`", "metrics.`test_accuracy`", "attributes.`Dataset`"):
        assert column in state["selectedColumns"]
    # the axes come before the metrics, so strategy sits next to the run name
    assert state["columnOrder"].index("tags.`strategy`") < state["columnOrder"].index("metrics.`test_accuracy`")


def test_an_existing_experiment_gets_what_it_lacks_and_keeps_its_own_choices(tracking_uri):
    client = MlflowClient(tracking_uri)
    bare = client.create_experiment("old")  # as created before this change
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    RunTracker(tracking_uri, "old", "run").finish()
    RunTracker(tracking_uri, "chosen", "run").finish()
    assert client.get_experiment(bare).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"  # the user's switch
    assert VIEW_TAG_PREFIX + COMPARE_VIEW_ID in client.get_experiment(chosen).tags


def test_runs_name_their_source_and_git_commit(tracking_uri):
    tracker = RunTracker(tracking_uri, "exp", "run")
    tracker.finish()
    tags = MlflowClient(tracking_uri).get_run(tracker.run_id).data.tags
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"]
    head = subprocess.run(["git", "-C", str(PROJECT_DIR), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout: no commit to compare with")
    assert tags["mlflow.source.git.commit"] == head.stdout.strip()
    assert tags["fc.git_dirty"] in ("true", "false")


def test_data_sets_and_model_are_logged_as_the_ui_reads_them(tracking_uri, tmp_path):
    import mlflow.pytorch
    import torch
    from flwr.app import ArrayRecord
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from fl_datasets.federated import DataSpec, build_image_data
    from fl_server.experiments.config import compose_config
    from tasks.image.models import build_model

    cfg = compose_config(["clients.num=2", "partition=dirichlet", "partition.alpha=0.5", "partition.rho=10"])
    spec = DataSpec.from_config(cfg)
    data = build_image_data(spec)
    arrays = ArrayRecord(build_model("cnn", 10, seed=1).state_dict())
    tracker = RunTracker(tracking_uri, "exp", "run")
    tracker.log_metrics({"test_accuracy": 0.5}, step=1)
    tracker.log_datasets(lambda: image_datasets(spec, data))
    tracker.log_pytorch_model(lambda: trained_model("cnn", 10, arrays, data.test.x[:2]), step=1)
    tracker.finish()

    run = MlflowClient(tracking_uri).get_run(tracker.run_id)
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"mnist-5k-clients", "mnist-5k-test", "mnist-5k-public-val"}
    train = inputs["mnist-5k-clients"]
    assert {t.key: t.value for t in train.tags}["mlflow.data.context"] == "train: dirichlet alpha=0.5 rho=10, 2 clients"
    assert train.dataset.digest and json.loads(train.dataset.source)["uri"].endswith("mnist_5k.csv.gz")
    assert json.loads(train.dataset.profile)["features_shape"] == [sum(data.client_sizes()), 1, 28, 28]
    (output,) = run.outputs.model_outputs
    logged = MlflowClient(tracking_uri).get_logged_model(output.model_id)
    assert logged.experiment_id == run.info.experiment_id and str(logged.status) == "READY"
    assert logged.artifact_location.startswith((tmp_path / "artifacts").as_uri())  # beside the store, not ./mlruns
    with _use_tracking_uri(tracking_uri):
        model_uri = f"models:/{output.model_id}"
        loaded = mlflow.pytorch.load_model(model_uri)
        signature = mlflow.models.get_model_info(model_uri).signature
    assert list(signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 28, 28]
    expected = trained_model("cnn", 10, arrays, None)[0].eval()(torch.from_numpy(data.test.x[:5]))
    np.testing.assert_allclose(loaded(torch.from_numpy(data.test.x[:5])).detach().numpy(),
                               expected.detach().numpy(), rtol=1e-5, atol=1e-5)  # any batch size, same weights


def test_an_experiment_run_logs_its_data_sets_model_and_source(tracking_uri):
    """The ServerApp's experiment end to end in-process (fake Grid, real clients' code)."""
    from fl_server.experiments.config import compose_config
    from fl_server.experiments.experiment import run_experiment
    from tests.fake_grid import FakeGrid
    from tests.fl_server.experiments.test_experiment import in_process_client

    cfg = compose_config(["num_rounds=1", "clients.num=4", "seed=1", "partition=dirichlet", "partition.alpha=0.3"])
    run_experiment(FakeGrid(range(4), in_process_client()), cfg, tracking_uri)
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    contexts = {i.dataset.name: {t.key: t.value for t in i.tags}[mlflow_ui.CONTEXT_TAG] for i in run.inputs.dataset_inputs}
    assert contexts == {"mnist-5k-clients": "train: dirichlet alpha=0.3 rho=1, 4 clients",
                        "mnist-5k-test": "eval", "mnist-5k-public-val": "validation"}
    (output,) = run.outputs.model_outputs
    assert output.step == 1 and client.get_logged_model(output.model_id).name == mlflow_ui.MODEL_NAME
    assert run.data.tags["mlflow.source.type"] == "LOCAL" and run.data.tags["alpha"] == "0.3"
    assert client.get_experiment(run.info.experiment_id).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING


def test_ui_command_tags_an_old_store_and_prints_the_runs_link(tmp_path, capsys):
    uri = sqlite_uri(tmp_path)
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("fedcontinuum")  # a store written before this change
    client.set_terminated(client.create_run(experiment_id).info.run_id)
    assert mlflow_ui.main(["--backend-store-uri", uri, "--port", "5123", "--no-serve"]) == 0
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    link = (f"fedcontinuum: http://127.0.0.1:5123/#/experiments/{experiment_id}/runs"
            f"?workflowType=machine_learning&viewStateShareKey={COMPARE_VIEW_ID}")
    assert link in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--backend-store-uri", "sqlite:////nonexistent/mlflow.db"], "--backend-store-uri sqlite:////nonexistent"),
        (["--port", "0"], "--port 0 is invalid"),
        (["--workers", "0"], "--workers 0 is invalid"),
    ],
)
def test_ui_command_bad_input_is_one_line_naming_it(tmp_path, args, named):
    uri = sqlite_uri(tmp_path)
    RunTracker(uri, "exp", "run").finish()
    result = run_module("fl_server.experiments.mlflow_ui", "--backend-store-uri", uri, *args, "--no-serve", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and named in result.stderr


# -- a real browser ----------------------------------------------------------------
def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    """Headless Chromium: Debian's package, installed if missing (as root with apt-get)."""
    path = find_chromium()
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no Chromium and cannot install it (needs root and apt-get): "
                    "`apt-get install chromium`, or set CHROMIUM=/path/to/chrome")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:  # an empty or stale package list: update once, try again
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env, timeout=900)
        result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    path = find_chromium()
    if not path:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"Chromium could not be installed (`{' '.join(install)}`: {last[0]})")
    return path


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe
    (``--remote-debugging-pipe``: commands on fd 3, replies on fd 4, each a
    JSON message ended by a NUL byte)."""

    def __init__(self, executable: str, profile: Path, width: int = 1600, height: int = 1000) -> None:
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()

        def onto_3_and_4() -> None:  # in the child, before exec: fds 3 and 4 are what Chromium reads and writes
            read, write = fcntl.fcntl(commands_read, fcntl.F_DUPFD, 100), fcntl.fcntl(replies_write, fcntl.F_DUPFD, 100)
            os.dup2(read, 3)
            os.dup2(write, 4)

        self.process = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--remote-debugging-pipe", "--no-first-run", "--no-default-browser-check",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
            preexec_fn=onto_3_and_4, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(commands_read)
        os.close(replies_write)
        self._buffer, self._next_id = b"", 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", page=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def call(self, method: str, page: bool = False, timeout: float = 30, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if page:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"Chromium did not answer {method} within {timeout} s")
            if select.select([self._replies], [], [], left)[0]:
                chunk = os.read(self._replies, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium exited (code {self.process.poll()}) during {method}")
                self._buffer += chunk

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", page=True, expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := self.js(expression):
                return value
            time.sleep(0.25)
        text = self.js("document.body ? document.body.innerText.slice(0, 500) : ''")
        raise AssertionError(f"the page never showed {what} within {timeout} s; it shows: {text!r}")

    def open(self, url: str) -> None:
        self.call("Page.navigate", page=True, url=url)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", page=True, format="png")["data"]))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
            self.process.wait(timeout=10)
        except Exception:
            pass
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        os.close(self._commands)
        os.close(self._replies)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real 2-job sweep (FedAvg vs FedAvgM, Dirichlet α=0.5, ρ=10, 2 clients, 2 rounds): ~60 s."""
    store = tmp_path_factory.mktemp("mlflow-ui-sweep")
    uri = sqlite_uri(store)
    result = run_module(
        "scripts.sweep", "--multirun", "clients.num=2", "num_rounds=2", "partition=dirichlet",
        "partition.alpha=0.5", "partition.rho=10", "strategy=fedavg,fedavgm",
        f"hydra.sweep.dir={store / 'multirun'}", env={"MLFLOW_TRACKING_URI": uri},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return uri


@pytest.fixture
def mlflow_ui_server(sweep_store: str, tmp_path: Path):
    """``python -m fl_server.experiments.mlflow_ui`` (README's way: tags, link, ``mlflow ui``) on a free loopback port."""
    port = free_port()
    log = tmp_path / "mlflow-ui.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "fl_server.experiments.mlflow_ui", "--backend-store-uri", sweep_store, "--port", str(port)],
            cwd=PROJECT_DIR, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, f"the UI server exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"the UI server did not answer within 90 s: {log.read_text()[-2000:]}"
            time.sleep(0.5)
        (link,) = re.findall(r"^fedcontinuum: (http://\S+)$", log.read_text(), flags=re.M)
        yield link
    finally:  # SIGTERM to the group we started (mlflow ui and its worker), then SIGKILL
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(server.pid, sig)
                server.wait(timeout=15)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


ROWS_JS = """
Array.from(document.querySelectorAll('.ag-row[row-id]')).reduce((rows, row) => {
  const id = row.getAttribute('row-id');
  const entry = rows[id] || (rows[id] = {index: Number(row.getAttribute('row-index')), cells: {}});
  for (const cell of row.querySelectorAll('.ag-cell[col-id]')) entry.cells[cell.getAttribute('col-id')] = cell.innerText.trim();
  const link = row.querySelector('a[href*="/runs/"]');
  if (link) entry.nameX = link.getBoundingClientRect().left;
  return rows;
}, {})
"""

VISIBLE_HEADERS_JS = """
Array.from(document.querySelectorAll('.ag-header-cell[col-id]')).filter(cell => {
  const box = cell.getBoundingClientRect();
  return box.width > 0 && box.left >= 0 && box.right <= window.innerWidth;
}).map(cell => cell.getAttribute('col-id'))
"""


@pytest.mark.browser
@pytest.mark.e2e
def test_the_runs_table_shows_the_sweep_with_strategy_and_accuracy(chromium, sweep_store, mlflow_ui_server, tmp_path):
    # Prepare: the sweep's parent and children as MLflow has them
    client = MlflowClient(sweep_store)
    experiment = client.get_experiment_by_name("fedcontinuum")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("fc.kind") == "sweep"]
    children = {r.info.run_id: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert len(children) == 2
    browser = Browser(chromium, tmp_path / "chromium-profile", width=1600, height=560)
    try:
        # Execute: open the link the UI command printed; expand the sweep
        browser.open(mlflow_ui_server)
        browser.wait_for(f"!!document.querySelector('.ag-row[row-id=\"{parent.info.run_id}\"]')", "the sweep's parent run")
        assert "/runs" in browser.js("location.hash")  # the runs table, not the GenAI overview
        browser.js("""(() => { const b = document.querySelector('button[aria-label="Close"]'); if (b) b.click(); })()""")
        expand = f'.ag-row[row-id="{parent.info.run_id}"] [col-id="attributes.`Run Name`"] button'
        browser.js(f"""document.querySelector('{expand}').click()""")
        browser.wait_for(" && ".join(f"!!document.querySelector('.ag-row[row-id=\"{c}\"]')" for c in children),
                         "both child runs after expanding the sweep")
        time.sleep(1)  # let the grid settle its column widths before measuring and the screenshot
        rows = browser.js(ROWS_JS)
        visible = browser.js(VISIBLE_HEADERS_JS)
        shot = tmp_path / "mlflow-ui-runs.png"
        browser.screenshot(shot)
        # the grid renders only the columns on screen: scroll right for Dataset, Models, Version
        browser.js("document.querySelectorAll('.ag-body-horizontal-scroll-viewport, .ag-center-cols-viewport')"
                   ".forEach(e => { e.scrollLeft = e.scrollWidth; })")
        browser.wait_for("!!document.querySelector('.ag-row .ag-cell[col-id=\"attributes.`Models`\"]')",
                         "the Models column after scrolling right")
        time.sleep(0.5)
        for run_id, row in browser.js(ROWS_JS).items():
            rows[run_id]["cells"].update(row["cells"])
        browser.screenshot(tmp_path / "mlflow-ui-runs-right.png")
    finally:
        browser.close()

    # Assert: children right below their parent, indented under it
    top = rows[parent.info.run_id]
    assert sorted(rows[c]["index"] for c in children) == [top["index"] + 1, top["index"] + 2]
    assert all(rows[c]["nameX"] > top["nameX"] for c in children)
    # strategy and accuracy columns on screen, with each child's values
    assert {"tags.`strategy`", "tags.`rho`", "tags.`alpha`", "metrics.`test_accuracy`"} <= set(visible), visible
    for run_id, run in children.items():
        cells = rows[run_id]["cells"]
        assert cells["tags.`strategy`"] == run.data.tags["strategy"]
        assert cells["tags.`alpha`"] == "0.5" and cells["tags.`rho`"] == "10"
        assert float(cells["metrics.`test_accuracy`"]) == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-3)
        assert "mnist-5k-clients" in cells["attributes.`Dataset`"], cells
        assert cells["attributes.`Models`"] not in ("", "-"), cells
        assert cells["attributes.`Version`"] == run.data.tags["mlflow.source.git.commit"][:6], cells
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    if os.environ.get("FC_UPDATE_SCREENSHOT") == "1":
        SCREENSHOTS.mkdir(exist_ok=True)
        for name in ("mlflow-ui-runs.png", "mlflow-ui-runs-right.png"):
            shutil.copyfile(tmp_path / name, SCREENSHOTS / name)
