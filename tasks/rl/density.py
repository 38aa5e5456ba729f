"""Paper 000 Table 4: edge-node density scenarios of the regions twin.

``density10`` ... ``density50`` deploy 10 % ... 50 % of each tier's candidate
edge sites (``twin.regions.density``, :mod:`edgesim.regions`) with the demand
held fixed (it is sized at ``reference_density``), and no faults. They sit
beside the Table 3 fault scenarios: ``task.faults=density20`` trains in one,
and a run on a regions twin scores its agents in all of them after its last
round (:mod:`tasks.rl.evaluation`).
"""

from __future__ import annotations

from typing import Any

DENSITY_SCENARIOS: dict[str, float] = {f"density{p}": p / 100 for p in (10, 20, 30, 40, 50)}


def is_density(name: str) -> bool:
    return name in DENSITY_SCENARIOS


def density_overrides(name: str, twin: dict[str, Any]) -> dict[str, Any]:
    """``load_scenario`` overrides of a density scenario (the twin must have ``regions``)."""
    if not twin.get("regions"):
        raise ValueError(f"task.faults={name} changes the edge-node density of paper 000's regions: "
                         "it needs twin=regions (a twin with a regions section)")
    return {"faults": [], "regions": {"density": DENSITY_SCENARIOS[name]}}
