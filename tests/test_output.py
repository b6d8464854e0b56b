"""Output files: time rotation on UTC boundaries (with an injected clock), names, retention, format.

These run the real ``Aggregator.serve()`` as a task of the test's event loop, with real ipc://
sockets and files; batches come from a plain PUSH socket speaking the wire format. Only the clock
is fake: it is what decides time-based rotation, rotated names, retention by age and the
``received`` field of json lines.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import dataclasses
import gzip
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq
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
from aggregator.daemon import Aggregator
from aggregator.files import rotated_name
from aggregator.formats import safe_name
from fleetlog import wire


def utc(*when: int) -> float:
    return float(calendar.timegm(when))


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_config(root: Path, **aggregator: Any) -> Config:
    data = {"aggregator": {
        "output_dir": str(root / "out"), "state_dir": str(root / "agg"),
        "pull": f"ipc://{root}/pull.sock", "xsub": f"ipc://{root}/xsub.sock",
        "xpub": f"ipc://{root}/xpub.sock", "control": [f"ipc://{root}/ctl.sock"],
        "commit_interval_ms": 10, **aggregator}}
    return parse(data, "<test>")


async def until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := cond()):
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
    return value


@contextlib.asynccontextmanager
async def running_aggregator(cfg: Config, clock: Callable[[], float]) -> AsyncIterator[Aggregator]:
    agg = Aggregator(cfg, clock=clock)
    task = asyncio.create_task(agg.serve(), name="aggregator-under-test")
    try:
        await until(lambda: agg.ready.is_set() or task.done(), what="aggregator ready")
        if task.done():
            task.result()  # raises what startup raised
        yield agg
    finally:
        agg.request_stop()
        await asyncio.wait_for(task, timeout=15)


class Sender:
    """An agent's data socket without the agent: batches continuing their stream exactly."""

    def __init__(self, endpoint: str, agent: str = "fake-01") -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.connect(endpoint)
        self.agent = agent
        self.streams: dict[str, tuple[int, int]] = {}

    def send(self, topic: str, lines: list[str], stream: str = "s1", path: str = "/var/log/app.log",
             version: int = 1) -> None:
        """``version`` 2 sends the lines as one string, as the agent does."""
        start, seq = self.streams.get(stream, (0, 0))
        end = start + sum(len(line.encode()) + 1 for line in lines)
        body: list[str] | str = "".join(x + "\n" for x in lines) if version == 2 else lines
        self.sock.send_multipart(wire.encode_batch(wire.Batch(
            topic=topic, agent=self.agent, stream=stream, base=0, path=path, file="1:2:abcd",
            seq=seq, start=start, end=end, lines=body)))
        self.streams[stream] = (end, seq + 1)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def sender(short_tmp: Path) -> Any:
    s = Sender(f"ipc://{short_tmp}/pull.sock")
    try:
        yield s
    finally:
        s.close()


def topic_files(out: Path, topic: str) -> list[str]:
    return sorted(os.listdir(out / topic))


async def test_time_rotation_on_utc_day_boundaries(short_tmp: Path, sender: Sender) -> None:
    out = short_tmp / "out"
    clock = FakeClock(utc(2024, 3, 1, 23, 59, 50))
    cfg = make_config(short_tmp, rotate_interval_s=86400, rotate_max_bytes=0)
    async with running_aggregator(cfg, clock) as agg:
        sender.send("app", make_lines("a", 0, 100))
        await until(lambda: count_lines(out / "app" / "app.log") == 100, what="first lines")
        clock.t = utc(2024, 3, 1, 23, 59, 59)
        sender.send("app", make_lines("a", 100, 100))
        await until(lambda: count_lines(out / "app" / "app.log") == 200, what="lines before midnight")
        await asyncio.sleep(0.1)  # a few commit rounds: still the same UTC day, nothing rotates
        assert topic_files(out, "app") == ["app.log"]

        clock.t = utc(2024, 3, 2, 0, 0, 1)
        first = "app.20240302T000001Z.log.gz"
        await until(lambda: first in topic_files(out, "app"), what="rotation at midnight, compressed")
        assert topic_files(out, "app") == [first, "app.log"]
        assert count_lines(out / "app" / "app.log") == 0
        assert gzip.decompress((out / "app" / first).read_bytes()).count(b"\n") == 200

        # The new file's period is 2024-03-02: lines all day long stay in it.
        sender.send("app", make_lines("a", 200, 50))
        await until(lambda: count_lines(out / "app" / "app.log") == 50, what="lines after midnight")
        clock.t = utc(2024, 3, 2, 23, 59, 59)
        sender.send("app", make_lines("a", 250, 50))
        await until(lambda: count_lines(out / "app" / "app.log") == 100, what="lines late that day")
        assert topic_files(out, "app") == [first, "app.log"]

        # An idle topic rotates too, once its day is over.
        clock.t = utc(2024, 3, 3, 0, 0, 5)
        second = "app.20240303T000005Z.log.gz"
        await until(lambda: second in topic_files(out, "app"), what="second rotation")
        await until(lambda: not agg._compressions, what="compression done")
    check_exactly_once(output_lines(out, "app", include_rotated=True), {"a": 300})
    assert topic_files(out, "app") == [first, second, "app.log"]


async def test_hourly_rotation_keeps_utc_boundaries(short_tmp: Path, sender: Sender) -> None:
    out = short_tmp / "out"
    clock = FakeClock(utc(2024, 7, 9, 10, 59, 0))
    async with running_aggregator(make_config(short_tmp, rotate_interval_s=3600), clock):
        sender.send("h", make_lines("h", 0, 10))
        await until(lambda: count_lines(out / "h" / "h.log") == 10, what="lines")
        clock.t = utc(2024, 7, 9, 11, 0, 0)
        await until(lambda: "h.20240709T110000Z.log.gz" in topic_files(out, "h"), what="hourly rotation")


async def test_rotated_names_sort_oldest_first_and_retention_keeps_the_newest(
        short_tmp: Path, sender: Sender) -> None:
    out = short_tmp / "out"
    clock = FakeClock(utc(2024, 5, 5, 12, 0, 0))  # frozen: every rotation falls in the same second
    cfg = make_config(short_tmp, retain_files=3, rotate_interval_s=0)
    async with running_aggregator(cfg, clock) as agg:
        for i in range(5):
            sender.send("r", make_lines(f"r{i}", 0, 10), stream=f"s{i}")
            await until(lambda: count_lines(out / "r" / "r.log") == 10, what=f"batch {i}")
            rotated = await agg.rotate_now("r")
            assert len(rotated) == 1
        await until(lambda: not agg._compressions, what="compression done")
        names = topic_files(out, "r")
        assert names == ["r.20240505T120000Z_002.log.gz", "r.20240505T120000Z_003.log.gz",
                         "r.20240505T120000Z_004.log.gz", "r.log"]
        # The newest three, oldest first: names sort in the order they were written.
        kept = output_lines(out, "r", include_rotated=True)
        assert [line.split("#")[0] for line in kept[::10]] == ["r2", "r3", "r4"]

        # Retention by age: a rotated file older than retain_days goes at the next rotation.
        old = out / "r" / names[0]
        os.utime(old, (clock.t - 3 * 86400, clock.t - 3 * 86400))
        agg.cfg = dataclasses.replace(agg.cfg, retain_days=2, retain_files=0)  # as a reload would
        clock.t += 61
        sender.send("r", make_lines("r5", 0, 10), stream="s5")
        await until(lambda: count_lines(out / "r" / "r.log") == 10, what="batch 5")
        assert await agg.rotate_now("r") == ["r.20240505T120101Z.log.gz"]  # its name once compressed
        await until(lambda: not agg._compressions, what="compression done")
        assert topic_files(out, "r") == [*names[1:3], "r.20240505T120101Z.log.gz", "r.log"]


async def test_retention_counts_a_file_caught_between_compression_and_unlink_once(
        short_tmp: Path) -> None:
    # X.log and X.log.gz both exist for a moment while X is compressed (or after a crash then).
    # Counting them as two rotated files made retention remove X.log, and the compression,
    # finding its original gone, then removed X.log.gz: a file within retention lost.
    topic = short_tmp / "out" / "r"
    topic.mkdir(parents=True)
    names = ["r.20240501T000000Z.log", "r.20240502T000000Z.log.gz", "r.20240503T000000Z.log.gz"]
    for name in [*names, "r.20240501T000000Z.log.gz"]:
        (topic / name).write_bytes(b"x\n")
    cfg = make_config(short_tmp, retain_files=3, compress="none")
    async with running_aggregator(cfg, FakeClock(utc(2024, 5, 5, 12, 0, 0))) as agg:
        assert agg.sink.rotated_files("r") == ["r.20240501T000000Z.log.gz", *names[1:]]
        agg.apply_retention("r")
        assert sorted(os.listdir(topic)) == sorted([*names, "r.20240501T000000Z.log.gz"])
        agg.cfg = dataclasses.replace(agg.cfg, retain_files=2)  # as a reload would
        agg.apply_retention("r")
        assert sorted(os.listdir(topic)) == names[1:]


@pytest.mark.parametrize("version", [1, 2])
async def test_json_format_per_topic(short_tmp: Path, sender: Sender, version: int) -> None:
    out = short_tmp / "out"
    clock = FakeClock(utc(2024, 1, 2, 3, 4, 5) + 0.25)
    cfg = make_config(short_tmp, topics={"j": {"format": "json"}})
    async with running_aggregator(cfg, clock):
        lines = ["plain line", 'with "quotes" and \\ and \t tab', "ünïcödé ✓ 😀", ""]
        sender.send("j", lines, path="/var/log/j.log", version=version)
        sender.send("raw", lines, stream="s2", version=version)
        await until(lambda: count_lines(out / "j" / "j.log") == 4
                    and count_lines(out / "raw" / "raw.log") == 4, what="both topics written")
    docs = [orjson.loads(x) for x in (out / "j" / "j.log").read_bytes().splitlines()]
    assert docs == [{"line": line, "agent": "fake-01", "path": "/var/log/j.log", "topic": "j",
                     "received": clock.t, "time": "2024-01-02T03:04:05.250000+00:00"}
                    for line in lines]
    assert (out / "raw" / "raw.log").read_text() == "".join(line + "\n" for line in lines)


async def test_forced_rotation_after_a_reopen(short_tmp: Path, sender: Sender) -> None:
    """SIGHUP closes the active files; `aggregatorctl rotate` must still find them."""
    out = short_tmp / "out"
    clock = FakeClock(utc(2024, 2, 29, 8, 0, 0))
    async with running_aggregator(make_config(short_tmp), clock) as agg:
        sender.send("x", make_lines("x", 0, 20))
        await until(lambda: count_lines(out / "x" / "x.log") == 20, what="lines")
        await agg.reopen()
        assert "x" not in agg.sink.files
        assert await agg.rotate_now(None) == ["x.20240229T080000Z.log.gz"]  # its name once compressed
        sender.send("x", make_lines("x", 20, 20))
        await until(lambda: count_lines(out / "x" / "x.log") == 20, what="lines in the new file")
        await until(lambda: not agg._compressions, what="compression done")
    check_exactly_once(output_lines(out, "x", include_rotated=True), {"x": 40})


def test_rotated_name_is_utc_and_sorts() -> None:
    t = utc(2023, 12, 31, 23, 59, 59)
    names = [rotated_name("t", t + 1), rotated_name("t", t), rotated_name("t", t, 2), rotated_name("t", t, 1),
             rotated_name("t", t, 10)]
    assert names[1] == "t.20231231T235959Z.log"
    assert sorted(names) == [names[1], names[3], names[2], names[4], names[0]]


async def test_a_file_left_from_an_earlier_day_rolls_over_at_start(
        short_tmp: Path, sender: Sender) -> None:
    out = short_tmp / "out"
    (out / "old").mkdir(parents=True)
    left = out / "old" / "old.log"
    left.write_text("".join(line + "\n" for line in make_lines("o", 0, 5)))
    yesterday = utc(2024, 4, 1, 18, 0, 0)
    os.utime(left, (yesterday, yesterday))
    clock = FakeClock(utc(2024, 4, 2, 9, 30, 0))
    async with running_aggregator(make_config(short_tmp), clock) as agg:
        sender.send("old", make_lines("o", 5, 5))
        await until(lambda: "old.20240402T093000Z.log.gz" in topic_files(out, "old"), what="rotation")
        await until(lambda: not agg._compressions, what="compression done")
        await until(lambda: count_lines(left) >= 5, what="today's lines")
    check_exactly_once(output_lines(out, "old", include_rotated=True), {"o": 10})
    # Yesterday's lines stay in yesterday's file; today's start the new one.
    rotated = gzip.decompress((out / "old" / "old.20240402T093000Z.log.gz").read_bytes()).decode()
    assert rotated.splitlines() == make_lines("o", 0, 5)
    # Compressed, it keeps its age: retention by days goes by it.
    assert (out / "old" / "old.20240402T093000Z.log.gz").stat().st_mtime == yesterday
    assert output_lines(out, "old") == make_lines("o", 5, 5)


async def test_files_from_an_earlier_day_and_a_crashed_compression_are_all_compressed_at_start(
        short_tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The start-up scan removes temporaries a crash left; it once ran while the rollovers below
    # were already compressing, took their temporaries and sometimes crashed the start.
    out = short_tmp / "out"
    yesterday = utc(2024, 4, 1, 18, 0, 0)
    topics = [f"t{i:02d}" for i in range(12)]
    for topic in topics:
        (out / topic).mkdir(parents=True)
        left = out / topic / f"{topic}.log"
        left.write_text("".join(line + "\n" for line in make_lines(topic, 0, 20_000)))
        os.utime(left, (yesterday, yesterday))
    crashed = out / "t00" / "t00.20240330T000000Z.log"
    crashed.write_text("".join(line + "\n" for line in make_lines("c", 0, 100)))
    (out / "t00" / "t00.20240330T000000Z.log.gz.tmp").write_bytes(b"\x1f\x8b half written")
    clock = FakeClock(utc(2024, 4, 2, 9, 30, 0))
    async with running_aggregator(make_config(short_tmp), clock) as agg:
        await until(lambda: not agg._compressions, timeout=30, what="compressions done")
    def gunzipped(path: Path) -> list[str]:
        return gzip.decompress(path.read_bytes()).decode().splitlines()

    for topic in topics:
        assert gunzipped(out / topic / f"{topic}.20240402T093000Z.log.gz") == make_lines(topic, 0, 20_000)
    assert gunzipped(Path(f"{crashed}.gz")) == make_lines("c", 0, 100)
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".log")) and p.stat().st_size]
    assert not [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]


async def test_a_failed_start_closes_what_it_opened(short_tmp: Path) -> None:
    # The control endpoint is taken: start-up fails after the data sockets are bound.
    blocker = zmq.Context()
    taken = blocker.socket(zmq.PULL)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        cfg = make_config(short_tmp, control=[f"tcp://127.0.0.1:{port}"])
        agg = Aggregator(cfg, clock=FakeClock(utc(2024, 4, 2, 9, 30, 0)))
        with pytest.raises(zmq.ZMQError):
            await asyncio.wait_for(agg.serve(), timeout=15)
        assert set(agg.sockets) == {"pull", "xsub", "xpub"}
        assert all(sock.closed for sock in agg.sockets.values())
        assert agg.ctx is not None and agg.ctx.closed
    finally:
        taken.close(linger=0)
        blocker.term()


# ---- per-agent files and the raw_agent format, against real daemons ------------------------------


def agent_lines(directory: Path, topic: str) -> list[str]:
    """Every line of one agent's (or a topic's) files in ``directory``: rotated ones (gzip'd or
    not) oldest first, then the active one."""
    rotated = sorted((p for p in directory.iterdir() if p.is_file() and p.name != f"{topic}.log"
                      and p.name.startswith(f"{topic}.")), key=lambda p: p.name.removesuffix(".gz"))
    out: list[str] = []
    for p in rotated:
        data = gzip.decompress(p.read_bytes()) if p.name.endswith(".gz") else p.read_bytes()
        out += data.decode().splitlines()
    active = directory / f"{topic}.log"
    return out + (active.read_text().splitlines() if active.exists() else [])


def test_split_by_agent_keeps_each_agents_lines_exactly_once_in_its_own_files_through_kill9_and_rotation(
        h: Harness) -> None:
    """Two agents write one topic; each one's lines land in <topic>/<agent>/, exactly once, in
    order, through aggregator kill -9s and size rotations (compressed); none in the merged file."""
    ep = h.endpoints()
    agg_args = ("aggregator.split_by_agent=true", "aggregator.rotate_max_bytes=60000",
                "aggregator.retain_files=0")
    agg = h.aggregator(ep, *agg_args)
    writers = {}
    for name, tag in (("web-01", "w"), ("db-01", "d")):
        log = h.path("logs", f"{name}.log")
        writers[name] = Writer({tag: log}, lines_per_tick=10, tick_s=0.01).start()
        h.agent(ep, [{"paths": [str(log)], "topic": "app"}], name=name)
    out = h.path("out", "app")
    for cycle in range(1, 3):
        wait_for(lambda: all(count_lines(out / n / "app.log") > 0 for n in writers), timeout=30,
                 what="lines of both agents")
        wait_for(lambda c=cycle: all(len(list((out / n).glob("app.*.log.gz"))) >= c for n in writers),
                 timeout=60, what="a rotated, compressed file of each agent")
        agg.kill9()
        agg = h.aggregator(ep, *agg_args)
    counts = {name: w.stop() for name, w in writers.items()}
    for name, tag in (("web-01", "w"), ("db-01", "d")):
        wait_for(lambda n=name, t=tag: len(agent_lines(out / n, "app")) >= counts[n][t], timeout=60,
                 what=f"every line of {name}")
    wait_for(lambda: all(h.all_acknowledged(n) for n in writers), timeout=30, what="all acknowledged")
    for name in writers:
        check_exactly_once(agent_lines(out / name, "app"), counts[name])
        assert len(list((out / name).glob("app.*.log.gz"))) >= 2
    assert not (out / "app.log").exists() or count_lines(out / "app.log") == 0
    topic = next(t for t in h.status(ep)["topics"] if t["name"] == "app")
    assert topic["file_bytes"] == sum((out / n / "app.log").stat().st_size for n in writers)


def test_raw_agent_format_prefixes_each_line_with_its_agent_and_tail_shows_it(h: Harness) -> None:
    ep = h.endpoints()
    h.aggregator(ep, "aggregator.topics.app.format=\"raw_agent\"")
    for name, tag in (("web-01", "w"), ("db-01", "d")):
        log = h.path("logs", f"{name}.log")
        append_lines(log, make_lines(tag, 0, 5))
        h.agent(ep, [{"paths": [str(log)], "topic": "app"}], name=name)
    out = h.path("out")
    wait_for(lambda: len(output_lines(out, "app")) == 10, timeout=30, what="both agents' lines")
    lines = output_lines(out, "app")
    assert sorted(lines) == sorted([f"web-01 {x}" for x in make_lines("w", 0, 5)]
                                   + [f"db-01 {x}" for x in make_lines("d", 0, 5)])
    r = h.ctl(ep, "tail", "app", "-n", "3", "--count", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == lines[-3:]


def test_hostile_agent_names_stay_inside_their_topic_directory(h: Harness) -> None:
    """Names that are paths (``..``, ``a/b``, ``../../etc``), hidden, spaced, with control
    characters, empty-looking or over-long each get one directory of their own under the topic,
    named safely (formats.safe_name), and a name that is not UTF-8 is dropped as malformed."""
    ep = h.endpoints()
    h.aggregator(ep, "aggregator.split_by_agent=true", "aggregator.format=\"raw_agent\"")
    h.status(ep)
    names = ["..", ".", "a/b", "../../etc", ".hidden", "x y", "tab\there", "nul\x00lf\n", "é" * 120, "%2E",
             "z" * 250, "app.log", "app.20260101T000000Z.log.gz", "x.gz.tmp"]
    for i, name in enumerate(names):
        s = Sender(ep.pull, agent=name)
        s.send("app", [f"line of agent {i}"])
        s.sock.close(linger=5000)
        s.ctx.term()
    s = Sender(ep.pull, agent="BADNAME")
    topic, body = wire.encode_batch(wire.Batch(topic="app", agent="BADNAME", stream="s", base=0,
                                               path="/x", file="1:2:ab", seq=0, start=0, end=5,
                                               lines=["bad!"]))
    s.sock.send_multipart([topic, bytes(body).replace(b'"BADNAME"', b'"\xff\xfe"')])
    s.sock.close(linger=5000)
    s.ctx.term()
    out = h.path("out")
    wait_for(lambda: h.status(ep)["totals"]["lines_written"] == len(names), timeout=30,
             what="a line of each agent written")
    wait_for(lambda: h.status(ep)["totals"]["malformed_dropped"] == 1, timeout=30,
             what="the name that is not UTF-8 dropped")
    # Nothing outside the topic's directory, one directory per agent, no hidden ones.
    assert sorted(p.name for p in out.iterdir()) == ["app"]
    dirs = sorted(p.name for p in (out / "app").iterdir())
    assert len(dirs) == len(names) and all(not d.startswith(".") and "/" not in d for d in dirs)
    assert all(len(d.encode()) <= 200 and (out / "app" / d).is_dir() for d in dirs)
    assert not any(d.endswith((".log", ".gz", ".tmp")) for d in dirs)
    for i, name in enumerate(names):
        d = out / "app" / safe_name(name)
        assert (d / "app.log").read_text() == f"{safe_name(name)} line of agent {i}\n"
    assert safe_name("..") == "%2E." and safe_name("a/b") == "a%2Fb" and safe_name("%2E") == "%252E"
    assert safe_name("app.log") == "app%2Elog" and safe_name("web-01") == "web-01"
