"""Tell a strategy which model its clients now start from.

Flower's strategies assume that the model they return is the model they send
next. Two things break that assumption here: an aggregator of a hierarchy
whose model is replaced from above (a regional or global model pushed down),
and a rollout guard that adopts another model than the one the strategy
returned (a rollback, or a mix with the last stable model). :func:`adopt`
re-synchronises the strategies that keep a model of their own.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from .staleness_clustered import StalenessClustered


def adopt(
    strategy: Strategy,
    arrays: ArrayRecord,
    server_round: int | None = None,
    members: Iterable[int] = (),
    reset_momentum: bool = False,
) -> None:
    """Make ``arrays`` the model ``strategy`` considers sent.

    Parameters
    ----------
    strategy : Strategy
        Flower's FedAvgM / FedOpt family keep ``current_arrays`` (the base of
        their pseudo-gradient); :class:`StalenessClustered` keeps its cluster
        models and the model sent per round (the base of each delta). Other
        strategies (FedAvg, ASS, the robust aggregators) keep no model.
    arrays : ArrayRecord
        The model the strategy's clients (or child aggregators) now hold.
    server_round : int, optional
        The round this model is sent in; with it, a staleness-aware strategy
        records it as the base of updates dispatched in that round.
    members : iterable of int
        The node ids the model is sent to in ``server_round``.
    reset_momentum : bool
        Drop server momentum (a rollback: the rejected step must not persist).
    """
    for name in ("strategy", "global_strategy"):  # wrappers (Flower's DP wrappers, a hierarchy's global tier)
        inner = vars(strategy).get(name)
        if isinstance(inner, Strategy):
            adopt(inner, arrays, server_round, members, reset_momentum)
    if hasattr(strategy, "current_arrays"):
        strategy.current_arrays = arrays
        if reset_momentum and hasattr(strategy, "momentum_vector"):
            strategy.momentum_vector = None
    if isinstance(strategy, StalenessClustered):
        if strategy.clustered:
            raise ValueError("a clustered staleness_clustered strategy keeps several models: it cannot adopt one")
        strategy.keys = list(arrays.keys())
        strategy.models = {0: [np.array(a, copy=True) for a in arrays.to_numpy_ndarrays()]}
        if reset_momentum:
            strategy.momentum = {}
        if server_round is not None:
            strategy.sent[(0, server_round)] = strategy.models[0]
            for node in members:
                strategy.cluster_of[node] = 0
                strategy.dispatch_cluster[(node, server_round)] = 0
