"""The JetStream sink against real nats-server processes (tests/natsserver.py), in-process.

Every scenario ends by reading the stream back: each (agent, stream) subject holds its source's
bytes exactly once, in contiguous messages (each Start the previous End), whatever happened.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import nats as natspy
import pytest
from natsserver import NatsCluster, read_stream, set_stream_max_bytes

from aggregator.config import ConfigError, JetStreamConfig, parse
from aggregator.jetstream import (
    CommitOutcome,
    JetStreamSink,
    escape_token,
    msg_id,
    subject_for,
    unescape_token,
)
from aggregator.jetstream.link import Refused
from aggregator.jetstream.sink import ERR_WRONG_LAST_SEQUENCE, classify

STREAM = "FLTEST"


def settings(servers: NatsCluster | list[str], **kw: Any) -> JetStreamConfig:
    urls = servers.urls if isinstance(servers, NatsCluster) else servers
    kw.setdefault("publish_timeout_s", 2.0)
    return JetStreamConfig(servers=tuple(urls), stream=STREAM, subject_prefix="fl", **kw)


@asynccontextmanager
async def running(cfg: JetStreamConfig) -> AsyncIterator[JetStreamSink]:
    sink = JetStreamSink(cfg)
    await sink.start()
    try:
        yield sink
    finally:
        await sink.close()


@dataclass
class Source:
    """One agent stream: numbered lines with known byte offsets, cut into batches on demand."""

    agent: str
    stream: str
    topic: str = "app"
    path: str = "/var/log/app.log"
    width: int = 0          # pad each line to about this many bytes
    lines: list[bytes] = field(default_factory=list)
    offsets: list[int] = field(default_factory=lambda: [0])

    def grow(self, n: int) -> None:
        for _ in range(n):
            i = len(self.lines)
            line = f"{self.agent} {self.stream} line {i:06d} ".encode().ljust(self.width, b"x") + b"\n"
            self.lines.append(line)
            self.offsets.append(self.offsets[-1] + len(line))

    def batch(self, first: int, last: int) -> dict[str, Any]:
        """add() arguments for lines [first, last)."""
        return {"topic": self.topic, "agent": self.agent, "stream": self.stream,
                "start": self.offsets[first], "end": self.offsets[last], "lines": last - first,
                "text": b"".join(self.lines[first:last]), "path": self.path, "received": time.time()}

    def line_at(self, offset: int) -> int:
        return self.offsets.index(offset)

    @property
    def key(self) -> tuple[str, str]:
        return (self.agent, self.stream)

    @property
    def text(self) -> bytes:
        return b"".join(self.lines)


async def read_back(urls: list[str]) -> list[tuple[str, dict[str, str], bytes]]:
    return await read_stream(urls, STREAM)


def check_exactly_once(messages: list[tuple[str, dict[str, str], bytes]], sources: list[Source],
                       cut: Callable[[bytes], bytes] | None = None) -> None:
    """Each source's subject holds its whole text once, in contiguous messages whose headers
    name it; ``cut`` maps a source text to what it becomes after the sink's line cutting."""
    by_subject: dict[str, list[tuple[dict[str, str], bytes]]] = {}
    for subject, headers, payload in messages:
        by_subject.setdefault(subject, []).append((headers, payload))
    assert set(by_subject) == {subject_for("fl", s.topic, s.agent, s.stream) for s in sources}
    for s in sources:
        got = by_subject[subject_for("fl", s.topic, s.agent, s.stream)]
        position = 0
        for headers, payload in got:
            start, end = int(headers["Fleetlog-Start"]), int(headers["Fleetlog-End"])
            assert start == position, f"{s.key}: a message starts at {start}, the last ended at {position}"
            assert end > start
            assert headers["Nats-Msg-Id"] == msg_id(s.agent, s.stream, start, end)
            assert int(headers["Fleetlog-Lines"]) == payload.count(b"\n")
            assert unescape_token(headers["Fleetlog-Agent"]) == s.agent
            assert unescape_token(headers["Fleetlog-Path"]) == s.path
            position = end
        assert position == s.offsets[-1], f"{s.key}: stream ends at {position}, source at {s.offsets[-1]}"
        whole = b"".join(p for _, p in got)
        assert whole == (cut(s.text) if cut else s.text), f"{s.key}: contents differ"


async def commit_until(sink: JetStreamSink, want: dict[tuple[str, str], int], timeout: float = 30.0,
                       acked: dict[tuple[str, str], int] | None = None) -> list[CommitOutcome]:
    """Commit again and again until every key is acknowledged up to its end (bounded)."""
    acked = {} if acked is None else acked
    outcomes = []
    deadline = time.monotonic() + timeout
    while any(acked.get(k, -1) < end for k, end in want.items()):
        assert time.monotonic() < deadline, f"not acked in {timeout} s: {acked} of {want}; {outcomes[-3:]}"
        outcome = await sink.commit()
        outcomes.append(outcome)
        acked.update(outcome.acked)
        assert not outcome.resync, outcome
        if outcome.error:
            await asyncio.sleep(0.1)
    return outcomes


# -- pure parts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("code, description, rule", [
    (10077, "maximum bytes exceeded", "full"),
    (10008, "jetstream not enabled", "retry"),
    # Our own retry overtook its first attempt (a publish timeout during an election): retried,
    # not a refusal (it was logged at ERROR as "JetStream refused" and failed the commit).
    (10158, "duplicate message id is in process", "retry"),
    (10060, "expected stream does not match", "fail"),
])
def test_what_each_jetstream_refusal_makes_the_sink_do(code: int, description: str, rule: str) -> None:
    assert classify(Refused(code, description)) == rule


def test_both_wrong_last_sequence_answers_are_the_race_not_an_error() -> None:
    """A clustered stream answers the loser of two aggregators' race with 10164 as often as with
    10071: both mean "reread the subject", neither is an error that stops intake."""
    assert set(ERR_WRONG_LAST_SEQUENCE) == {10071, 10164}


def test_escape_is_reversible_and_subject_safe() -> None:
    for name in ["web-01", "a.b", "x~y z", "/var/log/app.log", "é\udcff", "*>", ""]:
        token = escape_token(name)
        assert unescape_token(token) == name
        assert all(c.isascii() and (c.isalnum() or c in "_-~") for c in token)
    assert escape_token("a.b") == "a~2Eb"
    assert subject_for("fleetlog", "app", "web.01", "s 1") == "fleetlog.app.web~2E01.s~201"
    with pytest.raises(ValueError):
        unescape_token("a~4")


def test_config_keys_are_checked() -> None:
    cfg = parse({"aggregator": {"sink": "jetstream", "jetstream": {
        "servers": ["nats://10.0.0.1:4222", "tls://nats-b:4222"], "replicas": 3,
        "duplicate_window_s": 1, "publish_timeout_s": 0.5}}}, "t", check_dirs=False).aggregator
    assert cfg.sink == "jetstream" and cfg.jetstream.replicas == 3
    assert cfg.jetstream.duplicate_window_s == 1.0 and cfg.jetstream.stream == "FLEETLOG"
    with pytest.raises(ConfigError) as err:
        parse({"aggregator": {"sink": "kafka", "jetstream": {
            "servers": ["http://x:1"], "stream": "A.B", "subject_prefix": "a.>", "replicas": 0,
            "max_age_s": 10, "credentials": "/nonexistent.creds", "dedup": 1}}}, "t", check_dirs=False)
    text = str(err.value.problems)
    for key in ("aggregator.sink", "jetstream.servers", "jetstream.stream", "jetstream.subject_prefix",
                "jetstream.replicas", "jetstream.duplicate_window_s", "jetstream.credentials",
                "jetstream.dedup: unknown key"):
        assert key in text, (key, text)


# -- against real servers ---------------------------------------------------------------------


async def test_batches_are_published_once_with_the_headers_of_the_format(nats: Any) -> None:
    servers = nats.single()
    a, b = Source("web.01", "s1"), Source("web-02", "s~2", topic="db", path="/var/log/db x.log")
    for s in (a, b):
        s.grow(30)
    async with running(settings(servers)) as sink:
        assert sink.status()["connected"] is not None
        for first, last in ((0, 10), (10, 20), (20, 30)):   # contiguous: merged into one message
            sink.queue(**a.batch(first, last))
        sink.queue(**b.batch(0, 30), fields=[{"n": i, "é": "ü"} for i in range(30)])
        outcome = await sink.commit()
        assert outcome == CommitOutcome(acked={a.key: a.offsets[-1], b.key: b.offsets[-1]})
        assert await sink.last_end("app", "web.01", "s1") == a.offsets[-1]
        assert await sink.last_end("app", "nobody", "s1") is None
        assert sink.status()["published"] == 2 and sink.status()["last_error"] is None
        assert sink.status()["published_lines"] == 60
    messages = await read_back(servers.urls)
    check_exactly_once(messages, [a, b])
    headers = {subject: h for subject, h, _ in messages}[subject_for("fl", "db", "web-02", "s~2")]
    assert headers["Fleetlog-Version"] == "1" and headers["Fleetlog-Topic"] == "db"
    assert headers["Fleetlog-Stream"] == "s~7E2" and headers["Fleetlog-Path"] == "~2Fvar~2Flog~2Fdb~20x~2Elog"
    assert json.loads(headers["Fleetlog-Fields"])[3] == {"n": 3, "é": "ü"}
    assert headers["Fleetlog-Fields"].isascii()
    assert float(headers["Fleetlog-Received"]) > 1.7e9


async def test_batches_added_during_a_commit_wait_for_the_next_one(nats: Any) -> None:
    """The aggregator accepts batches while a commit waits for JetStream: they are not in that
    commit's outcome, and go whole with the next."""
    servers = nats.single()
    src = Source("web-01", "s1")
    src.grow(60)
    async with running(settings(servers)) as sink:
        sink.queue(**src.batch(0, 20))
        committing = asyncio.create_task(sink.commit())
        await asyncio.sleep(0)   # the commit is under way (its publish in flight)
        sink.queue(**src.batch(20, 40))
        assert (await committing).acked == {src.key: src.offsets[20]}
        sink.queue(**src.batch(40, 60))
        assert (await sink.commit()).acked == {src.key: src.offsets[60]}
    check_exactly_once(await read_back(servers.urls), [src])


@pytest.mark.parametrize("replicas", [1, 3])
async def test_retry_inside_and_beyond_the_dedup_window_is_stored_once(nats: Any, replicas: int) -> None:
    """A second publish of the same range (an aggregator's retry, or another aggregator with the
    same batch): inside the 1 s window and after it, JetStream keeps one copy and both senders
    are acknowledged; on one server and on an R3 stream of a 3-node cluster."""
    servers = nats.single() if replicas == 1 else nats.cluster(3)
    src = Source("web-01", "s1")
    src.grow(20)
    cfg = settings(servers, duplicate_window_s=1, replicas=replicas)
    async with running(cfg) as first, running(cfg) as late:
        for retry_after_window in (False, True):
            lo, hi = (0, 10) if not retry_after_window else (10, 20)
            # ``late`` reads the subject before ``first`` publishes: its cached position is then
            # stale, so its publish carries the same id and precondition a lost-answer retry would.
            await late.last_end(src.topic, src.agent, src.stream)
            first.queue(**src.batch(lo, hi))
            assert (await first.commit()).acked == {src.key: src.offsets[hi]}
            if retry_after_window:
                # The window is a span of time: wait it out (the only sleep of this module).
                await asyncio.sleep(cfg.duplicate_window_s + 0.3)
            late.queue(**src.batch(lo, hi))
            assert await late.commit() == CommitOutcome(acked={src.key: src.offsets[hi]})
        status = late.status()
        assert status["published"] == 0 and status["already_in"] == 2
        assert status["already_in_lines"] == 20   # the aggregator's status adds them to its duplicates
        assert status["already_in_bytes"] == src.offsets[20]
        # Inside the window JetStream says "duplicate" (or, checking the precondition first as
        # 2.12 does on one server, "wrong last sequence"); after it only the precondition refuses.
        assert status["duplicates"] + status["precondition_refusals"] == 2
        assert status["precondition_refusals"] >= 1
        if replicas == 3:   # a clustered stream checks the id first: the "duplicate" path is taken
            assert status["duplicates"] == 1
    check_exactly_once(await read_back(servers.urls), [src])


async def test_recut_batch_gets_resync_never_loss(nats: Any) -> None:
    """The stream holds lines 0-9; batches cut otherwise (after a restart or a failover) are
    trimmed at a known line boundary, or the agent is resynced to the stream's end."""
    servers = nats.single()
    src = Source("web-01", "s1")
    src.grow(40)
    async with running(settings(servers)) as a:
        a.queue(**src.batch(0, 10))
        assert (await a.commit()).acked == {src.key: src.offsets[10]}
    end = src.offsets[10]
    async with running(settings(servers)) as b:
        # 1. A gap: the agent sends from line 15; the stream ends at line 10. Resync there.
        b.queue(**src.batch(15, 20))
        assert await b.commit() == CommitOutcome(resync={src.key: end})
        # 2. Overlapping, but its text is not its byte range (the agent cut a line): the stream's
        # end is no boundary we can trust inside it. Resync, nothing published.
        recut = src.batch(5, 20)
        recut["text"] = recut["text"][:-5] + b"\n"
        b.queue(**recut)
        assert await b.commit() == CommitOutcome(resync={src.key: end})
        # 3. Overlapping with exact text: the stream's end is a line boundary in it, so the
        # already-stored part is dropped and the rest published: acknowledged to its end.
        b.queue(**src.batch(5, 25))
        assert await b.commit() == CommitOutcome(acked={src.key: src.offsets[25]})
        # The dropped front counts as lines already in (no whole batch was).
        assert (b.status()["already_in"], b.status()["already_in_lines"]) == (0, 5)
        assert b.status()["already_in_bytes"] == src.offsets[10] - src.offsets[5]
        # 4. The agent, resynced, goes on from the stream's end: accepted as usual.
        b.queue(**src.batch(25, 40))
        assert (await b.commit()).acked == {src.key: src.offsets[40]}
        assert b.status()["resyncs"] == 2
    check_exactly_once(await read_back(servers.urls), [src])


async def test_two_sinks_racing_on_the_same_stream_store_it_once(nats: Any) -> None:
    """Two aggregators receive the same stream cut into different batches and commit at the same
    time: the stream holds every byte once, and both end acknowledged to the end."""
    servers = nats.single()
    sources = [Source("web-01", f"s{i}") for i in range(3)]
    for s in sources:
        s.grow(120)
    async with running(settings(servers)) as a, running(settings(servers)) as b:

        async def aggregator(sink: JetStreamSink, lines: int) -> dict[tuple[str, str], int]:
            # One group commit per batch, so the two publish different ranges at the same time.
            acked: dict[tuple[str, str], int] = {}
            for first in range(0, 120, lines):
                for s in sources:
                    sink.queue(**s.batch(first, min(first + lines, 120)))
                outcome = await sink.commit()
                assert not outcome.resync, outcome
                acked.update(outcome.acked)
            return acked

        acked_a, acked_b = await asyncio.gather(aggregator(a, 3), aggregator(b, 5))
        want = {s.key: s.offsets[-1] for s in sources}
        await commit_until(a, want, acked=acked_a)
        await commit_until(b, want, acked=acked_b)
        races = sum(x.status()["precondition_refusals"] + x.status()["duplicates"] for x in (a, b))
    check_exactly_once(await read_back(servers.urls), sources)
    assert races > 0, "the two sinks never met: the test did not race"


async def test_an_agent_back_from_another_aggregator_is_not_resynced_by_a_stale_view(nats: Any) -> None:
    """An agent ships lines 0-10 through aggregator A, moves to B (A's acknowledgements were
    late: a stream leader election) and ships 10-30 there, then moves back to A with 30-40. A
    still holds the subject's end it saw (line 10): deciding from it would tell the agent to
    resync to line 10, which it can no longer send (acknowledged by B), so the agent would begin
    its stream again at 30 and A would report bytes 10-30 lost although the stream holds them
    (seen in the kill -9 soak after two leader elections). A reads the subject again before it
    resyncs anyone or accepts a gap, and goes on."""
    servers = nats.single()
    src = Source("web-01", "s1")
    src.grow(40)
    async with running(settings(servers)) as a, running(settings(servers)) as b:
        a.queue(**src.batch(0, 10))
        assert (await a.commit()).acked == {src.key: src.offsets[10]}
        b.queue(**src.batch(10, 30))
        assert (await b.commit()).acked == {src.key: src.offsets[30]}
        a.queue(**src.batch(30, 40))
        assert await a.commit() == CommitOutcome(acked={src.key: src.offsets[40]})
        # The same once the agent rebased at 30 (its own restart): no gap, the stream has it all.
        b.queue(**src.batch(30, 40), base=src.offsets[30])
        assert await b.commit() == CommitOutcome(acked={src.key: src.offsets[40]})
        assert a.status()["resyncs"] == 0 and b.status()["resyncs"] == 0
        assert a.status()["gaps_accepted"] == 0 and b.status()["gaps_accepted"] == 0
    check_exactly_once(await read_back(servers.urls), [src])


async def test_full_stream_stops_acknowledging_then_resumes_when_there_is_room(nats: Any) -> None:
    servers = nats.single()
    src = Source("web-01", "s1", width=1000)
    src.grow(200)
    async with running(settings(servers, max_bytes=64 * 1024)) as sink:
        acked: dict[tuple[str, str], int] = {}
        error = None
        added = 0
        while added < 200 and error is None:
            sink.queue(**src.batch(added, added + 10))
            added += 10
            outcome = await sink.commit()
            acked.update(outcome.acked)
            error = outcome.error
        assert error is not None and error.startswith("stream full"), error
        held = acked[src.key]
        assert held < src.offsets[added]
        # Still full: nothing more is acknowledged, and the error stays.
        outcome = await sink.commit()
        assert outcome.error and outcome.error.startswith("stream full") and not outcome.acked
        assert sink.status()["last_error"].startswith("stream full")
        assert sink.status()["queued_batches"] >= 1
        # The operator makes room (a larger limit); the same sink resumes on its next commits.
        await set_stream_max_bytes(servers.urls, STREAM, 16 * 1024 * 1024)
        for first in range(added, 200, 10):
            sink.queue(**src.batch(first, first + 10))
        await commit_until(sink, {src.key: src.offsets[-1]}, acked=acked)
        assert sink.status()["last_error"] is None
    check_exactly_once(await read_back(servers.urls), [src])


async def test_oversized_batch_is_split_at_lines_and_arrives_whole(nats: Any) -> None:
    """A server with max_payload 64 KiB: a 1 MB batch goes as several messages (each within the
    limit with its headers), a journal batch with its fields too; a single 100 KiB line is cut."""
    servers = nats.single(max_payload=64 * 1024)
    big = Source("web-01", "big", width=300)
    big.grow(3500)
    journal = Source("web-01", "journal", width=200)
    journal.grow(1000)
    long = Source("web-01", "long")
    long.grow(3)
    long.lines[1] = b"L" * 100_000 + b"\n"
    long.offsets = [0]
    for line in long.lines:
        long.offsets.append(long.offsets[-1] + len(line))
    async with running(settings(servers)) as sink:
        assert sink.status()["max_payload"] == 64 * 1024
        sink.queue(**big.batch(0, 3500))
        sink.queue(**journal.batch(0, 1000), fields=[{"PRIORITY": "6", "_PID": str(i)} for i in range(1000)])
        sink.queue(**long.batch(0, 3))
        await commit_until(sink, {big.key: big.offsets[-1], journal.key: journal.offsets[-1],
                                  long.key: long.offsets[-1]})
        status = sink.status()
        assert status["split_messages"] >= 3500 * 300 // (64 * 1024)
        assert status["cut_lines"] == 1 and status["cut_bytes"] > 100_000 - 64 * 1024
    messages = await read_back(servers.urls)
    for _, headers, payload in messages:
        header_bytes = sum(len(k) + len(v) + 4 for k, v in headers.items()) + 12
        assert header_bytes + len(payload) <= 64 * 1024
    check_exactly_once([m for m in messages if "long" not in m[0]], [big, journal])
    long_messages = [m for m in messages if "long" in m[0]]
    payload = b"".join(p for _, _, p in long_messages)
    assert payload.startswith(long.lines[0]) and payload.endswith(long.lines[2])
    assert payload.count(b"\n") == 3 and len(payload) < 64 * 1024
    assert int(long_messages[-1][1]["Fleetlog-End"]) == long.offsets[-1]
    fields = [f for subject, h, _ in messages if "journal" in subject
              for f in json.loads(h["Fleetlog-Fields"])]
    assert [f["_PID"] for f in fields] == [str(i) for i in range(1000)]


async def test_existing_stream_is_kept_and_its_message_limit_obeyed(nats: Any, caplog: Any) -> None:
    """A stream made by the operator (1 replica where 3 are configured, max_msg_size 16 KiB):
    the sink says what differs, changes nothing, and splits its batches to fit the stream."""
    servers = nats.single()
    nc = await natspy.connect(servers=servers.urls)
    await nc.jetstream().add_stream(name=STREAM, subjects=["fl.>"], max_msg_size=16 * 1024)
    await nc.close()
    src = Source("web-01", "s1", width=200)
    src.grow(500)
    async with running(settings(servers, replicas=3)) as sink:
        assert sink.status()["max_payload"] == 16 * 1024
        assert "num_replicas 1 (configured 3)" in caplog.text
        sink.queue(**src.batch(0, 500))
        await commit_until(sink, {src.key: src.offsets[-1]})
    messages = await read_back(servers.urls)
    assert len(messages) >= 500 * 200 // (16 * 1024)
    check_exactly_once(messages, [src])


async def test_start_without_a_server_is_bounded_then_connects_in_the_background(nats: Any,
                                                                                  short_tmp: Any) -> None:
    servers = NatsCluster(short_tmp / "late", 1, clustered=False)   # addresses known, not started
    src = Source("web-01", "s1")
    src.grow(10)
    began = time.monotonic()
    async with running(settings(servers.urls)) as sink:
        assert time.monotonic() - began < 10
        assert sink.status()["connected"] is None and "not connected" in sink.status()["last_error"]
        sink.queue(**src.batch(0, 10))
        outcome = await sink.commit()
        assert outcome.error and "not connected" in outcome.error and not outcome.acked
        try:
            await asyncio.to_thread(servers.start)
            await commit_until(sink, {src.key: src.offsets[-1]})
            assert sink.status()["connected"] is not None and sink.status()["last_error"] is None
        finally:
            servers.close()


async def test_stream_deleted_while_running_is_created_again(nats: Any) -> None:
    """An operator deletes the stream: publishes find no responder, the next commit creates the
    stream again (WARNING) and the subject starts afresh where the agent is."""
    servers = nats.single()
    src = Source("web-01", "s1")
    src.grow(30)
    async with running(settings(servers)) as sink:
        sink.queue(**src.batch(0, 10))
        assert (await sink.commit()).acked == {src.key: src.offsets[10]}
        nc = await natspy.connect(servers=servers.urls)
        await nc.jetstream().delete_stream(STREAM)
        await nc.close()
        sink.queue(**src.batch(10, 20))
        await commit_until(sink, {src.key: src.offsets[20]})
        sink.queue(**src.batch(20, 30))
        assert (await sink.commit()).acked == {src.key: src.offsets[30]}
        assert sink.status()["last_error"] is None
    messages = await read_back(servers.urls)
    assert [(h["Fleetlog-Start"], h["Fleetlog-End"]) for _, h, _ in messages] == [
        (str(src.offsets[10]), str(src.offsets[20])), (str(src.offsets[20]), str(src.offsets[30]))]
    assert b"".join(p for _, _, p in messages) == b"".join(src.lines[10:30])


async def test_single_server_killed_and_restarted_loses_nothing_acknowledged(nats: Any) -> None:
    """kill -9 of an R1 server mid-stream (its acknowledged messages are in the page cache):
    commits fail while it is down, the sink reconnects when it is back, every range once."""
    servers = nats.single()
    sources = [Source(f"web-{i:02d}", "s1") for i in range(3)]
    for s in sources:
        s.grow(200)
    async with running(settings(servers)) as sink:
        acked: dict[tuple[str, str], int] = {}
        down_errors = 0
        for step in range(0, 200, 10):
            for s in sources:
                sink.queue(**s.batch(step, step + 10))
            if step == 80:
                servers.kill(0)
            if step == 120:
                await asyncio.to_thread(servers.restart, 0)
            outcome = await sink.commit()
            acked.update(outcome.acked)
            assert not outcome.resync, outcome
            down_errors += outcome.error is not None
        await commit_until(sink, {s.key: s.offsets[-1] for s in sources}, acked=acked)
        assert down_errors >= 4   # the commits of steps 80 to 110, at least
        assert sink.status()["last_error"] is None and sink.status()["connected"] is not None
    check_exactly_once(await read_back(servers.urls), sources)


@pytest.mark.parametrize("connected_to", ["leader", "follower"])
async def test_stream_leader_killed_mid_stream_publishing_resumes_exactly_once(nats: Any,
                                                                               connected_to: str) -> None:
    """An R3 stream on a 3-node cluster: SIGKILL of the stream leader while batches flow, the sink
    connected to it (it must reconnect elsewhere, learning the others from the cluster) or to a
    follower. Publishes are retried (commits may fail) during the election, then resume within
    15 s; every range is stored exactly once; the node restarted catches up, the sink is quiet."""
    servers = nats.cluster(3)
    async with running(settings(servers, replicas=3)):   # creates the stream
        pass
    leader = await asyncio.to_thread(servers.stream_leader, STREAM)
    node = leader if connected_to == "leader" else (leader + 1) % 3
    sources = [Source(f"web-{i:02d}", "s1") for i in range(4)]
    for s in sources:
        s.grow(400)
    async with running(settings([servers.nodes[node].url], replicas=3)) as sink:
        acked: dict[tuple[str, str], int] = {}
        killed_at = 0.0
        errors_seen = 0
        for step in range(0, 400, 10):
            for s in sources:
                sink.queue(**s.batch(step, step + 10))
            if step == 150:
                assert await asyncio.to_thread(servers.stream_leader, STREAM) == leader
                servers.kill(leader)
                killed_at = time.monotonic()
            outcome = await sink.commit()
            acked.update(outcome.acked)
            assert not outcome.resync, outcome
            errors_seen += outcome.error is not None
        await commit_until(sink, {s.key: s.offsets[-1] for s in sources}, acked=acked)
        resumed_after = time.monotonic() - killed_at
        # Seen by the sink: failed commits, or at least publishes retried through the election.
        assert errors_seen or sink.status()["retries"], "the election was not seen"
        assert await asyncio.to_thread(servers.stream_leader, STREAM) != leader
        assert resumed_after < 15, f"publishing resumed {resumed_after:.1f} s after the kill"
        # Healthy again: the killed node comes back and catches up; the sink has nothing left.
        await asyncio.to_thread(servers.restart, leader)
        await asyncio.to_thread(servers.wait_stream_current, STREAM)
        status = sink.status()
        assert status["last_error"] is None and status["queued_batches"] == 0
        assert status["connected"] is not None
    check_exactly_once(await read_back(servers.urls), sources)
