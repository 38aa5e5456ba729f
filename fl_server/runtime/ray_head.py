"""A private Ray head that a sweep starts once and every job's simulation joins.

Flower's Simulation Engine calls ``ray.init()`` without an address, so Ray's
own ``RAY_ADDRESS`` decides whether each ``flwr-simulation`` starts a Ray of
its own (~10-17 s here, every job) or joins a running one (~1 s). A sweep
therefore starts ``ray start --head --block`` on a free loopback port, with a
temporary ``--temp-dir`` of its own, passes ``RAY_ADDRESS`` to its SuperLink,
and stops the head by its process group when it is done (never ``ray stop``,
which stops every Ray of the user on a shared machine).

The head is started with the SuperLink's environment: Ray's workers inherit
the raylet's, so the shared data cache (``FEDCONTINUUM_CACHE_DIR``) and the
venv on ``PATH`` reach every job's ClientApp actors as they do when each job
starts its own Ray. Jobs run one after another: when a job's ``flwr-simulation``
(the Ray driver) ends, Ray kills its actors and frees their CPUs for the next
job (:meth:`LocalRayHead.job_workers` counts what is left).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from fl_server.runtime.superlink import SuperLinkError, descendant_groups, descendants, unwind_on_sigterm, venv_bin

RAY_ADDRESS_ENV = "RAY_ADDRESS"
_STARTED = "Ray runtime started"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalRayHead:
    """``ray start --head --block`` on loopback; stopped by its process group.

    Parameters
    ----------
    env : dict
        The environment of the head and so of every Ray worker (pass the
        SuperLink's, :attr:`fl_server.runtime.superlink.LocalSuperLink.env`).
    num_cpus : int, optional
        CPUs the head offers; default: what Ray detects (as ``ray.init()`` does).
    startup_timeout_s : float
        How long to wait for "Ray runtime started".
    """

    def __init__(self, env: dict[str, str], num_cpus: int | None = None, startup_timeout_s: float = 120.0) -> None:
        self.env = {k: v for k, v in env.items() if k != RAY_ADDRESS_ENV}
        self.num_cpus = num_cpus
        self.startup_timeout_s = startup_timeout_s
        self.port = _free_port()
        self.temp_dir: Path | None = None
        self.process: subprocess.Popen[str] | None = None
        self.startup_s = float("nan")
        self._output: list[str] = []
        self._started = threading.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "LocalRayHead":
        """Start the head and wait until Ray says it runs."""
        unwind_on_sigterm()
        began = time.perf_counter()
        # short and private: Ray's socket paths must stay under ~107 characters
        self.temp_dir = Path(tempfile.mkdtemp(prefix="fc-ray-"))
        command = [
            venv_bin("ray"), "start", "--head", "--block",
            "--node-ip-address", "127.0.0.1", "--port", str(self.port),
            "--temp-dir", str(self.temp_dir),
            "--include-dashboard", "false", "--disable-usage-stats",
            *(["--num-cpus", str(self.num_cpus)] if self.num_cpus is not None else []),
        ]
        self.process = subprocess.Popen(
            command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            start_new_session=True,  # its own process group: we stop it whole
        )
        threading.Thread(target=self._read, name="ray-head-log", daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._started.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = "".join(self._output[-15:])
                self.stop()
                raise SuperLinkError(f"ray start --head did not start within {self.startup_timeout_s:.0f} s:\n{tail}")
        self.startup_s = time.perf_counter() - began
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self._output.append(line)
            del self._output[:-200]
            if _STARTED in line:
                self._started.set()

    def job_workers(self) -> list[str]:
        """Command lines of the head's Ray worker processes now serving a job
        (actors, tasks; idle pooled workers and Ray's agents excluded): empty between jobs
        unless a job leaked actors."""
        if self.process is None:
            return []
        found = []
        for pid in descendants(self.process.pid):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if command.startswith("ray::") and not command.startswith(("ray::IDLE", "ray::DashboardAgent",
                                                                            "ray::RuntimeEnvAgent")):
                found.append(command.strip())
        return found

    def pids(self) -> list[int]:
        """The head's process and all its descendants (GCS, raylet, workers)."""
        return [] if self.process is None else [self.process.pid, *descendants(self.process.pid)]

    def stop(self) -> None:
        """Stop the head, its raylet, GCS and workers (by process group), and remove its temp dir."""
        if self.process is not None:
            groups = descendant_groups(self.process.pid)
            if self.process.poll() is None:
                try:
                    os.killpg(self.process.pid, signal.SIGTERM)  # `ray start --block` stops its processes
                    self.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    pass
                except ProcessLookupError:
                    pass
            # GCS and monitor may outlive the SIGTERM; workers may sit in other groups
            for group in (self.process.pid, *groups):
                try:
                    os.killpg(group, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            self.process = None
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    def __enter__(self) -> "LocalRayHead":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

