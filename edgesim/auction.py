"""Congestion-priced allocation of a cluster's scarce resources (paper 001 §4.2, §4.4).

"COAs resolve conflicts via auction-style allocators that price scarce
resources (GPU slices, bandwidth reservations) using congestion signals."
Each Cluster Orchestrator Agent clears, per resource, one **uniform-price
auction for a divisible good** (the textbook "multi-unit uniform-price
auction"; Krishna, *Auction Theory*, ch. 12):

* every Edge Service Agent ``i`` bids a quantity ``q_i >= 0`` (slices or
  Mbps it asks for) at a per-unit value ``v_i >= 0`` (what one unit is worth
  to it: its predicted backlog pressure, see :mod:`edgesim.control`);
* bids are served highest value first until the capacity ``C`` runs out
  (ties share the marginal units in proportion to their quantities);
* the clearing price is the value of the highest bid that is **not** served
  in full (the marginal bid), or the reserve price when every bid fits:
  congestion-free resources cost only the reserve, and the price rises with
  how deep into the demand curve the capacity cuts.

Properties (tested on hand-made instances): the allocation never exceeds the
capacity; no bidder gets more than it asked for; every bidder with a
positive allocation has ``v_i >= price`` (individually rational: its utility
``(v_i - price) x a_i`` is not negative); a bidder below the reserve gets
nothing.

:func:`proportional_share` is the "no pricing" ablation (paper 001 Table 5):
the same capacity rationed in proportion to the quantities asked, no price.

Pure numpy, no state: one call per resource and cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import EdgeSimError


@dataclass(frozen=True)
class Clearing:
    """Result of one auction.

    Attributes
    ----------
    allocation : (n,) float
        Units each bidder gets, ``0 <= allocation <= quantity``, summing to at most the capacity.
    price : float
        Uniform per-unit price every winner pays (0 in :func:`proportional_share`).
    demand : float
        Units asked in total (the congestion signal is ``demand / capacity``).
    """

    allocation: np.ndarray
    price: float
    demand: float

    @property
    def payments(self) -> np.ndarray:
        """What each bidder pays: price x units received."""
        return self.price * self.allocation


def _check_bids(quantity: np.ndarray, value: np.ndarray, capacity: float) -> None:
    if quantity.shape != value.shape or quantity.ndim != 1:
        raise EdgeSimError(f"bids need one quantity and one value per bidder, got shapes {quantity.shape} and {value.shape}")
    if not (np.isfinite(quantity).all() and np.isfinite(value).all()) or (quantity < 0).any() or (value < 0).any():
        raise EdgeSimError("bid quantities and values must be finite and >= 0")
    if not (np.isfinite(capacity) and capacity >= 0):
        raise EdgeSimError(f"capacity={capacity} must be finite and >= 0")


def uniform_price(quantity: np.ndarray, value: np.ndarray, capacity: float, reserve: float = 0.0) -> Clearing:
    """Clear a uniform-price auction of ``capacity`` divisible units (see the module docstring)."""
    quantity = np.asarray(quantity, dtype=np.float64)
    value = np.asarray(value, dtype=np.float64)
    _check_bids(quantity, value, capacity)
    eligible = np.where(value >= reserve, quantity, 0.0)  # below the reserve: not served
    demand = float(eligible.sum())
    if demand <= capacity:
        return Clearing(eligible, float(reserve), demand)
    allocation = np.zeros_like(quantity)
    left = float(capacity)
    # Levels of value, highest first; one level (a tie) shares what is left pro rata.
    for level in np.unique(value[eligible > 0])[::-1]:
        at_level = (value == level) & (eligible > 0)
        wanted = float(eligible[at_level].sum())
        if wanted <= left:
            allocation[at_level] = eligible[at_level]
            left -= wanted
            continue
        allocation[at_level] = eligible[at_level] * (left / wanted)
        return Clearing(allocation, float(max(level, reserve)), demand)  # the marginal level sets the price
    raise AssertionError("unreachable: demand > capacity but every level fitted")  # pragma: no cover


def proportional_share(quantity: np.ndarray, capacity: float) -> Clearing:
    """Ration ``capacity`` in proportion to the quantities asked; no price (the no-pricing ablation)."""
    quantity = np.asarray(quantity, dtype=np.float64)
    _check_bids(quantity, np.zeros_like(quantity), capacity)
    demand = float(quantity.sum())
    factor = 1.0 if demand <= capacity else capacity / demand
    return Clearing(quantity * factor, 0.0, demand)
