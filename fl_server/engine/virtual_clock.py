"""Virtual time for simulated rounds: arrival order, deadlines, stale updates.

Flower's simulation returns every reply at once; each reply says how long its
client would have taken on its device (downlink + compute + uplink, see
``edgesim.devices``). The clock turns those durations into arrivals on a
virtual timeline:

* without a deadline a round ends when its last sampled update arrives
  (synchronous FedAvg);
* with a deadline D a round ends at ``start + D`` (or at its last arrival, if
  all arrived earlier). Updates arriving later are kept, never dropped: they
  are applied in the round during which they arrive, as *stale* updates with
  staleness tau = that round - the round they were computed for, and their
  client stays busy (is not sampled) until then.

Every update is applied exactly once, in arrival order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message


@dataclass(order=True)
class Arrival:
    """One client update on the virtual timeline."""

    arrival_s: float
    node_id: int = field(compare=False)
    dispatch_round: int = field(compare=False)
    reply: Message = field(compare=False, repr=False)


@dataclass
class RoundClose:
    """What a round applies when it closes."""

    start_s: float
    end_s: float
    applied: list[Arrival]          # fresh and stale, in arrival order
    staleness: list[int]            # tau of each applied update
    held_back: int                  # updates of this round that will arrive later


class VirtualClock:
    """Virtual timeline of one run.

    Parameters
    ----------
    deadline_s : float, optional
        Round deadline in virtual seconds; ``None`` waits for every update.
    """

    def __init__(self, deadline_s: float | None = None) -> None:
        if deadline_s is not None and not deadline_s > 0:
            raise ValueError(f"deadline_s={deadline_s} must be > 0 (or None for synchronous rounds)")
        self.deadline_s = deadline_s
        self.now_s = 0.0
        self.pending: list[Arrival] = []

    def is_busy(self, node_id: int) -> bool:
        """True while an update of ``node_id`` is still travelling."""
        return any(a.node_id == node_id for a in self.pending)

    def busy_nodes(self, node_ids: Iterable[int] = ()) -> set[int]:
        """Every node with an update still travelling (one pass, for sampling a large
        federation); ``node_ids``: the connected nodes, for clocks that ask per node."""
        return {a.node_id for a in self.pending}

    def close_round(self, server_round: int, durations: list[tuple[Message, float]]) -> RoundClose:
        """Place this round's updates (reply, duration in s) on the timeline and
        return everything that arrives before the round ends."""
        start = self.now_s
        arrivals = sorted(
            Arrival(start + duration, reply.metadata.src_node_id, server_round, reply)
            for reply, duration in durations
        )
        if self.deadline_s is None:
            on_time, late = arrivals, []
            end = max((a.arrival_s for a in arrivals), default=start)
        else:
            cutoff = start + self.deadline_s
            on_time = [a for a in arrivals if a.arrival_s <= cutoff]
            late = [a for a in arrivals if a.arrival_s > cutoff]
            everyone_in = not late and not self.pending
            end = max((a.arrival_s for a in on_time), default=start) if everyone_in else cutoff
        self.pending.extend(late)
        due = sorted(a for a in self.pending if a.arrival_s <= end)
        self.pending = [a for a in self.pending if a.arrival_s > end]
        applied = sorted(on_time + due)
        self.now_s = end
        return RoundClose(
            start_s=start,
            end_s=end,
            applied=applied,
            staleness=[server_round - a.dispatch_round for a in applied],
            held_back=len(late),
        )

    def idle_round(self, server_round: int) -> RoundClose:
        """A round in which nobody could be sampled: time moves on to the next
        arrival (or by one deadline, or one minute), applying what arrives."""
        step = self.deadline_s or 60.0
        next_arrival = min((a.arrival_s for a in self.pending), default=self.now_s + step)
        return self.close_round_at(server_round, max(next_arrival, self.now_s))

    def close_round_at(self, server_round: int, end_s: float) -> RoundClose:
        start = self.now_s
        due = sorted(a for a in self.pending if a.arrival_s <= end_s)
        self.pending = [a for a in self.pending if a.arrival_s > end_s]
        self.now_s = end_s
        return RoundClose(start, end_s, due, [server_round - a.dispatch_round for a in due], 0)
