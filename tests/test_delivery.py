"""Exactly once, in order, across crashes, restarts and outages of either side (the scenarios
every sink must pass are in test_sinks.py, run once per sink)."""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from harness import (
    Harness,
    Writer,
    append_lines,
    check_exactly_once,
    count_lines,
    make_lines,
    output_lines,
    wait_for,
)

from aggregator.config import Config, parse
from aggregator.daemon import AgentInfo, Aggregator
from fleetlog import wire


def start_writer(h: Harness, n_files: int = 3, **kw: object) -> Writer:
    paths = {f"w{i}": h.path("logs", f"w{i}.log") for i in range(n_files)}
    return Writer(paths, **kw).start()  # type: ignore[arg-type]


def finish(h: Harness, writer: Writer, topic: str = "app", timeout: float = 60) -> None:
    counts = writer.stop()
    total = sum(counts.values())
    out = h.path("out", topic, f"{topic}.log")
    try:
        wait_for(lambda: count_lines(out) >= total, timeout=timeout, what=f"{total} lines in the output")
    finally:
        lines = output_lines(h.path("out"), topic)
    time.sleep(0.5)  # anything doubled would arrive now
    check_exactly_once(output_lines(h.path("out"), topic), counts)
    del lines


SOURCES = None


def sources(h: Harness) -> list[dict[str, object]]:
    return [{"paths": [f"{h.path('logs')}/*.log"], "topic": "app"}]


def test_aggregator_down_when_the_agent_starts(h: Harness) -> None:
    ep = h.endpoints()
    writer = start_writer(h, limit=3000)
    h.agent(ep, sources(h))
    time.sleep(1.5)
    assert count_lines(h.path("out", "app", "app.log")) == 0
    h.aggregator(ep)
    finish(h, writer)


@pytest.mark.parametrize("mode", ["push", "pub"])
def test_soak_random_kills_of_either_side(h: Harness, mode: str) -> None:
    """20 kill -9s of agent or aggregator at random moments during a 200,000 line stream."""
    rng = random.Random(20)
    ep = h.endpoints()
    procs = {"aggregator": h.aggregator(ep)}
    writer = start_writer(h, n_files=4, lines_per_tick=100, tick_s=0.004, limit=50_000)
    procs["agent"] = h.agent(ep, sources(h), mode=mode)
    for _ in range(20):
        time.sleep(rng.uniform(0.1, 0.6))
        victim = rng.choice(["agent", "aggregator"])
        procs[victim].kill9()
        procs[victim] = h.aggregator(ep) if victim == "aggregator" else h.agent(ep, sources(h), mode=mode)
    # On a loaded machine the writer may still be writing after the 20 kills: let it finish.
    wait_for(lambda: writer.total >= 200_000, timeout=120, what="the writer's 200,000 lines written")
    finish(h, writer, timeout=120)
    assert writer.total == 200_000


def test_agents_catching_up_share_the_aggregators_window(h: Harness) -> None:
    """Two agents with backlogs share window_budget_bytes: each may have half in flight, so the
    aggregator's receive queues stay bounded however many agents reconnect at once."""
    ep = h.endpoints()
    mib = 1024 * 1024
    # Commits (and so acks) at the latest every 2 s, early once an agent has half its window
    # uncommitted: both agents stay behind for a while, a window at a time.
    agg = h.aggregator(ep, f"aggregator.window_budget_bytes={2 * mib}", "aggregator.commit_interval_ms=2000",
                       f"aggregator.commit_max_bytes={1 << 30}")
    counts = {}
    paths = {}
    for name in ("a", "b"):
        path = paths[name] = h.path(f"logs-{name}", "big.log")
        path.parent.mkdir()
        append_lines(path, make_lines(name, 0, 1))
        h.agent(ep, [{"paths": [str(path)], "topic": "app"}], "agent.ack_timeout_ms=10000",
                "agent.batch_max_bytes=131072", name=name)
    # Both connected before their backlogs come, so that they catch up at the same time (under
    # load the second agent started 0.8 s after the first, which had caught up 0.9 s later).
    wait_for(lambda: all((s := h.agent_status(n)) is not None and s["lines_shipped"] == 1 for n in paths),
             what="both agents shipping")
    # A commit comes once an agent has half its window uncommitted: 30 MiB were caught up in
    # under a second, too soon to look at. Every fdatasync of the aggregator made 50 ms slower
    # (strace's fault injection) keeps them catching up for seconds.
    slow = None
    if shutil.which("strace") is not None:
        slow = subprocess.Popen(["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=fdatasync",
                                 "-e", "inject=fdatasync:delay_enter=50000", "-p", str(agg.pid)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for name, path in paths.items():
            lines = make_lines(name, 1, 200_000, width=150)  # about 30 MiB each
            append_lines(path, lines)
            counts[name] = 1 + len(lines)
        # The aggregator's sum of the windows it granted follows at its next ack or tick (under
        # load the status was once read in between: 3 MiB, a's old 2 MiB and b's new 1 MiB). The
        # status text says all of it (budget, share, agents, granted) in one read.
        said = "catching up: 2 agents, a share of 1.0MiB each (2.0MiB granted of 2.0MiB)"
        wait_for(lambda: said in h.ctl(ep, "status").stdout, timeout=30,
                 what="the aggregator granting 2 x 1 MiB of its 2 MiB")
        assert {a["name"]: a["window_bytes"] for a in h.status(ep)["agents"]} == {"a": mib, "b": mib}

        def shared() -> bool:
            statuses = [h.agent_status(n) for n in ("a", "b")]
            return all(s is not None and s["window_bytes"] == mib and s["inflight_bytes"] <= mib + 131072
                       for s in statuses)
        wait_for(shared, timeout=30, what="both agents at half the budget, within their windows")
    finally:
        if slow is not None:
            slow.terminate()
            slow.wait(timeout=10)
    out = h.path("out", "app", "app.log")
    total = sum(counts.values())
    wait_for(lambda: count_lines(out) >= total, timeout=120, what=f"{total} lines in the output")
    check_exactly_once(output_lines(h.path("out"), "app"), counts)


def test_without_a_budget_agents_keep_their_own_window(h: Harness) -> None:
    ep = h.endpoints()
    h.aggregator(ep, "aggregator.window_budget_bytes=0")
    h.agent(ep, sources(h), "agent.max_inflight_bytes=3000000")
    wait_for(lambda: (s := h.agent_status()) is not None and s["aggregator"] is not None,
             what="the agent connected")
    assert h.agent_status()["window_bytes"] == 3_000_000  # type: ignore[index]
    assert h.status(ep)["flow"]["agent_window_bytes"] is None


def test_windows_granted_stay_within_the_budget_as_agents_arrive(tmp_path: Path) -> None:
    """The grant bookkeeping, in-process: agents catching up arrive one by one, each acked
    after every arrival. A window grows only into what the others leave, so the sum stays
    within the budget (plus the least window for an agent that found none left), and all
    converge on equal shares."""
    mib = wire.MIN_WINDOW
    cfg = parse({"aggregator": {"output_dir": str(tmp_path / "out"), "state_dir": str(tmp_path / "st"),
                                "window_budget_bytes": 64 * mib}}, "<test>").aggregator
    agg = Aggregator(Config(aggregator=cfg))
    arrived: list[AgentInfo] = []
    for i in range(8):
        info = agg.agents[f"a{i}"] = AgentInfo(f"a{i}", connected=True, lag_bytes=500 * mib,
                                              max_window=32 * mib)
        agg.catching_up += 1
        agg.share_window()
        arrived.insert(0, info)  # its hello reply first, then the acks of those there before
        for a in arrived:
            agg.grant(a)
            assert agg.granted == sum(x.window for x in arrived)
            assert agg.granted <= 64 * mib + len(arrived) * mib
    assert max(a.window for a in arrived) <= 32 * mib  # never beyond what an agent said it takes
    for a in arrived:
        agg.grant(a)
    assert [a.window for a in arrived] == [8 * mib] * 8
    arrived[0].lag_bytes = 0  # caught up: the least is enough
    assert agg.grant(arrived[0]) == mib


def test_a_quiet_agent_with_a_sudden_backlog_is_granted_a_share_at_once(h: Harness) -> None:
    """A quiet agent is granted the least window. When a burst fills it, the agent says so
    with a heartbeat of its own instead of waiting for the next beat (a minute here), and the
    reply grants it its share."""
    ep = h.endpoints()
    mib = wire.MIN_WINDOW
    h.aggregator(ep, "aggregator.commit_interval_ms=2000", f"aggregator.commit_max_bytes={1 << 30}")
    log = h.path("logs", "burst.log")
    append_lines(log, make_lines("q", 0, 10))
    h.agent(ep, [{"paths": [str(log)], "topic": "app"}], "agent.heartbeat_interval_ms=60000",
            "agent.ack_timeout_ms=600000")
    wait_for(lambda: (s := h.agent_status()) is not None and s["aggregator"] is not None
             and s["window_bytes"] == mib and s["lag_bytes"] == 0, what="a quiet agent at the least window")
    append_lines(log, make_lines("q", 10, 60_000, width=150))  # about 9 MiB at once
    wait_for(lambda: (s := h.agent_status()) is not None and s["window_bytes"] == 32 * mib,
             what="the agent granted its share (its own 32 MiB, under the 64 MiB budget)")
    out = h.path("out", "app", "app.log")
    wait_for(lambda: count_lines(out) >= 60_010, timeout=60, what="every line")
    check_exactly_once(output_lines(h.path("out"), "app"), {"q": 60_010})
