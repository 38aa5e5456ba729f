"""Model versions of the edge and the cloud (paper 004 Table 2's shape) and
their accuracy, measured on MNIST 5k per spatial-complexity bin.

Paper 004 deploys YOLOv5s / s6 on the edge and YOLOv5l / x (l6 / x6) in the
cloud: the cloud's model has ~6x (V1, V3) or ~12x (V2, V4) the edge's
parameters. Ours are the image task's LeNet-style CNN (:class:`tasks.image.models.SmallCNN`)
at three widths with the same ratios (printed in ``measured_accuracy.yaml``).
Their accuracies are not typed in: ``python -m scripts.cdio_accuracy`` trains
each once per seed on 4,000 MNIST 5k digits and scores it on the other 1,000,
per quintile of the spatial complexity (:mod:`tasks.cdio.complexity`), and
writes ``tasks/cdio/measured_accuracy.yaml``, which the task reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

VERSION_WIDTHS = {  # (conv1, conv2, hidden) of SmallCNN
    "edge-s": (4, 8, 24),       # 4,258 parameters
    "cloud-l": (8, 16, 84),     # ~6x the edge's (paper 004 V1: YOLOv5s -> YOLOv5l, 7.2 M -> 46.5 M)
    "cloud-x": (12, 24, 116),   # ~12x the edge's (V2: YOLOv5s -> YOLOv5x, 7.2 M -> 86.7 M)
}
DEPLOYMENTS = {"v1": ("edge-s", "cloud-l"), "v2": ("edge-s", "cloud-x")}  # (edge, cloud) as paper 004 Table 2
MEASURED = Path(__file__).with_name("measured_accuracy.yaml")
TRAIN_SIZE = 4000
BINS = 5


@dataclass(frozen=True)
class ModelVersion:
    """One deployable model: its cost and its measured accuracy per complexity bin."""

    name: str
    params: int
    flops: float                 # forward FLOPs per image
    accuracy: tuple[float, ...]  # per complexity bin (test digits)

    def accuracy_of(self, complexity_bin: np.ndarray) -> np.ndarray:
        return np.asarray(self.accuracy)[complexity_bin]


@dataclass(frozen=True)
class Measured:
    """``measured_accuracy.yaml``: bin edges of the complexity and every version."""

    bin_edges: tuple[float, ...]  # inner edges (BINS - 1), from the training digits' quantiles
    versions: dict[str, ModelVersion]
    command: str

    def bin_of(self, complexity: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.asarray(self.bin_edges), complexity, side="right")


def build_version(name: str, seed: int | None = None):
    """The untrained CNN of version ``name``."""
    import torch

    from tasks.image.models import SmallCNN

    if seed is not None:
        torch.manual_seed(seed)
    return SmallCNN(num_classes=10, widths=VERSION_WIDTHS[name])


def version_costs(name: str) -> tuple[float, int]:
    """(forward FLOPs per image, parameters) of version ``name``."""
    import torch

    from fl_common.costs import module_costs

    flops, params, _ = module_costs(build_version(name), torch.zeros(1, 1, 28, 28))
    return float(flops), int(params)


def load_measured(path: Path = MEASURED) -> Measured:
    """Read what ``python -m scripts.cdio_accuracy`` measured."""
    if not path.exists():
        raise ValueError(f"{path} is missing: run `python -m scripts.cdio_accuracy` to measure the model versions")
    raw = yaml.safe_load(path.read_text())
    versions = {name: ModelVersion(name=name, params=int(v["params"]), flops=float(v["flops"]),
                                   accuracy=tuple(float(a) for a in v["accuracy_per_bin"]))
                for name, v in raw["versions"].items()}
    return Measured(bin_edges=tuple(float(e) for e in raw["bin_edges"]), versions=versions, command=str(raw["command"]))


def split(num: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and the test digits of MNIST 5k (fixed by ``seed``)."""
    order = np.random.default_rng([seed, 4]).permutation(num)
    return np.sort(order[:TRAIN_SIZE]), np.sort(order[TRAIN_SIZE:])
