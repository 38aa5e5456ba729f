"""Environment steps per second of the edgesim twin and its two env APIs.

    .venv/bin/python -m scripts.bench_twin [--steps 3000] [--repeats 5]

Runs the 3-cluster x 4-node synthetic scenario (``conf/twin/synthetic.yaml``,
faults included) and prints steps/s, best of ``--repeats`` runs (other
processes on a shared machine only ever make a run slower): by wall clock,
by this process's CPU time, and for the fastest window of 25 consecutive
steps (an estimate for an uncontended core). Timed:

* the core twin under a fixed action (admit all, 60 % local, 20 % neighbour,
  20 % cloud: every code path), and under random env actions (drawn before
  the clock starts; decoding and shield clipping timed);
* the Gymnasium ``EdgeSiteEnv`` (one agent, the other 11 nodes hold);
* the PettingZoo ``ClusterParallelEnv`` (4 agents; one step moves all of them).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Callable, NamedTuple

import numpy as np

from edgesim import Action, EdgeCloudTwin, load_scenario


class Rates(NamedTuple):
    wall: float  # best whole run, wall clock
    cpu: float  # best whole run, this process's CPU time
    window: float  # fastest window of WINDOW consecutive steps, wall clock


WINDOW = 25


def measure(reset: Callable[[], None], step: Callable[[int], None], steps: int, repeats: int) -> Rates:
    """Time ``repeats`` runs of ``steps`` calls of ``step`` (after ``reset``).

    CPU time leaves out the time the scheduler gave other jobs; the fastest
    25-step window (the usual min-of-repeats of ``timeit``) estimates the
    cost of a step on an uncontended core. On an idle machine all three agree.
    """
    best_wall = best_cpu = best_window = 0.0
    for _ in range(repeats):
        reset()
        wall, cpu = time.perf_counter(), time.process_time()
        window_start = wall
        for i in range(steps):
            step(i)
            if (i + 1) % WINDOW == 0:
                now = time.perf_counter()
                best_window = max(best_window, WINDOW / (now - window_start))
                window_start = now
        best_wall = max(best_wall, steps / (time.perf_counter() - wall))
        best_cpu = max(best_cpu, steps / max(time.process_time() - cpu, 1e-9))
    return Rates(best_wall, best_cpu, best_window)


def bench_core(scenario, steps: int, repeats: int) -> tuple[Rates, Rates]:
    twin = EdgeCloudTwin(scenario, seed=0)
    n = twin.num_nodes
    fixed = Action.hold(n)
    fixed.placement = np.tile([0.6, 0.2, 0.2], (n, 1))
    rng = np.random.default_rng(0)
    max_step = scenario.shield.max_replica_step
    random_rows = [rng.uniform(-1, 1, size=(n, 6)) for _ in range(steps)]
    reset = lambda: twin.reset(0)  # noqa: E731
    return (
        measure(reset, lambda i: twin.step(fixed), steps, repeats),
        measure(reset, lambda i: twin.step(Action.from_env(random_rows[i], max_step)), steps, repeats),
    )


def bench_gym(scenario, steps: int, repeats: int) -> Rates:
    from edgesim.envs import EdgeSiteEnv

    env = EdgeSiteEnv(scenario, site=2)
    env.action_space.seed(0)
    actions = [env.action_space.sample() for _ in range(steps)]
    return measure(lambda: env.reset(seed=0), lambda i: env.step(actions[i]), steps, repeats)


def bench_pettingzoo(scenario, steps: int, repeats: int) -> Rates:
    from edgesim.envs import ClusterParallelEnv

    env = ClusterParallelEnv(scenario, cluster=0)
    rng = np.random.default_rng(0)
    actions = [{a: rng.uniform(-1, 1, 6).astype(np.float32) for a in env.possible_agents} for _ in range(steps)]
    return measure(lambda: env.reset(seed=0), lambda i: env.step(actions[i]), steps, repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="steps per timed run (<= episode length)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the best is reported")
    parser.add_argument("--scenario", default="synthetic", help="conf/twin/<name>.yaml")
    args = parser.parse_args(argv)
    scenario = load_scenario(args.scenario)
    steps = min(args.steps, scenario.episode_steps)
    print(
        f"edgesim twin benchmark: scenario {scenario.name!r}, {len(scenario.clusters)} clusters x "
        f"{scenario.num_nodes // len(scenario.clusters)} nodes, {steps} steps x best of {args.repeats}, "
        f"python {platform.python_version()}, numpy {np.__version__}"
    )
    print(f"  load average before: {_load()}")
    print(f"  {'steps/s':32s} {'wall-clock':>12s} {'CPU time':>12s} {'fastest 25-step window':>24s}")
    fixed, random_actions = bench_core(scenario, steps, args.repeats)
    rows = [
        ("core twin, fixed action", fixed),
        ("core twin, random actions", random_actions),
        ("Gymnasium EdgeSiteEnv", bench_gym(scenario, steps, args.repeats)),
        ("PettingZoo ClusterParallelEnv", bench_pettingzoo(scenario, steps, args.repeats)),
    ]
    for name, rates in rows:
        print(f"  {name:32s} {rates.wall:12.0f} {rates.cpu:12.0f} {rates.window:24.0f}")
    print(f"  load average after: {_load()} ({os.cpu_count()} CPUs); PettingZoo: one step moves all 4 agents")


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"

if __name__ == "__main__":
    main()
