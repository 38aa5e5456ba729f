"""Sample-level differential privacy for client training (DP-SGD with Opacus)
and the client-side switch for Flower's central-DP clipping mods.

Each client accounts its own privacy loss with Opacus's RDP accountant.
Simulated clients are re-created every round (Flower issue #2216), so the
accountant's history — the list of (noise multiplier, sample rate, steps) —
is kept in the client's ``context.state`` and restored each round. Before a
round, the client asks the same accountant what epsilon it would have spent
after the steps this round would take; if that exceeds its budget it declines
to train and says so in its reply (``dp_declined = 1``).

Only Opacus computes privacy here: ``RDPAccountant`` for epsilon,
``get_noise_multiplier`` for the target-epsilon mode; nothing is re-derived.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from torch import nn

from fl_common import protocol
from fl_common.dp_config import CENTRAL_MODE_KEY, DPSettings

# Opacus (~1.7 s of imports: scipy.stats, torch.distributed) is imported inside
# the functions that use it, so a ClientApp process without DP-SGD never loads it.
if TYPE_CHECKING:
    from opacus.accountants import RDPAccountant

ACCOUNTANT_KEY = "fc.dp.accountant"   # ConfigRecord in context.state
SIGMA_KEY = "fc.dp.sigma"             # ConfigRecord: target-mode sigma and what it was planned for
EPSILON_TOLERANCE = 0.01              # of get_noise_multiplier's binary search


# ------------------------------------------------------------ accountant state
def load_accountant(state: RecordDict) -> RDPAccountant:
    """The client's accountant, with the history it saved in earlier rounds."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    if ACCOUNTANT_KEY in state:
        record = state[ACCOUNTANT_KEY]
        accountant.history = [
            (float(s), float(q), int(n))
            for s, q, n in zip(record["noise"], record["rate"], record["steps"], strict=True)
        ]
    return accountant


def save_accountant(state: RecordDict, accountant: RDPAccountant) -> None:
    """Store the accountant's history in ``context.state`` (survives rounds)."""
    noise, rate, steps = zip(*accountant.history) if accountant.history else ((), (), ())
    state[ACCOUNTANT_KEY] = ConfigRecord(
        {"noise": [float(s) for s in noise], "rate": [float(q) for q in rate], "steps": [int(n) for n in steps]}
    )


def epsilon_spent(accountant: RDPAccountant, delta: float) -> float:
    """Epsilon spent so far (0 before any step)."""
    if not accountant.history:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "optimal order is the largest alpha"
        return float(accountant.get_epsilon(delta))


# --------------------------------------------------------------- the schedule
def sample_rate(num_samples: int, batch_size: int) -> float:
    """Poisson sampling rate, as Opacus sets it: 1 / len(DataLoader)."""
    return 1 / math.ceil(num_samples / batch_size)


def steps_per_round(num_samples: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps one round takes (Opacus's DPDataLoader: int(1 / q) per epoch)."""
    return epochs * int(1 / sample_rate(num_samples, batch_size))


def noise_multiplier(settings: DPSettings, rate: float, steps: int, state: RecordDict | None = None) -> float:
    """Sigma for this client: fixed, or (target mode) Opacus's
    ``get_noise_multiplier`` for ``total_rounds`` rounds of ``steps`` steps.

    The target-mode search (~0.3 s) is done once per client: its result is
    kept in ``state`` next to the inputs it was computed for.
    """
    if settings.target_epsilon is None:
        return settings.noise_multiplier
    plan = json.dumps([settings.target_epsilon, settings.delta, rate, steps, settings.total_rounds])
    if state is not None and SIGMA_KEY in state and state[SIGMA_KEY]["plan"] == plan:
        return float(state[SIGMA_KEY]["sigma"])
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "optimal order is the largest alpha"
        sigma = float(
            get_noise_multiplier(
                target_epsilon=settings.target_epsilon,
                target_delta=settings.delta,
                sample_rate=rate,
                steps=steps * settings.total_rounds,
                accountant="rdp",
                epsilon_tolerance=EPSILON_TOLERANCE,
            )
        )
    if state is not None:
        state[SIGMA_KEY] = ConfigRecord({"plan": plan, "sigma": sigma})
    return sigma


def would_exceed_budget(
    accountant: RDPAccountant, settings: DPSettings, sigma: float, rate: float, steps: int
) -> tuple[bool, float]:
    """Whether the next round's ``steps`` would take epsilon past the budget,
    and the epsilon it would reach (computed by the accountant itself)."""
    from opacus.accountants import RDPAccountant

    trial = RDPAccountant()
    trial.history = [*accountant.history, (sigma, rate, steps)]
    after = epsilon_spent(trial, settings.delta)
    return after > settings.budget, after


# ------------------------------------------------------------------ training
@dataclass
class PrivateRound:
    """What one DP-SGD round did (or why it did not train)."""

    declined: bool
    epsilon: float
    noise_multiplier: float
    steps: int
    loss: float = math.nan
    epsilon_next: float = math.nan   # what training would have reached (declined rounds)

    def metrics(self) -> dict[str, float | int]:
        """Reply metrics; every reply carries the same keys, as FedAvg requires."""
        return {
            protocol.DECLINED: int(self.declined),
            "dp_epsilon": self.epsilon,
            "dp_noise_multiplier": self.noise_multiplier,
        }


def train_private(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: nn.Module,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    seed: int,
    settings: DPSettings,
    state: RecordDict,
) -> PrivateRound:
    """DP-SGD on ``(x, y)`` with Opacus (Poisson sampling, per-sample clipping,
    Gaussian noise), unless the budget forbids this round.

    The accountant is restored from and saved to ``state``. ``model`` is
    trained in place. Any task whose loss is a mean over per-sample terms
    (classification, forecasting) can call this.

    Returns
    -------
    PrivateRound
        ``declined`` with the epsilon spent so far, or the mean training loss
        and the epsilon after this round.
    """
    accountant = load_accountant(state)
    rate = sample_rate(len(y), batch_size)
    steps = steps_per_round(len(y), batch_size, epochs)
    sigma = noise_multiplier(settings, rate, steps, state)
    exceeds, after = would_exceed_budget(accountant, settings, sigma, rate, steps)
    if exceeds:
        return PrivateRound(True, epsilon_spent(accountant, settings.delta), sigma, 0, epsilon_next=after)
    loss = _dp_sgd(model, x, y, loss_fn, accountant, sigma, settings.max_grad_norm,
                   epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, seed=seed)
    save_accountant(state, accountant)
    return PrivateRound(False, epsilon_spent(accountant, settings.delta), sigma, steps, loss=loss)


def _dp_sgd(model, x, y, loss_fn, accountant, sigma, max_grad_norm, *, epochs, batch_size, lr, momentum, seed) -> float:
    from opacus import PrivacyEngine

    data = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, generator=torch.Generator().manual_seed(seed)
    )
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    with warnings.catch_warnings():
        # "secure RNG turned off": seeded noise is what makes a seed reproduce a run
        warnings.simplefilter("ignore", UserWarning)
        engine = PrivacyEngine(accountant="rdp")
        engine.accountant = accountant  # the restored history; Opacus appends this round's steps
        private_model, optimiser, loader = engine.make_private(
            module=model, optimizer=optimiser, data_loader=loader,
            noise_multiplier=sigma, max_grad_norm=max_grad_norm,
            noise_generator=torch.Generator().manual_seed(seed + 1),
        )
        private_model.train()
        total, count = 0.0, 0
        for _ in range(epochs):
            for xb, yb in loader:
                optimiser.zero_grad()
                out = private_model(xb)
                # Poisson sampling may draw an empty batch: it is still a
                # (noise-only) step, which the accountant counts
                loss = loss_fn(out, yb) if len(yb) else out.sum()
                loss.backward()
                optimiser.step()
                total += loss.item() * len(yb)
                count += len(yb)
    private_model.remove_hooks()
    return total / count if count else math.nan


def declined_reply(msg: Message, outcome: PrivateRound, partition_id: int, server_round: int) -> Message:
    """The reply of a client whose budget forbids this round: no arrays, no
    examples, ``dp_declined = 1`` and the epsilon it has spent."""
    metrics = {
        protocol.NUM_EXAMPLES: 0,
        protocol.PARTITION_ID: partition_id,
        protocol.DISPATCH_ROUND: server_round,
        **outcome.metrics(),
        "dp_epsilon_next": outcome.epsilon_next,
    }
    return Message(RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord(metrics)}), reply_to=msg)


def is_declined(reply: Message) -> bool:
    """True for a successful reply in which the client declined to train."""
    if reply.has_error():
        return False
    return any(protocol.declined(r) for r in reply.content.metric_records.values())


# ------------------------------------------------------ central DP (client side)


def central_clipping_mod(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Apply Flower's ``fixedclipping_mod`` / ``adaptiveclipping_mod`` only
    when this run uses client-side central DP.

    Flower's mods fail every message that lacks the clipping norm, so they
    cannot sit on the ClientApp unconditionally; this switch passes every
    other message through. A client that declined (DP-SGD budget) has no
    update to clip and is passed through as well.
    """
    if msg.metadata.message_type != MessageType.TRAIN or "config" not in msg.content:
        return call_next(msg, ctxt)
    mode = msg.content["config"].get(CENTRAL_MODE_KEY)
    if mode not in ("client-fixed", "client-adaptive"):
        return call_next(msg, ctxt)
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

    reply = call_next(msg, ctxt)
    if is_declined(reply):
        return reply
    mod = fixedclipping_mod if mode == "client-fixed" else adaptiveclipping_mod
    return mod(msg, ctxt, lambda _msg, _ctxt: reply)
