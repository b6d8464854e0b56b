"""Which aggregator an agent uses when it has several: rank, stick, fail over in rank order.

An agent ranks its aggregators by rendezvous (highest-random-weight) hashing: each aggregator's
weight is a hash of the agent's name and the aggregator's control endpoint, highest first. So
every agent has its own stable order (a restart, or a reordered list, keeps it), a fleet spreads
evenly over the aggregators, and removing one aggregator moves only the agents that used it.

The agent uses the first, and sticks to the one it uses: it moves to the next in its order only
when that one fails (no reply to heartbeats, no acknowledgement while batches are out, a
refusal, its word that it is stopping, or nothing accepting the connection), never back to a
better-ranked one that returns. While none answers it keeps going round, giving each one a trial
of a heartbeat timeout (three heartbeat intervals), so a fleet whose aggregators are all down
makes no storm of reconnections.

An aggregator where nothing accepts the connection (its process is down: refused for a second,
see agent/link.py) is left without waiting out its trial, but at most once per aggregator
between two answers: the one that answered is left at once (as for any failure), and then
each one that never answered until each has been tried. After that every move waits for the
trial again, refused or not: two aggregators both down are tried in turn at the trial's pace,
never faster.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from agent.config import AggregatorEndpoints

log = logging.getLogger("fleetlog.agent.failover")


def weight(agent_name: str, control: str) -> int:
    """The rendezvous weight of one aggregator for one agent: 64 bits of BLAKE2b over both
    names (a keyed, well-mixed hash; Python's hash() changes with every process)."""
    digest = hashlib.blake2b(f"{agent_name}\n{control}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(agent_name: str, aggregators: tuple[AggregatorEndpoints, ...]) -> list[AggregatorEndpoints]:
    """``aggregators`` in this agent's order of preference (highest weight first)."""
    return sorted(aggregators, key=lambda a: (-weight(agent_name, a.control), a.control))


@dataclass(slots=True)
class Switch:
    """One move from an aggregator to another: why, from, to, and when (wall-clock seconds)."""
    reason: str
    source: AggregatorEndpoints
    target: AggregatorEndpoints
    at: float


class Failover:
    """The ranked aggregators, the one in use and what happened: the choice, not the sockets
    (agent/transport.py opens those).

    ``trial_s`` is how long an aggregator that has not answered yet is given before the next
    one is tried: the heartbeat timeout. A switch asked for while the one in use has never
    answered waits until its trial is over; so with every aggregator down the agent moves once
    a trial, and the first move away from one that answered is at once. A move asked for
    because nothing accepts the connection (``want(..., refused=True)``) is at once too while
    the round since the last answer has not tried every aggregator yet.
    """

    def __init__(self, agent_name: str, aggregators: tuple[AggregatorEndpoints, ...],
                 trial_s: float) -> None:
        self.ranked = rank(agent_name, aggregators)
        self.index = 0
        self.trial_s = trial_s
        self.since = time.monotonic()   # when the one in use was connected
        self.answered = False           # the one in use answered a hello
        self.fruitless = 0              # moves in a row to ones that never answered
        self.switches = 0
        self.last: Switch | None = None
        self.wanted: str | None = None  # a move asked for: why
        self.refused = False            # nothing accepts the connection at the one in use

    @property
    def several(self) -> bool:
        return len(self.ranked) > 1

    @property
    def current(self) -> AggregatorEndpoints:
        return self.ranked[self.index]

    def want(self, reason: str, refused: bool = False) -> bool:
        """Ask to move on (the first reason stays); ``refused``: because nothing accepts the
        connection. False with a single aggregator."""
        if not self.several:
            return False
        if self.wanted is None:
            self.wanted = reason
        self.refused = self.refused or refused
        return True

    def wait_s(self) -> float:
        """How long the move asked for must still wait (0: now)."""
        if self.answered or (self.refused and self.fruitless < len(self.ranked) - 1):
            return 0.0
        return max(0.0, self.since + self.trial_s - time.monotonic())

    def on_answer(self) -> None:
        """The one in use answered a hello: it is the one we stick to (a move asked for before,
        while it had its trial, is off; one asked for after this is made at once)."""
        if self.fruitless >= len(self.ranked):
            log.info("aggregator %s answers: shipping to it", self.current.control)
        self.answered = True
        self.fruitless = 0
        self.wanted = None
        self.refused = False

    def move(self) -> Switch:
        """Move to the next aggregator in rank order; the switch made."""
        reason = self.wanted or "asked to"
        self.wanted = None
        source = self.current
        self.fruitless = 0 if self.answered else self.fruitless + 1
        self.index = (self.index + 1) % len(self.ranked)
        self.since = time.monotonic()
        self.answered = False
        self.refused = False
        self.switches += 1
        self.last = Switch(reason, source, self.current, time.time())
        if self.fruitless < len(self.ranked):
            log.info("switching aggregator: %s, from %s to %s", reason, source.control,
                     self.current.control)
        elif self.fruitless == len(self.ranked):
            log.warning("no aggregator answers (tried all %d): trying each in turn, %gs each, until"
                        " one does", len(self.ranked), self.trial_s)
        else:
            log.debug("switching aggregator: %s, from %s to %s", reason, source.control,
                      self.current.control)
        return self.last

    def status(self) -> dict[str, Any]:
        last = self.last
        return {
            "in_use": {"data": self.current.data, "control": self.current.control},
            "ranked": [{"data": a.data, "control": a.control, "in_use": i == self.index}
                       for i, a in enumerate(self.ranked)],
            "switches": self.switches,
            "last_switch": None if last is None else {
                "reason": last.reason, "from": last.source.control, "to": last.target.control,
                "at": round(last.at, 3)},
        }
