"""End to end with real processes: agent -> ZeroMQ -> aggregator -> per-topic files."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time

import orjson
import pytest
import zmq
from harness import (
    Harness,
    append_lines,
    check_exactly_once,
    count_lines,
    make_lines,
    output_lines,
    wait_for,
)


def _run(h: Harness, mode: str, tcp: bool) -> None:
    ep = h.endpoints(tcp=tcp)
    logs = h.path("logs")
    files = {f"f{i}": logs / f"f{i}.log" for i in range(3)}
    for tag, path in files.items():
        append_lines(path, make_lines(tag, 0, 3000))
    agg = h.aggregator(ep)
    agent = h.agent(ep, [{"paths": [f"{logs}/*.log"], "topic": "app"}], mode=mode)
    out = h.path("out", "app", "app.log")
    wait_for(lambda: count_lines(out) >= 9000, what="backlog in the output")
    # Lines appended while running, in several small writes.
    for round_ in range(5):
        for tag, path in files.items():
            append_lines(path, make_lines(tag, 3000 + round_ * 100, 100))
        time.sleep(0.05)
    wait_for(lambda: count_lines(out) >= 10500, what="live lines in the output")
    assert agent.stop() == 0
    assert agg.stop() == 0
    check_exactly_once(output_lines(h.path("out"), "app"), {t: 3500 for t in files})


def test_push_mode_end_to_end_over_ipc(h: Harness) -> None:
    _run(h, "push", tcp=False)


def test_push_mode_end_to_end_over_tcp(h: Harness) -> None:
    _run(h, "push", tcp=True)


def test_pub_mode_end_to_end(h: Harness) -> None:
    _run(h, "pub", tcp=False)


def test_topics_go_to_their_own_files(h: Harness) -> None:
    ep = h.endpoints()
    for name in ("web", "db"):
        (h.path("logs") / name).mkdir()
        append_lines(h.path("logs", name, "a.log"), make_lines(name, 0, 500))
    agg = h.aggregator(ep)
    h.agent(ep, [{"paths": [f"{h.path('logs')}/web/*.log"], "topic": "web"},
                 {"paths": [f"{h.path('logs')}/db/*.log"], "topic": "db"}])
    for name in ("web", "db"):
        wait_for(lambda n=name: count_lines(h.path("out", n, f"{n}.log")) >= 500, what=name)
        check_exactly_once(output_lines(h.path("out"), name), {name: 500})
    assert agg.alive()


def test_xpub_subscriber_receives_topic_first_frames(h: Harness) -> None:
    ep = h.endpoints()
    log = h.path("logs", "s.log")
    h.aggregator(ep)
    h.agent(ep, [{"paths": [str(log)], "topic": "sub-test"}])
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"sub-test")
    sub.connect(ep.xpub)
    try:
        # The subscription reaches the publisher late: keep writing until a message comes.
        n = 0
        deadline = time.monotonic() + 20
        frames = None
        while frames is None and time.monotonic() < deadline:
            append_lines(log, make_lines("s", n, 1))
            n += 1
            if sub.poll(200):
                frames = sub.recv_multipart()
        assert frames is not None, "no message on XPUB"
        assert frames[0] == b"sub-test"
        body = orjson.loads(frames[1])
        assert body["v"] == 1 and body["lines"] and body["lines"][0].startswith("s#")
    finally:
        sub.close()
        ctx.term()


def test_status_reports_agents_topics_and_totals(h: Harness) -> None:
    ep = h.endpoints()
    append_lines(h.path("logs", "a.log"), make_lines("a", 0, 1234))
    h.aggregator(ep)
    h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "st"}], name="web-01")
    wait_for(lambda: count_lines(h.path("out", "st", "st.log")) >= 1234, what="lines")
    s = wait_for(lambda: (st := h.status(ep))["agents"] and st, what="agent in status")
    assert [a["name"] for a in s["agents"]] == ["web-01"]
    assert isinstance(s["agents"][0]["last_seen_s"], float | int)
    topic = {t["name"]: t for t in s["topics"]}["st"]
    assert topic["lines"] == 1234
    assert topic["bytes"] == h.path("out", "st", "st.log").stat().st_size
    assert s["totals"]["lines_written"] == 1234
    assert s["totals"]["duplicates_dropped"] == 0
    assert s["totals"]["malformed_dropped"] == 0
    readable = h.ctl(ep, "status")
    assert readable.returncode == 0
    assert "web-01" in readable.stdout and "st" in readable.stdout


def test_ctl_says_so_when_nothing_answers(h: Harness) -> None:
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "aggregator.ctl", "--control", f"ipc://{h.root}/none.sock",
                        "--timeout", "1", "status"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 3
    assert "no aggregator at" in r.stderr and "is it running?" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - started < 10


def test_ctl_tail_prints_a_topics_lines(h: Harness) -> None:
    ep = h.endpoints()
    log = h.path("logs", "t.log")
    h.aggregator(ep)
    h.agent(ep, [{"paths": [str(log)], "topic": "tailme"}])
    h.status(ep)  # listening (aggregatorctl says at once when nothing listens yet)
    proc = subprocess.Popen([sys.executable, "-m", "aggregator.ctl", "--control", ep.control,
                             "tail", "tailme", "--wait", "-n", "0", "--count", "3"],
                            stdout=subprocess.PIPE, text=True)
    try:
        n = 0
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            append_lines(log, make_lines("t", n, 1))
            n += 1
            time.sleep(0.1)
        out, _ = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert len(out.splitlines()) == 3 and all(x.startswith("t#") for x in out.splitlines())


def test_xpub_subscribers_get_lists_of_lines(h: Harness) -> None:
    """The agent sends version 2 batches (the lines as one string); subscribers on XPUB still
    get version 1, the lines as a list."""
    ep = h.endpoints()
    log = h.path("logs", "s.log")
    h.aggregator(ep)
    h.agent(ep, [{"paths": [str(log)], "topic": "subs"}])
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVTIMEO, 200)
    sub.setsockopt(zmq.SUBSCRIBE, b"subs")
    sub.connect(ep.xpub)
    try:
        frames: list[bytes] = []
        n = 0
        deadline = time.monotonic() + 20
        while not frames and time.monotonic() < deadline:
            append_lines(log, make_lines("s", n, 2))  # until the subscription has reached it
            n += 2
            with contextlib.suppress(zmq.Again):
                frames = sub.recv_multipart()
        assert frames, "no batch reached the subscriber"
        doc = orjson.loads(frames[1])
        assert frames[0] == b"subs" and doc["v"] == 1
        assert doc["lines"] and all(type(x) is str and x.startswith("s#") for x in doc["lines"])
    finally:
        sub.close()
        ctx.term()


@pytest.mark.parametrize("advertised, version", [(None, 1), ([1, 2], 2)])
def test_agent_sends_version_2_only_to_an_aggregator_that_reads_it(
        h: Harness, advertised: list[int] | None, version: int) -> None:
    """A rolling upgrade: an agent newer than its aggregator keeps to version 1. Here the
    aggregator is the test's own PULL and ROUTER, answering hello with or without "wire"."""
    ep = h.endpoints()
    log = h.path("logs", "u.log")
    ctx = zmq.Context()
    pull, router = ctx.socket(zmq.PULL), ctx.socket(zmq.ROUTER)
    try:
        pull.bind(ep.pull)
        router.bind(ep.control)
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        poller.register(router, zmq.POLLIN)
        append_lines(log, make_lines("u", 0, 5))
        h.agent(ep, [{"paths": [str(log)], "topic": "up"}])
        before_hello: list[int] = []
        after_hello: list[int] = []
        answered = False
        n = 5
        deadline = time.monotonic() + 20
        while len(after_hello) < 3 and time.monotonic() < deadline:
            for sock, _ in poller.poll(50):
                if sock is router:
                    ident, body = router.recv_multipart()
                    req = orjson.loads(body)
                    result: dict[str, object] = {"instance": "older-1", "committed": {}}
                    if advertised is not None:
                        result["wire"] = advertised
                    reply = {"id": req["id"], "ok": True, "result": result}
                    router.send_multipart([ident, orjson.dumps(reply)])
                    answered = answered or req["command"] == "hello"
                else:
                    doc = orjson.loads(pull.recv_multipart()[1])
                    (after_hello if answered else before_hello).append(doc["v"])
            if answered:
                append_lines(log, make_lines("u", n, 2))  # batches made after the reply
                n += 2
        assert len(after_hello) >= 3, f"batches before/after hello: {before_hello}/{after_hello}"
        assert set(before_hello) <= {1}  # until the aggregator says what it reads
        assert after_hello[-1] == version and after_hello[-2] == version
        if version == 1:
            assert set(after_hello) == {1}
    finally:
        pull.close(linger=0)
        router.close(linger=0)
        ctx.term()


def test_agent_keeps_within_the_window_its_aggregator_grants(h: Harness) -> None:
    """Flow control seen from the agent, against the test's own PULL and ROUTER, which never
    acknowledge: the agent fills the window the replies grant and stops there, ignores windows
    that are not sizes or are below 1 MiB, and goes on when a reply grants more."""
    mib, batch = 1024 * 1024, 128 * 1024
    ep = h.endpoints()
    log = h.path("logs", "w.log")
    append_lines(log, make_lines("w", 0, 40_000, width=150))  # about 6 MiB
    ctx = zmq.Context()
    pull, router = ctx.socket(zmq.PULL), ctx.socket(zmq.ROUTER)
    grant: list[object] = [2 * mib]  # what every reply carries as "window" (None: no window)
    try:
        pull.bind(ep.pull)
        router.bind(ep.control)
        h.agent(ep, [{"paths": [str(log)], "topic": "fc"}], "agent.ack_timeout_ms=600000",
                "agent.heartbeat_interval_ms=100", f"agent.batch_max_bytes={batch}")

        def serve(seconds: float) -> None:
            """Answer hello and heartbeats, and take batches, for a while."""
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                if router.poll(10):
                    ident, body = router.recv_multipart()
                    req = orjson.loads(body)
                    result: dict[str, object] = {"instance": "fake-1", "committed": {}, "wire": [1, 2]}
                    if grant[0] is not None:
                        result["window"] = grant[0]
                    router.send_multipart([ident, orjson.dumps({"id": req["id"], "ok": True,
                                                                "result": result})])
                while pull.poll(0):
                    pull.recv_multipart()

        def settled(window: int) -> dict[str, object] | None:
            serve(0.3)
            s = h.agent_status()
            return s if s and s["window_bytes"] == window and s["inflight_bytes"] >= window else None

        s = wait_for(lambda: settled(2 * mib), what="the agent at the 2 MiB granted")
        assert s["inflight_bytes"] <= 2 * mib + batch  # one batch past the window at most
        assert s["lag_bytes"] > 3 * mib  # it stopped with more to read
        for bogus in ("lots", 10, -5, None):
            grant[0] = bogus
            serve(0.5)  # five heartbeats
        s = h.agent_status()
        assert s is not None and s["window_bytes"] == 2 * mib and s["inflight_bytes"] <= 2 * mib + batch
        grant[0] = 3 * mib
        s = wait_for(lambda: settled(3 * mib), what="the agent going on to the 3 MiB granted")
        assert s["inflight_bytes"] <= 3 * mib + batch
    finally:
        pull.close(linger=0)
        router.close(linger=0)
        ctx.term()


@pytest.mark.parametrize("daemon", ["agent", "aggregator"])
def test_sigterm_exits_zero_and_flushes(h: Harness, daemon: str) -> None:
    ep = h.endpoints()
    append_lines(h.path("logs", "a.log"), make_lines("a", 0, 2000))
    agg = h.aggregator(ep)
    agent = h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "t"}])
    wait_for(lambda: count_lines(h.path("out", "t", "t.log")) >= 2000, what="lines")
    first, second = (agent, agg) if daemon == "agent" else (agg, agent)
    started = time.monotonic()
    assert first.stop(signal.SIGTERM) == 0, first.log()[-2000:]
    assert time.monotonic() - started < 12
    assert second.stop(signal.SIGTERM) == 0
    check_exactly_once(output_lines(h.path("out"), "t"), {"a": 2000})


def test_two_agents_with_one_name_are_reported(h: Harness) -> None:
    ep = h.endpoints(tcp=True)
    agg = h.aggregator(ep)
    ctx = zmq.Context()
    socks = []
    try:
        for source in ("127.0.0.2", "127.0.0.3"):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.IDENTITY, b"web-01")
            host, port = ep.control[len("tcp://"):].rsplit(":", 1)
            s.connect(f"tcp://{source}:0;{host}:{port}")
            socks.append(s)
        for i in range(30):
            for s in socks:
                s.send(orjson.dumps({"id": i, "command": "heartbeat", "args": {"agent": "web-01"}}))
            if "is used from" in agg.log():
                break
            time.sleep(0.1)
        assert "agent name 'web-01' is used from 127.0.0.2" in agg.log() or \
            "agent name 'web-01' is used from 127.0.0.3" in agg.log()
        assert agg.log().count("is used from") == 1
    finally:
        for s in socks:
            s.close()
        ctx.term()
