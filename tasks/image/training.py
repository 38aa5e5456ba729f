"""Local training and evaluation for image classification (client and server)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from fl_datasets.sources import LabelledImages


def train_local(
    model: nn.Module,
    data: LabelledImages,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    seed: int,
    weights: np.ndarray | None = None,
) -> float:
    """Plain SGD on the client's partition; returns the mean training loss.

    Batches are drawn from the in-memory tensors directly (no DataLoader): the
    partitions are tiny and a DataLoader's per-epoch overhead would dominate.
    ``weights`` (one per sample, e.g. hard cases weighted up) scale each
    sample's loss, normalised to mean 1 over the partition; the batches and
    their order are the same as without them.
    """
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    plain = weights is None
    loss_fn = nn.CrossEntropyLoss(reduction="mean" if plain else "none")
    scale = None if plain else torch.as_tensor(weights / np.mean(weights), dtype=torch.float32)
    model.train()
    total, count = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            batch = order[start : start + batch_size]
            optimiser.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            if not plain:
                loss = (scale[batch] * loss).mean()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(batch)
            count += len(batch)
    return total / count if count else math.nan


@torch.no_grad()
def probabilities(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Softmax outputs ``(N, classes)`` of ``model`` on images ``x``."""
    model.eval()
    return np.concatenate([torch.softmax(model(torch.from_numpy(x[start : start + batch_size])), dim=1).numpy()
                           for start in range(0, len(x), batch_size)]) if len(x) else np.zeros((0, 0))


@torch.no_grad()
def predict(model: nn.Module, data: LabelledImages, batch_size: int = 1024) -> tuple[np.ndarray, float]:
    """Predicted labels and mean cross-entropy loss."""
    model.eval()
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    preds, loss = [], 0.0
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        loss += nn.functional.cross_entropy(logits, y[start : start + batch_size], reduction="sum").item()
        preds.append(logits.argmax(dim=1).numpy())
    return np.concatenate(preds), loss / max(len(y), 1)


def per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy within each true class (= per-class recall); 0 for absent classes."""
    hits = np.bincount(y_true[y_true == y_pred], minlength=num_classes)
    totals = np.bincount(y_true, minlength=num_classes)
    return np.divide(hits, totals, out=np.zeros(num_classes), where=totals > 0)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy, macro-F1, per-class recall and the weakest class's recall.

    The same numbers as scikit-learn's ``recall_score`` / ``f1_score`` with
    ``labels=range(num_classes)`` and ``zero_division=0`` (F1 = 2 tp / (true +
    predicted), as sklearn computes it), from label counts: importing sklearn
    cost every run ~1.4 s on its round-0 evaluation, on the critical path."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    tp = np.bincount(y_true[y_true == y_pred], minlength=num_classes)[:num_classes].astype(np.float64)
    true_sum = np.bincount(y_true, minlength=num_classes)[:num_classes].astype(np.float64)
    pred_sum = np.bincount(y_pred, minlength=num_classes)[:num_classes].astype(np.float64)
    recalls = np.divide(tp, true_sum, out=np.zeros(num_classes), where=true_sum > 0)
    f1 = np.divide(2 * tp, true_sum + pred_sum, out=np.zeros(num_classes), where=(true_sum + pred_sum) > 0)
    metrics = {
        "accuracy": float(np.mean(y_true == y_pred)),
        "macro_f1": float(np.mean(f1)),
        "weakest_class_recall": float(recalls.min()),
    }
    metrics.update({f"recall_class_{c}": float(r) for c, r in enumerate(recalls)})
    return metrics


def evaluate(model: nn.Module, data: LabelledImages, num_classes: int) -> dict[str, float]:
    """All classification metrics plus ``loss`` of ``model`` on ``data``."""
    y_pred, loss = predict(model, data)
    return {"loss": loss, **classification_metrics(data.y, y_pred, num_classes)}
