"""What the operator sees: lines counted when acknowledged, each agent's files and errors in the
aggregator's status."""

from __future__ import annotations

from harness import Harness, append_lines, make_lines, wait_for


def test_lines_shipped_counts_only_acknowledged_lines(h: Harness) -> None:
    ep = h.endpoints()
    append_lines(h.path("logs", "a.log"), make_lines("a", 0, 50))
    h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "app"}])
    s = wait_for(lambda: (x := h.agent_status()) is not None and x["lines_sent"] >= 50 and x,
                 what="lines sent into the void")
    assert s["lines_shipped"] == 0  # nobody acknowledged them
    h.aggregator(ep)
    wait_for(lambda: (x := h.agent_status()) is not None and x["lines_shipped"] == 50,
             what="50 lines acknowledged")


def test_aggregator_status_lists_each_agents_files_and_errors(h: Harness) -> None:
    ep = h.endpoints()
    h.aggregator(ep)
    log = h.path("logs", "a.log")
    append_lines(log, ["short", "x" * 1000, "short again"])
    h.agent(ep, [{"paths": [str(log)], "topic": "app", "max_line_bytes": 256}])
    agent = wait_for(lambda: (a := h.status(ep)["agents"]) and a[0]["errors"].get("cut_lines") == 1
                     and a[0], what="the cut line reported")
    assert agent["file_list"] == [str(log)]
    assert agent["errors"]["discarded_bytes"] == 1000 - 256
    assert "cut_lines=1" in h.ctl(ep, "status").stdout


def test_agent_status_lists_sources_and_warns_of_globs_that_match_nothing(h: Harness) -> None:
    ep = h.endpoints()
    h.aggregator(ep)
    append_lines(h.path("logs", "a.log"), make_lines("a", 0, 5))
    agent = h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log", "/var/log/nonexistent-fleetlog/*.log"],
                          "topic": "app"}])
    s = wait_for(lambda: (x := h.agent_status()) is not None and x["sources"] and x, what="agent status")
    src = s["sources"][0]
    assert src["files"] == [str(h.path("logs", "a.log"))]
    assert src["empty_globs"] == ["/var/log/nonexistent-fleetlog/*.log"]
    assert "/var/log/nonexistent-fleetlog/*.log matches no file" in agent.log()
    h.assert_quiet(ep)  # said once, not at every rescan
