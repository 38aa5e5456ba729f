"""Weighted sums of reply models at memory speed.

Flower's ``Array.numpy()`` deserialises with ``np.load`` from a ``BytesIO``,
which copies every tensor, and Flower's ``aggregate_arrayrecords`` then makes a
scaled temporary per tensor per reply. For 100 replies of 1 M float32
parameters that is several times the cost of one weighted sum over a stacked
array. The helpers here read tensors as zero-copy, read-only views of the
messages' ``.npy`` bytes and accumulate with BLAS ``axpy`` in cache-sized
blocks, so every reply is read once and nothing of reply size is allocated.

Precision: float32 tensors are accumulated in float32 (as Flower's FedAvg and
``np.tensordot`` on a float32 stack do); float64 in float64; float16 and
integer tensors in float32 / float64 and cast to the requested dtype. A model
with weight 0 does not enter the sum at all (BLAS would skip it anyway), so a
NaN in it cannot turn the average into NaN.

Threads: these loops make hundreds of short BLAS calls. Multi-threaded
OpenBLAS synchronises its threads on every call, and on a machine whose cores
are shared (other users, or the simulation's client processes) a call can
then wait milliseconds for a descheduled thread: a 30 ms sum took up to 0.8 s
in measurement. So the loops run BLAS single-threaded (``BLAS_THREADS``; set
it to None to leave OpenBLAS's own setting), which is memory-bound already.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedAvgM
from scipy.linalg import blas  # a dependency of scikit-learn

BLOCK = 1 << 18  # elements per accumulation block: 1 MiB of float32 stays in L2
_SMALL = 1 << 14  # layers at most this big are stacked and summed with one gemv
BLAS_THREADS: int | None = 1  # BLAS threads inside the loops below; None: OpenBLAS's own setting
_controller = None


@contextmanager
def blas_threads() -> Iterator[None]:
    """Run the enclosed BLAS calls with ``BLAS_THREADS`` threads (numpy's and scipy's BLAS)."""
    global _controller
    if BLAS_THREADS is None:
        yield
        return
    if _controller is None:
        from threadpoolctl import ThreadpoolController  # a dependency of scikit-learn

        _controller = ThreadpoolController()
    with _controller.limit(limits=BLAS_THREADS, user_api="blas"):
        yield


_HEADERS: dict[bytes, tuple[tuple[int, ...], bool, np.dtype] | None] = {}  # .npy header -> parsed


def _parse_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int] | None:
    """(shape, fortran_order, dtype, data offset) of a version 1/2 ``.npy``
    payload, or None. Parsed headers are cached: a round's replies repeat the
    same few, and ``np.lib.format`` parses each with ``ast.literal_eval``."""
    if data[:6] != b"\x93NUMPY" or data[6:8] not in (b"\x01\x00", b"\x02\x00"):
        return None
    start = 10 if data[6] == 1 else 12  # version 1: 2-byte header length; 2: 4-byte
    offset = start + int.from_bytes(data[8:start], "little")
    key = bytes(data[:offset])
    parsed = _HEADERS.get(key, False)
    if parsed is False:
        stream = io.BytesIO(key)
        try:
            version = np.lib.format.read_magic(stream)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            parsed = read(stream)
        except ValueError:
            parsed = None
        if len(_HEADERS) >= 4096:
            _HEADERS.clear()
        _HEADERS[key] = parsed
    return None if parsed is None else (*parsed, offset)


def ndarray_view(array: Array) -> np.ndarray:
    """``array.numpy()`` without the copy: a read-only view of its ``.npy`` bytes.

    Falls back to ``array.numpy()`` (and its errors) for anything but a plain
    version 1/2 ``.npy`` payload of a non-object dtype.
    """
    data = array.data
    if array.stype != "numpy.ndarray" or not isinstance(data, bytes):
        return array.numpy()
    header = _parse_header(data)
    if header is None:
        return array.numpy()
    shape, fortran, dtype, offset = header
    count = int(np.prod(shape, dtype=np.int64))
    if dtype.hasobject or len(data) - offset < count * dtype.itemsize:
        return array.numpy()
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C")


def record_views(record: ArrayRecord) -> list[np.ndarray]:
    """Every tensor of ``record`` as a zero-copy view, in key order."""
    return [ndarray_view(array) for array in record.values()]


def first_record(content: RecordDict, kind: type) -> ArrayRecord | MetricRecord:
    """The first record of type ``kind`` in ``content`` (what
    ``next(iter(content.array_records.values()))`` gives, without building a
    new typed dict per access)."""
    return next(value for value in content.values() if isinstance(value, kind))


def _flat(array: np.ndarray) -> np.ndarray:
    return array.reshape(-1) if array.flags.c_contiguous else np.ascontiguousarray(array).reshape(-1)


def all_finite(layers: Iterable[np.ndarray]) -> bool:
    """False if any floating-point value is NaN or infinite.

    One BLAS dot product per float32/float64 tensor: a finite sum of squares
    means every value is finite (NaN and Inf propagate); an infinite one (a
    non-finite value, or an overflow of finite ones) is settled exactly with
    ``np.isfinite``.
    """
    with blas_threads():
        for array in layers:
            if array.dtype.kind not in "fc" or array.size == 0:
                continue
            if array.dtype in (np.float32, np.float64):
                flat = _flat(array)
                with np.errstate(over="ignore", invalid="ignore"):
                    squares = np.dot(flat, flat)
                if np.isfinite(squares):
                    continue
            if not np.isfinite(array).all():
                return False
    return True


def _accumulator(dtype: np.dtype) -> np.dtype:
    if dtype == np.float32 or dtype == np.float16:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def add_scaled(out: np.ndarray, x: np.ndarray, factor: float) -> None:
    """``out += factor * x`` in place (``out`` C-contiguous float32/float64), with BLAS axpy."""
    if factor == 0:
        return
    target, source = out.reshape(-1), _flat(x)
    if target.size != source.size:
        raise ValueError(f"cannot add a tensor of shape {x.shape} to one of shape {out.shape}")
    axpy = blas.saxpy if out.dtype == np.float32 else blas.daxpy
    with blas_threads():
        for start in range(0, target.size, BLOCK):
            block = target[start:start + BLOCK]
            piece = source[start:start + BLOCK]
            if piece.dtype != out.dtype:
                piece = piece.astype(out.dtype)
            result = axpy(piece, block, a=factor)
            if result is not block and not np.shares_memory(result, block):  # pragma: no cover - scipy copies
                block[...] = result


def weighted_sum(
    models: Sequence[Sequence[np.ndarray]],
    weights: Sequence[float],
    dtypes: Sequence[np.dtype] | None = None,
) -> list[np.ndarray]:
    """``sum_i weights[i] * models[i]``, tensor by tensor.

    Parameters
    ----------
    models : sequence of sequences of np.ndarray
        Every model's tensors, in the same order and shapes (views are fine:
        nothing is written to them).
    weights : sequence of float
        One weight per model; models with weight 0 are left out.
    dtypes : sequence of np.dtype, optional
        The dtype of each result tensor; by default the accumulator's
        (float32 for float16/float32 tensors, float64 otherwise).

    Returns
    -------
    list of np.ndarray
        Newly allocated, writable tensors shaped like ``models[0]``.
    """
    if len(models) != len(weights):
        raise ValueError(f"{len(models)} models but {len(weights)} weights")
    if not models:
        raise ValueError("weighted_sum needs at least one model")
    with blas_threads():
        return _weighted_sum(models, [float(w) for w in weights], dtypes)


def _weighted_sum(models, weights, dtypes):
    pairs = [(model, w) for model, w in zip(models, weights) if w != 0.0]
    first = models[0]
    result = []
    for i, layer in enumerate(first):
        acc_dtype = _accumulator(layer.dtype)
        for model, _ in pairs:
            if len(model) != len(first) or model[i].shape != layer.shape:
                raise ValueError(
                    f"models differ in tensor {i}: shape {model[i].shape if i < len(model) else None} "
                    f"vs {layer.shape}"
                )
        if layer.dtype.kind not in "fiub":  # complex and the like: plain numpy
            acc = sum((w * model[i] for model, w in pairs), np.zeros(layer.shape, np.result_type(layer.dtype, 1.0)))
        elif pairs and layer.size <= _SMALL:
            stacked = np.stack([_flat(model[i]) for model, _ in pairs]).astype(acc_dtype, copy=False)
            acc = np.dot(np.array([w for _, w in pairs], dtype=acc_dtype), stacked)
        else:
            acc = np.zeros(layer.size, dtype=acc_dtype)
            sources = [(_flat(model[i]), w) for model, w in pairs]
            axpy = blas.saxpy if acc_dtype == np.float32 else blas.daxpy
            for start in range(0, layer.size, BLOCK):  # each block of acc stays in cache
                block = acc[start:start + BLOCK]
                for source, w in sources:
                    piece = source[start:start + BLOCK]
                    if piece.dtype != acc_dtype:
                        piece = piece.astype(acc_dtype)
                    out = axpy(piece, block, a=w)
                    if out is not block and not np.shares_memory(out, block):  # pragma: no cover
                        block[...] = out
        acc = acc.reshape(layer.shape)
        if dtypes is not None and acc.dtype != dtypes[i]:
            acc = acc.astype(dtypes[i])
        result.append(acc)
    return result


def aggregate_arrayrecords(records: list[RecordDict], weighting_metric_name: str) -> ArrayRecord:
    """Flower's ``aggregate_arrayrecords`` (same weights, keys and result
    dtypes: ``value * float``), computed with :func:`weighted_sum`."""
    # (r.metric_records / r.array_records build a new typed dict per access)
    weights = [float(first_record(r, MetricRecord)[weighting_metric_name]) for r in records]
    total = sum(weights)
    factors = [w / total for w in weights]
    record_items = [[v for v in r.values() if isinstance(v, ArrayRecord)] for r in records]
    keys: list[str] = []
    for item in record_items[0]:
        keys.extend(item.keys())
    models = [[ndarray_view(item[k]) for item in items for k in item.keys()] for items in record_items]
    dtypes = [np.result_type(layer.dtype, 1.0) for layer in models[0]]  # Flower's ``value.numpy() * weight``
    summed = weighted_sum(models, factors, dtypes)
    return ArrayRecord({k: Array(v) for k, v in zip(keys, summed)})


class FastFedAvg(FedAvg):
    """Flower's FedAvg with :func:`aggregate_arrayrecords` (zero-copy reads,
    blocked BLAS accumulation); everything else is Flower's."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate ArrayRecords and MetricRecords in the received Messages."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [message.content for message in valid]
        return (aggregate_arrayrecords(contents, self.weighted_by_key),
                self.train_metrics_aggr_fn(contents, self.weighted_by_key))


class FastFedAvgM(FedAvgM, FastFedAvg):
    """Flower's FedAvgM on top of :class:`FastFedAvg`'s average: FedAvgM's
    ``super().aggregate_train`` resolves to ``FastFedAvg.aggregate_train``."""
