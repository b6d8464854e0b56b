"""The sources change (SIGHUP, or a restart with another config): a file no source matches any
more is let go with one clear line (not "gone", not "rotated away"), where it was left is kept
while it is there, and a source that matches it again resumes it there; a file whose topic
changed goes on under its new topic. Every line arrives exactly once throughout."""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path
from typing import Any

import orjson
from harness import (
    Endpoints,
    Harness,
    Proc,
    append_lines,
    check_exactly_once,
    make_lines,
    output_lines,
    wait_for,
)


def write_conf(h: Harness, ep: Endpoints, sources: list[dict[str, Any]], agent: str = "") -> Path:
    conf = h.path("agent.toml")
    text = f"""
[agent]
name = "node1"
state_dir = "{h.path('st-node1')}"
data = "{ep.pull}"
control = "{ep.control}"
rescan_interval_ms = 300
ack_timeout_ms = 1500
log_level = "debug"
{agent}
"""
    for s in sources:
        text += f"\n[[sources]]\npaths = {orjson.dumps(s['paths']).decode()}\ntopic = \"{s['topic']}\"\n"
    conf.write_text(text)
    return conf


def start_agent(h: Harness) -> Proc:
    conf = str(h.path("agent.toml"))
    return h._proc("agent-node1", [sys.executable, "-m", "agent", "--config", conf]).start()


def reload(agent: Proc) -> None:
    """SIGHUP, and wait until the agent says it reloaded."""
    assert agent.popen is not None
    before = agent.log().count(" reloaded ")
    agent.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: agent.log().count(" reloaded ") > before, what="the reload")


def settle(h: Harness, topic: str, count: int) -> list[str]:
    return wait_for(lambda: len(lines := output_lines(h.path("out"), topic)) >= count and lines,
                    what=f"{count} lines in {topic}")


def not_said_wrongly(said: str) -> None:
    for wrong in ("is gone", "rotated away", "was rotated", "could not be shipped"):
        assert wrong not in said, (wrong, said)


def two_files(h: Harness) -> tuple[Endpoints, Path, Path, Path]:
    """Endpoints, the logs directory and a.log and b.log in it, 100 lines each."""
    ep = h.endpoints()
    logs = h.path("logs")
    a, b = logs / "a.log", logs / "b.log"
    append_lines(a, make_lines("a", 0, 100))
    append_lines(b, make_lines("b", 0, 100))
    return ep, logs, a, b


def two_sources_shipped_then_stopped(h: Harness) -> tuple[Endpoints, Proc, Path, Path, list[dict[str, Any]]]:
    """a.log (topic app) and b.log (topic other), 100 lines each, shipped and acknowledged by an
    agent run from the config file, which is then stopped; its sources are ``both``."""
    ep = h.endpoints()
    a, b = h.path("logs", "a.log"), h.path("logs", "b.log")
    append_lines(a, make_lines("a", 0, 100))
    append_lines(b, make_lines("b", 0, 100))
    both = [{"paths": [str(a)], "topic": "app"}, {"paths": [str(b)], "topic": "other"}]
    h.aggregator(ep)
    write_conf(h, ep, both)
    agent = start_agent(h)
    settle(h, "app", 100)
    settle(h, "other", 100)
    wait_for(h.all_acknowledged, what="every line acknowledged")
    assert agent.stop() == 0
    return ep, agent, a, b, both


def test_glob_narrowed_by_a_reload_lets_the_file_go_and_widened_again_resumes_it(h: Harness) -> None:
    ep, logs, a, b = two_files(h)
    h.aggregator(ep)
    write_conf(h, ep, [{"paths": [f"{logs}/*.log"], "topic": "app"}])
    agent = start_agent(h)
    settle(h, "app", 200)
    wait_for(h.all_acknowledged, what="every line acknowledged")
    write_conf(h, ep, [{"paths": [str(a)], "topic": "app"}])
    reload(agent)
    size = b.stat().st_size
    text = (f"INFO fleetlog.agent: {b} (topic app) is no longer followed: no source matches it after the "
            f"reload; it was read to its end ({size} bytes); where it was left is kept while the file "
            "is there")
    wait_for(lambda: text in agent.log(), what="the file let go, said")
    append_lines(b, make_lines("b", 100, 50))  # not followed: not shipped, until it is again
    append_lines(a, make_lines("a", 100, 50))
    settle(h, "app", 250)
    status = wait_for(lambda: (s := h.agent_status()) and s["unfollowed"] and s, what="status")
    [unfollowed] = status["unfollowed"]
    assert unfollowed == {"path": str(b), "topic": "app", "stream": unfollowed["stream"], "offset": size,
                          "size": b.stat().st_size}
    assert [f["path"] for f in status["files"]] == [str(a)]
    # A restart with the same sources keeps where it was left, and does not say it again.
    assert agent.stop() == 0
    agent = start_agent(h)
    wait_for(lambda: "ready" in agent.log(), what="the agent's restart")
    append_lines(a, make_lines("a", 150, 10))
    settle(h, "app", 260)
    assert "no longer followed" not in agent.log() and "is gone" not in agent.log()
    # The glob widened again: b.log goes on from where it was left, its first 100 lines not again.
    write_conf(h, ep, [{"paths": [f"{logs}/*.log"], "topic": "app"}])
    reload(agent)
    wait_for(lambda: f"{b} is followed again (topic app; a source matches it): from offset {size}, where "
             "it was left" in agent.log(), what="b.log followed again, said")
    settle(h, "app", 310)
    wait_for(h.all_acknowledged, what="every line acknowledged")
    h.assert_quiet(ep)
    check_exactly_once(h.lines(), {"a": 160, "b": 150})
    not_said_wrongly("".join(p.log() for p in h.procs if p.name.startswith("agent-")))


def test_source_removed_while_the_agent_was_down_says_what_is_left_and_resumes_when_added_back(
        h: Harness) -> None:
    ep, agent, a, b, both = two_sources_shipped_then_stopped(h)
    acked = b.stat().st_size
    append_lines(b, make_lines("b", 100, 50))  # written while the agent was down
    size = b.stat().st_size
    write_conf(h, ep, both[:1])
    agent = start_agent(h)
    text = (f"WARNING fleetlog.agent: {b} (topic other) is no longer followed: no source matches it "
            f"since the last run; {size - acked} bytes after offset {acked} ({acked} to {size} of {size} "
            "bytes) are not shipped; where it was left is kept while the file is there: a source that "
            "matches it again ships what was not acknowledged")
    wait_for(lambda: text in agent.log(), what="what is left, said")
    append_lines(a, make_lines("a", 100, 20))
    settle(h, "app", 120)
    # Said once: the next restart knows the file was let go on purpose.
    assert agent.stop() == 0
    agent = start_agent(h)
    wait_for(lambda: "ready" in agent.log(), what="the agent's restart")
    wait_for(lambda: (s := h.agent_status()) and [u["path"] for u in s["unfollowed"]] == [str(b)],
             what="b.log unfollowed in status")
    assert "no longer followed" not in agent.log()
    # Added back: the 50 lines written while it was let go are shipped, and nothing twice.
    write_conf(h, ep, both)
    reload(agent)
    wait_for(lambda: f"{b} is followed again (topic other; a source matches it): from offset {acked}"
             in agent.log(), what="b.log followed again, said")
    settle(h, "other", 150)
    wait_for(h.all_acknowledged, what="every line acknowledged")
    h.assert_quiet(ep)
    check_exactly_once(h.lines("app"), {"a": 120})
    check_exactly_once(h.lines("other"), {"b": 150})
    not_said_wrongly("".join(p.log() for p in h.procs if p.name.startswith("agent-")))


def test_topic_changed_by_a_reload_or_a_restart_ships_the_new_lines_to_the_new_topic(h: Harness) -> None:
    ep = h.endpoints()
    log = h.path("logs", "app.log")
    append_lines(log, make_lines("a", 0, 100))
    h.aggregator(ep)
    write_conf(h, ep, [{"paths": [str(log)], "topic": "app"}])
    agent = start_agent(h)
    settle(h, "app", 100)
    wait_for(h.all_acknowledged, what="every line acknowledged")
    offset = log.stat().st_size
    write_conf(h, ep, [{"paths": [str(log)], "topic": "moved"}])
    reload(agent)
    wait_for(lambda: f"{log}: now in topic moved (was app; the sources changed), from offset {offset} on"
             in agent.log(), what="the new topic, said")
    append_lines(log, make_lines("c", 0, 50))
    settle(h, "moved", 50)
    wait_for(h.all_acknowledged, what="every line acknowledged")
    # And across a restart.
    assert agent.stop() == 0
    offset = log.stat().st_size
    write_conf(h, ep, [{"paths": [str(log)], "topic": "third"}])
    append_lines(log, make_lines("d", 0, 30))
    agent = start_agent(h)
    wait_for(lambda: f"{log}: now in topic third (was moved in the last run; the sources changed), from "
             f"offset {offset} on" in agent.log(), what="the new topic at restart, said")
    settle(h, "third", 30)
    wait_for(h.all_acknowledged, what="every line acknowledged")
    h.assert_quiet(ep)
    check_exactly_once(h.lines("app"), {"a": 100})
    check_exactly_once(h.lines("moved"), {"c": 50})
    check_exactly_once(h.lines("third"), {"d": 30})
    not_said_wrongly("".join(p.log() for p in h.procs if p.name.startswith("agent-")))


def test_file_let_go_by_a_reload_while_the_aggregator_is_down_counts_what_is_left(h: Harness) -> None:
    ep, logs, a, b = two_files(h)
    small = "max_inflight_bytes = 65536\nbatch_max_bytes = 16384"
    agg = h.aggregator(ep)
    write_conf(h, ep, [{"paths": [f"{logs}/*.log"], "topic": "app"}], small)
    agent = start_agent(h)
    settle(h, "app", 200)
    wait_for(h.all_acknowledged, what="every line acknowledged")
    assert agg.stop() == 0
    append_lines(b, make_lines("b", 100, 3000))  # 210 KB: more than the agent may have in flight
    wait_for(lambda: (s := h.agent_status()) and s["inflight_bytes"] > 0, what="b.log's new lines in flight")
    size = b.stat().st_size
    write_conf(h, ep, [{"paths": [str(a)], "topic": "app"}], small)
    reload(agent)
    said = wait_for(lambda: re.search(
        rf"WARNING fleetlog.agent: {re.escape(str(b))} \(topic app\) is no longer followed: no source "
        rf"matches it after the reload; (\d+) bytes after offset (\d+) \((\d+) to {size} of {size} bytes\) "
        rf"are not shipped, (\d+) bytes before them wait for the aggregator's acknowledgement; where it was "
        rf"left is kept while the file is there: a source that matches it again ships what was not "
        rf"acknowledged",
        agent.log()), what="what is left, said")
    left, read_to, _, inflight = map(int, said.groups())
    assert left == size - read_to and left > 0 and inflight > 0
    h.aggregator(ep)
    append_lines(a, make_lines("a", 100, 10))
    wait_for(h.all_acknowledged, what="a.log's new lines acknowledged by the aggregator come back")
    # Added back: what was in flight is not shipped twice (acknowledged by the aggregator that
    # came back, or shipped again from where it was left), the rest is shipped.
    write_conf(h, ep, [{"paths": [f"{logs}/*.log"], "topic": "app"}], small)
    reload(agent)
    wait_for(lambda: f"{b} is followed again" in agent.log(), what="b.log followed again")
    wait_for(lambda: len(h.lines()) >= 3210, what="every line")
    wait_for(h.all_acknowledged, what="every line acknowledged")
    h.assert_quiet(ep)
    check_exactly_once(h.lines(), {"a": 110, "b": 3100})
    not_said_wrongly(agent.log())


def test_file_let_go_then_truncated_or_rotated_is_forgotten_not_finished(h: Harness) -> None:
    ep = h.endpoints()
    logs = h.path("logs")
    a, b, c = logs / "a.log", logs / "b.log", logs / "c.log"
    for path, tag in ((a, "a"), (b, "b"), (c, "c")):
        append_lines(path, make_lines(tag, 0, 100))
    h.aggregator(ep)
    write_conf(h, ep, [{"paths": [f"{logs}/*.log"], "topic": "app"}])
    agent = start_agent(h)
    settle(h, "app", 300)
    wait_for(h.all_acknowledged, what="every line acknowledged")
    offset = b.stat().st_size
    write_conf(h, ep, [{"paths": [str(a)], "topic": "app"}])
    reload(agent)
    wait_for(lambda: agent.log().count("is no longer followed") == 2, what="b.log and c.log let go")
    # Truncated while let go: another content, nothing to resume.
    b.write_bytes(b"")
    append_lines(b, make_lines("b2", 0, 10))
    wait_for(lambda: f"{b} (no longer followed) is truncated: forgetting where it was left ({offset})"
             in agent.log(), what="b.log's checkpoint forgotten")
    # Rotated away while the agent is down: not finished as a rotated file of topic app.
    append_lines(c, make_lines("c", 100, 50))
    assert agent.stop() == 0
    c.rename(logs / "c.log.1")
    agent = start_agent(h)
    wait_for(lambda: f"{c} (no longer followed) is gone, renamed or truncated: forgetting where it was left "
             f"({offset})" in agent.log(), what="c.log's checkpoint forgotten")
    append_lines(a, make_lines("a", 100, 10))
    settle(h, "app", 310)
    wait_for(h.all_acknowledged, what="every line acknowledged")
    status = h.agent_status()
    assert status is not None and status["unfollowed"] == []
    h.assert_quiet(ep)
    check_exactly_once(h.lines(), {"a": 110, "b": 100, "c": 100})
    assert "finishing" not in agent.log()


def test_source_removed_and_its_file_truncated_while_the_agent_was_down_is_said_so(h: Harness) -> None:
    ep, agent, a, b, both = two_sources_shipped_then_stopped(h)
    b.write_bytes(b"")  # truncated while the agent was down, then the source removed
    append_lines(b, make_lines("b2", 0, 10))
    write_conf(h, ep, both[:1])
    agent = start_agent(h)
    wait_for(lambda: f"INFO fleetlog.agent: {b} (topic other) is no longer followed: no source matches it "
             "since the last run; its content changed since (truncated or written again), so where it was "
             "left is not kept" in agent.log(), what="the file let go, said")
    append_lines(a, make_lines("a", 100, 10))
    settle(h, "app", 110)
    wait_for(h.all_acknowledged, what="every line acknowledged")
    status = h.agent_status()
    assert status is not None and status["unfollowed"] == []
    h.assert_quiet(ep)
    check_exactly_once(h.lines("app"), {"a": 110})
    check_exactly_once(h.lines("other"), {"b": 100})
    not_said_wrongly(agent.log())
