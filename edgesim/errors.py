"""The one exception type of the digital twin."""

from __future__ import annotations


class EdgeSimError(ValueError):
    """A bad scenario parameter or call; the message names the value and the fix."""
