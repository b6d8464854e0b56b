"""The aggregator never trusts a frame: malformed input on every port is counted and dropped."""

from __future__ import annotations

import os
import time

import orjson
import zmq
from harness import Harness, append_lines, check_exactly_once, count_lines, make_lines, output_lines, wait_for

from fleetlog import wire


def good_body(**changes: object) -> bytes:
    doc = {"v": 1, "agent": "evil", "stream": "s1", "base": 0, "path": "/x", "file": "1:2:3", "seq": 0,
           "start": 0, "end": 10, "lines": ["hello"]}
    doc.update(changes)
    return orjson.dumps(doc)


BAD_MESSAGES: list[list[bytes]] = [
    [b"bad topic!", good_body()],
    [b"../../etc", good_body()],
    [b".hidden", good_body()],
    [b"t" * 200, good_body()],
    [b"ok", b"not json at all"],
    [b"ok", b"[1, 2, 3]"],
    [b"ok"],
    [b"ok", good_body(), b"extra"],
    [b"ok", good_body(v=99)],
    [b"ok", good_body(lines="not a list")],
    [b"ok", good_body(lines=[1, 2, 3], stream="s2")],
    [b"ok", good_body(start=50, end=10, stream="s3")],
    [b"ok", good_body(agent="", stream="s4")],
    [b"ok", good_body(seq=-1, stream="s5")],
    [b"ok", b"x" * 20000],
    [b"ok", b"\xff\xfe\x00garbage"],
    # Wire version 3 (several streams' batches): malformed anywhere, the whole message is dropped,
    # its good batches too.
    [b"ok", orjson.dumps({"v": 3, "batches": []})],
    [b"ok", orjson.dumps({"v": 3, "batches": "x"})],
    [b"ok", orjson.dumps({"v": 3})],
    [b"ok", b'{"v":3,"batches":[' + good_body(stream="s6") + b"," + good_body(stream="s7", start=9, end=1)
     + b"]}"],
    [b"ok", b'{"v":3,"batches":[' + good_body(stream="s8") + b',{"v":3,"batches":[]}]}'],
    [b"ok", b'{"v":3,"batches":[' + good_body(stream="s9") + b",5]}"],
]


def test_malformed_frames_on_every_port_leave_it_running_and_delivering(h: Harness) -> None:
    ep = h.endpoints()
    agg = h.aggregator(ep, "aggregator.max_message_bytes=16384")
    ctx = zmq.Context()
    socks = []
    try:
        push = ctx.socket(zmq.PUSH)
        pub = ctx.socket(zmq.PUB)
        dealer = ctx.socket(zmq.DEALER)
        xsub = ctx.socket(zmq.XSUB)
        socks += [push, pub, dealer, xsub]
        for s in socks:
            s.setsockopt(zmq.LINGER, 0)
        push.connect(ep.pull)
        pub.connect(ep.xsub)
        dealer.connect(ep.control)
        xsub.connect(ep.xpub)
        for msg in BAD_MESSAGES:
            push.send_multipart(msg)
        for junk in (b"\x00\x01junk", b"{\"command\": 5}", b"[]", b"{}", b"x" * 100):
            dealer.send(junk)
        dealer.send_multipart([b"a", b"b", b"c"])
        xsub.send(b"\x02not a subscription")
        xsub.send(b"")
        wait_for(lambda: h.status(ep)["totals"]["malformed_dropped"] >= len(BAD_MESSAGES),
                 what="malformed PULL messages counted")
        # PUB drops until the aggregator's subscription arrives: send until counted.
        before = h.status(ep)["totals"]["malformed_dropped"]

        def pub_counted() -> bool:
            pub.send_multipart([b"bad topic!", good_body()])
            return h.status(ep)["totals"]["malformed_dropped"] > before
        wait_for(pub_counted, interval=0.1, what="malformed XSUB messages counted")
        assert agg.alive()
        # Nothing was written anywhere for these, and certainly not outside output_dir.
        assert not os.path.exists(h.path("etc")) and not os.path.exists(h.path("out", "..", "etc"))
        assert sorted(os.listdir(h.path("out"))) == []
        # ... and real agents still get through.
        append_lines(h.path("logs", "a.log"), make_lines("a", 0, 1000))
        h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "good"}], "agent.batch_max_bytes=8192")
        wait_for(lambda: count_lines(h.path("out", "good", "good.log")) >= 1000, what="good lines")
        check_exactly_once(output_lines(h.path("out"), "good"), {"a": 1000})
        status = h.status(ep)
        assert status["malformed"].get("bad_topic", 0) >= 4
        assert status["malformed"].get("oversized", 0) >= 1
        # Warnings are logged once per peer and reason, not once per message.
        time.sleep(0.2)
        assert agg.log().count("reason: bad_topic") <= 2 or agg.log().count("bad_topic") < 10
    finally:
        for s in socks:
            s.close()
        ctx.term()


def test_decoder_rejects_what_it_should() -> None:
    for msg in BAD_MESSAGES:
        try:
            batch = wire.decode_batch(msg, max_bytes=16384)
        except wire.WireError:
            continue
        # Non-string lines are only caught when joined for writing.
        assert batch.lines == [1, 2, 3]


# Argument names the control commands read, and values of every JSON type and extreme.
CONTROL_KEYS = ("name", "agent", "agent_id", "aggregators", "errors", "file_list", "files", "streams",
                "heartbeat_interval_ms", "journal_lag_entries", "journal_lag_s", "lag_s", "lag_bytes",
                "inflight_bytes", "lines", "mode", "probe", "problems", "started_at", "topic", "version",
                "wire_versions", "count", "since", "follow")
CONTROL_VALUES = ([], {}, "x", -1, 1e308, None, [{}], {"a": 1}, [[1]], True, 2**63 - 1, [None], ["x"])


def test_every_control_command_answers_arguments_of_any_type_and_the_aggregator_goes_on(h: Harness) -> None:
    """Each command with each argument it reads set to each JSON type: every request gets an
    answer (a result or a one-line error), the aggregator keeps running and still ships."""
    ep = h.endpoints()
    agg = h.aggregator(ep)
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.IDENTITY, b"fuzz/1")
    dealer.setsockopt(zmq.RCVTIMEO, 10_000)
    try:
        dealer.connect(ep.control)
        req_id = 0
        for command in ("hello", "heartbeat", "goodbye", "history", "ping", "status", "tail", "rotate"):
            for key in CONTROL_KEYS:
                for value in CONTROL_VALUES:
                    req_id += 1
                    dealer.send(orjson.dumps({"command": command, "id": req_id,
                                              "args": {"name": "fuzz", key: value}}))
                    reply = orjson.loads(dealer.recv())  # zmq.Again here: a request went unanswered
                    assert reply["id"] == req_id and (reply["ok"] or reply["error"]), reply
        assert agg.alive()
    finally:
        dealer.close()
        ctx.term()
    append_lines(h.path("logs", "a.log"), make_lines("a", 0, 100))
    h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "good"}])
    wait_for(lambda: count_lines(h.path("out", "good", "good.log")) >= 100, what="good lines")
    check_exactly_once(output_lines(h.path("out"), "good"), {"a": 100})
    assert "Traceback" not in agg.log()
