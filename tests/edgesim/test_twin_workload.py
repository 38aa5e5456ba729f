"""Arrivals: real GWA-T-12 traces, the synthetic generator, constant rates; forecaster inputs."""

import numpy as np
import pytest

from edgesim import EdgeCloudTwin, EdgeSimError, build_workload, load_scenario
from edgesim.workload import ORACLE_LOOKAHEAD, capacity_reference, unit_mean_shape

from .helpers import GWA_DIR, requires_gwa, synthetic, tiny


@pytest.fixture(scope="module")
def bitbrains():
    return load_scenario("bitbrains", {"episode_s": 3600, "faults": [], "workload": {"trace_dir": str(GWA_DIR)}})


@requires_gwa
def test_trace_driven_workload_on_the_real_files(bitbrains):
    from fl_datasets.traces import load_trace_dir

    workload = build_workload(bitbrains, seed=0)
    intervals = 576 + 3600 // 300 + ORACLE_LOOKAHEAD
    assert workload.envelope.shape == (12, intervals)
    assert np.isfinite(workload.envelope).all() and (workload.envelope >= 0).all()
    vms = {p.stem for p in GWA_DIR.glob("*.csv")}
    assert set(workload.sites) <= vms and len(set(workload.sites)) == 12  # one distinct VM per node
    # The envelope is the VM's CPU % over its monthly mean (capped), times mean_load x capacity.
    traces = load_trace_dir(GWA_DIR, columns=("cpu_usage_pct",))
    node = 3
    vm = traces.sites.index(workload.sites[node])
    cpu = np.where(traces.mask[vm], traces.values[vm, :, 0], np.nan)[None, :]
    shape = unit_mean_shape(cpu, bitbrains.workload.burst_cap)[0]
    first = workload.start_interval - workload.history_intervals
    expected = bitbrains.workload.mean_load * capacity_reference(bitbrains)[node] * shape[first : first + intervals]
    np.testing.assert_allclose(workload.envelope[node], expected, rtol=1e-6)
    # Within the episode, each interval's mean arrival rate tracks the envelope (Poisson noise only).
    twin = EdgeCloudTwin(bitbrains, seed=0)
    per_interval = twin.arrivals.T.reshape(12, -1, 300).mean(axis=2)
    episode = workload.envelope[:, 576 : 576 + 12]
    busy = episode > 1.0
    np.testing.assert_allclose(per_interval[busy], episode[busy], rtol=0.25)
    assert np.corrcoef(per_interval.ravel(), episode.ravel())[0, 1] > 0.99


@requires_gwa
def test_trace_episodes_differ_by_seed_but_repeat_per_seed(bitbrains):
    a, b, c = build_workload(bitbrains, 0), build_workload(bitbrains, 0), build_workload(bitbrains, 1)
    np.testing.assert_array_equal(a.envelope, b.envelope)
    assert (a.sites, a.start_interval) != (c.sites, c.start_interval)


@requires_gwa
def test_trace_too_short_for_the_episode_is_a_clear_error():
    scenario = load_scenario("bitbrains", {"episode_s": 40 * 86_400, "faults": [], "workload": {"trace_dir": str(GWA_DIR)}})
    with pytest.raises(EdgeSimError, match="shorten twin.episode_s"):
        build_workload(scenario, 0)


def test_synthetic_workload_is_seeded_and_scaled():
    scenario = synthetic(episode_s=3600, faults=[])
    a, b, c = build_workload(scenario, 3), build_workload(scenario, 3), build_workload(scenario, 4)
    np.testing.assert_array_equal(a.envelope, b.envelope)
    assert not np.array_equal(a.envelope, c.envelope)
    # unit-mean shapes: over many intervals each node averages close to mean_load x its reference
    ratio = a.envelope.mean(axis=1) / (scenario.workload.mean_load * capacity_reference(scenario))
    assert np.all((ratio > 0.7) & (ratio <= 1.01))


def test_cluster_mean_scaling_gives_small_boards_the_same_demand():
    scenario = synthetic(faults=[])
    reference = capacity_reference(scenario)
    cluster_a = reference[:4]
    assert np.all(cluster_a == cluster_a[0])
    assert cluster_a[0] == pytest.approx(scenario.nodes.full_rate[:4].mean())


def test_unit_mean_shape_caps_bursts_and_keeps_idle_vms_idle():
    shape = unit_mean_shape(np.array([[1.0, 1.0, 10.0, np.nan], [0.0, 0.0, 0.0, 0.0]]), burst_cap=2.0)
    np.testing.assert_allclose(shape[0], [0.25, 0.25, 2.0, 1.0])
    np.testing.assert_array_equal(shape[1], 0.0)


def test_demand_history_and_oracle():
    twin = EdgeCloudTwin(tiny(episode_s=20), seed=0)  # 5 s intervals, 4 of history
    history = twin.demand_history()
    assert history.shape == (3, 4, 1) and (history == 5.0).all()
    version = twin.history_version
    for _ in range(5):
        twin.step()
    assert twin.history_version == version + 1
    np.testing.assert_allclose(twin.demand_history()[:, -1, 0], 5.0)  # observed 25 requests in 5 s
    np.testing.assert_allclose(twin.oracle_forecast(3), 5.0)
