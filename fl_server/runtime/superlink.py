"""A SuperLink that we start, own and stop by PID.

``flwr run`` would otherwise start a detached SuperLink on fixed ports that
outlives the command. Ours listens on a free loopback port, keeps its state
(``FLWR_HOME``) in the project's git-ignored ``.flwr/`` folder, never installs
dependencies at run time, and is stopped with its whole process group (the
simulation subprocess and Ray included) when we are done.

By default it runs Flower's Simulation Engine (``--simulation``, plaintext on
loopback). With ``simulation=False`` it is a Deployment Engine SuperLink that
separate ``flower-supernode`` processes connect to (see
:mod:`fl_server.runtime.deployment`); ``tls=True`` then serves all its APIs over HTTPS
with certificates made at start-up in its own (git-ignored, removed on stop)
folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from fl_datasets.federated import CACHE_ENV
from fl_server.experiments.config import PROJECT_DIR
from fl_server.runtime.certificates import Certificates, generate_certificates

FLWR_STATE_DIR = PROJECT_DIR / ".flwr"
CONNECTION = "fedcontinuum"


class SuperLinkError(RuntimeError):
    """The SuperLink could not be started or queried."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _checked_port(port: int) -> int:
    """``port`` if it is a loopback port nobody listens on, else a clear error."""
    if not 1024 <= port <= 65535:
        raise SuperLinkError(f"port {port} is invalid: use 1024 .. 65535, or leave it out (a free port is picked)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise SuperLinkError(f"port {port} on 127.0.0.1 is taken: choose another one, or leave it out "
                                 "(a free port is picked)") from None
    return port


def _process_table() -> tuple[dict[int, int], dict[int, int]]:
    """``(parent of, process group of)`` every live process, from ``/proc/<pid>/stat``."""
    parent_of: dict[int, int] = {}
    group_of: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        child = int(stat.parent.name)
        parent_of[child], group_of[child] = int(fields[1]), int(fields[2])
    return parent_of, group_of


def descendants(pid: int, parent_of: dict[int, int] | None = None) -> set[int]:
    """Every live process that descends from ``pid`` (empty where there is no ``/proc``)."""
    if parent_of is None:
        parent_of, _ = _process_table()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parent_of.items() if p in frontier} - found
        found |= frontier
    return found


def descendant_groups(pid: int) -> set[int]:
    """Process groups of ``pid``'s descendants other than its own and ours.

    Read from ``/proc/<pid>/stat`` (empty where there is no ``/proc``); only
    processes that descend from ``pid``, i.e. that we started, are included.
    """
    parent_of, group_of = _process_table()
    return {group_of[d] for d in descendants(pid, parent_of)} - {pid, os.getpgrp()}


def unwind_on_sigterm() -> None:
    """Let SIGTERM (``timeout``, ``kill``, a batch scheduler) unwind like Ctrl-C.

    Python's default SIGTERM ends the process at once, skipping the
    ``finally`` blocks, ``with`` exits and ``atexit`` hooks that stop our
    SuperLink's process groups: the SuperLink, its simulation and Ray would
    run on as orphans. Raising ``SystemExit`` runs them. Only the main thread
    may set a handler, and one set by someone else is left alone.
    """
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def venv_bin(name: str) -> str:
    """A console script of the running interpreter's environment."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise SuperLinkError(f"'{name}' is not installed: run 'make install' (pip install -e .)")
    return found


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the SuperLink and the flwr CLI."""
    env = os.environ.copy()
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            # console scripts the SuperLink spawns (flwr-simulation) come from our venv
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
            "RAY_DEDUP_LOGS": "0",
        }
    )
    env.update(extra or {})
    return env


class LocalSuperLink:
    """Start ``flower-superlink`` on a free port; stop it on exit.

    Parameters
    ----------
    env : dict, optional
        Extra environment for the SuperLink and everything it spawns
        (e.g. ``MLFLOW_TRACKING_URI``).
    startup_timeout_s : float
        How long to wait for its health endpoint.
    simulation : bool
        Run Flower's Simulation Engine (the default); False for the
        Deployment Engine, which SuperNodes connect to.
    tls : bool
        Serve HTTPS with certificates generated at start-up (``certificates``);
        False serves plaintext (``--insecure``).
    ray_head : bool
        Start a private Ray head first (:class:`fl_server.runtime.ray_head.LocalRayHead`)
        and let every simulation of this SuperLink join it (``RAY_ADDRESS``),
        so that a sweep pays Ray's start-up once instead of once per job. It is
        stopped with the SuperLink. Ignored when ``RAY_ADDRESS`` is already set
        (an existing cluster, see the README).
    port : int, optional
        Listen on this loopback port (refused at once if it is taken);
        default: a free one.
    """

    def __init__(
        self,
        env: dict[str, str] | None = None,
        startup_timeout_s: float = 60.0,
        *,
        simulation: bool = True,
        tls: bool = False,
        ray_head: bool = False,
        port: int | None = None,
    ) -> None:
        self.simulation = simulation
        self.tls = tls
        self.ray_head = ray_head
        self.ray = None  # the LocalRayHead, once started
        self.certificates: Certificates | None = None
        self.port = _free_port() if port is None else _checked_port(port)
        self.home = FLWR_STATE_DIR / f"superlink-{self.port}"
        # processes of this SuperLink share one split of the data (see fl_datasets.federated)
        self.env = flower_env(self.home, {CACHE_ENV: str(self.cache_dir), **(env or {})})
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.home / "superlink.log"

    @property
    def cache_dir(self) -> Path:
        """Per-SuperLink scratch space shared with every process it spawns."""
        return self.home / "cache"

    def start(self) -> "LocalSuperLink":
        """Spawn the SuperLink and wait until it answers."""
        self.spawn()
        self.wait_until_ready()
        return self

    def spawn(self) -> "LocalSuperLink":
        """Spawn the SuperLink without waiting (boot it while doing other work)."""
        unwind_on_sigterm()
        self.home.mkdir(parents=True, exist_ok=True)
        if self.ray_head and self.simulation and "RAY_ADDRESS" not in self.env:
            from fl_server.runtime.ray_head import RAY_ADDRESS_ENV, LocalRayHead

            self.ray = LocalRayHead(self.env).start()
            self.env[RAY_ADDRESS_ENV] = self.ray.address
        if self.tls:
            self.certificates = generate_certificates(self.home / "certs")
        (self.home / "config.toml").write_text(self._connection_toml())
        command = [
            venv_bin("flower-superlink"),
            *(self.certificates.superlink_args() if self.certificates else ["--insecure"]),
            *(["--simulation"] if self.simulation else []),
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-file",
            str(self.log_file),
        ]
        self.process = subprocess.Popen(
            command,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: we stop it whole
        )
        (self.home / "superlink.pid").write_text(str(self.process.pid))
        return self

    def _connection_toml(self) -> str:
        """The ``flwr`` CLI's connection to this SuperLink (``$FLWR_HOME/config.toml``)."""
        if self.certificates is not None:
            # the CLI verifies the SuperLink against our CA (an absolute path)
            security = f'root-certificates = "{self.certificates.ca_cert.resolve()}"\n'
        else:
            security = "insecure = true\n"
        return (
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{self.address}"\n{security}'
        )

    def _health_url(self) -> tuple[str, ssl.SSLContext | None]:
        if self.certificates is None:
            return f"http://{self.address}/health", None
        return f"https://{self.address}/health", ssl.create_default_context(cafile=str(self.certificates.ca_cert))

    def wait_until_ready(self) -> None:
        """Block until the SuperLink's health endpoint answers."""
        deadline = time.monotonic() + self.startup_timeout_s
        url, context = self._health_url()
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise SuperLinkError(
                    f"flower-superlink exited with code {self.process.returncode}; "
                    f"see {self.log_file}"
                )
            try:
                with urllib.request.urlopen(url, timeout=0.5, context=context) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SuperLinkError(
            f"flower-superlink did not become healthy within {self.startup_timeout_s:.0f} s; "
            f"see {self.log_file}"
        )

    def stop(self) -> None:
        """Stop the SuperLink and its children (by process group of our PID), then our Ray head."""
        try:
            self._stop_superlink()
        finally:
            if self.ray is not None:
                self.ray.stop()
                self.ray = None
                self.env.pop("RAY_ADDRESS", None)

    def _stop_superlink(self) -> None:
        if self.process is None:
            return
        # Flower starts its SuperExec (and so the ServerApp / simulation) in a
        # session of its own: note those groups while their parent still lives.
        child_groups = descendant_groups(self.process.pid)
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            except ProcessLookupError:
                pass
        # Ray workers may sit in the group after the SuperLink has gone.
        for group in (self.process.pid, *child_groups):
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.process = None
        shutil.rmtree(self.home, ignore_errors=True)

    def flwr(self, *args: str) -> list[str]:
        """A ``flwr`` CLI command line against this SuperLink."""
        return [venv_bin("flwr"), *args]

    def run_status(self, run_id: int) -> str:
        """The Flower status string of ``run_id`` (e.g. ``finished:completed``).

        Asked over the Control API from this process (~5 ms once flwr's client
        is imported, ~0.7 s the first time); ``flwr list`` (a new Python
        process: ~2-4 s here) where that client is not available."""
        try:
            return self._run_status_in_process(run_id)
        except SuperLinkError:
            raise
        except Exception:  # noqa: BLE001 - another flwr version: ask the CLI
            return self._run_status_cli(run_id)

    def _run_status_in_process(self, run_id: int) -> str:
        from flwr.proto.control_pb2 import ListRunsRequest
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

        client = ControlHttpClient.from_server_address(
            server_address=self.address,
            insecure=self.certificates is None,
            root_certificates=None if self.certificates is None else str(self.certificates.ca_cert.resolve()),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
        )
        try:
            runs = client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict.values()
        finally:
            client.close()
        for run in runs:
            status = run.status
            return f"{status.status}:{status.sub_status}" if status.sub_status else str(status.status)
        return "unknown"

    def _run_status_cli(self, run_id: int) -> str:
        out = subprocess.run(
            self.flwr("list", CONNECTION, "--run-id", str(run_id), "--format", "json"),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        try:
            payload = json.loads(out.stdout)
            runs = payload.get("runs", [])
            return str(runs[0]["status"]) if runs else "unknown"
        except (json.JSONDecodeError, KeyError, IndexError) as err:
            raise SuperLinkError(f"cannot read the status of run {run_id}: {out.stdout or out.stderr}") from err

    def __enter__(self) -> "LocalSuperLink":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
