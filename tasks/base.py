"""The task interface: what a federated task provides to the one experiment
skeleton (:mod:`fl_server.experiments.experiment`) and the one ClientApp
(:mod:`fl_clients.app`).

A task is one folder under ``tasks/`` plus one ``conf/task/*.yaml`` whose
``kind`` names it. The engine does everything else the same way for every
task: device profiles and the virtual clock (from the FLOPs and bytes a task
reports), deadlines and stale updates, availability, fault injection and
screening, min replies and retries, compression, DP-SGD (where the task
trains with a per-sample loss), SecAgg+, checkpoint/resume and MLflow.

Server side, a :class:`Task` builds one :class:`ServerTask` per run; client
side, :meth:`Task.train` and :meth:`Task.evaluate` run inside the ClientApp's
generic pipeline, which has already decoded the (possibly compressed) model,
and which encodes, corrupts (fault injection) and costs the reply.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from omegaconf import DictConfig

from fl_common.dp_config import DPSettings

ModelCosts = tuple[float, int, int]  # forward FLOPs per sample, parameters, activation floats per sample


@dataclass
class ClientRound:
    """What the ClientApp hands a task for one message.

    Attributes
    ----------
    config : ConfigRecord
        The message's config (the task's own entries plus the engine's).
    partition_id : int
        This client's partition (its data shard, edge site or cluster).
    num_clients : int
        The federation's size.
    server_round : int
        The round the message belongs to.
    seed : int
        A reproducible seed for this (run seed, round, client).
    state : RecordDict
        The client's ``context.state`` (survives Flower re-creating clients).
    dp : DPSettings or None
        This client's DP-SGD settings; None when DP-SGD is off.
    train_private : callable or None
        ``(model, x, y, loss_fn, *, epochs, batch_size, lr, momentum, seed) ->
        PrivateRound``: Opacus DP-SGD with the accountant in ``state``
        (given exactly when ``dp`` is).
    """

    config: ConfigRecord
    partition_id: int
    num_clients: int
    server_round: int
    seed: int
    state: RecordDict
    dp: DPSettings | None = None
    train_private: Callable[..., Any] | None = None


@dataclass
class LocalUpdate:
    """A task's training result on one client.

    Attributes
    ----------
    arrays : ArrayRecord
        The trained model (the engine encodes it for the uplink).
    num_examples : int
        The aggregation weight (samples, windows, environment steps).
    train_flops : float
        FLOPs the round's training took (the virtual clock's compute time).
    metrics : dict
        Training metrics (``train_loss``, ``train_return``, ...).
    declined : object, optional
        The DP-SGD outcome when the budget forbade this round (no update).
    uploads : dict of str to ArrayRecord
        Data the client sends beside its model, only where the config allows
        it (e.g. raw hard cases the cloud may store): counted in the uplink
        bytes and the virtual uplink time, handed to
        :meth:`ServerTask.receive_uploads`, never aggregated.
    """

    arrays: ArrayRecord
    num_examples: int
    train_flops: float
    metrics: dict[str, float] = field(default_factory=dict)
    declined: Any = None
    uploads: dict[str, ArrayRecord] = field(default_factory=dict)


class ServerTask(ABC):
    """One run's server side of a task.

    Attributes
    ----------
    num_clients : int
    client_sizes : list of int
        Each client's aggregation weight (SecAgg+ quantises by the largest).
    model_name : str
        What the memory check calls the model.
    headline : tuple of str
        Metrics copied to ``final_*`` at the end of the run.
    shown : tuple of str
        Metrics the progress display shows per round.
    needs_client_models : bool
        The server keeps each client's last trained model (``client_models``),
        e.g. to evaluate what each RL site deploys with a personal head.
    receives_uploads : bool
        The clients may send data beside their models (``LocalUpdate.uploads``):
        the engine strips it from the replies before aggregation and hands it
        to :meth:`receive_uploads`.
    """

    num_clients: int
    client_sizes: list[int]
    model_name: str = "model"
    headline: tuple[str, ...] = ()
    shown: tuple[str, ...] = ()
    needs_client_models: bool = False
    receives_uploads: bool = False
    client_models: dict[int, dict[str, Any]]

    @abstractmethod
    def initial_arrays(self) -> ArrayRecord:
        """The global model before round 1."""

    @abstractmethod
    def train_config(self) -> dict[str, Any]:
        """The task's own ConfigRecord entries (its spec); the engine adds its keys."""

    @abstractmethod
    def model_costs(self) -> ModelCosts:
        """Forward FLOPs per sample, parameters and activations (the memory check)."""

    @abstractmethod
    def batch_size(self) -> int:
        """Training batch size (the memory check)."""

    @abstractmethod
    def evaluate(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        """Server-side evaluation of the global model (round 0 = before training)."""

    def public_scorer(self) -> Callable[[ArrayRecord], Any] | None:
        """Per-class accuracy of a client model on public data (ASS), if the task has it."""
        return None

    def validation_score(self, arrays: ArrayRecord) -> float:
        """Score of a candidate global model on the task's validation replay,
        higher is better (the rollout guard, :mod:`strategies.rollout`): data
        the clients never train on and the logged evaluation never uses.
        Tasks without one leave it as it is (``rollout=...`` is then refused)."""
        raise NotImplementedError(f"{type(self).__name__} has no validation replay")

    def log_inputs(self, tracker: Any) -> None:
        """Artifacts and step-0 metrics describing the data (new runs only)."""

    def receive_uploads(self, partition: int, server_round: int, uploads: dict[str, ArrayRecord]) -> None:
        """What client ``partition`` sent beside its model in ``server_round``
        (only where ``receives_uploads``; before the round's aggregation)."""

    def after_round(self, server_round: int, arrays: ArrayRecord, tracker: Any) -> None:
        """Per-round artifacts beyond metrics (e.g. the RL policy)."""

    def report(self, tracker: Any, history: list[dict[str, Any]], final: ArrayRecord, run_name: str) -> dict[str, float]:
        """Plots and tables at the end; returns extra ``final_*`` metrics."""
        return {}


class Task(ABC):
    """A registered federated task (see the module docstring).

    Attributes
    ----------
    kind : str
        The ``task.kind`` of the ``conf/task/*.yaml`` files that select it.
    dp_sgd_refusal : str or None
        Why DP-SGD cannot apply to this task (None: it can).
    uses_twin : bool
        Whether the task acts in the twin (``conf/twin/``, ``twin.*`` overrides).
    """

    kind: ClassVar[str]
    dp_sgd_refusal: ClassVar[str | None] = None
    uses_twin: ClassVar[bool] = False  # the composed ``twin`` config matters (logged as params)

    # ------------------------------------------------------------ config
    @abstractmethod
    def validate(self, cfg: DictConfig) -> None:
        """Task-specific checks; raise ``ValueError`` with the one-line message."""

    @abstractmethod
    def tags(self, cfg: DictConfig) -> dict[str, str]:
        """MLflow tags that group and compare runs of this task."""

    @abstractmethod
    def run_name(self, cfg: DictConfig) -> str:
        """A short, human-readable run name."""

    def prepare(self, cfg: DictConfig, tracking_uri: str) -> None:
        """Before any process starts (the launcher): build caches, fail early on bad data."""

    def summary_columns(self) -> dict[str, str]:
        """Launcher summary table: column title -> final metric key."""
        return {}

    # ------------------------------------------------------------ server
    @abstractmethod
    def server(self, cfg: DictConfig, tracking_uri: str) -> ServerTask:
        """This run's server side."""

    # ------------------------------------------------------------ client
    @abstractmethod
    def train(self, arrays: ArrayRecord, run: ClientRound) -> LocalUpdate:
        """Local training from the received global model."""

    @abstractmethod
    def evaluate(self, arrays: ArrayRecord, run: ClientRound) -> dict[str, float]:
        """Federated evaluation on the client's data; include ``num-examples``."""
