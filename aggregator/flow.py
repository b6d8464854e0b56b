"""Flow control: the window budget shared by the agents that are catching up."""

from __future__ import annotations

import logging
import time
from typing import Any

from aggregator.agents import AgentInfo
from aggregator.stages import Stages
from fleetlog import wire

log = logging.getLogger("fleetlog.aggregator")


class FlowControl(Stages):
    """How much each agent may have in flight."""

    def share_window(self) -> None:
        """Each catching-up agent's share: an equal part of the budget (wire.MIN_WINDOW at least)."""
        budget = self.cfg.window_budget_bytes
        window = max(wire.MIN_WINDOW, budget // max(1, self.catching_up)) if budget else None
        if window != self.window:
            log.debug("each agent's window is now %s bytes (%d catching up)", window, self.catching_up)
            self.window = window

    def grant(self, info: AgentInfo) -> int | None:
        """The window for ``info``'s next reply or ack (None: no budget, agents keep their own).

        An agent catching up is given its share, and one that is not wire.MIN_WINDOW (it has
        less than that in flight). A window shrinks at once but grows only into what the
        others' windows leave of the budget: otherwise agents arriving one after the other
        would each get the share of the moment, and the early ones keep theirs in flight until
        their next ack. So the windows granted stay within the budget, plus MIN_WINDOW for each
        agent beyond budget / MIN_WINDOW, which is what bounds the receive queues.
        """
        if self.window is None:
            return None
        target = self.window if info.catching_up else wire.MIN_WINDOW
        if info.max_window:
            target = max(wire.MIN_WINDOW, min(target, info.max_window))
        free = self.cfg.window_budget_bytes - (self.granted - info.window)
        window = min(target, max(info.window, free, wire.MIN_WINDOW))
        self.granted += window - info.window
        info.window = window
        return window

    def replies(self, info: AgentInfo, result: dict[str, Any]) -> dict[str, Any]:
        """A hello or heartbeat reply, with this agent's window when there is one, and what is
        wrong with it (``warnings``, always present: an empty list says it is over)."""
        window = self.grant(info)
        if window is not None:
            result["window"] = window
        result["warnings"] = self.agent_warnings(info)
        hold = self.shared_stream_hold()
        if hold is not None:
            result["shared_stream_hold"] = hold
        return result

    def shared_stream_hold(self) -> dict[str, Any] | None:
        """When nothing can be committed because the JetStream stream itself takes nothing (an
        election, no quorum, full) while this aggregator's link to NATS is up: every aggregator
        of the stream waits for the same thing, so an agent moving to another gains nothing and
        sends its whole window again. Its hello and heartbeat replies say so (``error``,
        ``held_s``: how long, seconds, ``kind``: "full" for a full stream, which only room ends,
        else the sink's word: timeout, race...); the agent then waits instead of moving
        (agent/daemon.py, check_ack_stall). None otherwise (a files sink, or the link is down:
        another aggregator may well reach NATS)."""
        hold, sink = self.state_error, self.stream_sink
        if hold is None or sink is None or not sink.link.connected:
            return None
        return {"error": hold.error[:300], "held_s": round(time.monotonic() - hold.since, 1),
                "kind": sink.commit_error_kind or ""}
