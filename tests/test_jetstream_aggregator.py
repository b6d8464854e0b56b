"""Aggregators with ``sink = "jetstream"``: real agents, real aggregators, real nats-server.

Each scenario ends by reading the whole stream back: every line written to the agents' files is
in it exactly once and in its file's order, each (agent, stream) subject's messages contiguous
(every Fleetlog-Start the previous Fleetlog-End), and the daemons quiet again.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import time
import urllib.request

from harness import (
    Harness,
    Writer,
    append_lines,
    check_exactly_once,
    free_port,
    make_lines,
    output_lines,
    wait_for,
)
from natsserver import STREAM, jetstream_sets, set_stream_max_bytes, stream_lines
from prometheus_client.parser import text_string_to_metric_families

from agent.config import AggregatorEndpoints
from agent.failover import rank
from aggregator.metrics import JETSTREAM_COUNTERS


def start_writer(h: Harness) -> Writer:
    paths = {tag: h.path("logs", f"{tag}.log") for tag in ("a", "b")}
    h.path("logs").mkdir(exist_ok=True)
    return Writer(paths, lines_per_tick=20, tick_s=0.01).start()


def sources(h: Harness) -> list[dict[str, object]]:
    return [{"paths": [f"{h.path('logs')}/*.log"], "topic": "app"}]


def finish(h: Harness, writer: Writer, urls: list[str], *names: str, timeout: float = 90) -> None:
    """Stop writing, wait until every agent has every line acknowledged, check the stream."""
    counts = writer.stop()
    for name in names or ("node1",):
        wait_for(lambda name=name: h.all_acknowledged(name), timeout=timeout,  # type: ignore[misc]
                 what=f"{name}: every line acknowledged")
    check_exactly_once(stream_lines(urls), counts)


def test_agent_moving_to_a_second_aggregator_on_the_same_stream_doubles_nothing(h: Harness, nats) -> None:
    """Aggregator A dies with batches published but not acknowledged; the agent resends them to
    B, which has never seen the stream: the subject's precondition and last message tell B what
    is in already, so nothing is published twice and nothing is skipped."""
    servers = nats.single()
    ep_a, ep_b = h.endpoints(tcp=True), h.endpoints(tcp=True)
    agg_a = h.aggregator(ep_a, *jetstream_sets(servers), state="agg-a")
    h.aggregator(ep_b, *jetstream_sets(servers), state="agg-b")
    writer = start_writer(h)
    agent = h.agent(ep_a, sources(h))
    wait_for(lambda: h.status(ep_a)["totals"]["lines_written"] > 200, what="lines through A")
    agg_a.kill9()
    agent.kill9()
    h.agent(ep_b, sources(h))  # the same agent (same state_dir), now pointed at B
    finish(h, writer, servers.urls)
    h.assert_quiet(ep_b)


def test_nats_down_stops_acknowledging_then_everything_arrives_once(h: Harness, nats) -> None:
    servers = nats.single()
    ep = h.endpoints()
    h.aggregator(ep, *jetstream_sets(servers))
    writer = start_writer(h)
    h.agent(ep, sources(h))
    wait_for(lambda: h.status(ep)["totals"]["lines_written"] > 100, what="lines accepted")
    servers.kill(0)
    wait_for(lambda: h.status(ep)["state_error"] is not None, timeout=30, what="the aggregator says so")
    shown = h.ctl(ep, "status").stdout
    assert "sink JetStream stream FLEETLOG (R1) via NOT CONNECTED" in shown, shown
    assert "!! cannot publish, nothing is being acknowledged" in shown, shown
    acked = h.agent_status()["lines_shipped"] if h.agent_status() else 0
    time.sleep(1.0)  # lines keep being written; none may be acknowledged while NATS is down
    status = h.agent_status()
    assert status is not None and status["lines_shipped"] == acked
    servers.restart(0)
    wait_for(lambda: h.status(ep)["state_error"] is None, timeout=60, what="commits work again")
    assert h.status(ep)["jetstream"]["reconnects"] >= 1
    finish(h, writer, servers.urls)
    h.assert_quiet(ep)


def test_stream_leader_killed_mid_stream_publishing_resumes_and_doubles_nothing(h: Harness, nats) -> None:
    servers = nats.cluster(3)
    ep = h.endpoints()
    h.aggregator(ep, *jetstream_sets(servers, replicas=3))
    writer = start_writer(h)
    h.agent(ep, sources(h))
    wait_for(lambda: h.status(ep)["totals"]["lines_written"] > 200, timeout=30, what="lines accepted")
    leader = servers.stream_leader(STREAM)
    servers.kill(leader)
    written = h.status(ep)["totals"]["lines_written"]
    wait_for(lambda: h.status(ep)["totals"]["lines_written"] > written + 200, timeout=45,
             what="publishing resumed after the election")
    servers.restart(leader)
    finish(h, writer, servers.urls, timeout=120)
    h.assert_quiet(ep)



def test_agents_fail_over_between_two_aggregators_and_the_writer_has_each_line_once(h: Harness, nats) -> None:
    """The whole scale-out path: agents configured with two aggregators on one stream; the one
    two of them use is killed -9 mid-stream and they fail over to the other; the writer is killed
    too: its topic file holds every line once and in its file's order."""
    servers = nats.single()
    ep_a, ep_b = h.endpoints(tcp=True), h.endpoints(tcp=True)
    agg_a = h.aggregator(ep_a, *jetstream_sets(servers), state="agg-a")
    h.aggregator(ep_b, *jetstream_sets(servers), state="agg-b")
    # Both answering before the agents start: under load A was not up yet, the agents failed
    # over to B at once, and no line went through A.
    h.status(ep_a)
    h.status(ep_b)
    writer_proc = h.writer(servers.urls)
    listed = (AggregatorEndpoints(ep_a.pull, ep_a.control), AggregatorEndpoints(ep_b.pull, ep_b.control))
    names = [n for n in (f"web-{i:02d}" for i in range(100))
             if rank(n, listed)[0].control == ep_a.control][:2]
    logs = {f"{n}-{i}": h.path("logs", f"{n}-{i}.log") for n in names for i in range(2)}
    h.path("logs").mkdir(exist_ok=True)
    writer = Writer(logs, lines_per_tick=20, tick_s=0.01).start()
    for n in names:
        h.agent(ep_a, [{"paths": [str(h.path("logs", f"{n}-*.log"))], "topic": "app"}],
                "agent.heartbeat_interval_ms=300", name=n, also=[ep_b])
    wait_for(lambda: h.status(ep_a)["totals"]["lines_written"] > 400, what="lines through A")
    agg_a.kill9()
    wait_for(lambda: h.status(ep_b)["totals"]["lines_written"] > 400, timeout=30, what="the agents on B")
    writer_proc.kill9()
    writer_proc = h.writer(servers.urls)
    counts = writer.stop()
    for name in names:
        wait_for(lambda name=name: h.all_acknowledged(name), timeout=90,  # type: ignore[misc]
                 what=f"{name}: every line acknowledged")
    total = sum(counts.values())
    wait_for(lambda: len(output_lines(h.path("wout"), "app")) >= total, timeout=60,
             what="every line in the writer's file")
    check_exactly_once(output_lines(h.path("wout"), "app"), counts)
    h.assert_quiet(ep_b)


def test_an_agent_back_at_its_first_aggregator_goes_on_where_it_stands(h: Harness, nats) -> None:
    """An agent ships through A, moves to B (A stopped), ships more, and comes back to A (B
    stopped). A's view of the stream is from before the move: asking the agent to resend from
    there, below what B acknowledged, made the agent begin its stream again at its acknowledged
    offset, so that if the stream later lost those bytes (an R1 server's unsynced tail), the
    agent could no longer send them although its file had them (a review lost 11,446 lines so).
    A takes the agent where it stands and checks the subject instead: no stream is rebased."""
    servers = nats.single()
    ep_a, ep_b = h.endpoints(tcp=True), h.endpoints(tcp=True)
    agg_a = h.aggregator(ep_a, *jetstream_sets(servers), state="agg-a")
    agg_b = h.aggregator(ep_b, *jetstream_sets(servers), state="agg-b")
    h.status(ep_a)
    h.status(ep_b)
    listed = (AggregatorEndpoints(ep_a.pull, ep_a.control), AggregatorEndpoints(ep_b.pull, ep_b.control))
    name = next(n for n in (f"web-{i:02d}" for i in range(100)) if rank(n, listed)[0].control == ep_a.control)
    writer = start_writer(h)
    h.agent(ep_a, sources(h), "agent.heartbeat_interval_ms=300", name=name, also=[ep_b])

    def written(ep: object) -> int:
        return int(h.status(ep)["totals"]["lines_written"])  # type: ignore[arg-type]

    wait_for(lambda: written(ep_a) > 200, what="lines through A")
    os.kill(agg_a.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: written(ep_b) > 200, timeout=60, what="the agent on B")
    finally:
        os.kill(agg_a.pid, signal.SIGCONT)
    through_a = written(ep_a)
    os.kill(agg_b.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: written(ep_a) > through_a + 200, timeout=60, what="the agent back on A")
        status = h.agent_status(name)
        assert status is not None and status["rebased_streams"] == 0, \
            "A asked the agent to resend from before what B had acknowledged"
    finally:
        os.kill(agg_b.pid, signal.SIGCONT)
    finish(h, writer, servers.urls, name)


def test_agents_wait_for_a_full_stream_instead_of_moving_between_its_aggregators(h: Harness, nats) -> None:
    """Two aggregators on one stream that is full: neither commits anything, and both say so
    in their heartbeat replies. An agent that moved every two ack timeouts (3 s here) sent its
    whole window again to the other one each time, which waited for the same stream (a review:
    24 moves in 39 s), and resent it to each at every ack timeout; it waits now, sends nothing
    again (its aggregator asks for what it refused once it can take it) and says why in its
    status. Once there is room, every line is in the stream once."""
    servers = nats.single()
    ep_a, ep_b = h.endpoints(tcp=True), h.endpoints(tcp=True)
    full = [*jetstream_sets(servers), "aggregator.jetstream.max_bytes=40000"]
    h.aggregator(ep_a, *full, state="agg-a")
    h.aggregator(ep_b, *full, state="agg-b")
    h.status(ep_a)
    h.status(ep_b)
    listed = (AggregatorEndpoints(ep_a.pull, ep_a.control), AggregatorEndpoints(ep_b.pull, ep_b.control))
    name = next(n for n in (f"web-{i:02d}" for i in range(100)) if rank(n, listed)[0].control == ep_a.control)
    h.path("logs").mkdir(exist_ok=True)
    append_lines(h.path("logs", "a.log"), make_lines("a", 0, 800))  # about 70 KB: more than fits
    agent = h.agent(ep_a, sources(h), "agent.heartbeat_interval_ms=300", name=name, also=[ep_b])
    wait_for(lambda: "stream full" in str(h.status(ep_a)["jetstream"]["last_error"]), timeout=60,
             what="A's stream full")

    def status() -> dict[str, object]:
        s = h.agent_status(name)
        assert s is not None
        return s

    # The problem it shows comes after 5 s without an acknowledgement: the old agent had moved
    # after 3 (two ack timeouts), and resent its window every 1.5 s meanwhile.
    wait_for(lambda: any("stream takes nothing" in p for p in status()["problems"]),  # type: ignore[attr-defined]
             timeout=60, what="the agent's status saying why nothing is acknowledged")
    now = status()
    assert now["aggregators"]["switches"] == 0, now["aggregators"]  # type: ignore[index]
    assert now["resends"] <= 1, now["resends"]  # the first timeout may come before the first reply
    waiting = [line for line in agent.log().splitlines() if "waiting rather than moving" in line]
    assert len(waiting) == 1 and "until it has room" in waiting[0], waiting  # said once, not per beat
    assert "is `data`" not in agent.log()  # not taken for a wrong endpoint

    asyncio.run(set_stream_max_bytes(servers.urls, STREAM, 16 * 1024 * 1024))
    wait_for(lambda: h.all_acknowledged(name), timeout=60, what="every line acknowledged")
    check_exactly_once(stream_lines(servers.urls), {"a": 800})
    h.assert_quiet(ep_a)


def test_what_an_operator_sees_of_a_jetstream_aggregator(h: Harness, nats) -> None:
    """A stream the server cannot create (3 replicas on one server) is shown in the status text,
    not only in --json; tail -n says there are no past lines here instead of printing nothing."""
    servers = nats.single()
    ep = h.endpoints()
    h.aggregator(ep, *jetstream_sets(servers, replicas=3))
    wait_for(lambda: (h.status(ep)["jetstream"] or {}).get("last_error"), timeout=20,
             what="the stream's error in the status")
    shown = h.ctl(ep, "status").stdout
    assert "!! JetStream:" in shown and "replicas" in shown, shown
    r = h.ctl(ep, "tail", "app", "-n", "5", "--count", "0", "--wait")
    assert r.returncode == 0, r.stderr
    assert "writes no files (sink = jetstream)" in r.stderr and r.stdout == "", (r.stdout, r.stderr)


def test_stream_that_lost_its_acknowledged_tail_gets_it_again_from_the_agents(h: Harness, nats) -> None:
    """What a machine crash with JetStream's default sync_interval leaves: the stream ends before
    lines the agents saw acknowledged. The aggregator tells them the stream holds less, and they
    send those lines again from their files: every line once, no endless resync."""
    servers = nats.single()
    ep = h.endpoints()
    h.aggregator(ep, *jetstream_sets(servers))
    h.path("logs").mkdir(exist_ok=True)
    logs = {tag: h.path("logs", f"{tag}.log") for tag in ("a", "b")}
    for tag, path in logs.items():
        append_lines(path, make_lines(tag, 0, 300))
    h.agent(ep, sources(h))
    wait_for(lambda: h.all_acknowledged(), timeout=30, what="the first lines acknowledged")
    store = servers.nodes[0].store_dir
    servers.kill(0, signal.SIGTERM)
    copy = h.path("store-copy")
    shutil.copytree(store, copy)
    servers.restart(0)
    for tag, path in logs.items():
        append_lines(path, make_lines(tag, 300, 300))
    wait_for(lambda: h.all_acknowledged(), timeout=60, what="the next lines acknowledged")
    servers.kill(0)                 # a crash ...
    shutil.rmtree(store)
    shutil.copytree(copy, store)    # ... that lost what was acknowledged since the copy
    servers.restart(0)
    for tag, path in logs.items():
        append_lines(path, make_lines(tag, 600, 100))
    wait_for(lambda: h.all_acknowledged(), timeout=60, what="everything acknowledged again")
    check_exactly_once(stream_lines(servers.urls), {"a": 700, "b": 700})
    assert h.status(ep)["totals"]["resyncs"] <= 4
    h.assert_quiet(ep)


def test_writer_down_while_the_stream_lost_its_tail_and_took_new_messages_writes_them(h: Harness,
                                                                                       nats) -> None:
    """The stream loses its tail while the writer is down, and new messages take those sequence
    numbers before it is back: the writer sees another message where the last one it applied
    was, reads the stream again and writes every line once (before, the new ones were skipped)."""
    servers = nats.single()
    ep = h.endpoints()
    h.aggregator(ep, *jetstream_sets(servers))
    h.path("logs").mkdir(exist_ok=True)
    logs = {tag: h.path("logs", f"{tag}.log") for tag in ("a", "b", "c")}
    for tag in ("a", "b"):
        append_lines(logs[tag], make_lines(tag, 0, 100))
    h.agent(ep, sources(h))
    wait_for(lambda: h.all_acknowledged(), timeout=30, what="the first lines acknowledged")
    store = servers.nodes[0].store_dir
    servers.kill(0, signal.SIGTERM)
    copy = h.path("store-copy")
    shutil.copytree(store, copy)
    servers.restart(0)
    writer = h.writer(servers.urls)
    for i in range(1, 6):  # one message per round
        for tag in ("a", "b"):
            append_lines(logs[tag], make_lines(tag, 100 * i, 100))
        wait_for(lambda: h.all_acknowledged(), timeout=30, what="lines acknowledged")
    wait_for(lambda: len(output_lines(h.path("wout"), "app")) == 1200, timeout=30, what="the writer's lines")
    assert writer.stop() == 0
    servers.kill(0)
    shutil.rmtree(store)
    shutil.copytree(copy, store)
    servers.restart(0)
    for i in range(20):  # new messages take the lost sequence numbers, and more
        append_lines(logs["c"], make_lines("c", 10 * i, 10))
        wait_for(lambda: h.all_acknowledged(), timeout=30, what="c's lines acknowledged")
    h.writer(servers.urls)
    expected = {"a": 600, "b": 600, "c": 200}
    wait_for(lambda: len(output_lines(h.path("wout"), "app")) >= 1400, timeout=60, what="every line written")
    check_exactly_once(output_lines(h.path("wout"), "app"), expected)
    h.assert_quiet(ep)


def metric_values(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the aggregator's /metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def copy_state(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
    """A copy of an agent's state_dir as a backup takes it (its status socket left out)."""
    def sockets(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if stat.S_ISSOCK(os.lstat(os.path.join(folder, n)).st_mode)]
    shutil.copytree(src, dst, ignore=sockets)


def test_lines_resent_after_an_aggregator_crash_count_as_duplicates_dropped(h: Harness, nats) -> None:
    """The aggregator dies (kill -9) with lines in the stream that its agent never saw
    acknowledged; the agent sends them again to the restarted aggregator, whose JetStream sink
    finds them in the stream and drops them. ``aggregatorctl status`` (text and --json) and the
    metrics count them as duplicates dropped, like those the aggregator drops itself (the old
    code said 0 there: they were only in the sink's ``already_in``). Made exact here by giving
    the agent back the checkpoint of a backup taken 200 lines earlier: the stream then holds
    200 lines it has no acknowledgement of, as after a crash between publish and ack."""
    servers = nats.single()
    ep = h.endpoints()
    port = free_port()
    aggregator = h.aggregator(ep, *jetstream_sets(servers), f"aggregator.metrics_listen=127.0.0.1:{port}")
    log = h.path("logs", "a.log")
    append_lines(log, make_lines("a", 0, 100))
    agent = h.agent(ep, sources(h))
    wait_for(lambda: h.all_acknowledged(), timeout=30, what="the first 100 lines acknowledged")
    assert agent.stop() == 0
    copy_state(h.path("st-node1"), h.path("st-backup"))
    agent = h.agent(ep, sources(h))
    append_lines(log, make_lines("a", 100, 200))
    wait_for(lambda: h.all_acknowledged(), timeout=30, what="200 more lines acknowledged")
    assert h.status(ep)["totals"]["duplicates_dropped"] == 0
    aggregator.kill9()
    agent.kill9()
    h.aggregator(ep, *jetstream_sets(servers), f"aggregator.metrics_listen=127.0.0.1:{port}")
    h.agent(ep, sources(h), state="st-backup")
    wait_for(lambda: h.all_acknowledged(), timeout=30, what="the resent lines acknowledged")
    status = h.status(ep)  # acknowledged: the sink has found them in the stream
    assert status["jetstream"]["already_in"] >= 1 and status["jetstream"]["published"] == 0
    assert status["totals"]["duplicates_dropped"] == 200, status["totals"]
    assert status["totals"]["already_in_stream"] == 200
    assert status["jetstream"]["already_in_lines"] == 200
    shown = h.ctl(ep, "status").stdout
    assert "200 lines taken (14.1KiB), 0 published, 200 duplicates dropped (200 already in the stream)" \
        in shown, shown
    assert f"jetstream: {status['jetstream']['already_in']} batches already in the stream" in shown, shown
    metrics = wait_for(lambda: metric_values(port), what="metrics")
    assert metrics[("fleetlog_aggregator_dropped_lines_total", (("reason", "duplicate"),))] == 200
    assert metrics[("fleetlog_aggregator_jetstream_already_in_lines_total", ())] == 200
    assert metrics[("fleetlog_aggregator_jetstream_already_in_batches_total", ())] >= 1
    assert metrics[("fleetlog_aggregator_commit_interval_seconds", ())] == 0.2   # the default
    assert ("fleetlog_aggregator_early_commits_total", ()) in metrics
    # Every counter the sink keeps is a metric (a dashboard needs them all).
    gauges = ("replicas", "max_payload", "queued_batches", "queued_bytes")
    counters = {k for k, v in status["jetstream"].items() if isinstance(v, int) and k not in gauges}
    assert counters == {field for field, _, _ in JETSTREAM_COUNTERS}
    exposed = {name for name, _ in metrics}
    assert not {f"fleetlog_aggregator_{name}_total" for _, name, _ in JETSTREAM_COUNTERS} - exposed
    check_exactly_once(stream_lines(servers.urls), {"a": 300})
    h.assert_quiet(ep)


def test_aggregator_killed_with_a_batch_half_published_counts_the_resent_front_as_duplicates(
        h: Harness, nats) -> None:
    """A batch larger than the server's max_payload goes as several messages and is
    acknowledged once all are in. The stream fills after the first few (stream full): they are
    published, the agent is not acknowledged. The aggregator is killed -9 there; the operator
    raises the stream's limit; the restarted aggregator gets the batch again from the agent and
    its sink cuts off the front the stream holds. Status counts those lines as duplicates
    dropped (the old code: 0)."""
    servers = nats.single(max_payload=8192)
    ep = h.endpoints()
    sets = [*jetstream_sets(servers), "aggregator.jetstream.max_bytes=40960"]
    aggregator = h.aggregator(ep, *sets)
    append_lines(h.path("logs", "a.log"), make_lines("a", 0, 300, width=1000))
    h.agent(ep, sources(h))
    wait_for(lambda: ((h.status(ep)["jetstream"] or {}).get("last_error") or "").startswith("stream full"),
             timeout=30, what="the stream full in the middle of a batch")
    held = len(stream_lines(servers.urls))
    agent = h.agent_status()
    assert agent is not None
    shipped = agent["lines_shipped"]
    assert held > shipped, (held, shipped)   # in the stream, never acknowledged
    aggregator.kill9()
    asyncio.run(set_stream_max_bytes(servers.urls, STREAM, 16 * 1024 * 1024))
    h.aggregator(ep, *sets)
    wait_for(lambda: h.all_acknowledged(), timeout=60, what="every line acknowledged")
    totals = h.status(ep)["totals"]
    assert totals["duplicates_dropped"] == held - shipped, (totals, held, shipped)
    assert totals["already_in_stream"] == held - shipped
    check_exactly_once(stream_lines(servers.urls), {"a": 300})
    h.assert_quiet(ep)
