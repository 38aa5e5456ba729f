"""Figures of one CDIO run's final study (matplotlib, Agg)."""

from __future__ import annotations

from typing import Any

POLICY_ORDER = ("cdio", "rpp-only", "cdco-only", "all-edge", "all-cloud", "greedy-delay", "random",
                "complexity-threshold", "oracle")
PANELS = (("success_both", "success rate (accuracy and delay)"), ("compute_tflop", "compute (TFLOP / task)"),
          ("bandwidth_mb", "bandwidth (MB / task)"), ("energy_j", "energy (J / task, active + tx)"))


def grid_figure(rows: list[dict[str, Any]], title: str, errors: dict | None = None):
    """Bars per policy and bandwidth for the four headline measures (``errors``: (bandwidth, policy, key) -> sd)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    bandwidths = sorted({r["bandwidth"] for r in rows}, reverse=True)
    policies = [p for p in POLICY_ORDER if any(r["policy"] == p for r in rows)]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 4))
    x = np.arange(len(policies))
    for ax, (key, label) in zip(axes, PANELS):
        for offset, bw in enumerate(bandwidths):
            values = [next(r[key] for r in rows if r["policy"] == p and r["bandwidth"] == bw) for p in policies]
            err = None if errors is None else [errors.get((bw, p, key), 0.0) for p in policies]
            ax.bar(x + 0.4 * offset - 0.2, values, 0.4, yerr=err, label=bw)
        ax.set_xticks(x, policies, rotation=60, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def regret_figure(regret: list[dict[str, Any]], title: str):
    """Cumulative regret per slot of the learning policies (and two baselines for scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, bw in zip(axes, ("stable", "fluctuating")):
        for policy in ("cdio", "cdco-only", "rpp-only", "greedy-delay", "random"):
            points = [(r["slot"], r["cumulative_regret"]) for r in regret if r["bandwidth"] == bw and r["policy"] == policy]
            if points:
                ax.plot(*zip(*points), label=policy)
        ax.set_title(f"{bw} bandwidth", fontsize=9)
        ax.set_xlabel("slot")
    axes[0].set_ylabel("cumulative regret vs best super-arm in hindsight")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
