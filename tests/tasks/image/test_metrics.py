"""The server's classification metrics equal scikit-learn's (which the server no longer imports)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, recall_score

from tasks.image.training import classification_metrics


@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_sklearn_including_absent_and_never_predicted_classes(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 8, size=300)  # classes 8 and 9 absent from the truth
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 10, size=300))
    y_pred[y_pred == 3] = 4  # class 3 never predicted
    labels = list(range(10))
    metrics = classification_metrics(y_true, y_pred, 10)
    recalls = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    assert metrics["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=labels, average="macro",
                                                         zero_division=0), abs=1e-15)
    assert [metrics[f"recall_class_{c}"] for c in labels] == pytest.approx(list(recalls), abs=1e-15)
    assert metrics["weakest_class_recall"] == recalls.min() == 0.0
    assert metrics["accuracy"] == pytest.approx(np.mean(y_true == y_pred))
