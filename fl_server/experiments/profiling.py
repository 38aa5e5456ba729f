"""``tracking.profile=true``: a cProfile of the ServerApp's run, logged to its MLflow run.

The ServerApp runs inside Flower's ``flwr-simulation`` process, on a thread
of its own; cProfile records the thread that enables it, i.e. the
experiment (config, data, every round's configure / send-and-receive wait /
screening / aggregation / server-side evaluation, checkpoints, the report).
Not in it: the MLflow tracker's thread, Flower's simulation threads and the
Ray actors (other threads and processes). Artifacts:

* ``profile/server.pstats``: ``pstats.Stats("server.pstats")``, or
  ``snakeviz`` / ``python -m pstats`` on it;
* ``profile/server_top.txt``: the top functions by cumulative and by own time.
"""

from __future__ import annotations

import cProfile
import io
import marshal
import pstats
from typing import Any

TOP = 30


class RunProfile:
    """Profile from construction until :meth:`log`; a no-op when ``enabled`` is False."""

    def __init__(self, enabled: bool) -> None:
        self.profiler = cProfile.Profile() if enabled else None
        if self.profiler is not None:
            self.profiler.enable()

    def log(self, tracker: Any) -> None:
        """Stop profiling and queue both artifacts on ``tracker`` (once)."""
        if self.profiler is None:
            return
        profiler, self.profiler = self.profiler, None
        profiler.disable()
        profiler.create_stats()
        tracker.log_bytes(marshal.dumps(profiler.stats), "profile/server.pstats")  # the format pstats loads
        tracker.log_text(summary(profiler), "profile/server_top.txt")


def summary(profiler: cProfile.Profile, top: int = TOP) -> str:
    """The top ``top`` functions by cumulative time, then by own (total) time."""
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    out.write(f"ServerApp thread: {stats.total_calls:,} calls, {stats.total_tt:.2f} s profiled "
              "(MLflow tracker thread, Flower's simulation threads and Ray actors not included)\n\n")
    for key, title in (("cumulative", "by cumulative time"), ("tottime", "by own time")):
        out.write(f"==== top {top} {title} ====\n")
        stats.sort_stats(key).print_stats(top)
    return out.getvalue()
