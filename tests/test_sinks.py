"""The same exactly-once properties for every sink: the files an aggregator writes itself, and a
JetStream stream (a real nats-server). One scenario, run once per sink, so a third sink is written
against tests that already exist.

Real agents and aggregators. Each scenario ends with the lines the sink holds: every line written
to the agents' files exactly once and in its file's order (for JetStream also each subject's
messages contiguous), once every agent has every line acknowledged; the harness then checks the
daemons are quiet again.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass

import orjson
import pytest
from harness import Harness, Writer, check_exactly_once, output_lines, wait_for
from natsserver import jetstream_sets, stream_lines


@dataclass
class SinkUnderTest:
    name: str
    sets: list[str]  # the aggregator's --set items that choose the sink
    lines: Callable[[], list[str]]  # what the sink holds, in order


@pytest.fixture(params=["files", "jetstream"])
def sink(request: pytest.FixtureRequest, h: Harness) -> SinkUnderTest:
    if request.param == "files":
        return SinkUnderTest("files", [], lambda: output_lines(h.path("out"), "app"))
    servers = request.getfixturevalue("nats").single()
    return SinkUnderTest("jetstream", jetstream_sets(servers), lambda: stream_lines(servers.urls))


def start_writer(h: Harness, n_files: int = 3) -> Writer:
    h.path("logs").mkdir(exist_ok=True)
    return Writer({f"w{i}": h.path("logs", f"w{i}.log") for i in range(n_files)}).start()


def sources(h: Harness) -> list[dict[str, object]]:
    return [{"paths": [f"{h.path('logs')}/*.log"], "topic": "app"}]


def accepted(h: Harness, ep: object) -> int:
    return int(h.status(ep)["totals"]["lines_written"])  # type: ignore[arg-type]


def finish(h: Harness, writer: Writer, sink: SinkUnderTest, timeout: float = 90) -> None:
    """Stop writing; once the agent has every line acknowledged, the sink holds each once."""
    counts = writer.stop()
    wait_for(lambda: h.all_acknowledged(), timeout=timeout, what="every line acknowledged")
    check_exactly_once(sink.lines(), counts)


@pytest.mark.parametrize("mode", ["push", "pub"])
def test_agent_killed_mid_stream_sends_again_and_the_sink_has_each_line_once(
        h: Harness, sink: SinkUnderTest, mode: str) -> None:
    ep = h.endpoints()
    h.aggregator(ep, *sink.sets)
    writer = start_writer(h)
    agent = h.agent(ep, sources(h), mode=mode)
    for _ in range(3):
        before = accepted(h, ep)
        wait_for(lambda b=before: accepted(h, ep) > b + 50, what="lines flowing")  # type: ignore[misc]
        agent.kill9()
        agent = h.agent(ep, sources(h), mode=mode)
    finish(h, writer, sink)


@pytest.mark.parametrize("mode", ["push", "pub"])
def test_aggregator_killed_mid_stream_recovers_and_the_sink_has_each_line_once(
        h: Harness, sink: SinkUnderTest, mode: str) -> None:
    ep = h.endpoints()
    agg = h.aggregator(ep, *sink.sets)
    writer = start_writer(h)
    h.agent(ep, sources(h), mode=mode)
    for _ in range(3):
        wait_for(lambda: accepted(h, ep) > 50, what="lines accepted")
        agg.kill9()
        agg = h.aggregator(ep, *sink.sets)
    finish(h, writer, sink)


@pytest.mark.parametrize("victim", ["agent", "aggregator"])
def test_sigterm_of_either_side_mid_stream_loses_and_doubles_nothing(
        h: Harness, sink: SinkUnderTest, victim: str) -> None:
    ep = h.endpoints()
    procs = {"aggregator": h.aggregator(ep, *sink.sets)}
    writer = start_writer(h)
    procs["agent"] = h.agent(ep, sources(h))
    for _ in range(2):
        wait_for(lambda: accepted(h, ep) > 50, what="lines accepted")
        assert procs[victim].stop(signal.SIGTERM) == 0
        procs[victim] = h.aggregator(ep, *sink.sets) if victim == "aggregator" else h.agent(ep, sources(h))
        # Up (its signal handlers in place) before the next SIGTERM.
        wait_for(lambda: h.status(ep) if victim == "aggregator" else h.agent_status(), what=f"{victim} up")
    finish(h, writer, sink)


def test_agent_sending_again_from_an_old_checkpoint_after_both_crashed_doubles_nothing(
        h: Harness, sink: SinkUnderTest) -> None:
    """The overlap case: the agent's checkpoint is far behind what the sink holds (saved once a
    minute here) and both sides are killed -9: the aggregator that starts afresh must know what
    the sink holds (the files sink from its journal, the JetStream one from each subject's last
    message), so that the agent goes on from there and nothing after its old checkpoint is in
    twice."""
    ep = h.endpoints()
    agg = h.aggregator(ep, *sink.sets)
    writer = start_writer(h)
    extra = ("agent.checkpoint_interval_ms=60000",)
    agent = h.agent(ep, sources(h), *extra)
    wait_for(lambda: (s := h.agent_status()) is not None and sum(f["offset"] for f in s["files"]) > 20_000,
             what="lines acknowledged")
    status = h.agent_status()
    assert status is not None
    assert agent.state_dir is not None
    saved = orjson.loads((agent.state_dir / "checkpoints.json").read_bytes())["files"]
    acked = {f["stream"]: f["offset"] for f in status["files"]}
    assert any(cp["acked"] < acked.get(cp["stream"], 0) for cp in saved), (saved, acked)
    agent.kill9()
    agg.kill9()
    h.aggregator(ep, *sink.sets)
    h.agent(ep, sources(h), *extra)
    finish(h, writer, sink)
