"""fleetlog-writer against a real nats-server: messages published as the aggregators' JetStream
sink publishes them (JETSTREAM-FORMAT.md), real writer processes, real files."""

from __future__ import annotations

import asyncio
import gzip
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import orjson
import pytest
from harness import (
    Harness,
    ask,
    check_exactly_once,
    free_port,
    make_lines,
    mount_tmpfs,
    output_lines,
    wait_for,
)
from nats.js import api
from prometheus_client.parser import text_string_to_metric_families

from aggregator.formats import safe_name

RULES = Path(__file__).parent.parent / "deploy" / "prometheus" / "fleetlog-writer-rules.yml"
STREAM = "FLEETLOG"
PREFIX = "fleetlog"


def escape_token(name: str) -> str:
    """As the sink escapes a name: every UTF-8 byte outside [A-Za-z0-9_-] as ~XX."""
    return "".join(chr(b) if (chr(b).isalnum() and b < 128) or chr(b) in "_-" else f"~{b:02X}"
                   for b in name.encode("utf-8", "surrogateescape"))


class Feed:
    """Publishes batches of id-carrying lines into the stream from an event loop of its own
    (a thread), as aggregators would: per (topic, agent, stream) contiguous byte ranges, a
    message id and the expected-last-subject-sequence precondition."""

    def __init__(self, urls: list[str], **stream_kw: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.offsets: dict[tuple[str, str, str], int] = {}
        self.subject_seq: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self.sent: list[tuple[str, bytes, dict[str, str]]] = []
        self.nc: Any = self.call(nats.connect(servers=urls, max_reconnect_attempts=-1,
                                                         reconnect_time_wait=0.2))
        self.js = self.nc.jetstream()
        config = api.StreamConfig(name=STREAM, storage=api.StorageType.FILE,
                                  **{"duplicate_window": 1.0, "subjects": [f"{PREFIX}.>"], **stream_kw})
        self.call(self.js.add_stream(config))

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def batch(self, topic: str, agent: str, stream: str, tag: str,
              count: int) -> tuple[str, bytes, dict[str, str]]:
        """The next ``count`` lines of ``tag`` as one message (not published)."""
        first = self.counts.get(tag, 0)
        payload = ("\n".join(make_lines(tag, first, count)) + "\n").encode()
        self.counts[tag] = first + count
        key = (topic, agent, stream)
        start = self.offsets.get(key, 0)
        end = self.offsets[key] = start + len(payload)
        subject = f"{PREFIX}.{escape_token(topic)}.{escape_token(agent)}.{escape_token(stream)}"
        headers = {
            "Nats-Msg-Id": f"{escape_token(agent)}.{escape_token(stream)}.{start}.{end}",
            "Fleetlog-Version": "1", "Fleetlog-Topic": escape_token(topic),
            "Fleetlog-Agent": escape_token(agent), "Fleetlog-Stream": escape_token(stream),
            "Fleetlog-Start": str(start), "Fleetlog-End": str(end), "Fleetlog-Lines": str(count),
            "Fleetlog-Path": escape_token(f"/var/log/{tag}.log"), "Fleetlog-Received": f"{time.time():.6f}",
        }
        return subject, payload, headers

    async def _publish(self, subject: str, payload: bytes, headers: dict[str, str],
                       precondition: bool) -> Any:
        if precondition:
            expected = str(self.subject_seq.get(subject, 0))
            headers = {**headers, "Nats-Expected-Last-Subject-Sequence": expected}
        # Through a leader election: the same message again (same id: the stream answers
        # "duplicate" if the first try got in) until the stream takes it, within 30 s.
        deadline = time.monotonic() + 30
        while True:
            try:
                ack = await self.js.publish(subject, payload, headers=headers, timeout=2)
            except nats.js.errors.APIError as exc:
                if exc.code != 503 or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
                continue
            except nats.errors.Error:  # timeouts, no responders, reconnecting
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
                continue
            self.subject_seq[subject] = ack.seq
            return ack

    def publish(self, topic: str, agent: str, stream: str, tag: str, count: int, per_msg: int = 50) -> None:
        """``count`` lines of ``tag`` in messages of ``per_msg`` lines."""
        while count > 0:
            n = min(per_msg, count)
            subject, payload, headers = self.batch(topic, agent, stream, tag, n)
            self.call(self._publish(subject, payload, headers, True))
            self.sent.append((subject, payload, headers))
            count -= n

    def republish(self, index: int) -> Any:
        """Message ``index`` of those sent again, as a publisher that lost its ack might (no
        message id, no precondition: the stream takes it)."""
        subject, payload, headers = self.sent[index]
        headers = {k: v for k, v in headers.items() if k != "Nats-Msg-Id"}
        return self.call(self._publish(subject, payload, headers, False))

    def last_seq(self) -> int:
        """The stream sequence of the last fleetlog message this feed published."""
        return max(self.subject_seq.values())

    def close(self) -> None:
        try:
            self.call(self.nc.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()


@pytest.fixture
def server(nats: Any) -> Any:
    return nats.single()


@pytest.fixture
def feeds() -> Any:
    made: list[Feed] = []

    def make(urls: list[str], **kw: Any) -> Feed:
        made.append(Feed(urls, **kw))
        return made[-1]

    yield make
    for feed in made:
        feed.close()


def writer_status(h: Harness, proc: Any) -> dict[str, Any]:
    """The writer's status, asked in this process (polled often: no aggregatorctl start-up per
    poll; the tests that check aggregatorctl itself run it)."""
    return dict(wait_for(lambda: ask(proc.control, "status", timeout_s=2), timeout=20,
                         what="the writer's status"))


class _Ctl:
    """What Harness.ctl needs of an endpoint set: the control endpoint."""

    def __init__(self, control: str) -> None:
        self.control = control


def caught_up(h: Harness, proc: Any, last_seq: int) -> dict[str, Any] | None:
    s = writer_status(h, proc)
    return s if s["committed_seq"] >= last_seq and s["lag_messages"] == 0 else None


def all_lines(root: Path, topic: str) -> list[str]:
    """Every line of ``topic``, rotated files first. A rotated file being compressed meanwhile
    (its .log gone between the listing and the read) is read again under its new name."""
    for _ in range(100):
        try:
            return output_lines(root, topic, include_rotated=True)
        except FileNotFoundError:
            continue
    return output_lines(root, topic, include_rotated=True)


def test_writer_writes_every_line_once_in_order_and_rolls_by_size(h: Harness, server: Any,
                                                                  feeds: Any) -> None:
    feed = feeds(server.urls)
    w = h.writer(server.urls, "writer.rotate_max_bytes=20000", "writer.compress=\"gzip\"")
    for _ in range(4):
        feed.publish("app", "web-01", "s1", "a", 250, per_msg=40)
        feed.publish("app", "web.02", "s 2", "b", 250, per_msg=25)
        feed.publish("db", "web-01", "s3", "c", 300, per_msg=60)
    last = feed.last_seq()
    s = wait_for(lambda: caught_up(h, w, last), timeout=60, what="the writer to apply the stream")
    check_exactly_once(all_lines(h.root / "wout", "app"), {"a": 1000, "b": 1000})
    check_exactly_once(all_lines(h.root / "wout", "db"), {"c": 1200})
    rotated = wait_for(lambda: sorted(p.name for p in (h.root / "wout" / "app").iterdir()
                                      if p.name.endswith(".log.gz")), timeout=30, what="compressed files")
    assert rotated, rotated
    assert all(gzip.decompress((h.root / "wout" / "app" / n).read_bytes()) for n in rotated)
    s = writer_status(h, w)  # again: rotations run after the commit that caught up
    assert s["totals"]["lines_written"] == 3200 and s["totals"]["duplicates_dropped"] == 0
    assert s["totals"]["rotations"] >= 1 and s["discarded"]["unwritten_total"] == 0
    assert {t["name"]: t["lines"] for t in s["topics"]} == {"app": 2000, "db": 1200}
    text = h.ctl(_Ctl(w.control), "status")
    assert text.returncode == 0 and "writer" in text.stdout and "lag: 0 messages" in text.stdout, text
    # One topic rolled over on request (this stopped the writer: the shared command asked it for
    # the aggregator's topic table); a topic it never wrote is refused.
    feed.publish("db", "web-01", "s3", "c", 10)
    wait_for(lambda: caught_up(h, w, feed.last_seq()), timeout=60, what="the writer to apply 10 more")
    rotated = h.ctl(_Ctl(w.control), "rotate", "db")
    assert rotated.returncode == 0 and rotated.stdout.startswith("rotated to db."), rotated
    nosuch = h.ctl(_Ctl(w.control), "rotate", "nosuch")
    assert nosuch.returncode == 1 and "no such topic" in nosuch.stderr, nosuch
    assert w.alive() and writer_status(h, w)["totals"]["rotations"] >= 2
    assert w.stop() == 0
    assert "Traceback" not in w.log()


def test_writer_killed_repeatedly_while_messages_flow_writes_every_line_once(
        h: Harness, server: Any, feeds: Any) -> None:
    feed = feeds(server.urls)
    stop = threading.Event()

    def publish() -> None:
        while not stop.is_set():
            feed.publish("app", "web-01", "s1", "a", 40, per_msg=20)
            feed.publish("app", "web-02", "s2", "b", 30, per_msg=10)
            time.sleep(0.01)

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    w = h.writer(server.urls, "writer.rotate_max_bytes=200000", "writer.commit_interval_ms=50")
    def cut_seen() -> bool:
        return "cutting" in "".join(p.log() for p in h.procs if p.name.startswith("writer"))

    try:
        # Five kills, and more (up to 30) until one has left an uncommitted tail to cut: on a
        # loaded machine a kill can land just after a commit (CI once saw 15 in a row do so).
        for kills in range(30):
            if kills >= 5 and cut_seen():
                break
            base = wait_for(lambda w=w: writer_status(h, w)["committed_seq"], timeout=30,
                            what="the writer to commit")
            wait_for(lambda w=w, base=base: writer_status(h, w)["applied_seq"] > base + 20, timeout=30,
                     what="the writer to apply more")
            w.kill9()
            w = h.writer(server.urls, "writer.rotate_max_bytes=200000", "writer.commit_interval_ms=50")
    finally:
        stop.set()
        publisher.join(timeout=30)
    last = feed.last_seq()
    s = wait_for(lambda: caught_up(h, w, last), timeout=60, what="the writer to catch up")
    check_exactly_once(all_lines(h.root / "wout", "app"), dict(feed.counts))
    assert s["totals"]["stream_gaps"] == 0 and s["discarded"]["unwritten_total"] == 0
    # Exactly once by the position alone: the safety net had nothing to drop.
    assert s["totals"]["duplicate_messages"] == 0
    assert cut_seen(), "no kill left an uncommitted tail to cut: the soak did not test recovery"
    h.assert_quiet()


def agent_files_lines(directory: Path, topic: str) -> list[str]:
    """The lines of one agent's files of ``topic`` (``<topic>/<agent>/``): rotated ones oldest
    first (compressed or not), then the active file. A file compressed between the listing and
    the read is read again under its new name."""
    for _ in range(100):
        try:
            out: list[str] = []
            for p in sorted(directory.glob(f"{topic}.*.log*")):
                data = gzip.decompress(p.read_bytes()) if p.name.endswith(".gz") else p.read_bytes()
                out += data.decode(errors="replace").splitlines()
            active = directory / f"{topic}.log"
            return out + (active.read_text(errors="replace").splitlines() if active.exists() else [])
        except FileNotFoundError:
            continue
    raise AssertionError(f"{directory}'s files kept changing under the reader")


def test_writer_split_by_agent_keeps_each_agents_lines_once_in_its_own_files_through_kill9_and_rotation(
        h: Harness, server: Any, feeds: Any) -> None:
    """split_by_agent, as the aggregator's files sink does it (the same key function): each
    agent's lines of a split topic in <topic>/<agent>/<topic>.log (the name made safe), exactly
    once through a kill -9 and rotations; a topic not split keeps its one file; per topic too."""
    feed = feeds(server.urls)
    args = ("writer.split_by_agent=true", "writer.topics.db.split_by_agent=false",
            "writer.rotate_max_bytes=20000", "writer.retain_files=0")
    w = h.writer(server.urls, *args)
    agents = {"web-01": "a", "db 01": "b"}
    for agent, tag in agents.items():
        feed.publish("app", agent, f"s-{tag}", tag, 300, per_msg=30)
    feed.publish("db", "web-01", "s-c", "c", 200, per_msg=40)
    wait_for(lambda: caught_up(h, w, feed.last_seq()), timeout=60, what="the writer to apply the stream")
    w.kill9()
    w = h.writer(server.urls, *args)
    for agent, tag in agents.items():
        feed.publish("app", agent, f"s-{tag}", tag, 300, per_msg=30)
    s = wait_for(lambda: caught_up(h, w, feed.last_seq()), timeout=60, what="the writer to catch up")
    out = h.root / "wout"
    for agent, tag in agents.items():
        directory = out / "app" / safe_name(agent)
        check_exactly_once(agent_files_lines(directory, "app"), {tag: 600})
        assert list(directory.glob("app.*.log*")), "no rotated file of " + agent
    assert safe_name("db 01") == "db%2001"
    assert not (out / "app" / "app.log").exists() or (out / "app" / "app.log").stat().st_size == 0
    check_exactly_once(all_lines(out, "db"), {"c": 200})
    assert [p.name for p in (out / "db").iterdir() if p.is_dir()] == []
    assert s["totals"]["duplicate_messages"] == 0 and s["totals"]["lines_written"] == 600  # since the restart
    # A split topic's active file size is its agents' together.
    app = next(t for t in writer_status(h, w)["topics"] if t["name"] == "app")
    active = [out / "app" / safe_name(a) / "app.log" for a in agents]
    assert (app["file_bytes"] or 0) == sum(p.stat().st_size for p in active if p.exists())
    # Each agent's file is rolled over on request, and named with its directory.
    for agent, tag in agents.items():
        feed.publish("app", agent, f"s-{tag}", tag, 5)
    wait_for(lambda: caught_up(h, w, feed.last_seq()), timeout=60, what="the writer to apply 10 more")
    rotated = h.ctl(_Ctl(w.control), "rotate", "app")
    assert rotated.returncode == 0, rotated
    names = [line.split()[2] for line in rotated.stdout.splitlines()]
    assert sorted(n.split("/")[1] for n in names) == sorted(safe_name(a) for a in agents), names
    assert w.stop() == 0
    assert "Traceback" not in w.log()


def test_two_writers_make_two_full_copies(h: Harness, server: Any, feeds: Any) -> None:
    feed = feeds(server.urls)
    w1 = h.writer(server.urls, out="copy1", state="st1")
    feed.publish("app", "web-01", "s1", "a", 500)
    w2 = h.writer(server.urls, out="copy2", state="st2")
    feed.publish("app", "web-02", "s2", "b", 500)
    last = feed.last_seq()
    for w in (w1, w2):
        wait_for(lambda w=w: caught_up(h, w, last), timeout=60, what="both writers to catch up")
    for out in ("copy1", "copy2"):
        check_exactly_once(all_lines(h.root / out, "app"), {"a": 500, "b": 500})
    copies = [(h.root / out / "app" / "app.log").read_bytes() for out in ("copy1", "copy2")]
    assert copies[0] == copies[1]


def test_stream_discarding_unwritten_messages_raises_the_alarm(h: Harness, server: Any, feeds: Any) -> None:
    feed = feeds(server.urls, max_msgs=20, discard=api.DiscardPolicy.OLD)
    metrics_port = free_port()
    extra = (f"writer.metrics_listen=\"127.0.0.1:{metrics_port}\"",)
    w = h.writer(server.urls, *extra)
    feed.publish("app", "web-01", "s1", "a", 100, per_msg=10)
    first = wait_for(lambda: caught_up(h, w, feed.last_seq()), timeout=60, what="the writer to catch up")
    assert first["discarded"]["unwritten_total"] == 0
    assert w.stop() == 0
    applied = first["committed_seq"]
    feed.publish("app", "web-01", "s1", "a", 500, per_msg=10)  # 50 messages; the stream keeps 20
    last = feed.last_seq()
    w = h.writer(server.urls, *extra)
    s = wait_for(lambda: caught_up(h, w, last), timeout=60, what="the writer to catch up")
    gone = last - 20 - applied
    assert s["discarded"]["unwritten_total"] == gone, s["discarded"]
    assert s["discarded"]["last"]["first_seq"] == applied + 1
    assert s["discarded"]["last"]["last_seq"] == last - 20
    assert s["totals"]["stream_gaps"] == 1  # the (agent, stream) net sees the same hole
    log_text = w.log()
    assert f"discarded {gone} messages" in log_text and "ERROR" in log_text
    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    # lag_seconds is known from the writer's first look at the stream (once a second).
    text = wait_for(lambda: "fleetlog_writer_lag_seconds" in (t := scrape()) and t,
                    what="lag_seconds in the metrics")
    assert f"fleetlog_writer_discarded_unwritten_total {float(gone)}" in text, text
    assert "fleetlog_writer_lag_messages 0.0" in text
    exposed = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    used = set(re.findall(r"\bfleetlog_writer_[a-z_]+", RULES.read_text()))
    assert len(used) >= 4 and not used - exposed, sorted(used - exposed)
    lines = all_lines(h.root / "wout", "app")
    ids = [int(line.split(" ", 1)[0].split("#")[1]) for line in lines]
    kept = list(range(100)) + list(range(600 - 200, 600))  # 20 messages of 10 lines survived
    assert ids == kept


def test_duplicate_message_is_dropped_and_counted(h: Harness, server: Any, feeds: Any) -> None:
    feed = feeds(server.urls)
    w = h.writer(server.urls)
    feed.publish("app", "web-01", "s1", "a", 100, per_msg=25)
    ack = feed.republish(1)  # lines 25..49 once more, as a separate stream message
    assert not ack.duplicate
    feed.publish("app", "web-01", "s1", "a", 50, per_msg=25)
    last = feed.last_seq()
    s = wait_for(lambda: caught_up(h, w, last), timeout=60, what="the writer to catch up")
    check_exactly_once(all_lines(h.root / "wout", "app"), {"a": 150})
    assert s["totals"]["duplicate_messages"] == 1 and s["totals"]["duplicates_dropped"] == 25
    assert s["totals"]["stream_gaps"] == 0


def test_writer_sigterm_then_restart_resumes_after_its_position(h: Harness, server: Any, feeds: Any) -> None:
    feed = feeds(server.urls)
    w = h.writer(server.urls)
    feed.publish("app", "web-01", "s1", "a", 200)
    wait_for(lambda: caught_up(h, w, feed.last_seq()), timeout=60, what="the writer to catch up")
    w.popen.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_for(lambda: "configuration reloaded" in w.log(), what="the reload")
    assert w.stop() == 0
    feed.publish("app", "web-01", "s1", "a", 200)
    w = h.writer(server.urls)
    s = wait_for(lambda: caught_up(h, w, feed.last_seq()), timeout=60, what="the writer to catch up")
    check_exactly_once(all_lines(h.root / "wout", "app"), {"a": 400})
    assert s["totals"]["duplicate_messages"] == 0 and s["totals"]["messages_applied"] == 4


def test_stream_leader_killed_while_the_writer_reads_loses_nothing(h: Harness, nats: Any, feeds: Any) -> None:
    cluster = nats.cluster(3)
    feed = feeds(cluster.urls, num_replicas=3, duplicate_window=120.0)
    w = h.writer(cluster.urls)
    feed.publish("app", "web-01", "s1", "a", 400, per_msg=20)
    wait_for(lambda: writer_status(h, w)["applied_seq"] >= 5, timeout=60, what="the writer to read")
    cluster.kill(cluster.stream_leader(STREAM))
    feed.publish("app", "web-01", "s1", "a", 400, per_msg=20)  # retried through the election
    last = feed.last_seq()
    s = wait_for(lambda: caught_up(h, w, last), timeout=60, what="the writer to catch up")
    check_exactly_once(all_lines(h.root / "wout", "app"), {"a": 800})
    assert s["discarded"]["unwritten_total"] == 0 and s["totals"]["stream_gaps"] == 0
    assert s["totals"]["duplicate_messages"] == 0 and "made anew" not in w.log()
    h.assert_quiet()


def test_writer_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """deploy/systemd/fleetlog-writer.service, its ExecStart* pointed at a stub (verify insists
    that commands exist): no warning from ``systemd-analyze verify``, low exposure."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    stub = tmp_path / "bin" / "fleetlog-writer"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    source = Path(__file__).parent.parent / "deploy" / "systemd" / "fleetlog-writer.service"
    unit = tmp_path / "fleetlog-writer.service"
    unit.write_text(source.read_text().replace("/opt/fleetlog/venv/bin/", f"{stub.parent}/"))
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"})
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify
    security = subprocess.run([analyze, "security", "--offline=true", "--threshold=30", str(unit)],
                              capture_output=True, text=True, timeout=60)
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr
    text = source.read_text()
    for line in ("Type=notify", "WatchdogSec=30", "Restart=on-failure", "KillSignal=SIGTERM",
                 "ExecStart=/opt/fleetlog/venv/bin/fleetlog-writer --config /etc/fleetlog/writer.toml",
                 "ExecReload=/bin/kill -HUP $MAINPID", "StateDirectory=fleetlog/writer"):
        assert f"\n{line}\n" in text, line


@pytest.fixture
def small_fs(short_tmp: Path) -> Any:
    mount = short_tmp / "wout"
    mount_tmpfs(mount, "256k")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_output_disk_full_then_room_again_loses_nothing(h: Harness, server: Any, feeds: Any,
                                                        small_fs: Path) -> None:
    feed = feeds(server.urls)
    w = h.writer(server.urls, "writer.rotate_max_bytes=0")
    feed.publish("app", "web-01", "s1", "a", 6000, per_msg=100)  # ~430 KB into 256 KB
    s = wait_for(lambda: (s := writer_status(h, w))["disk_error"] and s, timeout=60,
                 what="the writer to find the output full")
    assert s["lag_messages"] > 0 and w.alive()
    assert "output not writable" in w.log()
    r = subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    last = feed.last_seq()
    s = wait_for(lambda: caught_up(h, w, last), timeout=60, what="the writer to write the rest")
    assert s["disk_error"] is None and "output writable again" in w.log()
    check_exactly_once(all_lines(small_fs, "app"), {"a": 6000})
    h.assert_quiet()


def test_readme_writer_config_passes_check_config(short_tmp: Path) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("    # /etc/fleetlog/writer.toml\n", 1)[1].split("\n\n", 1)[0]
    config = short_tmp / "writer.toml"
    config.write_text("\n".join(line[4:] for line in block.splitlines()) + "\n")
    base = [sys.executable, "-m", "writer", "--config", str(config), "--check-config",
            "--set", f"writer.output_dir={short_tmp / 'o'}", "--set", f"writer.state_dir={short_tmp / 's'}"]
    ok = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([*base, "--set", "writer.servers=[\"http://x\"]", "--set",
                          "writer.rotate_max_byte=1", "--set", "writer.stream=\"a.b\""],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    for key in ("writer.servers", "writer.rotate_max_byte: unknown key; did you mean rotate_max_bytes?",
                "writer.stream"):
        assert key in bad.stderr, bad.stderr


def test_readme_says_where_the_writer_control_socket_is_and_why() -> None:
    """The README's writer socket is the one the unit's own RuntimeDirectory holds and the role
    sets, and it says why it is not the design's /run/fleetlog/writer.sock (systemd removes the
    aggregator's /run/fleetlog when the aggregator stops)."""
    repo = Path(__file__).parent.parent
    readme = repo / "README.md"
    section = readme.read_text().split("## fleetlog-writer\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("    # /etc/fleetlog/writer.toml\n", 1)[1].split("\n\n", 1)[0]
    example = tomllib.loads("\n".join(line[4:] for line in block.splitlines()))["writer"]
    assert example["control"] == "ipc:///run/fleetlog-writer/control.sock"
    unit = (repo / "deploy" / "systemd" / "fleetlog-writer.service").read_text()
    assert "RuntimeDirectory=fleetlog-writer\n" in unit
    role = (repo / "deploy" / "ansible" / "roles" / "fleetlog_writer" / "defaults" / "main.yml").read_text()
    assert "- ipc:///run/fleetlog-writer/control.sock" in role
    prose = " ".join(section.split())
    for said in ("RuntimeDirectory=fleetlog-writer", "ipc:///run/fleetlog/writer.sock",
                 "systemd removes whenever the aggregator stops", "tcp://127.0.0.1:5559"):
        assert said in prose, said


def test_malformed_and_overlapping_messages_never_stop_the_writer(h: Harness, server: Any,
                                                                  feeds: Any) -> None:
    feed = feeds(server.urls)
    w = h.writer(server.urls, "writer.topics.js.format=json")
    feed.publish("app", "web-01", "s1", "a", 100, per_msg=50)
    feed.call(feed.js.publish(f"{PREFIX}.app.x.y", b"no headers\n"))
    feed.call(feed.js.publish(f"{PREFIX}.app.x.y", b"v2\n", headers={"Fleetlog-Version": "2"}))
    # Lines 90..119 again from offset 90 * 72: the 10 already written are cut off at a line.
    width = len(make_lines("a", 0, 1)[0]) + 1
    subject, payload, headers = feed.batch("app", "web-01", "s1", "a", 30)
    payload = ("\n".join(make_lines("a", 90, 30)) + "\n").encode()
    headers |= {"Fleetlog-Start": str(90 * width), "Fleetlog-End": str(120 * width)}
    feed.subject_seq[subject] = feed.call(feed.js.publish(subject, payload, headers=headers)).seq
    feed.offsets[("app", "web-01", "s1")], feed.counts["a"] = 120 * width, 120
    feed.publish("app", "web-01", "s1", "a", 30)
    feed.publish("js", "web.01", "j1", "j", 10)
    s = wait_for(lambda: caught_up(h, w, feed.last_seq()), timeout=60, what="the writer to catch up")
    check_exactly_once(all_lines(h.root / "wout", "app"), {"a": 150})
    assert s["malformed"] == {"no_headers": 1, "bad_version": 1}, s["malformed"]
    assert s["totals"]["overlaps"] == 0 and s["totals"]["duplicate_messages"] == 0
    assert s["totals"]["duplicates_dropped"] == 10   # the front cut off: lines dropped, counted
    objects = [orjson.loads(line) for line in all_lines(h.root / "wout", "js")]
    assert [o["line"] for o in objects] == make_lines("j", 0, 10)
    assert {(o["agent"], o["path"], o["topic"]) for o in objects} == {("web.01", "/var/log/j.log", "js")}
    assert w.log().count("dropped a malformed message") == 2


def test_message_headers_read_back() -> None:
    from writer import message

    for name in ("web-01", "a.b c~d", "é/ü", "raw\udcff\udc80bytes", ""):
        assert message.unescape_token(escape_token(name)) == name
    for bad in ("a.b", "~2", "~zz", "x y"):
        with pytest.raises(message.BadMessage):
            message.unescape_token(bad)
    headers = {"Fleetlog-Version": "1", "Fleetlog-Topic": "app", "Fleetlog-Agent": "web~2E01",
               "Fleetlog-Stream": "s1", "Fleetlog-Start": "10", "Fleetlog-End": "16", "Fleetlog-Lines": "2",
               "Fleetlog-Path": "~2Fvar~2Flog~2Fx", "Fleetlog-Received": "1764495600.5"}
    m = message.parse(headers, b"ab\ncd\n")
    assert (m.agent, m.path, m.start, m.end, m.lines, m.key) == ("web.01", "/var/log/x", 10, 16, 2,
                                                                 "web.01\x1fs1")
    for change, reason in (({"Fleetlog-Lines": "3"}, "bad_payload"), ({"Fleetlog-End": "9"}, "bad_range"),
                           ({"Fleetlog-Topic": "~2Eapp"}, "bad_topic"),
                           ({"Fleetlog-Start": "-1"}, "bad_header"),
                           ({"Fleetlog-Fields": "[{}]"}, "bad_fields")):
        with pytest.raises(message.BadMessage) as exc:
            message.parse(headers | change, b"ab\ncd\n")
        assert exc.value.reason == reason


def test_nats_server_restarted_and_foreign_subjects_in_the_stream_lose_nothing(
        h: Harness, server: Any, feeds: Any) -> None:
    feed = feeds(server.urls, subjects=[f"{PREFIX}.>", "other.>"])
    w = h.writer(server.urls)
    for _ in range(3):
        feed.publish("app", "web-01", "s1", "a", 100, per_msg=20)
        feed.call(feed.js.publish("other.thing", b"not for the writer"))
    wait_for(lambda: caught_up(h, w, feed.last_seq()), timeout=60, what="the writer to catch up")
    server.restart(0)  # SIGKILL, then the same ports and store; the writer's consumer is gone
    for _ in range(3):
        feed.publish("app", "web-01", "s1", "a", 100, per_msg=20)
        feed.call(feed.js.publish("other.thing", b"not for the writer"))
    s = wait_for(lambda: caught_up(h, w, feed.last_seq()), timeout=60, what="the writer to catch up")
    check_exactly_once(all_lines(h.root / "wout", "app"), {"a": 600})
    assert s["discarded"]["unwritten_total"] == 0 and s["malformed"] == {}
    assert s["totals"]["consumers_made"] >= 2 and s["totals"]["duplicate_messages"] == 0
    assert "made anew" not in w.log()
    h.assert_quiet()


def test_writer_waits_for_nats_and_the_stream_and_says_so(h: Harness, server: Any, feeds: Any) -> None:
    nowhere = h.writer([f"nats://127.0.0.1:{free_port()}"], out="o1", state="s1")
    s = wait_for(lambda: (s := writer_status(h, nowhere))["nats"]["problem"] and s, timeout=30,
                 what="the writer to say NATS is not there")
    assert not s["nats"]["connected"] and nowhere.alive()
    w = h.writer(server.urls)  # the stream does not exist yet
    wait_for(lambda: "does not exist" in (writer_status(h, w)["nats"]["problem"] or ""), timeout=30,
             what="the writer to say the stream is missing")
    feed = feeds(server.urls)
    feed.publish("app", "web-01", "s1", "a", 100)
    s = wait_for(lambda: caught_up(h, w, feed.last_seq()), timeout=60, what="the writer to catch up")
    assert s["nats"]["problem"] is None and s["nats"]["connected"]
    check_exactly_once(all_lines(h.root / "wout", "app"), {"a": 100})
    rotated = h.ctl(_Ctl(w.control), "rotate")
    assert rotated.returncode == 0 and "rotated to app." in rotated.stdout, rotated
    assert w.log().count("does not exist") == 1 and nowhere.log().count("WARNING") == 1
    h.assert_quiet()
    assert nowhere.stop() == 0 and w.stop() == 0


def test_writer_alerting_rules_pass_their_unit_tests() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus package; make system-deps installs it) is missing")
    for argv in (["check", "rules", RULES.name], ["test", "rules", "fleetlog-writer-rules.test.yml"]):
        r = subprocess.run([promtool, *argv], cwd=RULES.parent, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


def test_journal_keeps_the_writers_marks_across_compaction(tmp_path: Path) -> None:
    from aggregator.journal import Journal

    j = Journal(str(tmp_path), compact_bytes=400)
    j.recover()
    for seq in range(1, 30):
        j.append({"app": seq * 10}, {"a\x1fs": seq * 10}, marks={"stream_seq": seq, "stream_created": "t"})
    j.append({"app": 300}, {}, rotations={"app": {"name": "app.x.log", "size": 300}})  # no marks: kept
    j.close()
    assert (tmp_path / "state.json").exists()  # compacted on the way
    state = Journal(str(tmp_path)).recover()
    assert state.marks == {"stream_seq": 29, "stream_created": "t"}
    assert state.topics == {"app": 300} and state.streams["a\x1fs"][0] == 290


def test_the_aggregators_jetstream_sink_and_the_writer_agree(h: Harness, nats: Any) -> None:
    """What the aggregator's sink publishes (messages split at lines under a small max_payload,
    escaped names, journal fields) the writer writes back byte for byte (raw) and line for line
    with the fields (json). Skips on a branch without the sink (aggregator/jetstream.py)."""
    jetstream = pytest.importorskip("aggregator.jetstream")
    from aggregator.config import JetStreamConfig

    server = nats.single(max_payload=65536)
    sources = {("app", "web.01", "s1", "/var/log/a b.log"): 3000,
               ("db", "web-02", "s~2", "/var/log/db.log"): 2000}
    texts = {key: [f"{key[1]} line {i:06d} ".encode().ljust(300, b"x") + b"\n" for i in range(n)]
             for key, n in sources.items()}

    async def publish() -> None:
        sink = jetstream.JetStreamSink(JetStreamConfig(servers=tuple(server.urls), stream=STREAM,
                                                       subject_prefix=PREFIX, publish_timeout_s=2.0))
        await sink.start()
        try:
            for (topic, agent, stream, path), lines in texts.items():
                offset = 0
                for i in range(0, len(lines), 100):
                    text = b"".join(lines[i:i + 100])
                    fields = [{"n": i + k, "é": "ü"} for k in range(100)] if topic == "db" else None
                    sink.queue(topic=topic, agent=agent, stream=stream, start=offset, end=offset + len(text),
                             lines=100, text=text, path=path, received=time.time(), fields=fields)
                    offset += len(text)
                    if i % 500 == 0:
                        assert not (await sink.commit()).error
            outcome = await sink.commit()
            assert not outcome.error and not outcome.resync, outcome
        finally:
            await sink.close()

    asyncio.run(publish())
    w = h.writer(server.urls, "writer.topics.db.format=json")
    wait_for(lambda: (s := writer_status(h, w))["applied_seq"] and s["lag_messages"] == 0
             and s["applied_seq"] == s["stream"]["last_seq"], timeout=60, what="the writer to catch up")
    app = texts[("app", "web.01", "s1", "/var/log/a b.log")]
    assert (h.root / "wout" / "app" / "app.log").read_bytes() == b"".join(app)
    objects = [orjson.loads(line) for line in all_lines(h.root / "wout", "db")]
    db = texts[("db", "web-02", "s~2", "/var/log/db.log")]
    assert [o["line"] for o in objects] == [line.decode()[:-1] for line in db]
    assert objects[5]["n"] == 5 and objects[5]["é"] == "ü" and objects[5]["path"] == "/var/log/db.log"


def test_stream_deleted_and_made_anew_is_read_from_its_start(h: Harness, server: Any, feeds: Any) -> None:
    feed = feeds(server.urls)
    w = h.writer(server.urls)
    feed.publish("app", "web-01", "s1", "a", 300, per_msg=10)  # 30 messages
    wait_for(lambda: caught_up(h, w, feed.last_seq()), timeout=60, what="the writer to catch up")
    feed.call(feed.js.delete_stream(STREAM))
    feed.call(feed.js.add_stream(api.StreamConfig(name=STREAM, subjects=[f"{PREFIX}.>"])))
    feed.subject_seq.clear()
    feed.publish("app", "web-01", "s1", "a", 50, per_msg=10)  # sequences 1-5 of the new stream
    wait_for(lambda: len(all_lines(h.root / "wout", "app")) >= 350, timeout=60,
             what="the writer to read the new stream")
    # (Its committed sequence goes down: 30 of the old stream, then 5 of the new one.)
    s = wait_for(lambda: (s := writer_status(h, w))["committed_seq"] == 5 and s, timeout=60,
                 what="the writer to commit the new stream's position")
    check_exactly_once(all_lines(h.root / "wout", "app"), {"a": 350})
    assert s["applied_seq"] == 5 and s["discarded"]["unwritten_total"] == 0
    assert w.log().count("was made anew") == 1
    w.kill9()  # its journal now holds the new stream's position
    w = h.writer(server.urls)
    feed.publish("app", "web-01", "s1", "a", 50, per_msg=10)
    s = wait_for(lambda: caught_up(h, w, feed.last_seq()), timeout=60, what="the writer to catch up")
    check_exactly_once(all_lines(h.root / "wout", "app"), {"a": 400})
    assert "made anew" not in w.log() and s["totals"]["duplicate_messages"] == 0


def test_writer_status_keeps_its_topic_counts_across_a_restart(h: Harness, server: Any, feeds: Any) -> None:
    """After a restart the status still lists the topics with their lines, not `topics (0)`
    (found by a fresh-user review)."""
    feed = feeds(server.urls)
    feed.publish("app", "web-01", "s1", "a", 300)
    w = h.writer(server.urls)
    wait_for(lambda: caught_up(h, w, feed.last_seq()), timeout=60, what="the writer to catch up")
    assert w.stop() == 0
    w = h.writer(server.urls)
    topics = {t["name"]: t["lines"] for t in writer_status(h, w)["topics"]}
    assert topics == {"app": 300}, topics
