"""A SuperLink in simulation mode that we start, own and stop by PID.

``flwr run`` would otherwise start a detached SuperLink on fixed ports that
outlives the command. Ours listens on a free loopback port, keeps its state
(``FLWR_HOME``) in the project's git-ignored ``.flwr/`` folder, never installs
dependencies at run time, and is stopped with its whole process group (the
simulation subprocess and Ray included) when we are done.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fl_datasets.federated import CACHE_ENV
from fl_server.config import PROJECT_DIR

FLWR_STATE_DIR = PROJECT_DIR / ".flwr"
CONNECTION = "fedcontinuum"


class SuperLinkError(RuntimeError):
    """The SuperLink could not be started or queried."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    """Start ``flower-superlink --simulation`` on a free port; stop it on exit.

    Parameters
    ----------
    env : dict, optional
        Extra environment for the SuperLink and everything it spawns
        (e.g. ``MLFLOW_TRACKING_URI``).
    startup_timeout_s : float
        How long to wait for its health endpoint.
    """

    def __init__(self, env: dict[str, str] | None = None, startup_timeout_s: float = 60.0) -> None:
        self.port = _free_port()
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
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{self.address}"\ninsecure = true\n'
        )
        command = [
            venv_bin("flower-superlink"),
            "--insecure",
            "--simulation",
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

    def wait_until_ready(self) -> None:
        """Block until the SuperLink's health endpoint answers."""
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise SuperLinkError(
                    f"flower-superlink exited with code {self.process.returncode}; "
                    f"see {self.log_file}"
                )
            try:
                with urllib.request.urlopen(f"http://{self.address}/health", timeout=0.5) as reply:
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
        """Stop the SuperLink and its children (by process group of our PID)."""
        if self.process is None:
            return
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
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process = None
        shutil.rmtree(self.home, ignore_errors=True)

    def flwr(self, *args: str) -> list[str]:
        """A ``flwr`` CLI command line against this SuperLink."""
        return [venv_bin("flwr"), *args]

    def run_status(self, run_id: int) -> str:
        """The Flower status string of ``run_id`` (e.g. ``finished:completed``)."""
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
