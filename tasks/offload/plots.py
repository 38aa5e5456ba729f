"""Plots of the offload task: one run's rounds, and the θ_c trade-off curves
(one run's final study, or a study's mean ± sd over seeds)."""

from __future__ import annotations

from typing import Any

import numpy as np

PANELS = (("accuracy", "accuracy of the answers", 1.0), ("latency_p95_ms", "p95 latency (ms)", 1.0),
          ("energy_mj", "energy per request (mJ)", 1.0), ("fraction", "fraction offloaded", 1.0))
CURVES = {"confidence": "confidence-gated", "confidence+load": "confidence + load-gated"}
LEVELS = {"edge": ("edge only", "k", "--"), "cloud": ("cloud only", "C3", ":")}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tradeoff_figure(rows: list[dict[str, Any]], title: str):
    """Accuracy, p95 latency, energy and fraction offloaded against θ_c, one row of
    panels per link scenario; edge- and cloud-only as horizontal lines.
    ``<key>_sd`` entries, where present, become error bars."""
    plt = _pyplot()
    faults = list(dict.fromkeys(r["fault"] for r in rows))
    fig, axes = plt.subplots(len(faults), len(PANELS), figsize=(3.4 * len(PANELS), 2.6 * len(faults)), squeeze=False)
    for i, fault in enumerate(faults):
        mine = [r for r in rows if r["fault"] == fault]
        for j, (key, label, scale) in enumerate(PANELS):
            ax = axes[i, j]
            for mode, name in CURVES.items():
                curve = sorted((r for r in mine if r["mode"] == mode), key=lambda r: r["theta"])
                if curve:
                    ax.errorbar([r["theta"] for r in curve], [scale * r[key] for r in curve],
                                yerr=[scale * r.get(key + "_sd", 0.0) for r in curve], marker="o", ms=3, capsize=2,
                                label=name)
            for mode, (name, color, style) in LEVELS.items():
                level = [r for r in mine if r["mode"] == mode]
                if level:
                    ax.axhline(scale * level[0][key], color=color, ls=style, lw=1, label=name)
            ax.set_xlabel("θ_c (offload when max softmax < θ_c)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_title(f"link: {fault}", fontsize=9, loc="left")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def rounds_figure(history: list[dict[str, Any]], title: str):
    """The closed loop per round: edge model and served accuracy, fraction offloaded,
    hard cases (requests and cached training samples), latency percentiles."""
    plt = _pyplot()
    rounds = [row["round"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for key, label in (("test_accuracy", "edge model accuracy (test)"), ("offload_accuracy", "served accuracy"),
                       ("offload_fraction", "fraction offloaded"), ("offload_hard_fraction", "hard-case requests"),
                       ("hard_cases_found_fraction", "hard cases cached (train)")):
        values = [row.get(key, np.nan) for row in history]
        if not np.all(np.isnan(values)):
            left.plot(rounds, values, marker="o", ms=3, label=label)
    left.set_ylim(0, 1)
    left.set_xlabel("round")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    for key in ("offload_latency_p50_ms", "offload_latency_p95_ms", "offload_latency_p99_ms"):
        right.plot(rounds, [row.get(key, np.nan) for row in history], marker="o", ms=3, label=key.split("_")[-2])
    right.set_yscale("log")
    right.set_xlabel("round")
    right.set_ylabel("request latency (ms)")
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
