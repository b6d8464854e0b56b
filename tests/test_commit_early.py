"""When the group commit comes before its interval: an agent's window half full of uncommitted
lines. Real processes, sockets and files."""

from __future__ import annotations

import re
import time

from harness import Harness, append_lines, check_exactly_once, make_lines, output_lines, wait_for


def test_a_fast_agent_with_a_small_window_keeps_shipping_while_the_commit_interval_is_long(
        h: Harness) -> None:
    """An agent stops sending at its window (bytes shipped and not acknowledged) until an ack
    makes room. With a commit interval longer than the time it takes to ship a window, it would
    wait for every interval: the aggregator commits as soon as half an agent's window is
    uncommitted instead, so the backlog arrives without one interval's wait (old code: one
    256 KiB window per 10 s commit, six of them here)."""
    ep = h.endpoints()
    lines = 20_000  # 1.4 MB: five and a half 256 KiB windows
    append_lines(h.path("logs", "a.log"), make_lines("A", 0, lines))
    h.aggregator(ep, "aggregator.commit_interval_ms=10000", "aggregator.commit_max_bytes=1000000000")
    h.agent(ep, [{"paths": [str(h.path("logs", "*.log"))], "topic": "t"}],
            "agent.max_inflight_bytes=262144")
    wait_for(lambda: output_lines(h.root / "out", "t"), timeout=30, what="the first lines")
    first = time.monotonic()
    # Less than one commit interval: without early commits only the first window is there.
    wait_for(lambda: len(output_lines(h.root / "out", "t")) >= lines, timeout=9.5,
             what="every line before the first interval ends")
    assert time.monotonic() - first < 10
    wait_for(h.all_acknowledged, what="everything acknowledged")
    status = h.status(ep)
    assert status["totals"]["commits"] >= 2  # early ones: the interval has not passed
    # The operator sees the interval in force and that commits came before it.
    assert status["commit_interval_ms"] == 10000
    assert status["totals"]["early_commits"] >= 1, status["totals"]
    shown = h.ctl(ep, "status").stdout
    assert re.search(r"\b\d+ commits \(interval 10000 ms, [1-9]\d* early\)", shown), shown
    check_exactly_once(output_lines(h.root / "out", "t"), {"A": lines})
    h.assert_quiet(ep)
