"""Layers that stay on the client: personal heads, local mixers.

A client keeps some of its trained weights in ``context.state`` and deploys
the global model with those parts replaced by its own (:func:`deployed`). When
the personal parts must never leave the client, its reply carries the parts
it *received* in their place (:func:`uplink`): every key stays, as the
server's reply checks and every strategy expect, and aggregating identical
copies leaves the global values as they were.
"""

from __future__ import annotations

from collections.abc import Callable


def deployed(global_state: dict, local_state: dict | None, is_local: Callable[[str], bool]) -> dict:
    """The weights a client acts with: global, with its own values where ``is_local(key)``."""
    if local_state is None:
        return dict(global_state)
    return {k: (local_state[k] if is_local(k) and k in local_state else v) for k, v in global_state.items()}


def uplink(trained: dict, received: dict, is_local: Callable[[str], bool]) -> dict:
    """The reply's weights: the trained ones, with the received values where ``is_local(key)``."""
    return {k: (received[k] if is_local(k) else v) for k, v in trained.items()}


def local_part(state: dict, is_local: Callable[[str], bool]) -> dict:
    """Only the entries that stay on the client."""
    return {k: v for k, v in state.items() if is_local(k)}
