"""Config composition and bad input: one clear error naming value and fix."""

from __future__ import annotations

import pytest

from fl_server.experiments.config import ConfigError, compose_config, flatten, join_overrides, split_overrides
from tests.conftest import run_module

BAD_INPUTS = [
    (["strategy=foo"], "unknown strategy 'foo': choose one of ass, fedavg, fedavgm"),
    (["task=cifar"], "unknown task 'cifar': choose one of bitbrains, breastmnist, "),
    (["partition=shards"], "unknown partition 'shards': choose one of dirichlet, iid"),
    (["devices=raspberry"], "unknown devices 'raspberry': choose one of mixed"),
    (["partition.rho=0.5"], "partition.rho=0.5 is invalid"),
    (["partition=dirichlet", "partition.alpha=0"], "partition.alpha=0 is invalid"),
    (["partition=dirichlet", "partition.alpha=-1"], "partition.alpha=-1 is invalid"),
    (["clients.fraction_train=0"], "clients.fraction_train=0 is invalid: it must lie in (0, 1]"),
    (["clients.fraction_train=1.5"], "clients.fraction_train=1.5 is invalid"),
    (["trian.lr=0.1"], "unknown config key 'trian.lr'"),
    (["nonsense=1"], "unknown config key 'nonsense'"),
    (["task=breastmnist", "task.path=/no/such/file.npz"], "task.path=/no/such/file.npz does not exist"),
    (["strategy=fedavgm", "strategy.server_momentum=1.5"], "strategy.server_momentum=1.5 is invalid"),
    (["train.lr=-0.1"], "train.lr=-0.1 is invalid"),
    (["strategy=ass", "strategy.alpha=-1"], "strategy.alpha=-1 is invalid: ASS exponents must be >= 0"),
    (["strategy=ass", "strategy.gamma=-0.5"], "strategy.gamma=-0.5 is invalid"),
    (["strategy=ass", "strategy.floor=1"], "strategy.floor=1 is invalid"),
    (["clients.num=4", "clients.min_train=5"], "clients.min_train=5 is invalid"),
    (["simulation.cpus_per_client=0.5"], "simulation.cpus_per_client=0.5 is invalid"),
    (["simulation.shared_ray=maybe"], "simulation.shared_ray=maybe is invalid: use true or false"),
    (["tracking.profile=1"], "tracking.profile=1 is invalid: use true or false"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUTS)
def test_bad_input_gives_a_clear_config_error(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose_config(overrides)
    assert message in str(err.value)


def test_defaults_compose_to_the_embedded_mnist_job():
    cfg = compose_config()
    assert (cfg.task.name, cfg.partition.name, cfg.strategy.name) == ("mnist", "iid", "fedavg")
    assert cfg.clients.num == 10 and cfg.num_rounds == 10


def test_relative_data_paths_resolve_against_the_project_dir(tmp_path):
    npz = tmp_path / "data" / "x.npz"
    npz.parent.mkdir()
    npz.write_bytes(b"")
    cfg = compose_config(["task=breastmnist", "task.path=data/x.npz"], project_dir=tmp_path)
    assert cfg.task.path == str(npz)


def test_overrides_round_trip_through_a_run_config_string():
    overrides = ["strategy=fedavgm", "tracking.run_name='my run'", "partition.rho=10"]
    assert split_overrides(join_overrides(overrides)) == overrides
    assert compose_config(split_overrides(join_overrides(overrides))).tracking.run_name == "my run"


def test_flatten_gives_dotted_params():
    params = flatten(compose_config(["strategy=fedavgm"]))
    assert params["strategy.server_momentum"] == 0.9
    assert params["partition.rho"] == 1.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["strategy=foo"], "unknown strategy 'foo'"),
        (["partition.rho=0"], "partition.rho=0 is invalid"),
        (["clients.num=5000"], "clients.num=5000 exceeds the 3800 training samples"),
        (["task=breastmnist", "task.path=missing.npz"], "does not exist"),
    ],
)
def test_launcher_rejects_bad_input_before_starting_anything(args, message):
    result = run_module("fl_server.runtime.launch", *args, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert message in output
    assert "Traceback" not in output
    assert "SuperLink" not in output  # nothing was started


def test_rl_tasks_default_to_fedavgm_unless_a_strategy_is_given():
    assert compose_config(["task=ppo"]).strategy.name == "fedavgm"
    assert compose_config(["task=ppo"]).strategy.server_momentum == 0.9
    assert compose_config(["task=ppo", "strategy=staleness_clustered"]).strategy.name == "staleness_clustered"
    assert compose_config([]).strategy.name == "fedavg"  # image tasks keep FedAvg


def test_launcher_profile_flag_is_the_tracking_profile_key(capsys):
    from fl_server.runtime.launch import main

    assert main(["--profile", "--show-config", "num_rounds=1"]) == 0
    shown = capsys.readouterr().out
    assert "profile: true" in shown and "num_rounds: 1" in shown
    assert compose_config([]).tracking.profile is False  # off unless asked
