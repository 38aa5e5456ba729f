"""The federated view of the workload-forecasting task: one edge site per
client, each with its own series (non-IID by construction).

Every site's series is split in time (train / validation / test, no
shuffling), z-scored with statistics fitted on its own training slice, and cut
into (window, horizon) pairs inside each slice, so no target of one split ever
feeds another split's inputs or statistics. The server holds every site's
validation and test windows for the per-site metrics; a client sees only its
own training (and validation) windows.

Built once per process and cached (Flower re-creates clients every round): the
raw series of a trace directory are also saved under ``FEDCONTINUUM_CACHE_DIR``
when the launcher sets it, so Ray workers skip re-parsing the CSV files. The
series are cached whole; windows are cut per site on demand (a client: its
own, :func:`build_site`), so a 1,000-site federation does not hold every
site's windows in every process.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .federated import CACHE_ENV
from .synthetic import synthetic_invocations, synthetic_workload
from .traces import Normaliser, TraceError, TraceSet, load_trace_dir, time_split


@dataclass(frozen=True)
class ForecastSpec:
    """Everything that determines the forecasting data; hashable, JSON-able.

    Attributes
    ----------
    num_clients : int
        Sites used, one per client.
    window, horizon, season : int
        Input steps W, forecast steps H, seasonal period (MASE scale and the
        seasonal-naive baseline), all in grid steps.
    columns : tuple of str
        Resource columns forecast, e.g. ``("cpu_usage_pct",)`` for CPU %,
        ``("mem_usage_kb",)`` for memory, or both; any of
        :data:`fl_datasets.traces.VALUE_COLUMNS` for a trace directory.
    trace_dir : str or None
        A GWA-T-12 month folder; None = the synthetic generator. VMs that do
        not cover the month's common window are left out first (see
        :func:`fl_datasets.traces.load_trace_dir`).
    synthetic_profile, synthetic_steps : str, int
        The generator's load level and length (used when ``trace_dir`` is None).
    synthetic_kind : {"vm", "functions"}
        Which generator: VM CPU / memory at 300 s (paper 002's profiles) or
        per-minute invocation counts of serverless function apps (Azure
        Functions style, column ``invocations``).
    site_selection : {"busiest", "first"}
        Which ``num_clients`` sites of a larger trace set are used; "busiest"
        ranks by mean CPU over the training slice only (no peeking at the test),
        or by the first column when CPU is not among ``columns``.
    train_fraction, val_fraction : float
        Time split; the test slice is the rest.
    train_stride : int
        Every k-th training / validation window (bounds CPU time; test windows
        always use stride 1).
    seed : int
        Seeds the synthetic generator.
    """

    num_clients: int
    window: int
    horizon: int
    season: int
    columns: tuple[str, ...] = ("cpu_usage_pct",)
    trace_dir: str | None = None
    synthetic_profile: str = "medium"
    synthetic_steps: int = 8640
    synthetic_kind: str = "vm"
    site_selection: str = "busiest"
    train_fraction: float = 0.7
    val_fraction: float = 0.15
    train_stride: int = 8
    seed: int = 0

    @classmethod
    def from_config(cls, cfg) -> "ForecastSpec":
        """Build from a composed fedcontinuum config (``task.kind == forecast``)."""
        task = cfg.task
        return cls(
            num_clients=int(cfg.clients.num),
            window=int(task.window),
            horizon=int(task.horizon),
            season=int(task.season),
            columns=tuple(str(c) for c in task.columns),
            trace_dir=str(task.trace_dir) if task.get("trace_dir") else None,
            synthetic_profile=str(task.synthetic.profile),
            synthetic_steps=int(task.synthetic.num_steps),
            synthetic_kind=str(task.synthetic.kind),
            site_selection=str(task.site_selection),
            train_fraction=float(task.split.train),
            val_fraction=float(task.split.val),
            train_stride=int(task.train_stride),
            seed=int(cfg.seed),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ForecastSpec":
        fields = json.loads(text)
        fields["columns"] = tuple(fields["columns"])
        return cls(**fields)


@dataclass(frozen=True, eq=False)
class SiteData:
    """One site's prepared windows (normalised) and what scoring needs.

    Attributes
    ----------
    site : str
        Site (VM) id.
    normaliser : Normaliser
        Fitted on this site's training slice; maps forecasts back to units.
    y_train : numpy.ndarray, shape (n, C)
        Training slice in original units (NaN where masked): the MASE scale.
    train, val, test : tuple of numpy.ndarray
        ``(X, Y)`` windows, shapes (N, W, C) and (N, H, C), float32.
    series : numpy.ndarray, shape (T, C)
        The whole series in original units (NaN where masked): baselines that
        look further back than one window (a week's seasonal-naive, ETS) read
        the past of each origin from it.
    origins : dict of str to numpy.ndarray
        ``"val"`` / ``"test"``: the step index in ``series`` of each window's
        last input step (its forecast origin), in window order.
    train_slice : slice
        The training steps of ``series``.
    """

    site: str
    normaliser: Normaliser
    y_train: np.ndarray
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    series: np.ndarray
    origins: dict[str, np.ndarray]
    train_slice: slice

    def __len__(self) -> int:
        return len(self.train[0])


@dataclass(frozen=True, eq=False)
class FederatedForecastData:
    """All sites, in client (partition) order.

    Attributes
    ----------
    sites : tuple of SiteData
    step_s : int
    columns : tuple of str
    left_out : tuple of str
        VMs of the trace directory left out because their span does not cover
        the common window (empty for synthetic series), for the run's log.
    left_out_note : str
        One line saying how many were left out and why; "" if none.
    """

    sites: tuple[SiteData, ...]
    step_s: int
    columns: tuple[str, ...]
    left_out: tuple[str, ...] = ()
    left_out_note: str = ""

    def site_ids(self) -> list[str]:
        return [s.site for s in self.sites]


@dataclass(frozen=True, eq=False)
class _Prepared:
    """The series, the time split and the chosen sites: everything before windowing."""

    traces: TraceSet
    splits: tuple[slice, slice, slice]
    chosen: tuple[int, ...]  # index into ``traces`` of each client's site


@lru_cache(maxsize=4)
def _prepared(spec: ForecastSpec) -> _Prepared:
    """Load (or generate), check and select; cached per process (the windows are not)."""
    if spec.window <= 0 or spec.horizon <= 0:
        raise ValueError(
            f"task.window={spec.window}, task.horizon={spec.horizon}: both must be >= 1 steps"
        )
    traces = _series(spec)
    train, val, test = time_split(len(traces.timestamps), spec.train_fraction, spec.val_fraction)
    shortest = min(s.stop - s.start for s in (train, val, test))
    if spec.window + spec.horizon > shortest:
        raise ValueError(
            f"task.window + task.horizon = {spec.window} + {spec.horizon} steps is longer than the "
            f"shortest split ({shortest} of {len(traces.timestamps)} steps): shorten the window or "
            "horizon, or use a longer series (task.synthetic.num_steps or a full trace month)"
        )
    return _Prepared(traces, (train, val, test), tuple(_select_sites(traces, spec, train)))


def clear_caches() -> None:
    """Forget every cached series and window (tests: read the trace cache anew)."""
    _prepared.cache_clear()
    build_forecast_data.cache_clear()
    build_site.cache_clear()


@lru_cache(maxsize=4)
def build_forecast_data(spec: ForecastSpec, clients: tuple[int, ...] | None = None) -> FederatedForecastData:
    """Load (or generate), select, split, normalise and window every site
    (or only those of ``clients``, in that order: e.g. the sites a server scores).

    Every site's windows cost ~2 MB at the default settings (the test split
    at stride 1 most): a client needs only its own (:func:`build_site`), and
    a large federation's server scores a sample (``task.eval_sites``).

    Raises
    ------
    fl_datasets.traces.TraceError
        Missing or empty trace directory, corrupt file (naming file and line),
        or fewer sites than clients.
    ValueError
        W or H <= 0, or W + H longer than a split of the series.
    """
    prepared = _prepared(spec)
    chosen = prepared.chosen if clients is None else tuple(prepared.chosen[c] for c in clients)
    traces = prepared.traces
    sites = tuple(_prepare_site(traces, i, spec, prepared.splits) for i in chosen)
    return FederatedForecastData(
        sites=sites, step_s=traces.step_s, columns=traces.columns,
        left_out=tuple(traces.left_out), left_out_note=traces.left_out_summary(),
    )


@lru_cache(maxsize=8)
def build_site(spec: ForecastSpec, client: int) -> SiteData:
    """One client's site (what a ClientApp needs): only its windows are cut."""
    prepared = _prepared(spec)
    return _prepare_site(prepared.traces, prepared.chosen[client], spec, prepared.splits)


@dataclass(frozen=True)
class SiteLayout:
    """Every client's site id and window counts, without cutting any window."""

    site_ids: tuple[str, ...]
    windows: tuple[tuple[int, int, int], ...]  # (train, val, test) per client


def site_layout(spec: ForecastSpec) -> SiteLayout:
    """Site ids and (train, val, test) window counts of every client (cheap: masks only)."""
    from fl_datasets.windows import window_ends

    prepared = _prepared(spec)
    train, val, test = prepared.splits
    counts = []
    for i in prepared.chosen:
        mask = prepared.traces.mask[i]
        counts.append(tuple(
            len(window_ends(mask[part], spec.window, spec.horizon)[::stride])
            for part, stride in ((train, spec.train_stride), (val, spec.train_stride), (test, 1))
        ))
    return SiteLayout(tuple(prepared.traces.sites[i] for i in prepared.chosen), tuple(counts))


def _prepare_site(traces: TraceSet, i: int, spec: ForecastSpec, splits: tuple[slice, slice, slice]) -> SiteData:
    from fl_datasets.windows import make_windows, window_ends

    train, val, test = splits
    values, mask = traces.values[i], traces.mask[i]
    norm = Normaliser.fit(values[train])
    z = norm.transform(values).astype(np.float32)
    W, H, k = spec.window, spec.horizon, spec.train_stride
    return SiteData(
        site=traces.sites[i],
        normaliser=norm,
        y_train=values[train].astype(np.float64),
        train=make_windows(z[train], mask[train], W, H, stride=k),
        val=make_windows(z[val], mask[val], W, H, stride=k),
        test=make_windows(z[test], mask[test], W, H),
        series=values.astype(np.float64),
        origins={"val": window_ends(mask[val], W, H)[::k] + val.start, "test": window_ends(mask[test], W, H) + test.start},
        train_slice=train,
    )


def _select_sites(traces: TraceSet, spec: ForecastSpec, train: slice) -> list[int]:
    available = len(traces.sites)
    if spec.num_clients > available:
        sites = "site" if available == 1 else "sites"
        why = f" on a common time window ({traces.left_out_summary()})" if traces.left_out else ""
        raise TraceError(
            f"clients.num={spec.num_clients} but the traces hold only {available} {sites}{why}: "
            f"use clients.num<={available} or a directory with more VMs"
        )
    if spec.site_selection == "first":
        return list(range(spec.num_clients))
    if spec.site_selection != "busiest":
        raise ValueError(f"task.site_selection={spec.site_selection!r}: use 'busiest' or 'first'")
    cpu = traces.columns.index("cpu_usage_pct") if "cpu_usage_pct" in traces.columns else 0
    load = np.nanmean(traces.values[:, train, cpu], axis=1)
    busiest = np.argsort(-load, kind="stable")[: spec.num_clients]
    return sorted(int(i) for i in busiest)  # client order = trace order


def _series(spec: ForecastSpec) -> TraceSet:
    if spec.trace_dir is None:
        if spec.synthetic_kind == "functions":
            generated = synthetic_invocations(spec.num_clients, spec.synthetic_steps, seed=spec.seed)
        else:
            generated = synthetic_workload(
                spec.num_clients, spec.synthetic_steps, profile=spec.synthetic_profile, seed=spec.seed
            )
        return _only_columns(generated, spec.columns)
    cached = _cache_path(spec)
    if cached is not None and cached.exists():
        return _load_cached(cached)
    # min_sites: the common window must keep enough VMs for every client.
    traces = load_trace_dir(spec.trace_dir, columns=spec.columns, min_sites=spec.num_clients)
    if cached is not None:
        _save_cached(cached, traces)
    return traces


def _only_columns(traces: TraceSet, columns: tuple[str, ...]) -> TraceSet:
    unknown = [c for c in columns if c not in traces.columns]
    if unknown:
        raise ValueError(f"task.columns={list(columns)}: choose from {list(traces.columns)}")
    keep = [traces.columns.index(c) for c in columns]
    return TraceSet(
        sites=traces.sites, values=traces.values[..., keep], mask=traces.mask,
        timestamps=traces.timestamps, gaps=traces.gaps, columns=tuple(columns), step_s=traces.step_s,
    )


def _cache_path(spec: ForecastSpec) -> Path | None:
    root = os.environ.get(CACHE_ENV)
    if not root:
        return None
    # num_clients is in the key because it can change the common window.
    key = json.dumps({"dir": str(Path(spec.trace_dir).resolve()), "columns": spec.columns,
                      "min_sites": spec.num_clients})
    return Path(root) / f"traces-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def _save_cached(path: Path, traces: TraceSet) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(
        tmp, values=traces.values, mask=traces.mask, timestamps=traces.timestamps,
        sites=np.array(traces.sites), columns=np.array(traces.columns), step_s=traces.step_s,
        left_out_sites=np.array(list(traces.left_out), dtype=str),
        left_out_reasons=np.array(list(traces.left_out.values()), dtype=str),
    )
    os.replace(tmp, path)  # atomic: a concurrent reader sees all or nothing


def _load_cached(path: Path) -> TraceSet:
    with np.load(path) as f:
        return TraceSet(
            sites=tuple(str(s) for s in f["sites"]),
            values=f["values"],
            mask=f["mask"],
            timestamps=f["timestamps"],
            gaps={},  # reported by the process that parsed the files
            columns=tuple(str(c) for c in f["columns"]),
            step_s=int(f["step_s"]),
            left_out=dict(zip(f["left_out_sites"].tolist(), f["left_out_reasons"].tolist())),
        )
