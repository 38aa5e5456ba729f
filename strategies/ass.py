"""Accuracy-stability-size (ASS) weighted aggregation (paper 003, §4.2).

The server scores every returned client model on its small class-balanced
public validation set, giving per-class accuracies a_ic. From them:

* stability  W_i: higher when the per-class standard deviation of a_i is lower,
* capability U_i: the best class accuracy, max_c a_ic,
* scale      B_i: the client's training-sample count,

each range-normalised over the round's clients, then

    V_i = norm(W_i^alpha * U_i^beta * B_i^gamma),   G = sum_i V_i M_i,

with ``norm`` dividing by the sum so the V_i are convex weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from .weighted_sum import all_finite, first_record, ndarray_view, record_views, weighted_sum

PerClassEvaluator = Callable[[ArrayRecord], np.ndarray]


def range_normalise(values: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """Map ``values`` linearly onto [floor, 1] (min -> floor, max -> 1).

    All-equal values (zero range, which includes a single client) map to 1:
    the factor then does not discriminate, which is what it measures.
    """
    values = np.asarray(values, dtype=np.float64)
    low, high = values.min(), values.max()
    if high - low <= 1e-12 * max(1.0, abs(high)):
        return np.ones_like(values)
    return floor + (1.0 - floor) * (values - low) / (high - low)


def ass_weights(
    per_class_accuracy: np.ndarray,
    num_examples: np.ndarray,
    alpha: float,
    beta: float,
    gamma: float,
    floor: float = 0.0,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Aggregation weights V_i of paper 003's ASS rule.

    Parameters
    ----------
    per_class_accuracy : np.ndarray
        ``(clients, classes)`` accuracy of each client's model per class on
        the public validation set.
    num_examples : np.ndarray
        ``(clients,)`` training samples per client.
    alpha, beta, gamma : float
        Exponents (>= 0) of stability, capability and scale; 0 switches a
        factor off (x**0 == 1, also for x == 0).
    floor : float
        Lower end of the range normalisation, in [0, 1). 0 is the paper's
        literal min-max normalisation, which gives the weakest client of every
        factor with a positive exponent zero weight; a small floor keeps every
        client in the average.

    Returns
    -------
    (weights, factors)
        ``weights`` sum to 1. ``factors`` holds the normalised W, U and B.
        If every product is 0 (only possible with ``floor=0``), the weights
        fall back to the sample-size shares (FedAvg).
    """
    accuracy = np.asarray(per_class_accuracy, dtype=np.float64)
    sizes = np.asarray(num_examples, dtype=np.float64)
    stability = range_normalise(-accuracy.std(axis=1), floor)  # lower sd -> higher W
    capability = range_normalise(accuracy.max(axis=1), floor)
    scale = range_normalise(sizes, floor)
    product = stability**alpha * capability**beta * scale**gamma
    total = product.sum()
    weights = product / total if total > 0 else sizes / sizes.sum()
    return weights, {"stability": stability, "capability": capability, "scale": scale}


def is_finite(arrays: ArrayRecord) -> bool:
    """False if any floating-point value is NaN or infinite (read without copying)."""
    return all_finite(record_views(arrays))


class AccuracyStabilitySize(FedAvg):
    """FedAvg with paper 003's accuracy-stability-size weights.

    Sampling and configuration are FedAvg's; only ``aggregate_train`` changes.

    Parameters
    ----------
    evaluate_per_class : callable
        ``ArrayRecord -> (classes,) accuracy`` of a client model on the
        server's public class-balanced validation set.
    alpha : float (default: 1.0)
        Exponent of stability W (>= 0).
    beta : float (default: 1.0)
        Exponent of capability U (>= 0).
    gamma : float (default: 1.0)
        Exponent of scale B (>= 0).
    floor : float (default: 0.1)
        Lower end of the range normalisation, in [0, 1); see :func:`ass_weights`.
    **fedavg_kwargs
        FedAvg's sampling and key arguments (``fraction_train``,
        ``min_available_nodes``, ``weighted_by_key``, ...).

    Notes
    -----
    A reply whose model holds NaN or Inf never enters the average: it is
    logged, counted (``ass_rejected``) and the others are re-weighed as if it
    had never come. It is found after the sum (see ``aggregate_train``), so
    ``evaluate_per_class`` may see such a model; its scores are discarded.
    Per-client weights are returned as ``ass_weight_p<partition-id>`` metrics.
    """

    def __init__(
        self,
        evaluate_per_class: PerClassEvaluator,
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 1.0,
        floor: float = 0.1,
        **fedavg_kwargs,
    ) -> None:
        for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            if not value >= 0:
                raise ValueError(f"ASS {name}={value} must be >= 0 (0 switches the factor off)")
        if not 0 <= floor < 1:
            raise ValueError(f"ASS floor={floor} must lie in [0, 1)")
        super().__init__(**fedavg_kwargs)
        self.evaluate_per_class = evaluate_per_class
        self.alpha, self.beta, self.gamma, self.floor = alpha, beta, gamma, floor

    def summary(self) -> None:
        log(INFO, "\t├──> ASS: alpha=%s beta=%s gamma=%s floor=%s",
            self.alpha, self.beta, self.gamma, self.floor)
        super().summary()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Score each valid reply on the public set and average by V_i.

        Optimistic screening: the weights are positive, so the weighted sum
        is finite exactly when every reply is (barring an overflow of finite
        values). The sum is taken first, in one pass over the replies, and
        only a non-finite sum pays a second pass that finds and drops the
        bad replies and re-weighs the rest: the result is the same as
        screening first, at half the memory traffic in the common case.
        """
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        arrays, metrics, weights = self._weigh_and_sum(valid)
        # zero-weight replies (floor=0) are left out of the sum, so the sum cannot vouch for them
        unweighed = [m for m, w in zip(valid, weights) if w == 0]
        if is_finite(arrays) and all(is_finite(self._arrays(m)) for m in unweighed):
            metrics["ass_rejected"] = 0
            return arrays, metrics
        finite = []
        for message in valid:
            if is_finite(self._arrays(message)):
                finite.append(message)
            else:
                log(WARNING, "ASS: rejected the update of node %s: NaN/Inf in its model",
                    message.metadata.src_node_id)
        rejected = len(valid) - len(finite)
        if not finite:
            return None, MetricRecord({"ass_rejected": rejected}) if rejected else None
        if rejected == 0:  # an overflow of finite values: the sum is what it is
            metrics["ass_rejected"] = 0
            return arrays, metrics
        arrays, metrics, _ = self._weigh_and_sum(finite)
        metrics["ass_rejected"] = rejected
        return arrays, metrics

    def _weigh_and_sum(self, messages: list[Message]) -> tuple[ArrayRecord, MetricRecord, np.ndarray]:
        """V_i of each reply on the public set, and sum_i V_i M_i."""
        per_class = np.stack([self.evaluate_per_class(self._arrays(m)) for m in messages])
        sizes = np.array([float(self._metrics(m)[self.weighted_by_key]) for m in messages])
        with np.errstate(invalid="ignore"):  # a NaN model's scores: the caller re-weighs without it
            weights, _ = ass_weights(per_class, sizes, self.alpha, self.beta, self.gamma, self.floor)
        arrays = self._weighted_sum([self._arrays(m) for m in messages], weights)
        metrics = self.train_metrics_aggr_fn([m.content for m in messages], self.weighted_by_key)
        for message, weight in zip(messages, weights):
            metrics[f"ass_weight_p{self._client_label(message)}"] = float(weight)
        return arrays, metrics, weights

    def _arrays(self, message: Message) -> ArrayRecord:
        return first_record(message.content, ArrayRecord)

    def _metrics(self, message: Message) -> MetricRecord:
        return first_record(message.content, MetricRecord)

    def _client_label(self, message: Message) -> int:
        metrics = self._metrics(message)
        return int(metrics["partition-id"]) if "partition-id" in metrics else message.metadata.src_node_id

    @staticmethod
    def _weighted_sum(records: list[ArrayRecord], weights: np.ndarray) -> ArrayRecord:
        """sum_i V_i M_i in each tensor's dtype: zero-copy reads, one BLAS pass
        per reply (float32 tensors accumulate in float32, as FedAvg's do)."""
        keys = list(records[0].keys())
        models = [[ndarray_view(record[key]) for key in keys] for record in records]
        summed = weighted_sum(models, weights, [layer.dtype for layer in models[0]])
        return ArrayRecord({key: Array(layer) for key, layer in zip(keys, summed)})
