"""Control-plane CPU per twin step with paper 001's hierarchy off, on (ctl) and hybrid (Table 5's overhead).

    .venv/bin/python -m scripts.bench_control [--episodes 3] [--episode-s 288]

One process, the three settings interleaved episode by episode (so machine
load hits them alike): 12 PPO ESAs (untrained; the network's cost does not
depend on its weights) drive the Bitbrains twin through
:func:`tasks.rl.deploy.run_controlled_episode`, which times the control
plane: the agents' observations and forward passes, plus the control
layer's auctions, COA decisions and, in hybrid mode, the forecast-MPC. The
twin's own simulation is not counted. Prints µs per step (mean ± sd over
episodes), the control layer's own share, the ratio to control off, and that time as a % of one core per
simulated second of ESA cadence (paper 001 Table 5 gives "Overhead (CPU %)").
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

SETTINGS = {
    "off (MA-FL)": None,
    "ctl": {"enabled": True, "mode": "schedule",
            "schedule": [{"at": 0.0, "mode": "burst-absorber"}, {"at": 0.3333, "mode": "energy-saver"},
                         {"at": 0.6667, "mode": "balanced"}]},
    "hybrid": {"enabled": True, "hybrid": True},
}


def measure(episodes: int, episode_s: float) -> dict[str, list[tuple[float, float]]]:
    """Per setting and episode: (control plane µs per step, of which the control layer's)."""
    from tasks.rl.deploy import LearnedController, run_controlled_episode
    from tasks.rl.spec import RLSpec, build_scenario, control_config, forecast_fn
    from tasks.rl.task import build_model

    torch.set_num_threads(1)
    specs = {name: RLSpec(episode_s=episode_s, num_clients=12, control=json.dumps(c) if c else None)
             for name, c in SETTINGS.items()}
    agents = {name: {k: build_model(spec, k, seed=k) for k in range(12)} for name, spec in specs.items()}
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in SETTINGS}
    for episode in range(episodes):
        for name, spec in specs.items():
            scenario = build_scenario(spec)
            result = run_controlled_episode(scenario, LearnedController(spec, agents[name]), 20_000 + episode,
                                            control=control_config(spec), forecaster=forecast_fn(spec))
            layer_us = 1e6 * result.get("control_cpu_s", 0.0) / result["steps"]
            out[name].append((result["control_cpu_us"], layer_us))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_control", description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--episode-s", type=float, default=288.0)
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.episode_s < 10:
        parser.error(f"--episodes {args.episodes} / --episode-s {args.episode_s}: need >= 1 episode of >= 10 s")
    times = measure(args.episodes, args.episode_s)
    off = float(np.mean([total for total, _ in times["off (MA-FL)"]]))
    print("| control plane | CPU per twin step (µs) | of which the control layer (µs) | vs off | % of a core at 1 step/s |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        total = np.array([t for t, _ in values])
        layer = float(np.mean([layer for _, layer in values]))
        mean, sd = float(total.mean()), float(total.std(ddof=1)) if len(total) > 1 else 0.0
        print(f"| {name} | {mean:.0f} ± {sd:.0f} | {layer:.0f} | {mean / off:.2f}x | {mean / 1e4:.3f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
