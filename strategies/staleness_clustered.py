"""Staleness-aware clustered aggregation (paper 001, §3.3 and §4.3).

Two ideas from paper 001's "heterogeneous-aware FL", each switchable:

* **Staleness-aware mixing.** An update computed on the model of round d and
  applied in round r has staleness tau = r - d. It moves its cluster's model by
  its delta (client model - the model it started from) times alpha * s(tau):

      constant    s(tau) = 1
      polynomial  s(tau) = (tau + 1) ** -a
      hinge       s(tau) = 1 if tau <= b else 1 / (a * (tau - b) + 1)   (FedAsync, Xie et al. 2019)

  Within a round the deltas are averaged with sample-size weights, so with
  alpha = 1 and only fresh updates one round equals FedAvg.
* **Clustered FL.** Every R rounds the server clusters clients by the cosine
  similarity of their latest flattened updates (k-means on unit vectors with k
  from config, or average-linkage clustering cut at a similarity threshold, as
  in clustered FL, Sattler et al. 2020) and keeps one model per cluster; each
  client trains on, and is evaluated with, its cluster's model. For large
  models the updates can be clustered on seeded count sketches of
  ``sketch_dim`` dimensions instead of the full vectors (:class:`UpdateSketch`).

Optional server momentum per cluster (FedAvgM's rule on each cluster's delta).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from .weighted_sum import BLOCK, add_scaled, first_record, record_views, weighted_sum

DISCOUNTS = ("constant", "polynomial", "hinge")


def staleness_discount(tau: int, kind: str, a: float = 0.5, b: int = 4) -> float:
    """s(tau) for the ``constant``, ``polynomial`` or ``hinge`` discount."""
    if tau < 0:
        raise ValueError(f"staleness tau={tau} cannot be negative")
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((tau + 1) ** -a)
    if kind == "hinge":
        return 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)
    raise ValueError(f"unknown staleness discount '{kind}': use one of {', '.join(DISCOUNTS)}")


def cluster_updates(
    updates: np.ndarray, num_clusters: int | None, similarity_threshold: float | None, seed: int
) -> np.ndarray:
    """Cluster labels of flattened updates by cosine similarity.

    ``num_clusters``: k-means (scikit-learn) on the unit-normalised updates,
    which orders points as cosine similarity does. ``similarity_threshold``:
    average-linkage clustering on cosine distance, cut where clusters' mean
    similarity falls below the threshold.
    """
    from sklearn.cluster import AgglomerativeClustering, KMeans

    norms = np.linalg.norm(updates, axis=1, keepdims=True)
    unit = updates / np.where(norms > 0, norms, 1.0)
    if len(unit) == 1:
        return np.zeros(1, dtype=int)
    if num_clusters is not None:
        k = min(num_clusters, len(unit))
        return KMeans(n_clusters=k, n_init=10, random_state=seed, copy_x=False).fit_predict(unit)  # unit is ours
    model = AgglomerativeClustering(
        n_clusters=None, metric="cosine", linkage="average", distance_threshold=1.0 - similarity_threshold
    )
    return model.fit_predict(unit)


class UpdateSketch:
    """Seeded signed count sketch of flattened model updates (a sparse JL
    projection to ``dim`` dimensions).

    Coordinate j of the flattened update goes to bucket ``j mod dim`` with a
    random sign s_j = +-1 drawn once from ``seed``: ``S(x)_b = sum_{j = b mod dim}
    s_j x_j``. The sketch is linear and E<S(x), S(y)> = <x, y>, so cosine
    similarities are kept up to an error of about 1/sqrt(dim) (0.06 at 256,
    0.03 at 1024) when an update's energy is spread over many coordinates
    (striding mixes every layer into every bucket). One pass over the update,
    nothing of update size is allocated.

    Parameters
    ----------
    dim : int
        Sketch dimensions (>= 2).
    seed : int
        Seeds the signs; sketches are comparable only under the same seed.
    """

    def __init__(self, dim: int, seed: int = 0) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 2:
            raise ValueError(f"sketch_dim={dim} is invalid: use an integer >= 2 (e.g. 256), or null for exact")
        self.dim, self.seed = int(dim), seed
        self._signs = np.empty(0, dtype=np.float32)

    def signs(self, size: int) -> np.ndarray:
        """The +-1 signs of a flattened update of ``size`` values."""
        if self._signs.size != size:
            rng = np.random.default_rng([self.seed, size])
            self._signs = (rng.integers(0, 2, size=size, dtype=np.int8) * 2 - 1).astype(np.float32)
        return self._signs

    def __call__(self, layers: list[np.ndarray], base: list[np.ndarray] | None = None) -> np.ndarray:
        """The sketch of ``layers`` (minus ``base``, layer by layer, if given), float64."""
        d = self.dim
        signs = self.signs(sum(layer.size for layer in layers))
        out = np.zeros(d, dtype=np.float64)
        rows = max(1, BLOCK // d)
        scratch = np.empty(rows * d, dtype=np.float32)
        offset = 0
        for i, layer in enumerate(layers):
            x = np.ravel(layer)  # a view of a C-contiguous tensor
            b = None if base is None else np.ravel(base[i])
            n, pos = x.size, 0
            head = min((-offset) % d, n)  # up to the next bucket-0 coordinate
            if head:
                first = offset % d
                out[first:first + head] += self._piece(x, b, 0, head, scratch) * signs[offset:offset + head]
                pos = head
            while n - pos >= d:  # whole rows of d buckets, a cache-sized block at a time
                stop = pos + min((n - pos) // d, rows) * d
                out += np.einsum("rb,rb->b", self._piece(x, b, pos, stop, scratch).reshape(-1, d),
                                 signs[offset + pos:offset + stop].reshape(-1, d))
                pos = stop
            if pos < n:
                out[: n - pos] += self._piece(x, b, pos, n, scratch) * signs[offset + pos:offset + n]
            offset += n
        return out

    @staticmethod
    def _piece(x: np.ndarray, b: np.ndarray | None, start: int, stop: int, scratch: np.ndarray) -> np.ndarray:
        """``x[start:stop] - b[start:stop]`` (or ``x[start:stop]``) as float32, in ``scratch``."""
        if b is None and x.dtype == np.float32:
            return x[start:stop]
        target = scratch[: stop - start]
        if b is None:
            target[...] = x[start:stop]
        else:
            np.subtract(x[start:stop], b[start:stop], out=target, casting="unsafe")
        return target


class StalenessClustered(FedAvg):
    """Staleness-discounted, optionally clustered, optionally momentum FedAvg.

    Parameters
    ----------
    mixing : float (default: 1.0)
        alpha in (0, 1]: how far an update moves its cluster's model.
    discount : str (default: "polynomial")
        ``constant``, ``polynomial`` or ``hinge``.
    discount_a : float (default: 0.5)
        a of the polynomial / hinge discount (> 0).
    discount_b : int (default: 4)
        b of the hinge discount: staleness tolerated without discount (>= 0).
    num_clusters : int, optional
        k of k-means clustering; ``None`` with no threshold = one cluster.
    similarity_threshold : float, optional
        Cosine-similarity cut for threshold clustering, in (-1, 1); exclusive
        with ``num_clusters``.
    recluster_every : int (default: 1)
        R: re-cluster after every R-th round (>= 1).
    server_momentum : float (default: 0.0)
        Momentum per cluster, in [0, 1).
    max_staleness : int (default: 20)
        How many rounds of sent models are kept to compute deltas. An update
        older than that cannot be applied; it is logged and counted
        (``updates_expired``), never silently dropped.
    sketch_dim : int, optional
        Cluster on seeded count sketches of this many dimensions
        (:class:`UpdateSketch`) instead of the full flattened updates;
        ``None`` (default) clusters the exact vectors. Each node then keeps
        ``sketch_dim`` floats of its latest update instead of a model-sized copy.
    seed : int (default: 0)
        Seeds k-means and the sketch's signs.
    **fedavg_kwargs
        FedAvg's sampling and key arguments.
    """

    def __init__(
        self,
        mixing: float = 1.0,
        discount: str = "polynomial",
        discount_a: float = 0.5,
        discount_b: int = 4,
        num_clusters: int | None = None,
        similarity_threshold: float | None = None,
        recluster_every: int = 1,
        server_momentum: float = 0.0,
        max_staleness: int = 20,
        seed: int = 0,
        sketch_dim: int | None = None,
        **fedavg_kwargs,
    ) -> None:
        if not 0 < mixing <= 1:
            raise ValueError(f"mixing={mixing} must lie in (0, 1]")
        if discount not in DISCOUNTS:
            raise ValueError(f"unknown staleness discount '{discount}': use one of {', '.join(DISCOUNTS)}")
        if not discount_a > 0 or discount_b < 0:
            raise ValueError(f"discount_a={discount_a} must be > 0 and discount_b={discount_b} >= 0")
        if num_clusters is not None and similarity_threshold is not None:
            raise ValueError("give num_clusters or similarity_threshold, not both")
        if num_clusters is not None and num_clusters < 1:
            raise ValueError(f"num_clusters={num_clusters} must be >= 1")
        if similarity_threshold is not None and not -1 < similarity_threshold < 1:
            raise ValueError(f"similarity_threshold={similarity_threshold} must lie in (-1, 1)")
        if recluster_every < 1 or max_staleness < 0 or not 0 <= server_momentum < 1:
            raise ValueError(
                f"recluster_every={recluster_every} must be >= 1, max_staleness={max_staleness} "
                f">= 0 and server_momentum={server_momentum} in [0, 1)"
            )
        self.sketch = None if sketch_dim is None else UpdateSketch(sketch_dim, seed)  # validates
        super().__init__(**fedavg_kwargs)
        self.sketch_dim = sketch_dim
        self.mixing, self.discount = mixing, discount
        self.discount_a, self.discount_b = discount_a, discount_b
        self.num_clusters, self.similarity_threshold = num_clusters, similarity_threshold
        self.recluster_every, self.server_momentum = recluster_every, server_momentum
        self.max_staleness, self.seed = max_staleness, seed
        self.keys: list[str] = []
        self.models: dict[int, list[np.ndarray]] = {}  # cluster -> current model
        self.cluster_of: dict[int, int] = {}  # node -> cluster
        self.sent: dict[tuple[int, int], list[np.ndarray]] = {}  # (cluster, round) -> model sent
        self.dispatch_cluster: dict[tuple[int, int], int] = {}  # (node, round) -> cluster
        self.momentum: dict[int, list[np.ndarray]] = {}
        self.latest_update: dict[int, np.ndarray] = {}  # node -> flattened delta (or its sketch)
        self.latest_model: dict[int, list[np.ndarray]] = {}
        self.partition_of: dict[int, int] = {}

    # -- checkpointing --------------------------------------------------------
    # Node ids are random per simulation: state keyed by node is saved keyed by
    # the node's partition, and mapped back onto the new run's node ids.
    _BY_NODE = ("cluster_of", "latest_update", "latest_model", "partition_of")

    def state_dict(self, partition_of: dict[int, int]) -> dict:
        """Everything needed to continue aggregating (see :meth:`load_state_dict`).

        Parameters
        ----------
        partition_of : dict of int to int
            This run's node id -> partition id.
        """
        state = {
            "keys": list(self.keys), "models": self.models, "sent": self.sent, "momentum": self.momentum,
            "dispatch_cluster": {(partition_of[n], r): c for (n, r), c in self.dispatch_cluster.items()},
        }
        for name in self._BY_NODE:
            state[name] = {partition_of[n]: v for n, v in getattr(self, name).items()}
        return state

    def load_state_dict(self, state: dict, node_of: dict[int, int]) -> None:
        """Restore :meth:`state_dict`'s output onto this run's nodes.

        Parameters
        ----------
        state : dict
            From :meth:`state_dict`.
        node_of : dict of int to int
            This run's partition id -> node id.
        """
        self.keys, self.models, self.sent, self.momentum = (
            list(state["keys"]), state["models"], state["sent"], state["momentum"])
        self.dispatch_cluster = {(node_of[p], r): c for (p, r), c in state["dispatch_cluster"].items()}
        for name in self._BY_NODE:
            setattr(self, name, {node_of[p]: v for p, v in state[name].items()})

    @property
    def clustered(self) -> bool:
        return self.num_clusters is not None or self.similarity_threshold is not None

    def summary(self) -> None:
        log(INFO, "\t├──> staleness-aware clustered: mixing=%s discount=%s(a=%s, b=%s) k=%s "
            "threshold=%s R=%s momentum=%s sketch_dim=%s", self.mixing, self.discount, self.discount_a,
            self.discount_b, self.num_clusters, self.similarity_threshold, self.recluster_every,
            self.server_momentum, self.sketch_dim)
        super().summary()

    # -- sending ------------------------------------------------------------
    def _cluster_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
        fraction: float, min_nodes: int, message_type: str,
    ) -> list[Message]:
        if not self.models:
            self.keys = list(arrays.keys())
            self.models[0] = [a.copy() for a in arrays.to_numpy_ndarrays()]
        if fraction == 0.0:
            return []
        count = max(int(len(list(grid.get_node_ids())) * fraction), min_nodes)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, count)
        config["server-round"] = server_round
        messages = []
        for node in node_ids:
            cluster = self.cluster_of.setdefault(node, self._largest_cluster())
            if message_type == MessageType.TRAIN:
                self.sent[(cluster, server_round)] = self.models[cluster]
                self.dispatch_cluster[(node, server_round)] = cluster
            record = RecordDict({
                self.arrayrecord_key: self._record(self.models[cluster]),
                self.configrecord_key: ConfigRecord({**dict(config), "cluster": cluster}),
            })
            messages.append(Message(content=record, message_type=message_type, dst_node_id=node))
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Each sampled client gets its cluster's model."""
        return self._cluster_messages(
            server_round, arrays, config, grid, self.fraction_train, self.min_train_nodes, MessageType.TRAIN
        )

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Each sampled client is evaluated with its cluster's model."""
        return self._cluster_messages(
            server_round, arrays, config, grid, self.fraction_evaluate, self.min_evaluate_nodes, MessageType.EVALUATE
        )

    # -- aggregating --------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Apply each update's discounted delta to its client's cluster model.

        Models are read as zero-copy views of the replies and summed with one
        BLAS pass each (see :meth:`_apply`); the latest update and model of a
        node are kept only when clustering is on.
        """
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        per_cluster: dict[int, list[tuple[float, float, list[np.ndarray], list[np.ndarray]]]] = {}
        expired, discounts = 0, []
        for message in valid:
            node = message.metadata.src_node_id
            metrics = first_record(message.content, MetricRecord)
            dispatched = int(metrics.get("dispatch-round", server_round))
            tau = int(metrics.get("staleness", server_round - dispatched))
            if "partition-id" in metrics:
                self.partition_of[node] = int(metrics["partition-id"])
            base_cluster = self.dispatch_cluster.pop((node, dispatched), self.cluster_of.get(node, 0))
            base = self.sent.get((base_cluster, dispatched))
            if base is None or tau > self.max_staleness:
                expired += 1
                log(WARNING, "staleness-clustered: update of node %s from round %s (tau=%s) is older "
                    "than max_staleness=%s; not applied", node, dispatched, tau, self.max_staleness)
                continue
            model = record_views(first_record(message.content, ArrayRecord))
            weight = self.mixing * staleness_discount(tau, self.discount, self.discount_a, self.discount_b)
            discounts.append(weight / self.mixing)
            samples = float(metrics[self.weighted_by_key])
            cluster = self.cluster_of.setdefault(node, base_cluster)
            per_cluster.setdefault(cluster, []).append((samples, weight, model, base))
            if self.clustered:
                self.latest_update[node] = self._update_vector(model, base)
                self.latest_model[node] = model
        for cluster, updates in per_cluster.items():
            self._apply(cluster, updates)
        reclustered = self.clustered and server_round % self.recluster_every == 0 and len(self.latest_update) > 1
        if reclustered:
            self._recluster()
        self._forget_old_models(server_round)
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        metrics["num_clusters"] = len(self.models)
        metrics["updates_expired"] = expired
        metrics["mean_discount"] = float(np.mean(discounts)) if discounts else 0.0
        for node, partition in self.partition_of.items():
            metrics[f"cluster_p{partition}"] = self.cluster_of.get(node, 0)
        return self._record(self.models[self._largest_cluster()]), metrics

    def _update_vector(self, model: list[np.ndarray], base: list[np.ndarray]) -> np.ndarray:
        """The flattened delta ``model - base`` as float32, or its sketch."""
        if self.sketch is not None:
            return self.sketch(model, base)
        flat = np.empty(sum(layer.size for layer in model), dtype=np.float32)
        offset = 0
        for m, b in zip(model, base):
            np.subtract(m.reshape(-1), np.reshape(b, -1), out=flat[offset:offset + m.size], casting="unsafe")
            offset += m.size
        return flat

    def _apply(self, cluster: int, updates: list[tuple[float, float, list[np.ndarray], list[np.ndarray]]]) -> None:
        """Move ``cluster``'s model by ``sum_i c_i (model_i - base_i)``, with
        c_i = samples_i / total * mixing * s(tau_i).

        Computed as ``sum_i c_i model_i - sum_b (sum_{i: base b} c_i) base_b``:
        one BLAS pass over each reply and one per distinct base (a round's
        updates share few), accumulated in the tensors' precision. For float32
        models the step then carries an absolute error of some float32 ulps of
        the model's values (about sqrt(n) for n updates, at most n/2), the
        order of the rounding of the stored float32 model itself, rather than
        ulps of the (smaller) deltas as a float64 delta-by-delta sum would.
        """
        total = sum(samples for samples, _, _, _ in updates)
        coefficients = [(samples / total) * weight for samples, weight, _, _ in updates]
        step = weighted_sum([model for _, _, model, _ in updates], coefficients)
        bases: dict[int, list] = {}
        for (_, _, _, base), c in zip(updates, coefficients):
            bases.setdefault(id(base), [base, 0.0])[1] += c
        for base, c in bases.values():
            for s, b in zip(step, base):
                add_scaled(s, b, -c)
        if self.server_momentum > 0:
            previous = self.momentum.get(cluster)
            if previous is not None:
                for s, v in zip(step, previous):
                    add_scaled(s, v, self.server_momentum)
            self.momentum[cluster] = step
        self.models[cluster] = [
            (m + s).astype(m.dtype) for m, s in zip(self.models[cluster], step)
        ]

    def _recluster(self) -> None:
        nodes = sorted(self.latest_update)
        labels = cluster_updates(
            np.stack([self.latest_update[n] for n in nodes]),
            self.num_clusters, self.similarity_threshold, self.seed,
        )
        new_models: dict[int, list[np.ndarray]] = {}
        for label in sorted(set(labels)):
            members = [n for n, l in zip(nodes, labels) if l == label]
            first = self.latest_model[members[0]]
            new_models[int(label)] = weighted_sum(
                [self.latest_model[n] for n in members], [1.0 / len(members)] * len(members),
                [layer.dtype for layer in first],
            )
        self.models = new_models
        self.cluster_of.update({n: int(l) for n, l in zip(nodes, labels)})
        largest = self._largest_cluster()
        for node, cluster in list(self.cluster_of.items()):
            if cluster not in self.models:  # a node not seen since the last clustering
                self.cluster_of[node] = largest
        self.momentum = {}
        log(INFO, "staleness-clustered: %d clusters of sizes %s", len(new_models),
            [int((labels == l).sum()) for l in sorted(set(labels))])

    def _forget_old_models(self, server_round: int) -> None:
        oldest = server_round - self.max_staleness
        self.sent = {key: model for key, model in self.sent.items() if key[1] >= oldest}

    def _largest_cluster(self) -> int:
        if not self.models:
            return 0
        sizes = {c: 0 for c in self.models}
        for cluster in self.cluster_of.values():
            if cluster in sizes:
                sizes[cluster] += 1
        return max(sorted(sizes), key=lambda c: sizes[c])

    def _record(self, model: list[np.ndarray]) -> ArrayRecord:
        return ArrayRecord({key: Array(np.asarray(layer)) for key, layer in zip(self.keys, model)})

    # -- for the round driver's evaluation ----------------------------------
    def models_for_evaluation(self) -> dict[int, tuple[ArrayRecord, int]]:
        """Each cluster's model and its number of member clients."""
        members = {c: 0 for c in self.models}
        for cluster in self.cluster_of.values():
            if cluster in members:
                members[cluster] += 1
        return {c: (self._record(m), max(members[c], 1)) for c, m in self.models.items()}
