"""The cloud's high-capacity model: a wider CNN trained centrally on the cloud's own data.

Our choice, over fine-tuning the federated model: the cloud verifies the
edge's hard cases, so its errors should not be the edge model's. A copy of
the federated model inherits the long-tailed, non-IID clients' bias however
it is fine-tuned, and would change every round; an independent model trained
once on the cloud's class-balanced set (``task.cloud_per_class`` per class,
held out of the pool before the long tail, disjoint from the clients', the
test and the public validation sets) is what paper 003 calls the cloud's
"high-accuracy model". ``cnn-wide`` has 3.3x the edge CNN's parameters and
3.5x its FLOPs; it trains in seconds on a CPU.

Trained once per run, or once per job when the launcher's cache folder is
set (``FEDCONTINUUM_CACHE_DIR``): later runs with the same data and settings
load it (a study's arms share it).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from fl_datasets.federated import CACHE_ENV, DataSpec, FederatedImageData
from fl_datasets.sources import LabelledImages
from tasks.image.models import MODELS, build_model
from tasks.image.training import train_local
from tasks.offload.policy import check, number


@dataclass(frozen=True)
class CloudSettings:
    """``task.cloud``: the cloud model, its central training and its device."""

    model: str
    epochs: int
    lr: float
    momentum: float
    batch_size: int
    device: str
    finetune_epochs: int = 2

    def validate(self, where: str = "task.cloud") -> None:
        check(self.model in MODELS, f"{where}.model={self.model} is unknown: choose one of {', '.join(MODELS)}")
        check(isinstance(self.epochs, int) and self.epochs >= 1, f"{where}.epochs={self.epochs} is invalid: use an integer >= 1")
        check(number(self.lr) and self.lr > 0, f"{where}.lr={self.lr} is invalid: the learning rate must be > 0")
        check(number(self.momentum) and 0 <= self.momentum < 1,
              f"{where}.momentum={self.momentum} is invalid: use a value in [0, 1)")
        check(isinstance(self.batch_size, int) and self.batch_size >= 1,
              f"{where}.batch_size={self.batch_size} is invalid: use an integer >= 1")
        check(isinstance(self.finetune_epochs, int) and self.finetune_epochs >= 1,
              f"{where}.finetune_epochs={self.finetune_epochs} is invalid: use an integer >= 1 (epochs per round "
              "on the cloud's set plus the stored hard cases)")


def cloud_model(spec: DataSpec, data: FederatedImageData, settings: CloudSettings, seed: int):
    """The trained cloud model (from the cache folder when it holds it)."""
    import torch

    if data.cloud is None:
        raise ValueError(f"the cloud holds no data: set task.cloud_per_class > 0 (the {spec.task} pool gives "
                         "the cloud that many samples of every class)")
    model = build_model(settings.model, spec.num_classes, seed=seed)
    cache_dir = os.environ.get(CACHE_ENV)
    text = json.dumps({"spec": spec.to_json(), "cloud": asdict(settings), "seed": seed}, sort_keys=True)
    path = Path(cache_dir) / f"cloud-{hashlib.sha256(text.encode()).hexdigest()[:20]}.pt" if cache_dir else None
    if path is not None and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # beside the clients' processes, more threads only contend (10x slower here)
    try:
        train_local(model, data.cloud, epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                    momentum=settings.momentum, seed=seed)
    finally:
        torch.set_num_threads(threads)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".pt", delete=False) as tmp:
            torch.save(model.state_dict(), tmp)
        os.replace(tmp.name, path)  # atomic: readers never see a partial file
    return model


def finetuned(base, own: LabelledImages, stored: LabelledImages, settings: CloudSettings, seed: int):
    """A copy of the cloud model ``base`` fine-tuned on its own set plus the
    hard cases the clients uploaded (``task.hard_cases.cloud_store``).

    Always from ``base`` (trained on the cloud's set only), never from the
    previous round's fine-tuned copy, so a round's model depends on the
    hard cases stored now, not on the history of earlier ones.
    """
    import copy

    import numpy as np
    import torch

    model = copy.deepcopy(base)
    data = LabelledImages(np.concatenate([own.x, stored.x]), np.concatenate([own.y, stored.y]),
                          np.concatenate([own.origin, stored.origin]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_local(model, data, epochs=settings.finetune_epochs, batch_size=settings.batch_size, lr=settings.lr,
                    momentum=settings.momentum, seed=seed)
    finally:
        torch.set_num_threads(threads)
    return model
