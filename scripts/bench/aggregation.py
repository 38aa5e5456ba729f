"""Aggregation at memory speed: every strategy's ``aggregate_train`` on 100
replies of 1 M float32 parameters, against one numpy weighted sum over the
stacked array; then clustering 1,000 updates of 1 M parameters on sketches.

    python -m scripts.bench.aggregation            # the full run (~2 GiB peak, a few minutes)
    python -m scripts.bench.aggregation --updates 20 --params 200000 --cluster-updates 100 --no-exact

Every number is measured in this one run on this machine (median of
``--repeats`` timed calls; the exact-clustering row is timed once). "peak MiB"
is the process's peak resident memory during the timed call above what it held
before (the replies and the stacked baseline array), read from /proc (VmHWM,
reset per call).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import time
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg, FedAvgM

from strategies.ass import AccuracyStabilitySize
from strategies.staleness_clustered import StalenessClustered, UpdateSketch, cluster_updates
from strategies.weighted_sum import FastFedAvg, FastFedAvgM, blas_threads, ndarray_view
from tests.fake_grid import FakeGrid, train_reply

CLASSES = 10


def layer_shapes(params: int) -> list[tuple[int, ...]]:
    """A conv layer, two dense layers and a bias summing to ``params``."""
    if params == 1_000_000:
        return [(256, 64, 3, 3), (512, 1024), (1024, 320), (576,)]
    sizes = [params // 2, params // 3, params // 7]
    return [(s,) for s in sizes] + [(params - sum(sizes),)]


# -- memory ----------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def measure_once(fn: Callable[..., object], setup: Callable[[], object] | None = None) -> tuple[float, float]:
    """(seconds, peak MiB above the pre-call RSS) of one call of ``fn`` (on ``setup()``'s result)."""
    state = setup() if setup is not None else None
    gc.collect()
    before = _status_kib("VmRSS")
    reset_peak()
    start = time.perf_counter()
    result = fn() if state is None else fn(state)
    seconds = time.perf_counter() - start
    peak = (_status_kib("VmHWM") - before) / 1024
    del result, state
    return seconds, peak


def measure_interleaved(cases: list[tuple[Callable, Callable | None]], repeats: int) -> list[tuple[float, float, float]]:
    """Median seconds, fastest seconds and max peak MiB of each case, timed
    round-robin (every case once per repeat) so that load from other processes
    on a shared machine hits all cases alike."""
    samples: list[list[tuple[float, float]]] = [[] for _ in cases]
    for _ in range(repeats):
        for i, (fn, setup) in enumerate(cases):
            samples[i].append(measure_once(fn, setup))
    return [(float(np.median([t for t, _ in runs])), min(t for t, _ in runs), max(p for _, p in runs))
            for runs in samples]


# -- the replies -----------------------------------------------------------
def build_replies(updates: int, params: int, clusters: int, seed: int):
    """``updates`` train replies around a shared global model, in ``clusters``
    planted groups, and the same models stacked as one ``(updates, params)``
    float32 array (the baseline's input)."""
    rng = np.random.default_rng(seed)
    shapes = layer_shapes(params)
    global_flat = (0.05 * rng.standard_normal(params, dtype=np.float32))
    directions = rng.standard_normal((clusters, params), dtype=np.float32)
    # each cluster's direction has twice the norm of the noise: cosine ~0.8 within a cluster, ~0 across
    directions *= 0.02 * np.sqrt(params) / np.linalg.norm(directions, axis=1, keepdims=True)
    stacked = np.empty((updates, params), dtype=np.float32)
    replies, sizes = [], []
    for i in range(updates):
        row = stacked[i]
        rng.standard_normal(params, dtype=np.float32, out=row)
        row *= 0.01
        row += directions[i % clusters]
        row += global_flat
        record, offset = {}, 0
        for j, shape in enumerate(shapes):
            size = int(np.prod(shape))
            record[f"layer{j}"] = Array(row[offset:offset + size].reshape(shape))
            offset += size
        n = int(rng.integers(50, 500))
        sizes.append(n)
        replies.append(train_reply(ArrayRecord(record), n, node_id=i + 1,
                                   **{"dispatch-round": 1, "staleness": 0, "partition-id": i}))
    global_record, offset = {}, 0
    for j, shape in enumerate(shapes):
        size = int(np.prod(shape))
        global_record[f"layer{j}"] = Array(global_flat[offset:offset + size].reshape(shape))
        offset += size
    weights = np.asarray(sizes, dtype=np.float32) / np.float32(sum(sizes))
    return replies, ArrayRecord(global_record), stacked, weights


def stub_per_class_accuracy(record: ArrayRecord) -> np.ndarray:
    """A cheap deterministic stand-in for the public-set evaluation: per-class
    'accuracies' read off the first tensor's first values (no inference)."""
    first = ndarray_view(next(iter(record.values()))).reshape(-1)[:CLASSES]
    return 0.5 + 0.5 * np.tanh(20 * first.astype(np.float64))


# -- the benchmark ---------------------------------------------------------
def aggregation_table(args) -> None:
    replies, global_record, stacked, weights = build_replies(args.updates, args.params, 4, args.seed)
    nodes = [m.metadata.src_node_id for m in replies]
    sampling = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=len(nodes),
                    min_available_nodes=len(nodes), min_evaluate_nodes=0)

    def flower_read_and_sum():
        arrays = [next(iter(m.content.array_records.values())).to_numpy_ndarrays() for m in replies]
        return arrays, np.tensordot(weights, stacked, axes=1)

    def aggregate(make: Callable, configure: bool = False) -> tuple[Callable, Callable]:
        def setup():
            strategy = make()
            if configure:  # registers the nodes and the model they start from
                list(strategy.configure_train(1, global_record, ConfigRecord({}), FakeGrid(nodes)))
            return strategy
        return (lambda strategy: strategy.aggregate_train(1, replies)), setup

    def single_threaded_b0():
        with blas_threads():
            return np.tensordot(weights, stacked, axes=1)

    d = args.sketch_dim
    cases = [
        ("B0 np.tensordot(w, stacked (n, P) float32)", (lambda: np.tensordot(weights, stacked, axes=1), None),
         "the target (default BLAS threads)"),
        ("   B0 with BLAS on 1 thread", (single_threaded_b0, None), "as the strategies' loops run"),
        ("B1 Array.numpy() of every reply + B0", (flower_read_and_sum, None), "Flower's read path + the sum"),
        ("   zero-copy views of every reply",
         (lambda: [[ndarray_view(a) for a in m.content["arrays"].values()] for m in replies], None),
         "this branch's read path"),
        ("FedAvg (Flower 1.4x, for reference)", aggregate(lambda: FedAvg(**sampling)), ""),
        ("FedAvgM (Flower; momentum 0.9)",
         aggregate(lambda: FedAvgM(server_momentum=0.9, **sampling), configure=True), ""),
        ("FastFedAvg (strategy=fedavg)", aggregate(lambda: FastFedAvg(**sampling)), ""),
        ("FastFedAvgM (strategy=fedavgm)",
         aggregate(lambda: FastFedAvgM(server_momentum=0.9, **sampling), configure=True), ""),
        ("ASS (stubbed public-set scorer)",
         aggregate(lambda: AccuracyStabilitySize(stub_per_class_accuracy, **sampling)),
         "scorer: tanh of 10 values, no inference"),
        ("staleness_clustered, no clustering", aggregate(lambda: StalenessClustered(**sampling), True), ""),
        ("staleness_clustered, no clustering, momentum 0.9",
         aggregate(lambda: StalenessClustered(server_momentum=0.9, **sampling), True), "first round: no momentum yet"),
        (f"staleness_clustered, k=4, sketch {d}",
         aggregate(lambda: StalenessClustered(num_clusters=4, recluster_every=1, sketch_dim=d, **sampling), True),
         "re-clusters in this call (k-means, n_init=10)"),
        (f"staleness_clustered, threshold 0.5, sketch {d}",
         aggregate(lambda: StalenessClustered(similarity_threshold=0.5, recluster_every=1, sketch_dim=d,
                                              **sampling), True),
         "re-clusters in this call (average linkage)"),
    ]
    results = measure_interleaved([case for _, case, _ in cases], args.repeats)
    rows = [(name, seconds, fastest, peak, note)
            for (name, _, note), (seconds, fastest, peak) in zip(cases, results)]
    if args.exact:
        seconds, peak = measure_once(*aggregate(
            lambda: StalenessClustered(num_clusters=4, recluster_every=1, **sampling), True))
        rows.append(("staleness_clustered, k=4, exact", seconds, seconds, peak,
                     "k-means on the full vectors; timed once"))
    (_, baseline, baseline_min, _, _), (_, read_baseline, _, _, _) = rows[0], rows[2]

    print()
    print(f"aggregate_train on {args.updates} replies x {args.params:,} float32 parameters "
          f"({len(layer_shapes(args.params))} tensors); median of {args.repeats} calls, round-robin")
    header = (f"{'':50s} {'median s':>8s} {'/B0':>7s} {'/B1':>7s} {'min s':>8s} {'min/B0min':>9s} "
              f"{'peak MiB':>8s}  note")
    print(header)
    print("-" * len(header))
    for name, seconds, fastest, peak, note in rows:
        print(f"{name:50s} {seconds:8.4f} {seconds / baseline:7.2f} {seconds / read_baseline:7.2f} "
              f"{fastest:8.4f} {fastest / baseline_min:9.2f} {peak:8.0f}  {note}")
    print(f"(the process held {_status_kib('VmRSS') / 1024:.0f} MiB before each call: the replies and the stack)")
    print("B0 excludes reading the arrays out of the messages; B1 adds Flower's own read of every tensor")
    print("(Array.numpy(): np.load from BytesIO, a copy). Target: every strategy <= 2.00 x B0.")


def clustering_benchmark(args) -> None:
    """Sketch planted updates, generated in chunks, and cluster the sketches
    with ``cluster_updates``; memory stays at one chunk however many updates."""
    updates, params, k, d = args.cluster_updates, args.params, 4, args.sketch_dim
    rng = np.random.default_rng(args.seed + 1)
    shapes = layer_shapes(params)
    directions = rng.standard_normal((k, params), dtype=np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    labels = np.arange(updates) % k
    sketch = UpdateSketch(d, seed=args.seed)
    sketches = np.empty((updates, d), dtype=np.float64)
    chunk = np.empty((args.chunk, params), dtype=np.float32)
    before = _status_kib("VmRSS")
    reset_peak()
    generate_s = sketch_s = 0.0
    for start in range(0, updates, args.chunk):
        stop = min(start + args.chunk, updates)
        t0 = time.perf_counter()
        for row, i in zip(chunk, range(start, stop)):
            # an update: its cluster's direction plus noise of the same norm (cosine 0.5 within, ~0 across)
            rng.standard_normal(params, dtype=np.float32, out=row)
            row *= 1.0 / np.sqrt(params)
            row += directions[labels[i]]
        t1 = time.perf_counter()
        for row, i in zip(chunk, range(start, stop)):
            layers, offset = [], 0
            for shape in shapes:
                size = int(np.prod(shape))
                layers.append(row[offset:offset + size].reshape(shape))
                offset += size
            sketches[i] = sketch(layers)
        sketch_s += time.perf_counter() - t1
        generate_s += t1 - t0
    t0 = time.perf_counter()
    by_k = cluster_updates(sketches, k, None, seed=args.seed)
    kmeans_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    by_threshold = cluster_updates(sketches, None, 0.25, seed=args.seed)
    threshold_s = time.perf_counter() - t0
    peak = (_status_kib("VmHWM") - before) / 1024

    from sklearn.metrics import adjusted_rand_score

    full_gib = updates * params * 4 / 2**30
    print()
    print(f"clustering {updates:,} updates x {params:,} parameters, {k} planted clusters, "
          f"generated {args.chunk} at a time, count sketch to {d} dimensions")
    print(f"  generating the updates (not clustering)   {generate_s:8.2f} s")
    print(f"  sketching                                 {sketch_s:8.2f} s  "
          f"({sketch_s / updates * 1e3:.2f} ms per update)")
    print(f"  k-means k={k}, n_init=10 on the sketches    {kmeans_s:8.2f} s  "
          f"ARI vs planted {adjusted_rand_score(labels, by_k):.3f}")
    print(f"  average linkage, cut at cosine 0.25       {threshold_s:8.2f} s  "
          f"ARI vs planted {adjusted_rand_score(labels, by_threshold):.3f}  ({len(set(by_threshold))} clusters)")
    print(f"  sketch + k-means                          {sketch_s + kmeans_s:8.2f} s")
    print(f"  peak memory above the start               {peak:8.0f} MiB  (chunk {args.chunk * params * 4 / 2**20:.0f}"
          f" MiB, signs {params * 4 / 2**20:.0f} MiB, sketches {sketches.nbytes / 2**20:.1f} MiB)")
    print(f"  the full vectors would be {full_gib:.1f} GiB as float32, twice that with the unit-normalised copy")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sketch-dim", type=int, default=256)
    parser.add_argument("--cluster-updates", type=int, default=1000)
    parser.add_argument("--chunk", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-exact", dest="exact", action="store_false",
                        help="skip k-means on the full vectors (~20 s at 100 x 1 M)")
    args = parser.parse_args(argv)
    print("load average at the start (1, 5, 15 min): %.2f %.2f %.2f on %d CPUs" % (*os.getloadavg(), os.cpu_count()))
    logging.getLogger("flwr").setLevel(logging.ERROR)  # per-call INFO lines, fraction_evaluate=0 warnings
    import threadpoolctl

    print(f"numpy {np.__version__}; BLAS threads: "
          f"{[(i['internal_api'], i['num_threads']) for i in threadpoolctl.threadpool_info()]}")
    aggregation_table(args)
    clustering_benchmark(args)
    print("load average at the end: %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
