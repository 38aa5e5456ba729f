"""A Deployment Engine federation on this machine: one SuperLink and N
SuperNodes as separate processes on loopback, each started, owned and stopped
by PID.

This is Flower's own Deployment Engine (``flower-superlink`` without
``--simulation`` and ``flower-supernode``), the same processes one would run on
separate machines; only the addresses and the certificates' host names differ
(see README, "Deployment engine"). The ServerApp and ClientApp are the ones the
simulation runs, unchanged.

Each SuperNode holds one partition, given by its node config
(``partition-id=i num-partitions=N``). Its device profile follows from the
partition id (the server assigns profiles with ``Fleet.assign``), so node config
is all a node needs to know.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fl_datasets.federated import CACHE_ENV
from fl_server.runtime.superlink import (
    CONNECTION,
    LocalSuperLink,
    SuperLinkError,
    _free_port,
    descendant_groups,
    flower_env,
    venv_bin,
)


class LocalSuperNode:
    """One ``flower-supernode`` process connected to ``superlink``.

    Parameters
    ----------
    superlink : LocalSuperLink
        A running Deployment Engine SuperLink (``simulation=False``).
    partition_id, num_partitions : int
        Its node config: the partition this node trains on.
    extra_config : dict, optional
        More node-config keys (strings), e.g. a regional aggregator's
        (:mod:`fl_common.regions`).
    """

    def __init__(self, superlink: LocalSuperLink, partition_id: int, num_partitions: int,
                 extra_config: dict[str, str] | None = None) -> None:
        self.superlink = superlink
        self.partition_id = partition_id
        self.num_partitions = num_partitions
        self.extra_config = dict(extra_config or {})
        self.home = superlink.home / f"supernode-{partition_id}"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_file(self) -> Path:
        return self.home / "supernode.log"

    @property
    def node_config(self) -> str:
        extra = "".join(f' {key}="{value}"' for key, value in self.extra_config.items())  # TOML strings
        return f"partition-id={self.partition_id} num-partitions={self.num_partitions}{extra}"

    def command(self) -> list[str]:
        """The ``flower-supernode`` command line."""
        certificates = self.superlink.certificates
        tls = ["--root-certificates", str(certificates.ca_cert)] if certificates else ["--insecure"]
        return [
            venv_bin("flower-supernode"),
            *tls,
            "--superlink", self.superlink.address,
            "--node-config", self.node_config,
            "--isolation", "subprocess",
            # each node's local Runtime API (for its ClientApp processes) needs its own port
            "--host", "127.0.0.1",
            "--port", str(_free_port()),
        ]

    def spawn(self) -> "LocalSuperNode":
        """Start the SuperNode in its own process group."""
        self.home.mkdir(parents=True, exist_ok=True)
        # Same data cache as the SuperLink: on one machine the split is built once.
        env = flower_env(self.home, {CACHE_ENV: self.superlink.env[CACHE_ENV]})
        with self.log_file.open("wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its ClientApp processes join its group
            )
        (self.home / "supernode.pid").write_text(str(self.process.pid))
        return self

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """Crash the node: SIGKILL its whole group, no goodbye to the SuperLink."""
        self._signal(signal.SIGKILL)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the node and its ClientApp processes (by our PID's group)."""
        if self.process is None:
            return
        # its SuperExec may run in a session of its own (and a regional aggregator's
        # ClientApp its `flwr run`): note those groups while their parent still lives
        child_groups = descendant_groups(self.process.pid)
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)  # lets it deactivate itself at the SuperLink
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait(timeout=timeout_s)
        self._signal(signal.SIGKILL)  # anything left in its group
        for group in child_groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.process = None

    def _signal(self, signum: int) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


class LocalFederation:
    """A Deployment Engine SuperLink plus ``num_supernodes`` SuperNodes.

    Use as a context manager; everything started is stopped on exit, by PID.

    Parameters
    ----------
    num_supernodes : int
        One SuperNode per partition ``0 .. num_supernodes - 1``.
    tls : bool
        HTTPS with certificates generated at start-up (default). False only
        for an explicit ``--insecure`` request.
    env : dict, optional
        Extra environment for the SuperLink (e.g. ``MLFLOW_TRACKING_URI``).
    connect_timeout_s : float
        How long to wait for every SuperNode to be online.
    partitions : sequence of int, optional
        The nodes' partition ids (default ``0 .. num_supernodes - 1``), out of
        ``num_partitions`` (default ``num_supernodes``): a region's clients
        hold a block of the global partitions.
    node_config : dict or callable, optional
        More node-config keys for every node (``LocalSuperNode.extra_config``),
        or ``partition id -> keys`` where they differ per node.
    port : int, optional
        The SuperLink's port (default: a free one).
    """

    def __init__(
        self,
        num_supernodes: int,
        tls: bool = True,
        env: dict[str, str] | None = None,
        connect_timeout_s: float = 120.0,
        *,
        partitions: Sequence[int] | None = None,
        num_partitions: int | None = None,
        node_config: dict[str, str] | Callable[[int], dict[str, str]] | None = None,
        port: int | None = None,
    ) -> None:
        self.superlink = LocalSuperLink(env, simulation=False, tls=tls, port=port)
        self.num_supernodes = num_supernodes
        self.partitions = list(range(num_supernodes) if partitions is None else partitions)
        self.num_partitions = num_supernodes if num_partitions is None else num_partitions
        self.node_config = node_config or {}
        self.connect_timeout_s = connect_timeout_s
        self.supernodes: list[LocalSuperNode] = []

    def spawn_superlink(self) -> "LocalFederation":
        """Start the SuperLink without waiting (boot it while doing other work)."""
        self.superlink.spawn()
        return self

    def start(self) -> "LocalFederation":
        """Start the SuperLink (if not yet) and the SuperNodes; wait until all are online."""
        self.spawn_supernodes()
        self.wait_for_supernodes()
        return self

    def spawn_supernodes(self) -> "LocalFederation":
        """Start the SuperLink (if not yet) and the SuperNodes, without waiting for them."""
        if self.superlink.process is None:
            self.superlink.spawn()
        self.superlink.wait_until_ready()
        self.supernodes = [
            LocalSuperNode(self.superlink, i, self.num_partitions,
                           self.node_config(i) if callable(self.node_config) else self.node_config).spawn()
            for i in self.partitions
        ]
        return self

    def online_node_count(self) -> int:
        """SuperNodes the SuperLink reports online (``flwr supernode list``)."""
        out = subprocess.run(
            self.superlink.flwr("supernode", "list", CONNECTION, "--format", "json"),
            env=self.superlink.env, capture_output=True, text=True, timeout=60,
        )
        try:
            nodes = json.loads(out.stdout).get("nodes", [])
        except json.JSONDecodeError as err:
            raise SuperLinkError(f"cannot list the SuperNodes: {out.stdout or out.stderr}") from err
        return sum(1 for node in nodes if node.get("status") == "online")

    def wait_for_supernodes(self) -> None:
        """Block until every SuperNode is online; fail fast if one exits."""
        deadline = time.monotonic() + self.connect_timeout_s
        while time.monotonic() < deadline:
            for node in self.supernodes:
                if not node.is_running():
                    raise SuperLinkError(
                        f"SuperNode {node.partition_id} exited; see {node.log_file}:\n{_tail(node.log_file)}"
                    )
            if self.online_node_count() >= self.num_supernodes:
                return
            time.sleep(1.0)
        raise SuperLinkError(
            f"not all {self.num_supernodes} SuperNodes came online within {self.connect_timeout_s:.0f} s; "
            f"see {self.superlink.home}/supernode-*/supernode.log"
        )

    def stop(self) -> None:
        """Stop the SuperNodes, then the SuperLink (each by its own process group)."""
        for node in self.supernodes:
            node.stop()
        self.superlink.stop()

    def __enter__(self) -> "LocalFederation":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tail(path: Path, lines: int = 10) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
