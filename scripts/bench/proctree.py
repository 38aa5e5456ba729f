"""Memory and Ray actors of a process tree, sampled from ``/proc`` while it runs.

RSS counts a shared page (torch's libraries, Ray's plasma store) once per
process that maps it, so the sum over a tree overstates what it costs; PSS
(``/proc/<pid>/smaps_rollup``) splits each shared page among the processes
that map it, so the sum over the tree is the tree's real footprint.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fl_server.runtime.superlink import descendants


@dataclass
class Sample:
    at: float  # epoch s
    rss_mb: float
    pss_mb: float
    processes: int
    actors: int  # Ray worker processes serving a ClientApp actor
    by_role: dict[str, float] = field(default_factory=dict)  # PSS MB per role
    cpu_s: float = 0.0  # CPU seconds used so far by every process of the tree seen up to now (see TreeSampler)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _rollup(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in kB, 0 for a process that has gone."""
    rss = pss = 0.0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = float(line.split()[1])
            elif line.startswith("Pss:"):
                pss = float(line.split()[1])
    except OSError:
        pass
    return rss, pss


def role(command: str) -> str:
    """What a process of the tree is, for the per-role breakdown."""
    if command.startswith("ray::ClientAppActor"):
        return "ray actor"
    if command.startswith("ray::IDLE"):
        return "ray worker (idle)"
    if command.startswith("ray::"):  # DashboardAgent, RuntimeEnvAgent
        return "ray gcs/raylet/agents"
    for needle, name in (("flwr-simulation", "flwr-simulation (ServerApp)"), ("flower-superlink", "SuperLink"),
                         ("flower-superexec", "SuperExec"), ("gcs_server", "ray gcs/raylet/agents"),
                         ("raylet", "ray gcs/raylet/agents"), ("ray/", "ray gcs/raylet/agents"),
                         ("ray start", "ray gcs/raylet/agents"), ("flwr run", "flwr CLI"), ("bin/flwr ", "flwr CLI")):
        if needle in command:
            return name
    return "launcher / other"


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> tuple[int, float] | None:
    """(start time in ticks, user + system CPU seconds) of ``pid``; None if it has gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19]), (int(fields[11]) + int(fields[12])) / _TICK


def sample(root: int, cpu_seen: dict[tuple[int, int], float] | None = None) -> Sample:
    """One sample of ``root`` and every process descending from it.

    ``cpu_seen`` (process -> last CPU seconds seen) accumulates across samples:
    a process that has exited keeps what it was last seen using, so the sum
    is the tree's CPU so far (less what a process used after its last sample,
    and processes that lived less than one interval)."""
    pids = [root, *descendants(root)]
    cpu_seen = {} if cpu_seen is None else cpu_seen
    for pid in pids:
        if (seen := _cpu(pid)) is not None:
            cpu_seen[(pid, seen[0])] = seen[1]
    rss = pss = 0.0
    actors = 0
    by_role: dict[str, float] = {}
    for pid in pids:
        r, p = _rollup(pid)
        rss, pss = rss + r, pss + p
        command = _cmdline(pid)
        name = role(command)
        actors += name == "ray actor"
        by_role[name] = by_role.get(name, 0.0) + p / 1024
    return Sample(time.time(), rss / 1024, pss / 1024, len(pids), actors, by_role, sum(cpu_seen.values()))


class TreeSampler:
    """Sample a process tree every ``interval_s`` on a thread until stopped."""

    def __init__(self, root: int, interval_s: float = 0.5) -> None:
        self.root, self.interval_s = root, interval_s
        self.samples: list[Sample] = []
        self.cpu_seen: dict[tuple[int, int], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proctree-sampler", daemon=True)

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(sample(self.root, self.cpu_seen))
            self._stop.wait(self.interval_s)

    def peak(self, key: str = "pss_mb") -> Sample | None:
        return max(self.samples, key=lambda s: getattr(s, key), default=None)

    def cpu_at(self, at: float) -> float:
        """The tree's CPU seconds at the last sample before ``at`` (epoch s)."""
        return max((s.cpu_s for s in self.samples if s.at <= at), default=0.0)
