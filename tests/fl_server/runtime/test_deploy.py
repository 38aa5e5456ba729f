"""Flower's Deployment Engine on loopback: a SuperLink and SuperNodes as
separate processes, TLS with certificates generated at run time.

Every test stops exactly the processes it started (by their process groups)
and checks that they are gone. The two federation runs cost ~1.5-3 min each
on 2 CPUs (each ClientApp message starts a fresh process that imports torch).
"""

from __future__ import annotations

import io
import os
import re
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console

from fl_server.experiments.config import compose_config
from fl_server.runtime.certificates import generate_certificates
from fl_server.runtime.deployment import LocalFederation, LocalSuperNode
from fl_server.runtime.launch import preflight, run_job
from fl_server.runtime.superlink import FLWR_STATE_DIR, LocalSuperLink
from tests.conftest import run_module, sqlite_uri


def _gone(pid: int, wait_s: float = 15.0) -> bool:
    """Whether the process group ``pid`` is gone; SIGKILL is asynchronous and
    orphans are reaped by init, so give the kernel a moment."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (read from /proc; nothing is signalled)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _only_run(uri: str):
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return client, runs[0]


def _history(client, run, key):
    return [m.value for m in client.get_metric_history(run.info.run_id, key)]


# ------------------------------------------------------------- no Flower run
def test_certificates_name_the_loopback_addresses_and_verify_against_the_ca(tmp_path):
    from cryptography import x509

    certs = generate_certificates(tmp_path)
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert certs.server_key.stat().st_mode & 0o077 == 0  # the key is private to its owner


def test_tls_superlink_serves_https_only_and_is_stopped_with_its_certificates():
    superlink = LocalSuperLink(simulation=False, tls=True)
    with superlink:
        pid, home = superlink.process.pid, superlink.home
        ca = superlink.certificates.ca_cert
        assert ca.is_relative_to(FLWR_STATE_DIR)  # generated into the git-ignored state folder
        context = ssl.create_default_context(cafile=str(ca))
        with urllib.request.urlopen(f"https://{superlink.address}/health", context=context, timeout=5) as reply:
            assert reply.status == 200
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://{superlink.address}/health", timeout=5)  # no plaintext
        assert f'root-certificates = "{ca.resolve()}"' in (home / "config.toml").read_text()
        node = LocalSuperNode(superlink, partition_id=2, num_partitions=3).command()
        assert "--insecure" not in node and node[node.index("--root-certificates") + 1] == str(ca)
        assert node[node.index("--node-config") + 1] == "partition-id=2 num-partitions=3"
    assert _gone(pid) and not home.exists()  # certificates go with it
    assert not _processes_mentioning(superlink.address)  # its SuperExec (own session) too


def test_supernodes_option_is_clients_num():
    from scripts.deploy_local import _with_supernodes

    assert _with_supernodes(["num_rounds=2"], 3) == ["num_rounds=2", "clients.num=3"]
    assert _with_supernodes(["clients.num=3"], 3) == ["clients.num=3"]
    assert _with_supernodes(["clients.num=5"], None) == ["clients.num=5"]
    with pytest.raises(ValueError, match="--supernodes 3 contradicts clients.num=5"):
        _with_supernodes(["clients.num=5"], 3)


def test_bad_input_exits_2_before_anything_starts():
    result = run_module("scripts.deploy_local", "--supernodes", "3", "partition.rho=0.5", timeout=120)
    assert result.returncode == 2 and "partition.rho=0.5 is invalid" in result.stdout


def test_insecure_mode_only_when_asked():
    federation = LocalFederation(2, tls=False)
    assert not federation.superlink.tls
    assert "--insecure" in LocalSuperNode(federation.superlink, 0, 2).command()
    assert LocalFederation(2).superlink.tls  # TLS is the default


# -------------------------------------------------------- real deployments
@pytest.mark.e2e
def test_deploy_local_over_tls_with_3_supernodes_completes_2_rounds(tmp_path):
    uri = sqlite_uri(tmp_path)
    result = run_module("scripts.deploy_local", "--supernodes", "3", "num_rounds=2",
                        env={"MLFLOW_TRACKING_URI": uri}, timeout=480)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert re.search(r"SuperLink 127\.0\.0\.1:\d+ \(TLS, CA .*ca\.crt\), 3 SuperNodes online", out)
    client, run = _only_run(uri)
    assert run.info.status == "FINISHED" and run.data.tags["fc.engine"] == "deployment"
    assert _history(client, run, "clients_replied") == [3.0, 3.0]
    assert _history(client, run, "test_accuracy")[-1] > 0.2  # chance is 0.1
    # everything it started is gone: its SuperLink's state folder and any process on its port
    port = re.search(r"SuperLink 127\.0\.0\.1:(\d+)", out).group(1)
    assert not (FLWR_STATE_DIR / f"superlink-{port}").exists()
    assert not _processes_mentioning(f"127.0.0.1:{port}")


def _kill_when_training_starts(node: LocalSuperNode, nth_message: int, timeout_s: float) -> threading.Event:
    """SIGKILL ``node`` (its group) once its log shows its ``nth_message``-th train message."""
    killed = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = node.log_file.read_text(errors="replace") if node.log_file.exists() else ""
            if text.count("Receiving: train message") >= nth_message:
                node.kill()
                killed.set()
                return
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()
    return killed


@pytest.mark.e2e
def test_a_supernode_killed_mid_round_leaves_the_run_completing_with_the_others(tmp_path):
    # 3 rounds; the SuperNode of partition 2 crashes (SIGKILL) as round 2's training starts.
    # The SuperLink notices the node gone after its heartbeat patience (flwr 1.41: 2 x 30 s),
    # before the round's 90 s timeout; rounds 2 and 3 proceed with the 2 others (min_replies = 2).
    overrides = ["clients.num=3", "num_rounds=3", "simulation.round_timeout_s=90"]
    cfg = compose_config(overrides)
    uri = sqlite_uri(tmp_path)
    federation = LocalFederation(3, tls=True)
    try:
        federation.spawn_superlink()
        preflight(cfg, federation.superlink.cache_dir)
        federation.start()
        victim = federation.supernodes[2]
        killed = _kill_when_training_starts(victim, nth_message=2, timeout_s=300)
        outcome = run_job(cfg, overrides, federation.superlink, tracking_uri=uri,
                          console=Console(file=io.StringIO()))
        pids = [node.process.pid for node in federation.supernodes] + [federation.superlink.process.pid]
    finally:
        federation.stop()
    assert killed.is_set(), "the victim never received round 2's training message"
    assert outcome.ok, f"{outcome.status}: {outcome.reason}"
    client, run = _only_run(uri)
    assert run.info.status == "FINISHED"
    replied = _history(client, run, "clients_replied")
    failed = _history(client, run, "clients_failed")
    assert replied[0] == 3.0 and failed[0] == 0.0  # round 1: all three
    assert replied[1] == 2.0 and failed[1] == 1.0  # round 2: the victim failed, the others went on
    assert replied[2] == 2.0  # round 3: the two survivors
    lost = _history(client, run, "clients_failed_unavailable")[1] + _history(client, run, "clients_failed_timeout")[1]
    assert lost == 1.0
    assert "failures/round_002.csv" in {a.path for a in client.list_artifacts(run.info.run_id, "failures")}
    assert all(_gone(pid) for pid in pids)
