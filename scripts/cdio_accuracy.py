"""Measure the CDIO model versions' accuracy per spatial-complexity bin on MNIST 5k.

    python -m scripts.cdio_accuracy [--seeds 0 1 2] [--epochs 3] [--out tasks/cdio/measured_accuracy.yaml]

Trains every version of :mod:`tasks.cdio.versions` once per seed (central
SGD on 4,000 digits) and scores it on the 1,000 held-out digits, split into
complexity quintiles (edges from the training digits); writes the mean over
seeds with the sd, parameters, FLOPs and this command to the YAML the CDIO
task reads. About 30 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from fl_datasets.sources import LabelledImages, load_mnist_5k
from tasks.cdio.complexity import spatial_complexity
from tasks.cdio.versions import BINS, MEASURED, VERSION_WIDTHS, build_version, split, version_costs
from tasks.image.training import probabilities, train_local


def measure(seeds: list[int], epochs: int) -> dict:
    """Accuracy per bin of every version, mean and sd over ``seeds``."""
    data = load_mnist_5k()
    train_idx, test_idx = split(len(data.y))
    complexity = spatial_complexity(data.x)
    edges = np.quantile(complexity[train_idx], np.linspace(0, 1, BINS + 1)[1:-1])
    test_bins = np.searchsorted(edges, complexity[test_idx], side="right")
    train = LabelledImages(data.x[train_idx], data.y[train_idx], train_idx)
    out = {"bin_edges": [float(e) for e in edges], "versions": {}}
    for name in VERSION_WIDTHS:
        per_seed = []
        for seed in seeds:
            model = build_version(name, seed)
            train_local(model, train, epochs=epochs, batch_size=32, lr=0.05, momentum=0.9, seed=seed)
            correct = probabilities(model, data.x[test_idx]).argmax(axis=1) == data.y[test_idx]
            per_seed.append([float(correct[test_bins == b].mean()) for b in range(BINS)] + [float(correct.mean())])
            print(f"{name} seed {seed}: test accuracy {correct.mean():.4f}", flush=True)
        scores = np.array(per_seed)
        flops, params = version_costs(name)
        out["versions"][name] = {"params": params, "flops": flops, "widths": list(VERSION_WIDTHS[name]),
                                 "accuracy_per_bin": [round(float(a), 4) for a in scores[:, :-1].mean(axis=0)],
                                 "accuracy_per_bin_sd": [round(float(a), 4) for a in scores[:, :-1].std(axis=0)],
                                 "test_accuracy": round(float(scores[:, -1].mean()), 4)}
    edge = out["versions"]["edge-s"]["params"]
    for v in out["versions"].values():
        v["params_vs_edge"] = round(v["params"] / edge, 2)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=MEASURED)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = measure(args.seeds, args.epochs)
    command = "python -m scripts.cdio_accuracy " + shlex.join(sys.argv[1:] if argv is None else argv)
    header = (f"# Written by `{command.strip()}` ({time.strftime('%Y-%m-%d')}, {time.perf_counter() - started:.0f} s):\n"
              "# MNIST 5k, 4,000 training / 1,000 test digits, accuracy per spatial-complexity quintile (mean over seeds).\n")
    args.out.write_text(header + yaml.safe_dump({"command": command.strip(), "seeds": args.seeds, "epochs": args.epochs,
                                                 **result}, sort_keys=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
