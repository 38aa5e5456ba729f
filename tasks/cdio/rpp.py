"""Resource-preference prediction (paper 004 §3.2): a multi-layer LSTM over
the site's recent tasks (eq. 3's features of each) with two sigmoid outputs,
delay-sensitive and accuracy-sensitive, trained on the BCE (eq. 7).

The paper's input is sequential (the history of a site's tasks), so an LSTM
(torch's ``nn.LSTM``) it is; eq. 3 writes the features as a sum, we feed
them as four inputs (a sum would mix incomparable units).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

PREFERENCES = ("neither", "delay", "accuracy", "both")  # class = delay_bit + 2 x accuracy_bit


class PreferenceLSTM(nn.Module):
    """``layers`` LSTM layers of ``hidden`` units; the last step's state -> 2 logits."""

    def __init__(self, features: int = 4, hidden: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def build_rpp(hidden: int, layers: int, seed: int | None = None) -> PreferenceLSTM:
    if seed is not None:
        torch.manual_seed(seed)
    return PreferenceLSTM(hidden=hidden, layers=layers)


def rpp_flops(hidden: int, layers: int, window: int, features: int = 4) -> float:
    """Forward FLOPs of one prediction: 4 gates x (input + recurrent) multiply-adds per step and layer, plus the head."""
    per_step = sum(2 * 4 * hidden * ((features if layer == 0 else hidden) + hidden + 1) for layer in range(layers))
    return float(per_step * window + 2 * hidden * 2)


def train_rpp(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int, lr: float, seed: int) -> float:
    """Adam on the BCE (eq. 7); returns the last epoch's mean loss."""
    generator = torch.Generator().manual_seed(seed)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()  # eq. 7, on logits for numerical stability
    model.train()
    loss_sum = 0.0
    for _ in range(epochs):
        loss_sum, order = 0.0, torch.randperm(len(ys), generator=generator)
        for start in range(0, len(ys), batch_size):
            batch = order[start:start + batch_size]
            optimiser.zero_grad()
            loss = loss_fn(model(xs[batch]), ys[batch])
            loss.backward()
            optimiser.step()
            loss_sum += loss.item() * len(batch)
    return loss_sum / max(len(ys), 1)


@torch.no_grad()
def predict_proba(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    return torch.sigmoid(model(torch.from_numpy(x))).numpy()


def preference_class(bits: np.ndarray) -> np.ndarray:
    """(N, 2) 0/1 bits -> class index of :data:`PREFERENCES`."""
    bits = np.asarray(bits) > 0.5
    return bits[:, 0].astype(int) + 2 * bits[:, 1].astype(int)


def scores(model: nn.Module, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """BCE, per-label and exact-match accuracy, and the majority class's exact-match accuracy."""
    p = predict_proba(model, x)
    eps = 1e-7
    bce = float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)))
    predicted, true = preference_class(p), preference_class(y)
    majority = np.bincount(true, minlength=4).max() / max(len(true), 1)
    return {"bce": bce, "exact_acc": float(np.mean(predicted == true)), "majority_acc": float(majority),
            "delay_acc": float(np.mean((p[:, 0] > 0.5) == (y[:, 0] > 0.5))),
            "accuracy_acc": float(np.mean((p[:, 1] > 0.5) == (y[:, 1] > 0.5)))}
