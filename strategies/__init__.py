"""Aggregation strategies: Flower ``Strategy`` subclasses, one per module,
each testable on plain arrays without a simulation. :func:`build_strategy`
maps the ``strategy`` config group to an instance."""

from .registry import build_strategy

__all__ = ["build_strategy"]
