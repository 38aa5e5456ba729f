"""Context modes (paper 001 §4.1): scalarisation weight sets, fixed, per episode or on a schedule.

A mode is a weight triple ``(slo, energy, cost)`` for the twin's three
normalised reward terms (:meth:`edgesim.twin.EdgeCloudTwin.reward_terms`);
the weights live in ``conf/control/modes.yaml`` (our choice, see the file).
A :class:`ModePlan` says which mode holds at each step of an episode:

* a mode's name: that mode all episode;
* ``random``: one mode per episode, drawn from the episode's seed;
* ``schedule``: a list of ``{at, mode}`` entries, ``at`` the fraction of the
  episode where the mode starts (the first at 0), e.g. burst-absorber for
  the first third, then energy-saver, then cost-cap.

Policies observe the mode as a one-hot (:mod:`edgesim.control`), so one
policy can serve every mode.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from .errors import EdgeSimError
from .scenario import CONF_DIR

MODES_FILE = CONF_DIR / "control" / "modes.yaml"
TERMS = ("slo", "energy", "cost")
PLANS = ("random", "schedule")


@lru_cache(maxsize=1)
def mode_weights() -> dict[str, np.ndarray]:
    """Every mode's (slo, energy, cost) weights from ``conf/control/modes.yaml``, in file order."""
    import yaml

    raw = yaml.safe_load(MODES_FILE.read_text())
    out = {}
    for name, weights in raw.items():
        if set(weights) != set(TERMS) or any(not _is_weight(weights[t]) for t in TERMS):
            raise EdgeSimError(f"{MODES_FILE}: mode {name} needs numbers >= 0 for exactly {', '.join(TERMS)}, got {weights}")
        out[name] = np.array([float(weights[t]) for t in TERMS])
    return out


def mode_names() -> tuple[str, ...]:
    return tuple(mode_weights())


class ModePlan:
    """Which mode holds at each step (see the module docstring).

    Parameters
    ----------
    mode : str
        A mode name, ``random`` or ``schedule``.
    schedule : list of dict, optional
        ``[{at: 0.0, mode: ...}, ...]`` (only with ``mode="schedule"``).
    where : str
        The config path named in errors (e.g. ``task.control``).
    """

    def __init__(self, mode: str, schedule: list[dict[str, Any]] | None = None, where: str = "control") -> None:
        names = mode_names()
        self.names = names
        if mode not in names + PLANS:
            raise EdgeSimError(f"{where}.mode={mode} is unknown: choose one of {', '.join(names + PLANS)} "
                               f"(modes from {MODES_FILE.relative_to(CONF_DIR.parent)})")
        self.mode = mode
        self.starts: list[float] = []
        self.sequence: list[int] = []
        if mode == "schedule":
            self._parse_schedule(schedule, names, where)
        elif schedule:
            raise EdgeSimError(f"{where}.schedule is set but {where}.mode={mode}: use {where}.mode=schedule, "
                               f"or drop {where}.schedule")
        self.weights = np.stack([mode_weights()[n] for n in names])
        self.reset(0, 1)

    def _parse_schedule(self, schedule, names, where: str) -> None:
        if not schedule:
            raise EdgeSimError(f"{where}.mode=schedule needs {where}.schedule: a list of {{at: <fraction>, mode: <name>}}, "
                               "the first at 0")
        previous = -1.0
        for entry in schedule:
            if not isinstance(entry, dict) or set(entry) != {"at", "mode"}:
                raise EdgeSimError(f"{where}.schedule entry {entry} is invalid: use {{at: <fraction>, mode: <name>}}")
            at, name = entry["at"], entry["mode"]
            if not _is_weight(at) or at >= 1.0 or at <= previous:
                raise EdgeSimError(f"{where}.schedule at={at} is invalid: fractions of the episode in [0, 1), increasing")
            if name not in names:
                raise EdgeSimError(f"{where}.schedule mode={name} is unknown: choose one of {', '.join(names)}")
            self.starts.append(float(at))
            self.sequence.append(names.index(name))
            previous = at
        if self.starts[0] != 0.0:
            raise EdgeSimError(f"{where}.schedule starts at {self.starts[0]}: the first entry needs at: 0")

    def reset(self, seed: int, episode_steps: int) -> None:
        """A new episode of ``episode_steps`` steps; ``random`` draws its mode from ``seed``."""
        if self.mode == "schedule":
            self.start_steps = np.array([round(a * episode_steps) for a in self.starts])
            self.fixed = None
        elif self.mode == "random":
            self.fixed = int(np.random.default_rng([int(seed), 7]).integers(len(self.names)))
        else:
            self.fixed = self.names.index(self.mode)

    def index(self, step: int) -> int:
        """Index (in :func:`mode_names` order) of the mode at ``step``."""
        if self.fixed is not None:
            return self.fixed
        return self.sequence[int(np.searchsorted(self.start_steps, step, side="right")) - 1]

    def weights_at(self, step: int) -> np.ndarray:
        """(slo, energy, cost) weights at ``step``."""
        return self.weights[self.index(step)]


def _is_weight(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) and value >= 0
