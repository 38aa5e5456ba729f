"""Per-client round metrics of large federations: a fixed sample plus summaries.

Strategies and the driver report some values per client as
``<family>_p<partition>`` (``epsilon_p3``, ``ass_weight_p3``, ``cluster_p3``).
:func:`limit_per_client` keeps those of the clients in ``keep`` (see
:func:`fl_common.per_client.sample_clients`) and adds, for every family,
``<family>_min`` / ``_mean`` / ``_max`` over all clients that reported one
(an existing key of that name, e.g. the driver's ``epsilon_mean``, is kept).
"""

from __future__ import annotations

import re
from collections.abc import Container

PER_CLIENT = re.compile(r"^(?P<family>epsilon|ass_weight|cluster)_p(?P<partition>\d+)$")


def limit_per_client(metrics: dict[str, float], keep: Container[int] | None) -> dict[str, float]:
    """``metrics`` with per-client keys only for partitions in ``keep`` (None: all, unchanged)."""
    if keep is None:
        return metrics
    out: dict[str, float] = {}
    families: dict[str, list[float]] = {}
    for key, value in metrics.items():
        match = PER_CLIENT.match(key)
        if match is None:
            out[key] = value
            continue
        families.setdefault(match["family"], []).append(float(value))
        if int(match["partition"]) in keep:
            out[key] = value
    for family, values in families.items():
        out.setdefault(f"{family}_min", min(values))
        out.setdefault(f"{family}_mean", sum(values) / len(values))
        out.setdefault(f"{family}_max", max(values))
    return out
