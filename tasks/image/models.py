"""Models for the client tasks."""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from fl_common.costs import module_costs


class SmallCNN(nn.Module):
    """LeNet-style CNN for 28x28 images, ~97k parameters with 10 classes.

    Parameters
    ----------
    num_classes : int
        Output classes.
    in_channels : int
        1 for grey images (MNIST, BreastMNIST), 3 for RGB MedMNIST sets.
    """

    def __init__(self, num_classes: int, in_channels: int = 1) -> None:
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
        # inputs arrive in [0, 1]; centre them here so every loader stays raw
        return self.classifier(self.features((x - 0.5) / 0.5))


MODELS = {"cnn": SmallCNN}


def build_model(name: str, num_classes: int, in_channels: int = 1, seed: int | None = None) -> nn.Module:
    """Instantiate a model by config name; ``seed`` fixes its initial weights."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}': choose one of {', '.join(MODELS)}")
    if seed is not None:
        torch.manual_seed(seed)
    return MODELS[name](num_classes=num_classes, in_channels=in_channels)


@lru_cache(maxsize=8)
def model_costs(model_name: str, num_classes: int, in_channels: int = 1, side: int = 28) -> tuple[float, int, int]:
    """(forward FLOPs per sample, parameter count, activation floats per sample)
    of an image classifier; see :func:`fl_common.costs.module_costs`."""
    return module_costs(build_model(model_name, num_classes, in_channels), torch.zeros(1, in_channels, side, side))
