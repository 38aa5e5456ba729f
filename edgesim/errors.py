"""The one exception type of the digital twin, and the unknown-key check every config parser shares."""

from __future__ import annotations

from typing import Any, Mapping


class EdgeSimError(ValueError):
    """A bad scenario parameter or call; the message names the value and the fix."""


def no_unknown_keys(config: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    """Refuse keys of ``config`` outside ``allowed``, naming them and the valid ones."""
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise EdgeSimError(f"{where} has unknown key(s) {unknown}: valid keys are {list(allowed)}")
