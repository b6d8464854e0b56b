"""Exactly once, in order, across crashes, restarts and outages of either side."""

from __future__ import annotations

import random
import signal
import time

import pytest
from harness import Harness, Writer, check_exactly_once, count_lines, output_lines, wait_for


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


@pytest.mark.parametrize("mode", ["push", "pub"])
def test_agent_killed_mid_stream(h: Harness, mode: str) -> None:
    ep = h.endpoints()
    h.aggregator(ep)
    writer = start_writer(h)
    agent = h.agent(ep, sources(h), mode=mode)
    for _ in range(3):
        wait_for(lambda: count_lines(h.path("out", "app", "app.log")) > 0, what="first lines")
        time.sleep(0.3)
        agent.kill9()
        time.sleep(0.2)
        agent = h.agent(ep, sources(h), mode=mode)
    finish(h, writer)


@pytest.mark.parametrize("mode", ["push", "pub"])
def test_aggregator_killed_mid_stream(h: Harness, mode: str) -> None:
    ep = h.endpoints()
    agg = h.aggregator(ep)
    writer = start_writer(h)
    h.agent(ep, sources(h), mode=mode)
    for _ in range(3):
        wait_for(lambda: count_lines(h.path("out", "app", "app.log")) > 0, what="first lines")
        time.sleep(0.3)
        agg.kill9()
        time.sleep(0.3)
        agg = h.aggregator(ep)
    finish(h, writer)


def test_aggregator_down_when_the_agent_starts(h: Harness) -> None:
    ep = h.endpoints()
    writer = start_writer(h, limit=3000)
    h.agent(ep, sources(h))
    time.sleep(1.5)
    assert count_lines(h.path("out", "app", "app.log")) == 0
    h.aggregator(ep)
    finish(h, writer)


@pytest.mark.parametrize("victim", ["agent", "aggregator"])
def test_sigterm_mid_stream(h: Harness, victim: str) -> None:
    ep = h.endpoints()
    procs = {"aggregator": h.aggregator(ep)}
    writer = start_writer(h)
    procs["agent"] = h.agent(ep, sources(h))
    for _ in range(2):
        wait_for(lambda: count_lines(h.path("out", "app", "app.log")) > 0, what="first lines")
        time.sleep(0.3)
        assert procs[victim].stop(signal.SIGTERM) == 0
        procs[victim] = h.aggregator(ep) if victim == "aggregator" else h.agent(ep, sources(h))
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
    finish(h, writer, timeout=120)
    assert writer.total == 200_000
