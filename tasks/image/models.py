"""Models for the client tasks."""

from __future__ import annotations

from functools import lru_cache, partial

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
    widths : tuple of int
        Channels of the two convolutions and units of the hidden layer
        (``cnn-wide``, the offload task's cloud model: 32, 64, 256; ~317k parameters).
    """

    def __init__(self, num_classes: int, in_channels: int = 1, widths: tuple[int, int, int] = (16, 32, 160)) -> None:
        super().__init__()
        conv1, conv2, hidden = widths
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, conv1, kernel_size=5),  # 28 -> 24
            nn.ReLU(),
            nn.MaxPool2d(2),  # -> 12
            nn.Conv2d(conv1, conv2, kernel_size=5),  # -> 8
            nn.ReLU(),
            nn.MaxPool2d(2),  # -> 4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(conv2 * 4 * 4, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # inputs arrive in [0, 1]; centre them here so every loader stays raw
        return self.classifier(self.features((x - 0.5) / 0.5))


MODELS = {"cnn": SmallCNN, "cnn-wide": partial(SmallCNN, widths=(32, 64, 256))}


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
