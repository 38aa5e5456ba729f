"""Progress events from the ServerApp to whoever streams its log.

The ServerApp runs inside the SuperLink's simulation process; its log reaches
the user through ``flwr run --stream``. It prints one marker line per event,
which the launcher turns into a progress bar and a summary table; a user of
plain ``flwr run`` still sees a readable line.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

MARKER = "[fedcontinuum] "
_marks: dict[str, float] = {}


def emit(kind: str, **payload: Any) -> None:
    """Print one event as ``[fedcontinuum] {"kind": ..., ...}``."""
    print(MARKER + json.dumps({"kind": kind, **payload}, default=float), flush=True)


def parse(line: str) -> dict[str, Any] | None:
    """The event in a streamed log line, or None if it carries none."""
    at = line.find(MARKER)
    if at < 0:
        return None
    try:
        return json.loads(line[at + len(MARKER) :])
    except json.JSONDecodeError:
        return None


# ---------------------------------------------------------------- start-up timeline
def reset_marks() -> None:
    """Forget the marks of an earlier run in this process (the ServerApp calls it first)."""
    _marks.clear()


def mark(name: str, at: float | None = None) -> None:
    """Note when ``name`` first happened (``at`` or now; epoch seconds, comparable across processes)."""
    _marks.setdefault(name, time.time() if at is None else at)


def timeline() -> dict[str, float]:
    """``process_start`` (this process, from ``/proc``; absent elsewhere) and every mark so far.

    The ServerApp emits it as a ``timeline`` event at the end of a run: it
    says where a run's fixed cost went (process start and imports, data and
    model, the clients' actors answering their first message, the rounds)."""
    started = _process_start()
    return {**({"process_start": started} if started is not None else {}), **_marks}


def _process_start() -> float | None:
    try:
        fields = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, in ticks after boot
    except (OSError, ValueError, StopIteration, IndexError):
        return None
