"""Regions (paper 000 §4.3, Table 2): city tier x leading industry.

A twin config may give ``regions`` instead of ``clusters``: each region
(area A-I of paper 000 Table 2) becomes one edge cluster, so the twin's
per-cluster fulfillment (:mod:`edgesim.metrics`) is per region. The
``regions`` section::

    regions:
      density: 0.3              # share of each tier's candidate sites deployed (paper 000 Table 4)
      reference_density: 0.3    # demand is sized for this density and kept fixed when density changes
      tiers:                    # city hierarchy: candidate sites, boards (cycled), home cloud region
        first: {sites: 16, profiles: [jetson-agx-orin, jetson-xavier-nx], cloud_region: cloud-eu}
      industries:               # leading industry: demand level and its daily shape
        manufacturing: {load: 1.0, amplitude: 0.2, peak_hour: 10}
      areas:
        - {name: A, tier: first, industry: manufacturing}

What a region is:

* its nodes: ``max(1, round(density x sites))`` of them, boards taken from
  the tier's ``profiles`` in turn (node i gets ``profiles[i % len]``), so
  rural areas with few small boards have the "low deployment density of edge
  nodes" paper 000 (l. 232) blames for their lower fulfillment;
* its demand (requests/s, before the workload's unit-mean shape):
  ``mean_load x load x capacity at reference_density x daily(t)``, split
  evenly over the region's nodes, where capacity at the reference density is
  the summed service rate of the nodes the region would have there and
  ``daily(t) = 1 + amplitude cos(2 pi (hour(t) - peak_hour) / 24)``, times
  one unit-mean series per region (a Bitbrains VM or a synthetic site) that
  all its nodes share: the region's workload shape. Demand does not follow
  the density, so Table 4's sweep adds nodes to the same load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import EdgeSimError, no_unknown_keys


@dataclass(frozen=True)
class RegionSpec:
    """One region: its tier and industry, and what they imply."""

    name: str
    tier: str
    industry: str
    nodes: tuple[str, ...]  # device profile of each node at the configured density
    reference_nodes: tuple[str, ...]  # ... and at the reference density (sizes the demand)
    cloud_region: str
    load: float
    amplitude: float
    peak_hour: float


@dataclass(frozen=True)
class RegionLayout:
    density: float
    reference_density: float
    regions: tuple[RegionSpec, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.regions)


def parse_regions(config: Any, profile_names: set[str]) -> RegionLayout:
    """Validate the ``regions`` section; every bad value is one :class:`EdgeSimError`."""
    where = "twin.regions"
    if not isinstance(config, Mapping):
        raise EdgeSimError(f"{where}={config!r} must be a mapping with tiers, industries and areas")
    no_unknown_keys(config, ("density", "reference_density", "tiers", "industries", "areas"), where)
    density = _fraction(config.get("density", 0.3), f"{where}.density")
    reference = _fraction(config.get("reference_density", 0.3), f"{where}.reference_density")
    tiers = _table(config.get("tiers"), f"{where}.tiers", ("sites", "profiles", "cloud_region"))
    industries = _table(config.get("industries"), f"{where}.industries", ("load", "amplitude", "peak_hour"))
    areas = config.get("areas")
    if not isinstance(areas, list) or not areas:
        raise EdgeSimError(f"{where}.areas={areas!r}: give a non-empty list of {{name, tier, industry}}")
    regions = []
    for index, area in enumerate(areas):
        at = f"{where}.areas[{index}]"
        if not isinstance(area, Mapping):
            raise EdgeSimError(f"{at}={area!r} must be a mapping {{name, tier, industry}}")
        no_unknown_keys(area, ("name", "tier", "industry"), at)
        tier, industry = area.get("tier"), area.get("industry")
        if tier not in tiers:
            raise EdgeSimError(f"{at}.tier={tier!r} is not a tier: use one of {sorted(tiers)} (twin.regions.tiers)")
        if industry not in industries:
            raise EdgeSimError(f"{at}.industry={industry!r} is not an industry: use one of {sorted(industries)} "
                               "(twin.regions.industries)")
        regions.append(_region(str(area.get("name", f"region-{index}")), tier, tiers[tier], industry,
                               industries[industry], density, reference, profile_names, f"{where}.tiers.{tier}",
                               f"{where}.industries.{industry}"))
    names = [r.name for r in regions]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise EdgeSimError(f"{where}.areas repeat the name(s) {repeated}: give each area a unique name")
    return RegionLayout(density=density, reference_density=reference, regions=tuple(regions))


def cluster_configs(layout: RegionLayout) -> list[dict[str, Any]]:
    """The ``clusters`` list the scenario parser expects: one cluster per region."""
    return [{"name": r.name, "nodes": list(r.nodes), "cloud_region": r.cloud_region} for r in layout.regions]


def daily_factor(region: RegionSpec, hours: np.ndarray) -> np.ndarray:
    """``1 + amplitude cos(2 pi (hour - peak_hour) / 24)`` (never below 0)."""
    return np.maximum(1.0 + region.amplitude * np.cos(2.0 * np.pi * (np.asarray(hours) - region.peak_hour) / 24.0), 0.0)


def node_counts(sites: int, fraction: float) -> int:
    """Nodes a tier with ``sites`` candidate sites deploys at ``fraction`` (at least one)."""
    return max(1, round(fraction * sites))


def _region(name, tier, tier_cfg, industry, industry_cfg, density, reference, profile_names, tier_at, industry_at):
    sites = tier_cfg.get("sites")
    if not isinstance(sites, int) or isinstance(sites, bool) or sites < 1:
        raise EdgeSimError(f"{tier_at}.sites={sites!r} must be a whole number >= 1 (candidate edge sites)")
    profiles = tier_cfg.get("profiles")
    if not isinstance(profiles, list) or not profiles:
        raise EdgeSimError(f"{tier_at}.profiles={profiles!r}: list the device profiles of the tier's boards")
    for profile in profiles:
        if profile not in profile_names:
            raise EdgeSimError(f"{tier_at}.profiles has {profile!r}, not a device profile: use one of "
                               f"{sorted(profile_names)}")
    cloud = tier_cfg.get("cloud_region")
    if not isinstance(cloud, str):
        raise EdgeSimError(f"{tier_at}.cloud_region={cloud!r}: name one of twin.cloud_regions")
    load = _number(industry_cfg.get("load"), f"{industry_at}.load", low=0.0)
    amplitude = _number(industry_cfg.get("amplitude", 0.0), f"{industry_at}.amplitude", low=0.0, high=1.0)
    peak = _number(industry_cfg.get("peak_hour", 12.0), f"{industry_at}.peak_hour", low=0.0, high=24.0)
    cycle = lambda count: tuple(profiles[i % len(profiles)] for i in range(count))  # noqa: E731
    return RegionSpec(name=name, tier=tier, industry=industry, nodes=cycle(node_counts(sites, density)),
                      reference_nodes=cycle(node_counts(sites, reference)), cloud_region=cloud, load=load,
                      amplitude=amplitude, peak_hour=peak)


def _table(config: Any, where: str, keys: tuple[str, ...]) -> dict[str, Mapping[str, Any]]:
    if not isinstance(config, Mapping) or not config:
        raise EdgeSimError(f"{where}={config!r}: give a mapping name -> {{{', '.join(keys)}}}")
    for name, entry in config.items():
        if not isinstance(entry, Mapping):
            raise EdgeSimError(f"{where}.{name}={entry!r} must be a mapping {{{', '.join(keys)}}}")
        no_unknown_keys(entry, keys, f"{where}.{name}")
    return dict(config)


def _fraction(value: Any, where: str) -> float:
    value = _number(value, where, low=0.0, high=1.0)
    if value == 0:
        raise EdgeSimError(f"{where}=0 deploys no edge node: use a share in (0, 1]")
    return value


def _number(value: Any, where: str, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EdgeSimError(f"{where}={value!r} is not a finite number: set it to a number")
    if (low is not None and value < low) or (high is not None and value > high):
        raise EdgeSimError(f"{where}={value} is outside [{low}, {high}]: use a value in that range")
    return float(value)
