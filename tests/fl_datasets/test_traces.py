"""VM trace loading (GWA-T-12 Bitbrains format), gap handling, normalising,
time splits and the synthetic workload generator."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fl_datasets.forecast_data import ForecastSpec, build_forecast_data, clear_caches
from fl_datasets.synthetic import synthetic_workload
from fl_datasets.traces import (
    COLUMNS,
    GapReport,
    Normaliser,
    TraceError,
    TraceSet,
    common_window,
    load_trace_dir,
    read_vm_trace,
    resample_to_grid,
    time_split,
)
from tests.conftest import GWA_DIR, requires_gwa

HEADER = ";\t".join(COLUMNS)


def trace_row(ts: int, cpu_pct: float = 10.0, mem_kb: float = 1000.0) -> str:
    """One GWA-T-12 data row (2 cores of 2600 MHz, so MHz = 52 * %)."""
    fields = [ts, 2, 5200.0, 52.0 * cpu_pct, cpu_pct, 8388608.0, mem_kb, 0.1, 14.8, 0.2, 0.0]
    return ";\t".join(str(f) for f in fields)


def write_trace(path: Path, rows: list[str], header: str = HEADER) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


# ------------------------------------------------------------ real traces


@pytest.fixture(scope="module")
def real_set():
    return load_trace_dir(GWA_DIR)


@requires_gwa
def test_read_one_real_vm():
    # Prepare
    path = GWA_DIR / "170.csv"
    n_lines = len(path.read_text().splitlines())
    # Execute
    df = read_vm_trace(path)
    # Assert
    assert len(df) == n_lines - 1
    assert tuple(df.columns) == tuple(COLUMNS.values())
    assert df["timestamp_s"].dtype == np.int64
    assert (np.diff(df["timestamp_s"].to_numpy()) > 0).all()
    # Seconds, not ms: August 2013 is 1.375e9 .. 1.378e9 s since the epoch.
    assert 1.375e9 < df["timestamp_s"].iloc[0] < df["timestamp_s"].iloc[-1] < 1.378e9


@requires_gwa
def test_load_real_directory(real_set):
    # Execute: done once by the fixture.
    ts = real_set
    n_t = len(ts.timestamps)
    # Assert
    assert len(ts.sites) == 32
    assert [int(s) for s in ts.sites] == sorted(int(s) for s in ts.sites)
    assert ts.values.shape == (32, n_t, 2) and ts.values.dtype == np.float32
    assert ts.mask.shape == (32, n_t) and ts.mask.dtype == bool
    assert n_t == 8640  # all VMs span the same 30 days of 300 s steps
    assert (np.diff(ts.timestamps) == 300).all()
    assert set(ts.gaps) == set(ts.sites)
    assert np.isfinite(ts.values[ts.mask]).all()
    assert np.isnan(ts.values[~ts.mask]).all()
    assert ts.mask.mean() > 0.99


@requires_gwa
def test_real_cpu_range_as_observed(real_set):
    # Prepare
    cpu = real_set.values[..., 0][real_set.mask]
    # Assert: CPU % is never negative, but 15 of the 32 VMs exceed 100 %
    # (max 107.47 % in VM 407); the files compute it as usage MHz over
    # provisioned MHz, and usage above the provisioned clock is real data.
    assert cpu.min() >= 0.0
    assert 100.0 < cpu.max() < 107.5


@requires_gwa
def test_real_cpu_pct_is_usage_over_capacity():
    # Prepare: VM 41 has many samples above 100 %.
    df = read_vm_trace(GWA_DIR / "41.csv")
    # Execute
    ratio = 100.0 * df["cpu_usage_mhz"] / df["cpu_capacity_mhz"]
    # Assert: the >100 % values are not a parsing artefact.
    assert (df["cpu_usage_pct"] > 100).sum() > 0
    np.testing.assert_allclose(df["cpu_usage_pct"], ratio, rtol=1e-6)


# ------------------------------------------------------ grid and gaps


def test_resample_interpolates_short_gap_and_masks_long_gap():
    # Prepare: 300 s grid from t=3000; bins 0, 1, 3, 4, 10, 11 occupied.
    # Bin 0 holds two samples (3000, 3100) -> averaged; 3301 floors to bin 1.
    df = pd.DataFrame(
        {
            "timestamp_s": [3000, 3100, 3301, 3900, 4200, 6000, 6300],
            "a": [1.0, 3.0, 4.0, 10.0, 0.0, 5.0, 6.0],
        }
    )
    # Execute
    frame, mask, report = resample_to_grid(df, step_s=300, max_interp_gap_steps=3)
    # Assert
    assert frame.index.tolist() == list(range(3000, 6301, 300))  # 12 steps
    a = frame["a"].to_numpy()
    assert a[0] == 2.0  # (1 + 3) / 2
    assert a[2] == 7.0  # 1-step gap: halfway between 4 and 10
    assert np.isnan(a[5:10]).all()  # 5-step gap > 3: left missing
    assert mask.tolist() == [True] * 5 + [False] * 5 + [True] * 2
    assert report == GapReport(
        missing_steps=6, short_gaps_interpolated=1, long_gaps_masked=1, longest_gap_steps=5
    )


@pytest.mark.parametrize("gap, interpolated", [(3, True), (4, False)])
def test_resample_gap_limit_is_inclusive(gap, interpolated):
    # Prepare: values 0 and 8 with `gap` empty steps between them.
    df = pd.DataFrame({"timestamp_s": [0, 300 * (gap + 1)], "a": [0.0, 8.0]})
    # Execute
    frame, mask, report = resample_to_grid(df, step_s=300, max_interp_gap_steps=3)
    # Assert
    inner = frame["a"].to_numpy()[1:-1]
    if interpolated:  # gap 3: 8 * k / 4 for k = 1, 2, 3
        np.testing.assert_array_equal(inner, [2.0, 4.0, 6.0])
    else:
        assert np.isnan(inner).all()
    assert mask[1:-1].all() == interpolated
    counts = (report.short_gaps_interpolated, report.long_gaps_masked)
    assert counts == (int(interpolated), int(not interpolated))


def test_load_trace_dir_intersects_spans_and_sorts_ids(tmp_path):
    # Prepare: VM "10" covers steps 0..5, VM "2" steps 2..7, so the common
    # grid is steps 2..5 (2 VMs x 4 steps = 8 VM-steps beats 1 VM x 6 steps);
    # "2" must sort before "10" (numeric, not text).
    write_trace(tmp_path / "10.csv", [trace_row(300 * k, cpu_pct=k) for k in range(6)])
    write_trace(tmp_path / "2.csv", [trace_row(300 * k, cpu_pct=10 * k) for k in range(2, 8)])
    # Execute
    ts = load_trace_dir(tmp_path, columns=("cpu_usage_pct",))
    # Assert
    assert ts.sites == ("2", "10")
    assert ts.timestamps.tolist() == [600, 900, 1200, 1500]
    np.testing.assert_array_equal(ts.values[:, :, 0], [[20, 30, 40, 50], [2, 3, 4, 5]])
    assert ts.mask.all()


# ------------------------------------------------- site selection rule

SEP_1_2013 = 1377993600  # 2013-09-01 00:00 UTC, in seconds since the epoch


def write_span(directory: Path, site: str, first_step: int, last_step: int) -> None:
    """VM ``site`` sampled every 300 s from ``first_step`` to ``last_step``."""
    steps = range(first_step, last_step + 1)
    rows = [trace_row(SEP_1_2013 + 300 * k, cpu_pct=k % 7, mem_kb=1000.0 + k) for k in steps]
    write_trace(directory / f"{site}.csv", rows)


def test_vms_that_start_late_or_end_early_are_left_out_and_counted(tmp_path, caplog):
    # Prepare: 40 steps (00:00..03:15). VMs 1-3 cover all of them, VM 4
    # starts at step 30 (02:30), VM 5 ends at step 9 (00:45). The five share
    # no step (30 > 9), which the old loader refused ("do not overlap").
    # VM-steps: steps 0..39 keep 3 VMs x 40 = 120; steps 0..9 keep 4 x 10 =
    # 40; steps 30..39 keep 4 x 10 = 40; so the rule picks the full window.
    for site in ("1", "2", "3"):
        write_span(tmp_path, site, 0, 39)
    write_span(tmp_path, "4", 30, 39)
    write_span(tmp_path, "5", 0, 9)
    # Execute
    with caplog.at_level(logging.WARNING, logger="fl_datasets.traces"):
        ts = load_trace_dir(tmp_path, columns=("cpu_usage_pct",))
    # Assert
    assert ts.sites == ("1", "2", "3")
    assert ts.timestamps.tolist() == [SEP_1_2013 + 300 * k for k in range(40)]
    assert ts.values.shape == (3, 40, 1) and ts.mask.all()
    assert set(ts.gaps) == {"1", "2", "3"}
    assert ts.left_out == {"4": "starts late, at 2013-09-01 02:30 UTC", "5": "ends early, at 2013-09-01 00:45 UTC"}
    summary = ts.left_out_summary()
    assert summary == (
        "2 of 5 VMs left out for not covering the common window 2013-09-01 00:00..2013-09-01 03:15 UTC "
        "(40 steps of 300 s, kept by 3 VMs): VM 4 starts late, at 2013-09-01 02:30 UTC; "
        "VM 5 ends early, at 2013-09-01 00:45 UTC"
    )
    assert summary in caplog.text


def test_a_vm_one_step_late_crops_the_window_instead_of_being_dropped(tmp_path):
    # Prepare: VM 5 starts at step 1 of 12. Keeping it costs one step to
    # all: 5 VMs x 11 steps = 55 > 4 VMs x 12 steps = 48.
    for site in ("1", "2", "3", "4"):
        write_span(tmp_path, site, 0, 11)
    write_span(tmp_path, "5", 1, 11)
    # Execute
    ts = load_trace_dir(tmp_path, columns=("cpu_usage_pct",))
    # Assert
    assert ts.sites == ("1", "2", "3", "4", "5")
    assert ts.timestamps[0] == SEP_1_2013 + 300 and len(ts.timestamps) == 11
    assert ts.left_out == {} and ts.left_out_summary() == ""


def test_left_out_summary_names_a_few_and_counts_the_rest():
    # Prepare: 1 kept VM over 2 steps, 3 left out; name only the first.
    ts = TraceSet(
        sites=("1",), values=np.zeros((1, 2, 1), np.float32), mask=np.ones((1, 2), bool),
        timestamps=np.array([SEP_1_2013, SEP_1_2013 + 300]), gaps={},
        left_out={"7": "ends early, at 2013-08-31 23:55 UTC", "8": "x", "9": "y"},
    )
    # Execute
    summary = ts.left_out_summary(max_listed=1)
    # Assert
    assert summary.startswith("3 of 4 VMs left out")
    assert summary.endswith("(2 steps of 300 s, kept by 1 VM): VM 7 ends early, at 2013-08-31 23:55 UTC; 2 more")


@pytest.mark.parametrize(
    "min_sites, window_steps, kept",
    [
        (1, (0, 11), 2),  # 2 VMs x 12 steps = 24 beats 5 x 4 = 20
        (3, (0, 3), 5),  # a window must keep 3 VMs: only steps 0..3 do
    ],
)
def test_min_sites_can_choose_a_shorter_window(min_sites, window_steps, kept):
    # Prepare: spans as (first, last) grid times; VMs 3-5 end at step 3.
    firsts = np.zeros(5, dtype=np.int64)
    lasts = 300 * np.array([11, 11, 3, 3, 3], dtype=np.int64)
    # Execute
    start, stop = common_window(firsts, lasts, step_s=300, min_sites=min_sites)
    # Assert
    assert (start, stop) == (300 * window_steps[0], 300 * window_steps[1])
    assert int(((firsts <= start) & (lasts >= stop)).sum()) == kept


def test_no_window_shared_by_enough_vms_is_one_clear_error(tmp_path):
    # Prepare: three VMs one after the other (steps 0-19, 20-39, 40-59), so
    # no step is covered by the 2 clients asked for. Each alone keeps 20
    # VM-steps; the tie goes to the earliest start, VM 1.
    for k, site in enumerate(("1", "2", "3")):
        write_span(tmp_path, site, 20 * k, 20 * k + 19)
    spec = ForecastSpec(num_clients=2, window=2, horizon=1, season=2, trace_dir=str(tmp_path), train_stride=1)
    # Execute / Assert
    with pytest.raises(
        TraceError,
        match=r"clients.num=2 but the traces hold only 1 site on a common time window \(2 of 3 VMs left out "
        r".*: VM 2 starts late, at 2013-09-01 01:40 UTC; VM 3 starts late, .*\): use clients.num<=1 ",
    ):
        build_forecast_data(spec)


def test_left_out_report_reaches_the_forecast_data_through_the_cache(tmp_path, monkeypatch):
    # Prepare: the 5-VM month of the first test; the cache is written, then read.
    month = tmp_path / "month"
    month.mkdir()
    for site in ("1", "2", "3"):
        write_span(month, site, 0, 39)
    write_span(month, "4", 30, 39)
    write_span(month, "5", 0, 9)
    monkeypatch.setenv("FEDCONTINUUM_CACHE_DIR", str(tmp_path / "cache"))
    spec = ForecastSpec(num_clients=3, window=4, horizon=2, season=4, trace_dir=str(month), train_stride=1)
    # Execute
    parsed = build_forecast_data(spec)
    clear_caches()
    cached = build_forecast_data(spec)
    # Assert
    for data in (parsed, cached):
        assert data.site_ids() == ["1", "2", "3"]
        assert data.left_out == ("4", "5")
        assert data.left_out_note.startswith("2 of 5 VMs left out")


def test_memory_target_and_unknown_column(tmp_path):
    # Prepare: memory usage is 1000 + step KB.
    write_span(tmp_path, "1", 0, 5)
    # Execute
    ts = load_trace_dir(tmp_path, columns=("mem_usage_kb",))
    # Assert
    np.testing.assert_array_equal(ts.values[0, :, 0], [1000, 1001, 1002, 1003, 1004, 1005])
    with pytest.raises(ValueError, match=r"columns=\['mem_kb'\]: unknown column\(s\) \['mem_kb'\]; "
                                         r"choose one or more of \[.*'mem_usage_kb'"):
        load_trace_dir(tmp_path, columns=("mem_kb",))


@requires_gwa
def test_real_month_cpu_and_memory_targets():
    # Prepare
    spec = ForecastSpec(num_clients=3, window=288, horizon=12, season=288, trace_dir=str(GWA_DIR),
                        columns=("cpu_usage_pct", "mem_usage_kb"), train_stride=64)
    # Execute
    data = build_forecast_data(spec)
    # Assert: all 32 VMs share August's span, so none is left out.
    assert data.columns == ("cpu_usage_pct", "mem_usage_kb")
    assert data.left_out == () and data.left_out_note == ""
    for site in data.sites:
        assert site.train[0].shape[1:] == (288, 2) and site.test[1].shape[1:] == (12, 2)
        memory = site.y_train[:, 1]
        assert np.nanmin(memory) > 0  # KB used, never zero in August


# ------------------------------------------------------------ normaliser


def test_normaliser_round_trip_and_constant_column():
    # Prepare: 2 sites x 5 steps x 2 columns; column 1 is constant (std 0).
    x = np.zeros((2, 5, 2))
    x[0, :, 0] = [1, 2, 3, 4, 5]  # mean 3, population std sqrt(2)
    x[1, :, 0] = [10, 10, 10, 20, 20]  # mean 14, std sqrt(24)
    x[:, :, 1] = 7.0
    # Execute
    norm = Normaliser.fit(x)
    z = norm.transform(x)
    # Assert
    np.testing.assert_allclose(norm.mean[:, 0, 0], [3.0, 14.0])
    np.testing.assert_allclose(norm.std[:, 0, 0], [np.sqrt(2), np.sqrt(24)])
    np.testing.assert_allclose(z[0, 4, 0], 2 / np.sqrt(2))
    np.testing.assert_array_equal(norm.std[:, 0, 1], [1.0, 1.0])  # std 0 -> 1
    np.testing.assert_array_equal(z[:, :, 1], 0.0)
    np.testing.assert_allclose(norm.inverse_transform(z), x, rtol=1e-12)


def test_normaliser_ignores_masked_nan():
    # Prepare: the NaN step (a masked gap) must not enter the statistics.
    x = np.array([[1.0], [np.nan], [3.0]])
    # Execute
    norm = Normaliser.fit(x)
    # Assert
    assert norm.mean.shape == (1, 1)
    assert norm.mean[0, 0] == 2.0 and norm.std[0, 0] == 1.0


# -------------------------------------------------------- corrupt input


def test_non_numeric_value_names_file_and_line(tmp_path):
    # Prepare: line 1 header, lines 2-3 good, line 4 has "abc" as CPU %.
    bad = trace_row(900).replace("10.0;", "abc;", 1)
    path = write_trace(tmp_path / "7.csv", [trace_row(300), trace_row(600), bad, trace_row(1200)])
    # Execute / Assert
    with pytest.raises(TraceError, match=r"7\.csv, line 4: field 5 is 'abc'"):
        read_vm_trace(path)


@pytest.mark.parametrize(
    "bad_row, expected",
    [
        (trace_row(600) + ";\t1.0", "12 fields where the header has 11"),
        (trace_row(600).rsplit(";", 1)[0], "10 fields where the header has 11"),
        (trace_row(600).replace("14.8", ""), "field 9 is '', not a number"),
        (trace_row(600).replace("14.8", "nan"), "field 9 is 'nan', not a finite number"),
    ],
)
def test_bad_field_count_or_value_names_line(tmp_path, bad_row, expected):
    # Prepare: the bad row is line 3.
    path = write_trace(tmp_path / "8.csv", [trace_row(300), bad_row, trace_row(900)])
    # Execute / Assert
    with pytest.raises(TraceError, match=rf"8\.csv, line 3: {expected}"):
        read_vm_trace(path)


def test_missing_column_is_named(tmp_path):
    # Prepare: header and rows without the memory-usage column.
    header = HEADER.replace(";\tMemory usage [KB]", "")
    row = ";\t".join(f for i, f in enumerate(trace_row(300).split(";\t")) if i != 6)
    path = write_trace(tmp_path / "9.csv", [row], header=header)
    # Execute / Assert
    with pytest.raises(TraceError, match=r"9\.csv.*Memory usage \[KB\]"):
        read_vm_trace(path)


@pytest.mark.parametrize("content", ["", HEADER + "\n"], ids=["0 bytes", "header only"])
def test_empty_file(tmp_path, content):
    # Prepare
    path = tmp_path / "11.csv"
    path.write_text(content)
    # Execute / Assert
    with pytest.raises(TraceError, match=r"11\.csv.*(empty|no samples)"):
        read_vm_trace(path)


def test_missing_or_empty_directory(tmp_path):
    # Prepare
    missing = tmp_path / "nope"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a trace")
    # Execute / Assert
    with pytest.raises(TraceError, match=r"nope: no such directory.*Rnd.*<vm>\.csv"):
        load_trace_dir(missing)
    with pytest.raises(TraceError, match=r"empty: no \*\.csv files.*Rnd.*<vm>\.csv"):
        load_trace_dir(empty)


# ------------------------------------------------------------ time split


def test_time_split_hand_computed():
    # Execute
    train, val, test = time_split(100, train=0.7, val=0.15)
    # Assert: 70 / 15 / 15 steps, in order, no overlap, covering 0..99.
    assert (train, val, test) == (slice(0, 70), slice(70, 85), slice(85, 100))
    covered = np.concatenate([np.arange(100)[s] for s in (train, val, test)])
    np.testing.assert_array_equal(covered, np.arange(100))


@pytest.mark.parametrize("kwargs", [dict(train=0.0), dict(train=0.9, val=0.1), dict(val=-0.1)])
def test_time_split_rejects_bad_fractions(kwargs):
    with pytest.raises(ValueError):
        time_split(100, **kwargs)


# ------------------------------------------------------------- synthetic


def lag_autocorr(x: np.ndarray, lag: int) -> float:
    x = x - x.mean()
    return float((x[:-lag] * x[lag:]).sum() / (x * x).sum())


def test_synthetic_shape_range_and_determinism():
    # Execute
    a = synthetic_workload(4, 600, seed=3)
    b = synthetic_workload(4, 600, seed=3)
    c = synthetic_workload(4, 600, seed=4)
    # Assert
    assert a.values.shape == (4, 600, 2) and a.values.dtype == np.float32
    assert a.mask.shape == (4, 600) and a.mask.all()
    assert a.timestamps.tolist() == list(range(0, 600 * 300, 300))
    assert a.sites == ("0", "1", "2", "3") and a.columns == ("cpu_usage_pct", "mem_usage_kb")
    np.testing.assert_array_equal(a.values, b.values)
    assert not np.array_equal(a.values, c.values)
    cpu = a.values[..., 0]
    assert cpu.min() >= 0.0 and cpu.max() <= 100.0
    assert (a.values[..., 1] > 0).all()


def test_synthetic_has_daily_cycle():
    # Prepare: 8 sites x 7 days of 300 s steps; 288 steps = 24 h.
    cpu = synthetic_workload(8, 7 * 288, seed=1).values[..., 0].astype(np.float64)
    # Execute
    day = np.mean([lag_autocorr(site, 288) for site in cpu])
    half_day = np.mean([lag_autocorr(site, 144) for site in cpu])
    # Assert: in phase a day apart, out of phase half a day apart.
    assert day > 0.3
    assert half_day < -0.3


def test_synthetic_profiles_ordered():
    # Execute
    sets = [synthetic_workload(8, 7 * 288, profile=p, seed=2) for p in ("low", "medium", "high")]
    means = [s.values[..., 0].mean() for s in sets]
    # Assert
    assert means[0] < means[1] < means[2]


def test_synthetic_rejects_unknown_profile():
    with pytest.raises(ValueError, match="profile='extreme'"):
        synthetic_workload(2, 10, profile="extreme")
