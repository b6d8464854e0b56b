"""An aggregator killed between a topic's first write and its first commit."""

from __future__ import annotations

from harness import Harness, append_lines, check_exactly_once, make_lines, output_lines, wait_for


def test_aggregator_killed_before_a_topics_first_commit_doubles_nothing(h: Harness) -> None:
    """Nothing in the commit journal names the topic yet, so the restarted aggregator must cut
    its whole active file (uncommitted) instead of keeping lines the agent resends."""
    ep = h.endpoints()
    append_lines(h.path("logs", "a.log"), [])
    # A long commit interval keeps the first commit well after the first write; without a window
    # budget the agent's window is its own max_inflight_bytes (32 MiB), so no early commit comes
    # at half of it either.
    agg = h.aggregator(ep, "aggregator.commit_interval_ms=5000", "aggregator.commit_max_bytes=1000000000",
                       "aggregator.window_budget_bytes=0")
    h.agent(ep, [{"paths": [str(h.path("logs", "*.log"))], "topic": "t"}])
    # The lines come once the agent's hello has said its window: before, the aggregator
    # commits as early as for the least window an agent may have.
    wait_for(lambda: any(a.get("connected") for a in h.status(ep).get("agents", [])),
             what="the agent's hello")
    append_lines(h.path("logs", "a.log"), make_lines("A", 0, 30_000))
    wait_for(lambda: len(output_lines(h.root / "out", "t")) >= 1000, what="lines written, not committed")
    agg.kill9()
    h.aggregator(ep)
    wait_for(lambda: len(output_lines(h.root / "out", "t")) >= 30_000, timeout=60, what="every line")
    wait_for(lambda: (s := h.agent_status()) is not None and s["inflight_bytes"] == 0 and s["lag_bytes"] == 0,
             what="everything acknowledged")
    h.assert_quiet(ep)
    check_exactly_once(output_lines(h.root / "out", "t"), {"A": 30_000})
    assert "cutting" in h.procs[-1].log()
