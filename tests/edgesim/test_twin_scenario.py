"""Scenario validation: every bad parameter is one EdgeSimError naming it and the fix."""

import copy

import pytest

from edgesim import EdgeSimError, Scenario, load_scenario

from .helpers import tiny, tiny_config


def test_shipped_configs_load():
    synthetic = load_scenario("synthetic")
    assert synthetic.num_nodes == 12 and len(synthetic.cloud_regions) == 2
    assert synthetic.network.intra_cluster_rtt_ms == (5.0, 15.0)  # paper 001 §5.3
    assert synthetic.network.edge_cloud_rtt_ms == (20.0, 40.0)
    assert synthetic.shield.migration_cap_per_min == 2
    assert [type(f).__name__ for f in synthetic.faults] == ["NodeFailure", "CloudOutage", "PacketLoss"]
    # device figures come from conf/devices/mixed.yaml via edgesim.devices.Fleet
    assert synthetic.profiles["jetson-nano"].active_w == 10
    assert synthetic.nodes.full_rate[2] == pytest.approx(0.236e3 * 0.3 / 1.0)


def test_interval_must_be_whole_steps():
    with pytest.raises(EdgeSimError, match="interval_s=5 is not a positive whole multiple of twin.step_s=2"):
        Scenario.from_dict(tiny_config(step_s=2))


def test_bitbrains_config_points_at_the_traces():
    import yaml

    from edgesim.scenario import CONF_DIR

    raw = yaml.safe_load((CONF_DIR / "twin" / "bitbrains.yaml").read_text())
    assert raw["workload"]["source"] == "trace" and raw["episode_s"] == 21600


def test_nodes_as_a_count_follow_the_devices_mix():
    config = tiny_config(clusters=[{"name": "a", "nodes": 3, "cloud_region": "dc"}])
    assert Scenario.from_dict(config).nodes.profile == ("box", "box", "box")


def test_omegaconf_nodes_are_accepted():
    from omegaconf import OmegaConf

    assert Scenario.from_dict(OmegaConf.create(tiny_config())).num_nodes == 3


def set_path(config: dict, path: str, value) -> dict:
    config = copy.deepcopy(config)
    node = config
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return config


BAD = [
    # negative capacities
    ("cloud_regions.0.instances", -2, r"instances=-2 is a negative capacity"),
    ("service.queue_capacity", -10, r"queue_capacity=-10(\.0)? is negative"),
    ("service.max_replicas_per_node", -1, r"max_replicas_per_node=-1 is negative"),
    ("service.replica_memory_gb", -1.0, r"replica_memory_gb=-1.0 is negative"),
    ("devices.profiles.box.memory_gb", -4, r"memory_gb=-4 is invalid"),
    ("devices.profiles.box.peak_tflops", -0.01, r"peak_tflops=-0.01 is invalid"),
    # negative or malformed RTTs
    ("network.intra_cluster_rtt_ms", [-5, 15], r"intra_cluster_rtt_ms=\[-5, 15\] has a negative RTT"),
    ("network.edge_cloud_rtt_ms", [-20, 40], r"edge_cloud_rtt_ms=\[-20, 40\] has a negative RTT"),
    ("network.edge_cloud_rtt_ms", [40, 20], r"low > high"),
    ("network.intra_cluster_rtt_ms", "fast", r"must be \[low, high\]"),
    ("network.jitter_max", 0.5, r"jitter_max=0.5 is below 1.0"),
    ("network.rto_ms", -1, r"rto_ms=-1 is negative"),
    # faults
    ("faults", [{"type": "meteor"}], r"faults\[0\].type='meteor' is an unknown fault type: use one of"),
    ("faults", [{"fraction": 0.1}], r"needs a 'type'"),
    ("faults", [{"type": "node_failure", "fraction": 1.5, "at_step": 0}], r"fraction=1.5 is above 1.0"),
    ("faults", [{"type": "node_failure", "fraction": 0.1, "at_step": 0}], r"fails no node"),
    ("faults", [{"type": "node_failure", "fraction": 0.5, "at_step": 99}], r"at_step=99 is past the episode"),
    ("faults", [{"type": "node_failure", "fraction": 0.5, "at_step": 0, "when": 3}], r"unknown key\(s\) \['when'\]"),
    (
        "faults",
        [{"type": "node_failure", "fraction": 0.7, "at_step": 0}, {"type": "node_failure", "fraction": 0.7, "at_step": 1}],
        r"more than the 3 edge nodes",
    ),
    ("faults", [{"type": "cloud_outage", "start_s": 50, "duration_s": 5}], r"start_s=50(\.0)? is past the episode"),
    ("faults", [{"type": "cloud_outage", "start_s": 1, "duration_s": 0}], r"duration_s=0 is invalid"),
    ("faults", [{"type": "cloud_outage", "start_s": 1, "duration_s": 2, "regions": ["mars"]}], r"regions=\['mars'\]"),
    ("faults", [{"type": "packet_loss", "rate": 1.0}], r"rate=1.0 must be in \[0, 1\)"),
    ("faults", [{"type": "packet_loss", "rate": -0.1}], r"rate=-0.1 is negative"),
    ("faults", {"type": "packet_loss"}, r"must be a list"),
    # topology and references
    ("clusters.0.nodes", ["box", "toaster"], r"nodes\[1\]='toaster' is not a device profile"),
    ("clusters.0.cloud_region", "moon", r"cloud_region='moon' is not a cloud region"),
    ("clusters.0.nodes", 0, r"a cluster needs at least 1 node"),
    ("clusters", [], r"non-empty list"),
    ("cloud_regions", [], r"non-empty list"),
    ("cloud_regions.0.profile", "toaster", r"profile='toaster' is not a device profile"),
    ("accelerators", {"box": "gpu"}, r"accelerators.dc=None"),
    ("clusters.1.name", "a", r"names repeat \['a'\]"),
    # time, SLO, service, caps
    ("step_s", 0, r"step_s=0 is invalid: it must be > 0"),
    ("step_s", -1, r"step_s=-1 is negative"),
    ("episode_s", 10.5, r"episode_s=10.5 is not a positive whole multiple of twin.step_s"),
    ("slo_ms", -150, r"slo_ms=-150 is negative"),
    ("slo_ms", "fast", r"slo_ms='fast' is not a finite number"),
    ("service.initial_replicas", 3, r"initial_replicas=3 exceeds max_replicas_per_node=1"),
    ("service.host_cpu_share", 2, r"host_cpu_share=2(\.0)? must be in \[0, 1\]"),
    ("service.max_replicas_per_node", 1.5, r"must be a whole number"),
    ("cost.per_gb_egress_usd", -0.09, r"per_gb_egress_usd=-0.09 is negative"),
    ("power.node_cap_w", 3, r"node_cap_w=3(\.0)? is below the idle power 4 W of profile 'box'"),
    ("power.gpu_cap_w", -150, r"gpu_cap_w=-150 is negative"),
    ("thermal.max_c", 20, r"max_c=20(\.0)? must be above ambient_c=25"),
    ("thermal.max_c", 26, r"profile 'box' settles at 39.0 degC when idle, above twin.thermal.max_c=26"),
    ("thermal.full_load_c", 20, r"full_load_c=20(\.0)? must be above ambient_c=25"),
    ("shield.migration_cap_per_min", -1, r"migration_cap_per_min=-1 is negative"),
    ("shield.cloud_margin", 1.5, r"cloud_margin=1.5 must be in \(0, 1\]"),
    ("shield.max_replica_step", 0, r"max_replica_step=0 is invalid"),
    # workload
    ("workload.source", "crystal-ball", r"source='crystal-ball' is unknown: use one of"),
    ("workload.interval_s", 0, r"interval_s=0 is invalid"),
    ("workload.profile", "extreme", r"profile='extreme' is unknown"),
    ("workload.scale_to", "galaxy", r"scale_to='galaxy' is unknown"),
    ("workload.start", -3, r"start=-3: use 'random' or an interval index >= 0"),
    ("workload.mean_load", -0.5, r"mean_load=-0.5 is negative"),
    ("workload.poisson", "yes", r"poisson='yes' must be true or false"),
    # typos
    ("stepsize", 1, r"twin has unknown key\(s\) \['stepsize'\]"),
    ("network.rtt", 5, r"twin.network has unknown key\(s\) \['rtt'\]"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD, ids=[f"{p}={v}" for p, v, _ in BAD])
def test_bad_input_is_one_clear_error(path, value, message):
    with pytest.raises(EdgeSimError, match=message):
        Scenario.from_dict(set_path(tiny_config(), path, value))


def test_missing_trace_dir_names_the_fix(tmp_path):
    config = tiny_config(workload={"source": "trace", "trace_dir": str(tmp_path / "nowhere")})
    with pytest.raises(EdgeSimError, match="no such directory.*workload.source=synthetic"):
        Scenario.from_dict(config)
    with pytest.raises(EdgeSimError, match="needs twin.workload.trace_dir"):
        Scenario.from_dict(tiny_config(workload={"source": "trace"}))


def test_unknown_config_name_lists_the_options():
    with pytest.raises(EdgeSimError, match=r"use one of \['bitbrains', 'regions', 'synthetic'\]"):
        load_scenario("nope")
    with pytest.raises(EdgeSimError, match="twin.devices='nope'"):
        Scenario.from_dict(tiny_config(devices="nope"))


def test_edgesim_error_is_a_value_error():
    assert issubclass(EdgeSimError, ValueError)
    assert tiny().num_nodes == 3
