"""Engine features x tasks: every engine feature takes effect for every task.

Each test runs the real experiment skeleton with the real ClientApp behind a
fake Grid (no Ray): the image task (MNIST 5k), synthetic-series forecasting,
PPO in the twin, the offload task (MNIST 5k) and DQN + FOMAML in the twin, on small settings.
"""

from __future__ import annotations

import pytest

from fl_server.experiments.config import ConfigError, compose_config
from tasks.rl.spec import RLSpec, build_scenario
from tests.conftest import run_in_process

TASKS = {
    "image": ["task=mnist", "clients.num=3"],
    "forecast": ["task=workload", "task.synthetic.num_steps=1728", "task.window=48", "task.horizon=6",
                 "task.season=48", "task.train_stride=4", "clients.num=3"],
    "rl": ["task=ppo", "clients.num=2", "task.episode_s=60", "task.steps_per_round=128", "task.eval_seeds=[7]",
           "task.final_study=false"],
    "offload": ["task=offload", "clients.num=3", "task.cloud_per_class=20", "task.cloud.epochs=1", "task.final_study=false"],
    "cdio": ["task=cdio", "clients.num=3", "task.stream.train_tasks=200", "task.stream.holdout_tasks=100",
             "task.placement.round_slots=5", "task.final_study=false"],
    "metarl": ["task=dqn", "clients.num=2", "task.episode_s=60", "task.steps_per_regime=64", "task.eval_seeds=[7]",
               "task.hyper.meta_iterations=1", "task.hyper.batch_size=32", "task.adapt_episodes=1", "task.baselines=false"],
}


# every client on a Jetson Nano (Hydra merges a dict override into the mix, so zero the others)
NANO_ONLY = ("devices.mix.jetson-nano=1.0", "devices.mix.jetson-xavier-nx=0", "devices.mix.jetson-agx-orin=0",
             "devices.mix.cloud-gpu=0")


def run(tracking_uri, tmp_path, *overrides: str, rounds: int = 2) -> dict[str, list[float]]:
    """Run one experiment; return every metric's per-round values."""
    return run_in_process(tracking_uri, [*overrides, f"num_rounds={rounds}", "seed=1", f"checkpoint.dir={tmp_path / 'ckpt'}",
                                         "tracking.log_model=false"])[0]


@pytest.mark.parametrize("task", TASKS)
def test_a_deadline_creates_stale_updates_for_every_task(task, tracking_uri, tmp_path):
    # A deadline far below any client's round time: every update arrives after
    # its round closed and is applied later, as a stale update.
    metrics = run(tracking_uri, tmp_path, *TASKS[task], "devices.deadline_s=1e-6", rounds=3)
    assert sum(metrics["updates_stale"]) > 0
    assert max(metrics["staleness_tau1"]) > 0
    assert all(v > 0 for v in metrics["round_virtual_s"])


@pytest.mark.parametrize("task", TASKS)
def test_compression_shrinks_uplink_bytes_for_every_task(task, tracking_uri, tmp_path):
    plain = run(tracking_uri, tmp_path, *TASKS[task], rounds=1)
    compressed = run(tracking_uri, tmp_path, *TASKS[task], "compression=topk8", rounds=1)
    assert compressed["uplink_bytes"][0] < 0.5 * plain["uplink_bytes"][0]
    assert compressed["vc_up_bytes"][0] < plain["vc_up_bytes"][0]  # the virtual clock charges what was sent


@pytest.mark.parametrize("task", TASKS)
def test_virtual_clock_charges_training_flops_and_payload_for_every_task(task, tracking_uri, tmp_path):
    base = run(tracking_uri, tmp_path, *TASKS[task], *NANO_ONLY, rounds=1)
    faster = run(tracking_uri, tmp_path, *TASKS[task], *NANO_ONLY,
                 "devices.profiles.jetson-nano.peak_tflops=23.6", rounds=1)
    assert base["vc_compute_s"][0] > 0 and base["energy_j"][0] > 0
    # 100x the throughput: 1/100 of the compute time (same FLOPs counted)
    assert faster["vc_compute_s"][0] == pytest.approx(base["vc_compute_s"][0] / 100, rel=1e-6)


@pytest.mark.parametrize("task", TASKS)
def test_fault_injection_and_screening_apply_to_every_task(task, tracking_uri, tmp_path):
    metrics = run(tracking_uri, tmp_path, *TASKS[task], "faults.fraction.nan=0.5", "clients.min_replies=1", rounds=1)
    assert metrics["clients_failed_nan"][0] >= 1
    assert metrics["round_aggregated"][0] == 1


def test_a_device_override_reaches_the_twin_and_the_rl_rounds_virtual_time(tracking_uri, tmp_path):
    # Prepare
    default = compose_config(TASKS["rl"])
    slower = compose_config([*TASKS["rl"], "devices.profiles.jetson-nano.peak_tflops=0.0236"])
    # Execute
    twin_default, twin_slower = build_scenario(RLSpec.from_config(default)), build_scenario(RLSpec.from_config(slower))
    # Assert: the twin's fleet follows devices.* ...
    assert twin_default.profiles["jetson-nano"].peak_tflops == pytest.approx(0.236)
    assert twin_slower.profiles["jetson-nano"].peak_tflops == pytest.approx(0.0236)
    # ... and so does the RL round on the virtual clock
    base = run(tracking_uri, tmp_path, *TASKS["rl"], *NANO_ONLY, rounds=1)
    slow = run(tracking_uri, tmp_path, *TASKS["rl"], *NANO_ONLY,
               "devices.profiles.jetson-nano.peak_tflops=0.0236", rounds=1)
    assert slow["vc_compute_s"][0] == pytest.approx(10 * base["vc_compute_s"][0], rel=1e-6)
    assert slow["round_virtual_s"][0] > base["round_virtual_s"][0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task=ppo", "task.hyper.lamda=0.9"], r"unknown config key 'task.hyper.lamda'"),
        (["task=ppo", "+task.hyper.lamda=0.9"], r"task.hyper.lamda is unknown for ppo: valid keys are gamma, lmbda"),
        (["task=qmix", "clients.num=3", "+task.hyper.epochs=4"], r"task.hyper.epochs is unknown for qmix"),
        (["task=ppo", "privacy=dpsgd"], r"privacy=dpsgd \(DP-SGD\) does not apply to task=ppo: DP-SGD bounds"),
        (["seed=abc"], r"seed=abc is invalid: use a whole number >= 0"),
    ],
)
def test_bad_task_settings_are_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(overrides)


@pytest.mark.parametrize("task", TASKS)
def test_secagg_runs_on_the_same_driver_for_every_task(task, tracking_uri, tmp_path):
    metrics = run(tracking_uri, tmp_path, *TASKS[task], "privacy=secagg", rounds=1)
    clients = compose_config(TASKS[task]).clients.num
    assert metrics["secagg_survivors"] == [clients]
    assert metrics["round_aggregated"] == [1] and metrics["updates_applied"] == [clients]
    assert metrics["vc_compute_s"][0] > 0  # the virtual clock, as without SecAgg+


def test_secagg_rounds_count_failures_and_proceed_with_min_replies(tracking_uri, tmp_path):
    # One of three clients raises (fault injection): it is a failure, and the
    # two survivors' masked sum is aggregated (clients.min_replies=2).
    metrics = run(tracking_uri, tmp_path, *TASKS["image"], "privacy=secagg", "faults.fraction.error=0.34",
                  "clients.min_train=3", "clients.min_replies=2", rounds=1)
    assert metrics["clients_failed_error"] == [1]
    assert metrics["secagg_survivors"] == [2] and metrics["round_aggregated"] == [1]


def test_secagg_rounds_short_of_min_replies_are_retried_then_fail(tracking_uri, tmp_path):
    from fl_server.engine.rounds import RoundFailedError

    with pytest.raises(RoundFailedError, match=r"round 1 failed after 2 attempt\(s\): 2 of 3 sampled clients"):
        run(tracking_uri, tmp_path, *TASKS["image"], "privacy=secagg", "faults.fraction.error=0.34",
            "clients.min_train=3", "clients.min_replies=3", "clients.round_retries=1", rounds=1)


@pytest.mark.parametrize("task", TASKS)
def test_central_dp_applies_to_every_task(task, tracking_uri, tmp_path):
    metrics = run(tracking_uri, tmp_path, *TASKS[task], "privacy=central", "privacy.central.mode=server-fixed",
                  rounds=1)
    assert metrics["round_aggregated"] == [1]
