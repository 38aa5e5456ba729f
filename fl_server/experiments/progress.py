"""Progress events from the ServerApp to whoever streams its log.

The ServerApp runs inside the SuperLink's simulation process; its log reaches
the user through ``flwr run --stream``. It prints one marker line per event,
which the launcher turns into a progress bar and a summary table; a user of
plain ``flwr run`` still sees a readable line.
"""

from __future__ import annotations

import json
from typing import Any

MARKER = "[fedcontinuum] "


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
