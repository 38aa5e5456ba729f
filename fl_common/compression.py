"""Update compression: top-k sparsification with error feedback and linear
quantisation (paper 001 §5.3: k = 10 %, 8 bits), encoded as a Flower
ArrayRecord, plus byte accounting from the serialised payload.

Wire format (one ArrayRecord; for every tensor ``name`` of the model):

* ``name|i``: indices of the kept entries in the flattened tensor (uint16 when
  the tensor has at most 65,536 entries, else uint32); absent when k keeps
  every entry;
* ``name|q``: the kept values as unsigned codes (uint8, ``bits`` <= 8), or
  ``name|v`` as float32 when quantisation is off;
* ``name|r``: float32 ``[low, step]`` of the linear quantiser
  (value = low + code * step);
* ``name|x``: a non-float tensor (e.g. a counter) sent unchanged.

Shapes are not sent: the decoder knows them from the reference model it
holds (the model the update is relative to).

Every encoded record is the *delta* to a reference both sides hold: on the
uplink the trained model minus the model the client started from, on the
optional downlink the new global model minus the model the client holds.
What top-k and the quantiser drop is kept as a residual (error feedback) in
the client's ``context.state`` and added to the next update, so nothing is
lost, only delayed (Seide et al. 2014; Stich et al. 2018).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fl_common import protocol

SEP = "|"
RESIDUAL_KEY = "fc.compression.residual"   # ArrayRecord in context.state
VIEW_KEY = "fc.compression.view"           # ArrayRecord: the model the client holds (downlink)
VIEW_META_KEY = "fc.compression.view-meta"  # ConfigRecord: its version
# per-message config keys set by the server's AccountingGrid for the downlink
DOWNLINK_BASE = "compress-dl-base"          # version the delta is relative to; -1 = full model

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class CompressionSettings:
    """What the uplink (and optionally the downlink) compression does.

    Parameters
    ----------
    k : float
        Fraction of each tensor's entries kept by top-k, in (0, 1].
    bits : int or None
        Bits of the linear quantiser per kept value (1..8); None keeps float32.
    error_feedback : bool
        Carry what was not sent into the next update.
    downlink : bool
        Compress the server-to-client model as well.
    """

    k: float = 0.1
    bits: int | None = 8
    error_feedback: bool = True
    downlink: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.k <= 1:
            raise ValueError(f"k={self.k} must lie in (0, 1]")
        if self.bits is not None and not 1 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits} must be in 1..8 (uint8 codes) or None")

    def to_config(self) -> dict[str, int | float | bool]:
        """The ConfigRecord entries that tell clients how to compress."""
        return {
            "compress-k": float(self.k),
            "compress-bits": int(self.bits or 0),
            "compress-ef": bool(self.error_feedback),
            "compress-downlink": bool(self.downlink),
        }

    @classmethod
    def from_config(cls, config: Mapping) -> CompressionSettings | None:
        """The settings a client received, or None when compression is off."""
        if "compress-k" not in config:
            return None
        return cls(
            k=float(config["compress-k"]),
            bits=int(config["compress-bits"]) or None,
            error_feedback=bool(config["compress-ef"]),
            downlink=bool(config["compress-downlink"]),
        )


# ---------------------------------------------------------------- one tensor
def kept_count(size: int, k: float) -> int:
    """Entries top-k keeps of a tensor with ``size`` entries (at least one)."""
    return min(size, max(1, math.ceil(k * size))) if size else 0


def top_k_indices(flat: np.ndarray, k: float) -> np.ndarray:
    """Sorted indices of the ``ceil(k * n)`` largest-magnitude entries."""
    keep = kept_count(flat.size, k)
    if keep == flat.size:
        return np.arange(flat.size)
    # argpartition is O(n); sorting the kept indices makes the encoding canonical
    return np.sort(np.argpartition(np.abs(flat), flat.size - keep)[flat.size - keep:])


def quantise(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear quantisation onto ``2**bits`` levels spanning [min, max].

    Returns the uint8 codes and float32 ``[low, step]``; every value is
    reproduced within ``step / 2`` (plus float32 rounding).
    """
    if values.size == 0:
        return np.zeros(0, np.uint8), np.zeros(2, np.float32)
    low = np.float32(values.min())
    span = float(values.max()) - float(low)
    step = np.float32(span / (2**bits - 1)) if span > 0 else np.float32(1.0)
    # quantise with the float32 low/step the decoder will use, so both agree
    codes = np.rint((values.astype(np.float64) - float(low)) / float(step))
    codes = np.clip(codes, 0, 2**bits - 1).astype(np.uint8)
    return codes, np.array([low, step], dtype=np.float32)


def dequantise(codes: np.ndarray, low_step: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantise` (float32)."""
    low, step = low_step.astype(np.float32)
    return (low + codes.astype(np.float32) * step).astype(np.float32)


def encode_tensor(x: np.ndarray, k: float, bits: int | None) -> dict[str, np.ndarray]:
    """The parts (suffix -> array) that encode one float tensor."""
    flat = np.ascontiguousarray(x, dtype=np.float32).ravel()
    parts: dict[str, np.ndarray] = {}
    idx = top_k_indices(flat, k)
    if idx.size < flat.size:
        parts["i"] = idx.astype(np.uint16 if flat.size <= 2**16 else np.uint32)
    values = flat[idx]
    if bits is None:
        parts["v"] = values
    else:
        parts["q"], parts["r"] = quantise(values, bits)
    return parts


def decode_tensor(parts: Mapping[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Rebuild a dense float32 tensor of ``shape`` from its parts."""
    values = parts["v"].astype(np.float32) if "v" in parts else dequantise(parts["q"], parts["r"])
    size = int(np.prod(shape))
    if "i" not in parts:
        return values.reshape(shape)
    dense = np.zeros(size, dtype=np.float32)
    dense[parts["i"].astype(np.int64)] = values
    return dense.reshape(shape)


# ------------------------------------------------------------ whole models
def encode(delta: Mapping[str, np.ndarray], settings: CompressionSettings) -> ArrayRecord:
    """Encode a model delta (name -> tensor) as one ArrayRecord."""
    record = ArrayRecord()
    for name, x in delta.items():
        if not np.issubdtype(x.dtype, np.floating):
            record[f"{name}{SEP}x"] = _array(np.asarray(x))
            continue
        for suffix, part in encode_tensor(x, settings.k, settings.bits).items():
            record[f"{name}{SEP}{suffix}"] = _array(part)
    return record


def decode(record: ArrayRecord, reference: Mapping[str, np.ndarray]) -> Tensors:
    """Decode an encoded delta; ``reference`` (name -> tensor) gives the
    names, order, shapes and dtypes."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key in record.keys():
        name, _, suffix = key.rpartition(SEP)
        parts.setdefault(name, {})[suffix] = record[key].numpy()
    out: Tensors = {}
    for name, ref in reference.items():
        got = parts.get(name)
        if got is None:
            raise ValueError(f"compressed update lacks tensor '{name}'")
        if "x" in got:
            out[name] = got["x"]
        else:
            out[name] = decode_tensor(got, ref.shape).astype(ref.dtype, copy=False)
    return out


def round_trip(delta: Mapping[str, np.ndarray], settings: CompressionSettings) -> tuple[ArrayRecord, Tensors]:
    """Encode ``delta`` and also return what the receiver will decode."""
    record = encode(delta, settings)
    return record, decode(record, delta)


def tensors(record: ArrayRecord) -> Tensors:
    """An ArrayRecord as name -> numpy array."""
    return {k: record[k].numpy() for k in record.keys()}


def to_record(values: Mapping[str, np.ndarray]) -> ArrayRecord:
    """name -> numpy array as an ArrayRecord (order kept)."""
    return ArrayRecord({k: _array(np.asarray(v)) for k, v in values.items()})


def _array(x: np.ndarray):
    from flwr.app import Array

    return Array(np.ascontiguousarray(x))


def add(base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Tensors:
    """base + delta per tensor, in base's dtype (non-float tensors: delta's value)."""
    out: Tensors = {}
    for name, b in base.items():
        d = delta[name]
        out[name] = (b + d).astype(b.dtype, copy=False) if np.issubdtype(b.dtype, np.floating) else d
    return out


def subtract(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> Tensors:
    """a - b per float tensor; non-float tensors are sent as a's value."""
    return {
        name: (x.astype(np.float32) - b[name].astype(np.float32)) if np.issubdtype(x.dtype, np.floating) else x
        for name, x in a.items()
    }


# ---------------------------------------------------------------- accounting
def serialised_size(record: RecordDict | ArrayRecord | ConfigRecord) -> int:
    """Bytes Flower transmits for ``record``: the sum of the serialised
    (deflated) objects of its object tree, each unique object once, which is
    what a SuperNode pushes to / pulls from the SuperLink."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())


# ---------------------------------------------------------------- client side
def client_receive(arrays: ArrayRecord, config: Mapping, state: RecordDict) -> ArrayRecord:
    """The model a client starts from.

    Without downlink compression that is ``arrays`` itself. With it, ``arrays``
    is a delta to the model the client holds (``VIEW_KEY`` in its state, of the
    version named by ``DOWNLINK_BASE``), or the full model when the base is -1.
    """
    settings = CompressionSettings.from_config(config)
    if settings is None or not settings.downlink or DOWNLINK_BASE not in config:
        return arrays
    base = int(config[DOWNLINK_BASE])
    if base < 0:
        return arrays
    held = int(state[VIEW_META_KEY]["version"]) if VIEW_META_KEY in state else None
    if held != base:
        # our state was lost (e.g. a restarted node): fail so the server resends in full
        raise RuntimeError(f"downlink delta is relative to model version {base}, this client holds {held}")
    view = tensors(state[VIEW_KEY])
    return to_record(add(view, decode(arrays, view)))


def client_remember_model(start: ArrayRecord, config: Mapping, state: RecordDict) -> None:
    """Keep the model the client started from as its downlink reference."""
    settings = CompressionSettings.from_config(config)
    if settings is None or not settings.downlink or DOWNLINK_BASE not in config:
        return
    state[VIEW_KEY] = to_record(tensors(start))
    state[VIEW_META_KEY] = ConfigRecord({"version": int(config[protocol.SERVER_ROUND])})


def client_send(trained: ArrayRecord, start: ArrayRecord, config: Mapping, state: RecordDict) -> ArrayRecord:
    """What a client uploads: ``trained`` itself without compression, else the
    encoded delta ``trained - start`` plus the carried residual, whose new
    residual (what was not sent) is stored in ``state``."""
    settings = CompressionSettings.from_config(config)
    if settings is None:
        return trained
    delta = subtract(tensors(trained), tensors(start))
    if settings.error_feedback and RESIDUAL_KEY in state:
        residual = tensors(state[RESIDUAL_KEY])
        delta = {n: d + residual[n] if n in residual else d for n, d in delta.items()}
    record, sent = round_trip(delta, settings)
    if settings.error_feedback:
        state[RESIDUAL_KEY] = to_record(
            {n: d - sent[n] for n, d in delta.items() if np.issubdtype(d.dtype, np.floating)}
        )
    return record
