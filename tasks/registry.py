"""Tasks by kind: the one place that knows which tasks exist.

Adding a task = one folder with a :class:`tasks.base.Task` subclass, one line
here, and ``conf/task/<name>.yaml`` with ``kind: <its kind>``.
"""

from __future__ import annotations

from functools import cache
from importlib import import_module

from tasks.base import Task

# kind -> "module:class"; imported on first use, so an image run never loads
# the RL or forecasting code (pandas, TorchRL).
TASKS = {
    "offload": "tasks.offload.task:OffloadTask",  # first: the launcher's summary takes the first task whose metric a run has
    "image": "tasks.image.task:ImageTask",
    "forecast": "tasks.forecast.task:ForecastTask",
    "rl": "tasks.rl.task:RLTask",
    "cdio": "tasks.cdio.task:CDIOTask",
    "metarl": "tasks.metarl.task:MetaRLTask",
}


@cache
def get_task(kind: str) -> Task:
    """The task registered under ``kind``."""
    if kind not in TASKS:
        raise ValueError(f"task.kind={kind} is unknown: registered kinds are {', '.join(TASKS)} (tasks/registry.py)")
    module, cls = TASKS[kind].split(":")
    return getattr(import_module(module), cls)()


def task_of(cfg) -> Task:
    """The task a composed config selects (``task.kind``)."""
    return get_task(str(cfg.task.kind))
