"""Misconfigured agents say what is wrong, within seconds, in their log and in both status
commands, and then stay quiet (a warning said once, not once a retry): an agent whose ``data`` is
the aggregator's wrong port for its mode, and two live agents given one name."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import orjson
from harness import (
    PY,
    Harness,
    append_lines,
    check_exactly_once,
    count_lines,
    make_lines,
    output_lines,
    wait_for,
)


def agent_status(state_dir: Path) -> dict[str, Any] | None:
    r = subprocess.run([PY, "-m", "agent", "status", "--json", "--timeout", "2",
                        "--set", f"agent.state_dir={state_dir}"], capture_output=True, text=True, timeout=20)
    return orjson.loads(r.stdout) if r.returncode == 0 else None


def problems_of(h: Harness, ep: Any, name: str) -> list[str]:
    agents = {a["name"]: a for a in h.status(ep)["agents"]}
    return list(agents[name]["problems"]) if name in agents else []


def wrong_data_port_warns(h: Harness, mode: str, wrong: str, right: str) -> None:
    """An agent in ``mode`` whose ``data`` is the aggregator's ``wrong`` endpoint says, once,
    that it should be the ``right`` one, in its log and both status commands."""
    ep = h.endpoints()
    h.aggregator(ep)
    append_lines(h.path("logs", "a.log"), make_lines("a", 0, 100))
    data = getattr(ep, wrong)
    agent = h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "app"}], f"agent.data={data}",
                    mode=mode)
    phrase = f"the aggregator's {right} endpoint ({mode} mode)"
    wait_for(lambda: phrase in agent.log(), timeout=15, what="a warning naming the data endpoint")
    assert "WARNING fleetlog.agent" in agent.log()
    # The control channel works (hello answered): only `data` is wrong.
    wait_for(lambda: (s := h.agent_status()) and s["aggregator"] and any(phrase in p for p in s["problems"]),
             what="the problem in `fleetlog-agent status`")
    wait_for(lambda: any(phrase in p for p in problems_of(h, ep, "node1")),
             what="the problem in `aggregatorctl status`")
    h.assert_quiet(ep)
    # Said once per kind (the monitor's and the missing acknowledgements'), not once a retry.
    assert agent.log().count(phrase) <= 2, agent.log()


def test_push_agent_pointed_at_xpub_warns(h: Harness) -> None:
    wrong_data_port_warns(h, "push", "xpub", "pull")


def test_pub_agent_pointed_at_pull_warns(h: Harness) -> None:
    wrong_data_port_warns(h, "pub", "pull", "xsub")


def test_two_agents_with_one_name_are_told(h: Harness) -> None:
    """The second live agent with a name is refused and says so; the first keeps shipping and is
    told; once the first stops, the second takes over and ships everything, exactly once."""
    ep = h.endpoints(tcp=True)
    agg = h.aggregator(ep)
    for d in ("a", "b"):
        h.path("logs", d).mkdir()
    append_lines(h.path("logs", "a", "a.log"), make_lines("a", 0, 200))
    append_lines(h.path("logs", "b", "b.log"), make_lines("b", 0, 200))
    first = h.agent(ep, [{"paths": [f"{h.path('logs', 'a')}/*.log"], "topic": "app"}], name="web",
                    state="st-a")
    wait_for(lambda: count_lines(h.path("out", "app", "app.log")) >= 200, what="the first agent's lines")
    wait_for(lambda: (s := agent_status(h.path("st-a"))) and s["aggregator"], what="the first one connected")
    second = h.agent(ep, [{"paths": [f"{h.path('logs', 'b')}/*.log"], "topic": "app"}], name="web",
                     state="st-b")
    wait_for(lambda: "is in use by another live agent" in second.log(), timeout=15,
             what="the second agent saying it is refused")
    wait_for(lambda: "is also used by another agent" in first.log(), timeout=15, what="the first agent told")
    assert "used by two live agents" in agg.log()
    s2 = wait_for(lambda: agent_status(h.path("st-b")), what="second agent's status")
    assert any("in use by another live agent" in p for p in s2["problems"]), s2
    s1 = wait_for(lambda: agent_status(h.path("st-a")), what="first agent's status")
    assert any("also used by another agent" in p for p in s1["problems"]), s1
    assert s1["agent_id"] != s2["agent_id"]
    assert any("also used by another agent" in p for p in problems_of(h, ep, "web"))
    # The first goes on shipping while the second waits.
    append_lines(h.path("logs", "a", "a.log"), make_lines("a", 200, 100))
    wait_for(lambda: sum(1 for line in output_lines(h.path("out"), "app") if line.startswith("a#")) >= 300,
             what="the first agent's new lines")
    h.assert_quiet(ep)
    assert second.log().count("is in use by another live agent") == 1
    assert agg.log().count("used by two live agents") == 1
    first.stop()
    wait_for(lambda: sum(1 for line in output_lines(h.path("out"), "app") if line.startswith("b#")) >= 200,
             timeout=30, what="the second agent's lines once the first is gone")
    check_exactly_once(output_lines(h.path("out"), "app"), {"a": 300, "b": 200})
    h.assert_quiet(ep)
    # The clash is over: the one that has the name now is not told of a clash with itself.
    assert "is also used by another agent" not in second.log(), second.log()
    # What ended is the refusal, said as such (it said "new to this agent (a restart, or a move)").
    assert "it takes this agent now, after refusing it" in second.log(), second.log()
    assert "is new to this agent" not in second.log()
    assert not any("also used by another agent" in p for p in problems_of(h, ep, "web"))


def test_an_agent_that_stopped_cleanly_frees_its_name_at_once(h: Harness) -> None:
    """An agent stopped with SIGTERM says goodbye: another agent with its name and another
    state_dir (the host reinstalled, or its state moved) is taken at once, not refused as a
    second live agent for its heartbeat timeout (3-5 s before)."""
    ep = h.endpoints()
    agg = h.aggregator(ep)
    log = h.path("logs", "a.log")
    append_lines(log, make_lines("a", 0, 10))
    first = h.agent(ep, [{"paths": [str(log)], "topic": "app"}], name="web", state="st-a")
    # Acknowledged, so it has heard the aggregator (an agent that never did has nobody to say
    # goodbye to: CI stopped it between its first batch and its hello's reply).
    wait_for(lambda: h.all_acknowledged("web"), what="the first agent's lines acknowledged")
    assert first.stop() == 0
    wait_for(lambda: "agent web (" in agg.log() and " stopped" in agg.log(), what="the goodbye")
    h.path("logs", "b").mkdir()
    append_lines(h.path("logs", "b", "b.log"), make_lines("b", 0, 10))
    second = h.agent(ep, [{"paths": [f"{h.path('logs', 'b')}/*.log"], "topic": "app"}], name="web",
                     state="st-b")
    wait_for(lambda: sum(1 for line in output_lines(h.path("out"), "app") if line.startswith("b#")) >= 10,
             what="the second agent's lines")
    assert "in use by another live agent" not in second.log()
    assert "used by two live agents" not in agg.log()
    check_exactly_once(output_lines(h.path("out"), "app"), {"a": 10, "b": 10})
