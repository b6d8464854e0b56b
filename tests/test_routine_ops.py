"""Routine operations never lose, double or storm: restarts, a second daemon on the same state,
key roll-outs, misconfigured agents. Every scenario ends with the system quiet again
(``Harness.assert_quiet``), not only with the lines in place."""

from __future__ import annotations

import signal
import time

import pytest
from harness import (
    Harness,
    Writer,
    check_exactly_once,
    output_lines,
    wait_for,
)


def acknowledged(h: Harness, name: str = "node1") -> bool:
    s = h.agent_status(name)
    return s is not None and s["lag_bytes"] == 0 and s["inflight_bytes"] == 0 and bool(s["files"])


@pytest.mark.parametrize("tcp", [True, False], ids=["tcp", "ipc"])
def test_aggregator_restart_does_not_start_a_hello_storm(h: Harness, tcp: bool) -> None:
    ep = h.endpoints(tcp=tcp)
    agg = h.aggregator(ep)
    writer = Writer({"a": h.path("logs", "a.log")}, lines_per_tick=5, tick_s=0.01).start()
    h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "app"}])
    wait_for(lambda: len(output_lines(h.path("out"), "app")) > 100, what="lines flowing")
    assert agg.stop(signal.SIGTERM) == 0
    # Down for a few heartbeats: they queue up, and their replies all name the new instance.
    time.sleep(3)
    agg = h.aggregator(ep)
    counts = writer.stop()
    wait_for(lambda: acknowledged(h), what="every line acknowledged by the new aggregator")
    h.assert_quiet(ep)
    check_exactly_once(output_lines(h.path("out"), "app"), counts)
