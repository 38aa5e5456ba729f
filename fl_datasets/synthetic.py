"""Synthetic edge-site workloads: the default when no trace directory is set.

Structure from paper 002 (DYNAMIC-ALLOCATOR), §4.2: "Workload patterns were
generated using a Poisson process combined with periodic bursts", in three
profiles, Low, Medium and High. The paper gives no rates, periods or burst
sizes, so every number below is OUR choice, picked to give plausible edge
utilisation (Low ~10 %, Medium ~30 %, High ~60 % mean CPU) with a clear
daily cycle; none of them is taken from the paper.

Per site and step: requests arrive as Poisson(rate), where the rate follows a
24 h sine (per-site phase and amplitude) times a burst multiplier (bursts
start as a Bernoulli per step, last a geometric number of steps, and scale
the rate by a random intensity). CPU % is proportional to arrivals, clipped
to [0, 100]; memory follows a one-hour moving average of CPU load plus noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .traces import GapReport, TraceSet

DAY_S = 86_400  # period of the diurnal cycle
# Our choices (not from paper 002): a site serves at most 250 requests per
# step at 100 % CPU, idles at 2 % CPU, and has 8 GiB of memory (the most
# common provisioned size in GWA-T-12, 8388608 KB).
CAPACITY_REQ_PER_STEP = 250.0
IDLE_CPU_PCT = 2.0
MEM_CAPACITY_KB = 8_388_608.0
MEM_BASE_FRACTION = 0.15  # memory held at zero load (OS, runtime)
MEM_LOAD_FRACTION = 0.50  # extra memory at 100 % smoothed CPU
MEM_NOISE_REL = 0.03  # relative Gaussian noise on memory
MEM_SMOOTH_S = 3_600  # memory lags load by a one-hour moving average


@dataclass(frozen=True)
class Profile:
    """One workload level (all numbers our choice; paper 002 names only Low/Medium/High).

    Attributes
    ----------
    mean_rate : float
        Mean Poisson arrivals per step before bursts.
    bursts_per_day : float
        Expected burst starts per site and day.
    """

    mean_rate: float
    bursts_per_day: float


PROFILES: dict[str, Profile] = {
    "low": Profile(mean_rate=20.0, bursts_per_day=1.0),
    "medium": Profile(mean_rate=70.0, bursts_per_day=2.0),
    "high": Profile(mean_rate=140.0, bursts_per_day=4.0),
}
# Shared by every profile (our choice): per-site diurnal amplitude, relative
# to the mean rate; per-site rate scale (log-normal sigma) for heterogeneity;
# bursts of 30 min mean length scaling the rate by 1.5x to 3x.
AMPLITUDE_RANGE = (0.3, 0.7)
SITE_SCALE_SIGMA = 0.2
BURST_MEAN_S = 1_800
BURST_INTENSITY_RANGE = (1.5, 3.0)


def synthetic_workload(
    num_sites: int, num_steps: int, step_s: int = 300, profile: str = "medium", seed: int = 0
) -> TraceSet:
    """Generate per-site CPU and memory series (no gaps, all mask True).

    Parameters
    ----------
    num_sites : int
        Number of sites (edge nodes / VMs), each with its own phase,
        amplitude, rate scale and bursts.
    num_steps : int
        Length of every series in steps.
    step_s : int, default 300
        Step in seconds (300 matches GWA-T-12); the diurnal period and burst
        durations are set in seconds, so they keep their meaning at any step.
    profile : {"low", "medium", "high"}, default "medium"
        Load level, see :data:`PROFILES`.
    seed : int, default 0
        Seed of the only random generator used: same seed, same data.

    Returns
    -------
    TraceSet
        Columns ``("cpu_usage_pct", "mem_usage_kb")``, float32, timestamps
        ``0, step_s, ...`` seconds, sites ``"0", "1", ...``.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r}: choose one of {sorted(PROFILES)}")
    if num_sites < 1 or num_steps < 1 or step_s <= 0:
        raise ValueError(
            f"need num_sites, num_steps >= 1 and step_s > 0; got {num_sites}, {num_steps}, {step_s}"
        )
    rng = np.random.default_rng(seed)
    rate = _diurnal_rate(rng, PROFILES[profile].mean_rate, num_sites, num_steps, step_s)
    rate = rate * _burst_multiplier(rng, PROFILES[profile].bursts_per_day, rate.shape, step_s)
    arrivals = rng.poisson(rate)
    cpu = np.clip(IDLE_CPU_PCT + 100.0 * arrivals / CAPACITY_REQ_PER_STEP, 0.0, 100.0)
    mem = _memory_kb(rng, cpu, step_s)
    sites = tuple(str(i) for i in range(num_sites))
    return TraceSet(
        sites=sites,
        values=np.stack([cpu, mem], axis=-1).astype(np.float32),
        mask=np.ones((num_sites, num_steps), dtype=bool),
        timestamps=np.arange(num_steps, dtype=np.int64) * step_s,
        gaps={site: GapReport(0, 0, 0, 0) for site in sites},
        columns=("cpu_usage_pct", "mem_usage_kb"),
        step_s=step_s,
    )


def _diurnal_rate(
    rng: np.random.Generator, mean_rate: float, sites: int, steps: int, step_s: int
) -> np.ndarray:
    """Arrival rate (sites, steps): per-site scale x (1 + amplitude x sin(day phase))."""
    phase = rng.uniform(0.0, 2 * np.pi, size=(sites, 1))
    amplitude = rng.uniform(*AMPLITUDE_RANGE, size=(sites, 1))
    # Mean-one log-normal, so the profile's mean rate is kept on average.
    scale = rng.lognormal(-SITE_SCALE_SIGMA**2 / 2, SITE_SCALE_SIGMA, size=(sites, 1))
    day_angle = 2 * np.pi * np.arange(steps) * step_s / DAY_S
    return mean_rate * scale * (1.0 + amplitude * np.sin(day_angle + phase))


def _burst_multiplier(
    rng: np.random.Generator, bursts_per_day: float, shape: tuple[int, int], step_s: int
) -> np.ndarray:
    """1 outside bursts, 1 + sum of (intensity - 1) over the bursts covering a step.

    Built with a difference array and a cumulative sum instead of a loop over
    bursts; overlapping bursts add their extra intensity.
    """
    sites, steps = shape
    start_p = min(1.0, bursts_per_day * step_s / DAY_S)
    site_idx, start = np.nonzero(rng.random(shape) < start_p)
    length = rng.geometric(min(1.0, step_s / BURST_MEAN_S), size=start.size)  # >= 1 step
    extra = rng.uniform(*BURST_INTENSITY_RANGE, size=start.size) - 1.0
    delta = np.zeros((sites, steps + 1))
    np.add.at(delta, (site_idx, start), extra)
    np.add.at(delta, (site_idx, np.minimum(start + length, steps)), -extra)
    return 1.0 + np.cumsum(delta[:, :steps], axis=1)


def _memory_kb(rng: np.random.Generator, cpu_pct: np.ndarray, step_s: int) -> np.ndarray:
    """Memory (KB): base + share of capacity following smoothed load, plus noise."""
    load = _trailing_mean(cpu_pct / 100.0, max(1, round(MEM_SMOOTH_S / step_s)))
    level = MEM_BASE_FRACTION + MEM_LOAD_FRACTION * load
    noise = 1.0 + MEM_NOISE_REL * rng.standard_normal(cpu_pct.shape)
    return np.clip(MEM_CAPACITY_KB * level * noise, 0.0, MEM_CAPACITY_KB)


def _trailing_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Causal moving average along the last axis (shorter window at the start)."""
    csum = np.cumsum(x, axis=-1)
    shifted = np.zeros_like(csum)
    shifted[..., window:] = csum[..., :-window]
    counts = np.minimum(np.arange(1, x.shape[-1] + 1), window)
    return (csum - shifted) / counts


# ------------------------------------------------- serverless invocations
# Per-minute invocation counts of serverless function apps, in the style of
# the Azure Functions traces (Shahrad et al., "Serverless in the Wild",
# USENIX ATC 2020): popularity spread over orders of magnitude, and three
# kinds of trigger that each app mixes: HTTP (diurnal and weekly cycle,
# Poisson), timer (fires every k minutes) and event/queue (on-off bursts).
# Every number below is OUR choice, not taken from the paper or the trace.
FUNCTIONS_STEP_S = 60
FUNCTIONS_COLUMN = "invocations"
APP_RATE_MEDIAN = 20.0   # invocations per minute of the median app
APP_RATE_SIGMA = 1.2     # log-normal spread of app popularity
TIMER_PERIODS_MIN = (5, 10, 15, 30, 60)
WEEKEND_FACTOR = 0.6     # HTTP traffic on Saturdays and Sundays
EVENT_ON_MEAN_MIN = 20   # mean length of an event burst
EVENT_OFF_MEAN_MIN = 240  # mean quiet time between bursts


def synthetic_invocations(num_sites: int, num_steps: int, seed: int = 0) -> TraceSet:
    """Per-minute invocation counts of ``num_sites`` function apps.

    Each app's rate is its popularity times a random mix (Dirichlet weights)
    of an HTTP component (a 24 h sine with a per-app phase, damped on
    weekends), a timer component (a burst of calls every k minutes, k per
    app) and an event component (on-off bursts, geometric lengths); counts
    are Poisson of that rate. Deterministic per seed.

    Returns
    -------
    TraceSet
        Column ``("invocations",)``, float32 counts per 60 s step, no gaps.
    """
    if num_sites < 1 or num_steps < 1:
        raise ValueError(f"need num_sites, num_steps >= 1; got {num_sites}, {num_steps}")
    rng = np.random.default_rng(seed)
    minute = np.arange(num_steps)
    popularity = APP_RATE_MEDIAN * rng.lognormal(0.0, APP_RATE_SIGMA, size=(num_sites, 1))
    weights = rng.dirichlet([1.0, 1.0, 1.0], size=num_sites)  # http, timer, event
    day = 2 * np.pi * minute * FUNCTIONS_STEP_S / DAY_S
    phase = rng.uniform(0, 2 * np.pi, size=(num_sites, 1))
    weekend = np.where((minute * FUNCTIONS_STEP_S // DAY_S) % 7 >= 5, WEEKEND_FACTOR, 1.0)
    http = (1.0 + 0.8 * np.sin(day + phase)) * weekend
    periods = rng.choice(TIMER_PERIODS_MIN, size=(num_sites, 1))
    offsets = rng.integers(0, periods)
    timer = np.where((minute + offsets) % periods == 0, periods, 0.0)  # mean 1 per minute
    event = _on_off(rng, num_sites, num_steps) * (EVENT_OFF_MEAN_MIN + EVENT_ON_MEAN_MIN) / EVENT_ON_MEAN_MIN
    rate = popularity * (weights[:, :1] * http + weights[:, 1:2] * timer + weights[:, 2:] * event)
    counts = rng.poisson(rate).astype(np.float32)
    sites = tuple(f"app{i}" for i in range(num_sites))
    return TraceSet(
        sites=sites, values=counts[..., None], mask=np.ones((num_sites, num_steps), dtype=bool),
        timestamps=minute.astype(np.int64) * FUNCTIONS_STEP_S, gaps={s: GapReport(0, 0, 0, 0) for s in sites},
        columns=(FUNCTIONS_COLUMN,), step_s=FUNCTIONS_STEP_S,
    )


def _on_off(rng: np.random.Generator, sites: int, steps: int) -> np.ndarray:
    """0/1 per site and minute: alternating geometric off and on periods."""
    out = np.zeros((sites, steps))
    for s in range(sites):
        t = int(rng.geometric(1 / EVENT_OFF_MEAN_MIN))
        while t < steps:
            length = int(rng.geometric(1 / EVENT_ON_MEAN_MIN))
            out[s, t : t + length] = 1.0
            t += length + int(rng.geometric(1 / EVENT_OFF_MEAN_MIN))
    return out
