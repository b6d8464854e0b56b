"""The aggregator daemon: binds the sockets, accepts batches, commits, acknowledges."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import zmq
import zmq.asyncio

from aggregator import metrics, proxy, registry
from aggregator.config import Config, load_config
from aggregator.control import ControlServer
from aggregator.formats import format_lines
from aggregator.journal import DurableState, Journal, JournalError, stream_key
from aggregator.rolling import Rolling
from aggregator.security import Guard
from aggregator.writer import (
    Hold,
    RollingFileSink,
    SinkError,
    TopicFile,
    open_files_bound,
    uncompressed_rotated,
)
from fleetlog import __version__, curve, wire
from fleetlog.dirlock import DirectoryLock
from fleetlog.runtime import SystemdNotifier, Wakeup, raise_open_files_limit, start_zmq_threads, supervise
from fleetlog.tomlconf import ConfigError

log = logging.getLogger("fleetlog.aggregator")

_NOW = int(zmq.NOBLOCK)
# Held topics logged one by one; past that, one line counts the rest (a full output disk
# holds every topic at once).
_HOLDS_LOGGED = 10


@dataclass
class AgentInfo:
    name: str
    routing_id: bytes = b""
    route: Any = None  # the control socket the agent talks on
    name_clash_warned: bool = False
    agent_id: str = ""     # the agent's own id (kept in its state_dir): two hosts, two ids
    heartbeat_s: float = 1.0
    problems: list[str] = field(default_factory=list)  # what the agent says is wrong
    # Another live agent with this name, refused while this one is connected: its address and id,
    # and when it last tried (monotonic).
    clash: tuple[str, str, float] | None = None
    address: str = ""
    mode: str = ""
    last_seen: float = 0.0
    connected: bool = False
    stopped: bool = False  # said goodbye: stopped cleanly, not lost
    heard: bool = True     # by this instance (False: remembered from before a restart)
    version: str = ""
    started_at: float = 0.0   # wall-clock time the agent started (from its hello)
    errors: dict[str, int] = field(default_factory=dict)  # its files' troubles (heartbeats)
    file_list: list[str] = field(default_factory=list)     # what it follows (heartbeats, on change)
    lag_bytes: int = 0
    # How old the oldest line the agent has not had acknowledged is (its heartbeats say; 0: none).
    lag_s: float = 0.0
    files: int = 0
    # [[journal]] sources (from heartbeats): entries read and not acknowledged, and how far
    # (seconds of journal time) the last acknowledged entry is behind the newest read.
    journal_lag_entries: int | None = None
    journal_lag_s: float | None = None
    # Flow control: the window last granted to it, and the most it asked for (its own
    # max_inflight_bytes, from its hello; 0: not said).
    window: int = 0
    max_window: int = 0
    lines: int = 0
    bytes: int = 0
    rate: float = 0.0
    _last_lines: int = 0

    def take_report(self, args: dict[str, Any]) -> None:
        """What a hello or heartbeat says of the agent (each field checked; bad ones ignored)."""
        mode = args.get("mode")
        if mode in ("push", "pub"):
            self.mode = mode
        version, started_at = args.get("version"), args.get("started_at")
        if isinstance(version, str) and len(version) <= 64:
            self.version = version
        if isinstance(started_at, int | float) and started_at > 0:
            self.started_at = float(started_at)
        problems = args.get("problems")
        if isinstance(problems, list):
            self.problems = [str(p)[:1000] for p in problems[:10]]
        beat = args.get("heartbeat_interval_ms")
        if type(beat) is int and beat > 0:
            self.heartbeat_s = beat / 1000
        fields = (("lag_bytes", "lag_bytes"), ("files", "files"), ("max_window", "max_inflight_bytes"))
        for attr, key in fields:
            value = args.get(key)
            if type(value) is int and value >= 0:
                setattr(self, attr, value)
        errors, file_list = args.get("errors"), args.get("file_list")
        if isinstance(errors, dict):
            self.errors = {str(k)[:64]: v for k, v in list(errors.items())[:16] if type(v) is int}
        if isinstance(file_list, list):
            self.file_list = [p for p in file_list[:1000] if isinstance(p, str)]
        lag_s = args.get("lag_s")
        if isinstance(lag_s, int | float) and 0 <= lag_s < 1e9:
            self.lag_s = float(lag_s)
        if type(args.get("journal_lag_entries")) is int:
            self.journal_lag_entries = args["journal_lag_entries"]
        if type(args.get("journal_lag_s")) in (int, float):
            self.journal_lag_s = float(args["journal_lag_s"])

    @property
    def catching_up(self) -> bool:
        """Connected with a backlog (by its last hello or heartbeat): it shares the window budget."""
        return self.connected and self.lag_bytes >= wire.MIN_WINDOW


@dataclass
class TopicStats:
    lines: int = 0
    bytes: int = 0
    rate: float = 0.0
    _last_lines: int = 0


@dataclass
class Totals:
    lines_written: int = 0
    bytes_written: int = 0
    batches: int = 0
    duplicates_dropped: int = 0
    malformed_dropped: int = 0
    resyncs: int = 0
    commits: int = 0
    write_errors: int = 0
    rotations: int = 0
    retention_removed: int = 0   # rotated files removed by retention
    # Streams continued at the agent's acknowledged offset, past what our state knew.
    rebased_streams: int = 0
    # Batches refused for want of a file descriptor (taken at a later try).
    descriptor_waits: int = 0
    malformed: dict[str, int] = field(default_factory=dict)


class Aggregator(Rolling):
    def __init__(self, config: Config, clock: Callable[[], float] = time.time,
                 overrides: list[str] | None = None) -> None:
        self.config = config
        # --set items of the command line: applied again on every reload.
        self.overrides = list(overrides or [])
        self.cfg = config.aggregator
        self.clock = clock
        self.instance = uuid.uuid4().hex[:12]
        self.started = time.monotonic()
        self.started_wall = clock()
        self.ctx: zmq.asyncio.Context | None = None
        self.sink = RollingFileSink(self.cfg.output_dir, clock=clock)
        self.locks = [DirectoryLock(self.cfg.state_dir, "aggregator.state_dir"),
                      DirectoryLock(self.cfg.output_dir, "aggregator.output_dir")]
        self.journal = Journal(self.cfg.state_dir, stream_ttl_s=self.cfg.stream_ttl_s)
        self.notifier = SystemdNotifier()
        self.guard = Guard(self.cfg)
        self.agents: dict[str, AgentInfo] = {}
        self.topics: dict[str, TopicStats] = {}
        self.totals = Totals()
        # Next expected start offset of each stream (accepted, maybe not yet durable).
        self.accepted: dict[str, int] = {}
        # Accepted since the last commit: key -> end; acks owed to agents: agent -> {stream: end}.
        self.pending: dict[str, int] = {}
        self.pending_bytes = 0
        self.owed_acks: dict[str, dict[str, int]] = {}
        # Flow control: agents catching up (lag of at least wire.MIN_WINDOW) share the window budget;
        # ``window`` is each one's share, ``granted`` the sum of the windows granted.
        self.catching_up = 0
        self.window: int | None = None
        self.granted = 0
        self.share_window()
        self.disk_error: str | None = None
        # Failed writes (see refuse()): the journal's hold stops everything, a topic's hold
        # (in sink.held) only that topic; ``refusing`` is the one test on the hot path.
        self.state_error: Hold | None = None
        self.refusing = False
        # Streams with batches refused or taken back: key -> (agent, stream, seq of the last
        # refused batch or None, topic, offset we expect); asked to resend once they can be taken.
        self.refused: dict[str, tuple[str, str, int | None, str, int]] = {}
        # The topic of each stream's accepted batches (one topic's failure takes back its streams).
        self.stream_topic: dict[str, str] = {}
        self.descriptors_short_at: float | None = None
        self._holds_unlogged = 0
        self.commit_wake = Wakeup()
        self.readable: dict[str, Wakeup] = {}
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self._warned_peers: set[tuple[str, str]] = set()
        self._registry_error = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._compressions: set[asyncio.Future[Any]] = set()
        # Its own thread: a backlog of big files to compress never delays a commit's fsync.
        self._compressor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compress")
        # Set at shutdown: a compression stops within one chunk (the next start redoes it).
        self._compress_cancel = threading.Event()
        # Retention passes run in a thread, one at a time (aggregator/rolling.py).
        self._retention: asyncio.Future[Any] | None = None
        self._retain_waiting: set[str] = set()
        self._retain_all = False
        self._ahead_warned: set[str] = set()
        self.sockets: dict[str, zmq.asyncio.Socket] = {}
        self.control: ControlServer | None = None
        # Prefixes XPUB subscribers asked for: no subscriber, nothing to publish.
        self.subscriptions: set[bytes] = set()
        self.commit_lock = asyncio.Lock()
        self.commit_latency = metrics.LatencyHistogram()
        # How late the loop ran a 100 ms timer: the longest since start, and per 10 s window
        # (this one and the last), so status shows stalls (a blocking call on the loop).
        self.loop_stall_max_s = 0.0
        self.loop_stall_windows = [0.0, 0.0]
        self.metrics: metrics.MetricsServer | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def startup(self) -> None:
        cfg = self.cfg
        os.makedirs(cfg.output_dir, exist_ok=True)
        os.makedirs(cfg.state_dir, exist_ok=True)
        # Before reading or repairing anything: a second aggregator on the same directories
        # would replay the journal and cut the live one's files back.
        for lock in self.locks:
            if not lock.same_directory_as(self.locks[0]) or lock is self.locks[0]:
                lock.acquire()  # (output_dir may be state_dir itself, by another path)
        self.guard.load(cfg)
        limit = raise_open_files_limit()
        self.sink.max_open = open_files_bound(limit)
        log.info("descriptor limit %d: up to %d topic files open at once", limit, self.sink.max_open)
        journal_existed = os.path.exists(self.journal.journal_path)
        state = self.journal.recover()
        # Streams idle for longer than stream_ttl_s are forgotten here and at each compaction
        # (a full state_dir only postpones it).
        self.journal.compact_quietly()
        if state.damage is None:
            self.recover_rotations(state.rotations)
            positions = dict(state.topics)
            if journal_existed:
                # A topic's first batches are written before its first commit: after a crash in
                # between no record names it, and its whole active file is uncommitted (agents
                # resend it). Without a journal (a new or lost state_dir) nothing can be known.
                for topic in self.sink.topics_on_disk():
                    positions.setdefault(topic, 0)
            self.sink.recover(positions)
        else:
            self.rebuild_journal(state)
        # Before anything is compressed: the scan removes stale temporaries, and must not take
        # one a compression started below is still writing.
        leftovers = uncompressed_rotated(cfg.output_dir)
        # A file whose period ended while we were down rolls over before it takes a new line.
        for topic in self.sink.topics_on_disk():
            if wire.valid_topic(topic):
                self.sink.open_existing(topic)
        await self.rotate_due()
        self.accepted = {k: int(v[0]) for k, v in state.streams.items()}
        self.remember(registry.load(cfg.state_dir))
        self.ctx = zmq.asyncio.Context()
        start_zmq_threads(self.ctx)
        self.guard.start(self.ctx)
        self.sockets = proxy.bind_data_sockets(self.ctx, cfg, self.guard.protect)
        self.control = ControlServer(self, self.ctx, cfg.control, self.guard)
        self.control.bind()
        self.metrics = metrics.serve(self)
        for name in leftovers:
            self._compress_later(name)
        self._tasks = [
            asyncio.create_task(self.receive_loop(self.sockets["pull"], "pull"), name="pull"),
            asyncio.create_task(self.receive_loop(self.sockets["xsub"], "xsub"), name="xsub"),
            asyncio.create_task(proxy.forward_subscriptions(
                self.sockets["xpub"], self.sockets["xsub"], self.subscriptions,
                lambda: self.readable["xsub"].set()), name="subscriptions"),
            asyncio.create_task(self.control.serve(), name="control"),
            asyncio.create_task(self.commit_loop(), name="commit"),
            asyncio.create_task(self.ticker(), name="ticker"),
            asyncio.create_task(self.loop_probe(), name="loop-probe"),
            asyncio.create_task(self.notifier.watchdog(), name="watchdog"),
        ]
        supervise(self._tasks, self.request_stop)
        self.ready.set()
        self.notifier.notify("READY=1", f"STATUS=listening; {len(self.accepted)} streams known")
        log.info("aggregator %s ready: pull %s, xsub %s, xpub %s, control %s; output %s",
                 self.instance, cfg.pull, cfg.xsub, cfg.xpub, ", ".join(cfg.control), cfg.output_dir)

    def rebuild_journal(self, state: DurableState) -> None:
        """After damage (not a crash's torn tail) the journal may have lost commits that were
        acknowledged: keep every topic file whole and record its length as committed. Lines
        after the last commit the journal still knew may then appear twice (agents resend what
        was not acknowledged); none is lost. Agents whose acknowledged offsets are past what
        the journal knows continue from there (see take_agents_base)."""
        extra = self.sink.uncommitted(state.topics)
        before = dict(state.topics)
        sizes = {topic: before.get(topic, 0) + n for topic, n in extra.items()}
        if state.rotations:
            log.error("journal damaged: not finishing the rotations it names (%s); their active"
                      " files are kept as they are", ", ".join(sorted(state.rotations)))
        self.journal.append(sizes, {}, rotations=dict.fromkeys(state.rotations) or None)
        if extra:
            listed = sorted(extra.items())
            log.error("journal damaged: output kept whole; lines past the last commit the journal"
                      " knows may appear twice in: %s%s",
                      ", ".join(f"{t}/{t}.log after byte {before.get(t, 0)} ({n} bytes)"
                                for t, n in listed[:20]),
                      f" and {len(listed) - 20} more topics" if len(listed) > 20 else "")
        log.warning("journal rebuilt from the topic files (commit %d)", self.journal.state.seq)

    async def serve(self) -> None:
        try:
            await self.startup()
        except BaseException:
            await self.release()  # what startup opened before it failed
            raise
        try:
            await self.stopping.wait()
        finally:
            await self.shutdown()

    def request_stop(self) -> None:
        self.stopping.set()

    def remember(self, known: registry.Remembered) -> None:
        """Agents and topics seen before the restart: listed as disconnected until they speak."""
        mono, wall = time.monotonic(), time.time()
        for name, a in known.agents.items():
            seen = a.get("last_seen")
            if name in self.agents or not isinstance(seen, int | float):
                continue
            self.agents[name] = AgentInfo(
                name, address=str(a.get("address", "")), mode=str(a.get("mode", "")),
                version=str(a.get("version", "")), last_seen=mono - max(0.0, wall - seen),
                lines=int(a.get("lines", 0)), bytes=int(a.get("bytes", 0)),
                stopped=bool(a.get("stopped", False)), heard=False)
            self.agents[name]._last_lines = self.agents[name].lines  # no rate from the old count
        for name, t in known.topics.items():
            if name not in self.topics:
                lines = int(t.get("lines", 0))
                self.topics[name] = TopicStats(lines=lines, bytes=int(t.get("bytes", 0)), _last_lines=lines)

    def save_registry(self) -> None:
        mono, wall = time.monotonic(), time.time()
        agents = {a.name: {"address": a.address, "mode": a.mode, "version": a.version,
                           "last_seen": wall - (mono - a.last_seen), "lines": a.lines, "bytes": a.bytes,
                           "stopped": a.stopped}
                  for a in self.agents.values() if a.last_seen}
        topics = {name: {"lines": t.lines, "bytes": t.bytes} for name, t in self.topics.items()}
        try:
            registry.save(self.cfg.state_dir, agents, topics)
            self._registry_error = False
        except OSError as exc:
            if not self._registry_error:
                log.warning("cannot save %s/%s (%s): status will forget agents that are down at the "
                            "next restart; no line is at risk", self.cfg.state_dir, registry.FILE, exc)
            self._registry_error = True

    async def shutdown(self) -> None:
        """Stop taking batches, commit and acknowledge what we hold, then close, all within
        ``shutdown_timeout_s`` (systemd's stop timeout is longer, so we are never killed)."""
        deadline = time.monotonic() + self.cfg.shutdown_timeout_s
        self.notifier.notify("STOPPING=1")
        log.info("aggregator stopping")
        receivers = [t for t in self._tasks if t.get_name() in ("pull", "xsub", "ticker", "watchdog",
                                                                "subscriptions", "loop-probe")]
        for task in receivers:
            task.cancel()
        await asyncio.gather(*receivers, return_exceptions=True)
        try:
            async with asyncio.timeout_at(_loop_deadline(deadline)):
                async with self.commit_lock:
                    await self.commit()
        except (TimeoutError, SinkError) as exc:
            log.warning("final commit did not finish (%s); agents will resend what was not acknowledged",
                        exc or f"not within shutdown_timeout_s={self.cfg.shutdown_timeout_s}")
        self.tell_agents_stopping()
        self.save_registry()
        await self.release(deadline)

    def tell_agents_stopping(self) -> int:
        """Tell every connected agent that this aggregator stops (after the final commit's acks,
        on the same connection, so they arrive first): agents with another aggregator move to
        it at once instead of after a heartbeat timeout. The control sockets linger on close,
        so the events go out. Returns how many agents were told. Self-contained: called once,
        from shutdown."""
        body = wire.encode_event(wire.EVENT_STOPPING, instance=self.instance)
        told = 0
        for info in self.agents.values():
            if info.connected and info.routing_id and info.route is not None:
                self.send_event(info.name, body)
                told += 1
        if told:
            log.info("told %d connected agents that this aggregator stops", told)
        return told

    async def release(self, deadline: float | None = None) -> None:
        """Cancel the tasks, let compressions finish until shortly before ``deadline`` (a
        time.monotonic() value; default: shutdown_timeout_s from now) and stop the rest between
        two chunks (the next start compresses those files again), close files and sockets."""
        if deadline is None:
            deadline = time.monotonic() + self.cfg.shutdown_timeout_s
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        margin = min(0.5, self.cfg.shutdown_timeout_s / 4)  # a chunk takes some 30 ms
        if self._compressions:
            await asyncio.wait(self._compressions, timeout=max(0.0, deadline - margin - time.monotonic()))
        self._compress_cancel.set()
        if self._compressions:
            _, pending = await asyncio.wait(self._compressions, timeout=margin)
            if pending:
                log.warning("%d compressions did not stop in time; their files are compressed again"
                            " at the next start", len(pending))
        self._compressor.shutdown(wait=False, cancel_futures=True)
        try:
            async with asyncio.timeout_at(_loop_deadline(deadline + margin)):
                await self.close_files()
        except TimeoutError:
            log.warning("the active files could not be made durable within shutdown_timeout_s; what"
                        " was not committed is resent by the agents")
        self.sink.close()
        self.journal.close()
        if self.metrics is not None:
            self.metrics.close()
        for sock in self.sockets.values():
            sock.close(linger=0)
        if self.control is not None:
            self.control.close()
        self.guard.stop()
        if self.ctx is not None:
            self.ctx.term()
        self.notifier.close()
        for lock in self.locks:
            lock.release()
        log.info("aggregator stopped")

    async def reload(self, path: str | None = None) -> dict[str, Any]:
        """Load, validate, diff, apply; a bad config is reported and the running one stays."""
        source = path or (None if self.config.source.startswith("<") else self.config.source)
        try:
            new = load_config(source, self.overrides)
        except ConfigError as exc:
            log.warning("reload refused, keeping the running config: %s", "; ".join(exc.problems))
            return {"reloaded": False, "problems": exc.problems}
        # max_message_bytes too: agents size their batches by the value their hello was told,
        # and the sockets' MAXMSGSIZE is set at bind.
        fixed = ("output_dir", "state_dir", "pull", "xsub", "xpub", "control", "metrics_listen", "loop",
                 "curve_secret_key", "max_message_bytes")
        changed = [k for k in fixed if getattr(new.aggregator, k) != getattr(self.cfg, k)]
        if changed:
            log.warning("reload: %s need a restart to change; keeping the running values",
                        ", ".join(changed))
            kept = {k: getattr(self.cfg, k) for k in fixed}
            new = Config(aggregator=dataclasses.replace(new.aggregator, **kept), source=new.source)
        if new.aggregator.log_level != self.cfg.log_level:
            logging.getLogger().setLevel(new.aggregator.log_level.upper())
        try:
            self.guard.reload(new.aggregator)
        except curve.KeyError_ as exc:
            log.warning("reload refused, keeping the running config and keys: %s", exc)
            return {"reloaded": False, "problems": [str(exc)]}
        self.config, self.cfg = new, new.aggregator
        await self.reopen()
        log.info("configuration reloaded from %s", new.source)
        return {"reloaded": True, "restart_needed": changed}

    async def reopen(self) -> None:
        """Commit, then close the active files so the next write reopens them by name."""
        async with self.commit_lock:
            await self.commit()
            await self.close_files()

    async def rotate_now(self, topic: str | None) -> list[str]:
        """``aggregatorctl rotate [TOPIC]``: commit, then roll the topic (or all) over."""
        async with self.commit_lock:
            await self.commit()
            return await self.rotate_due({topic})

    # -- ingestion ----------------------------------------------------------------------------

    async def receive_loop(self, sock: zmq.asyncio.Socket, via: str) -> None:
        """Take everything queued on ``sock`` each time its descriptor says so.

        The socket is read through a plain (shadow) socket, with no pyzmq future per message or
        per wake-up: the loop watches ``ZMQ_FD`` and each wake-up receives until ZeroMQ says
        ``EAGAIN`` (the descriptor only signals again after that). Receiving until ``EAGAIN``
        costs less than asking ``ZMQ_EVENTS`` before each message (2.7 against 4.2 us).
        """
        raw: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
        loop = asyncio.get_running_loop()
        readable = self.readable[via] = Wakeup()
        fd = cast(int, raw.getsockopt(zmq.FD))
        loop.add_reader(fd, readable.set)
        recv, ingest = raw.recv, self.ingest
        try:
            while True:
                readable.clear()
                for _ in range(256):
                    try:
                        frames = [recv(_NOW, copy=False)]
                    except zmq.Again:
                        break
                    # A message's later parts are there once its first is; Frame.more spares
                    # recv_multipart's getsockopt(RCVMORE) and its enum per part.
                    while frames[-1].more:
                        frames.append(recv(_NOW, copy=False))
                    ingest(frames, via)
                else:
                    await asyncio.sleep(0)  # more is waiting: let the rest of the daemon run first
                    continue
                if self.pending_bytes >= self.cfg.commit_max_bytes:
                    self.commit_wake.set()
                await readable.wait(1.0)
        finally:
            loop.remove_reader(fd)

    def malformed(self, reason: str, peer: str, detail: str = "") -> None:
        t = self.totals
        t.malformed_dropped += 1
        t.malformed[reason] = t.malformed.get(reason, 0) + 1
        if (peer, reason) not in self._warned_peers and len(self._warned_peers) < 10_000:
            self._warned_peers.add((peer, reason))
            log.warning("dropped a malformed message from %s: %s %s (logged once per peer and reason)",
                        peer, reason, detail)

    def ingest(self, frames: list[zmq.Frame], via: str) -> None:
        try:
            batch = wire.decode_batch([f.buffer for f in frames], self.cfg.max_message_bytes)
        except wire.WireError as exc:
            self.malformed(exc.reason, f"{via}:{peer_address(frames[-1])}", str(exc))
            return
        if self.refusing and self.refuse(batch):
            return  # not taken, not acknowledged: agents are asked to resend once it can be written
        key = stream_key(batch.agent, batch.stream)
        expected = self.accepted.get(key, batch.base)
        if batch.start == batch.end:
            return
        if expected < batch.base:
            expected = self.take_agents_base(key, batch, expected)
        if batch.end <= expected:
            self.totals.duplicates_dropped += batch.count
            durable = self.journal.state.streams.get(key)
            if durable is not None and durable[0] >= batch.end:
                self.owe_ack(batch.agent, batch.stream, int(durable[0]))
            return
        if batch.start != expected:
            self.totals.resyncs += 1
            self.send_event(batch.agent, wire.encode_event(
                "resync", stream=batch.stream, offset=expected, seq=batch.seq))
            return
        topic = batch.topic
        if self.stream_topic.get(key) != topic and not self.set_stream_topic(key, batch, expected):
            return
        fmt = self.cfg.topic_format(topic)
        try:
            data = self.format_batch(batch, fmt)
        except TypeError:
            self.malformed("bad_lines", f"{via}:{peer_address(frames[-1])}", "lines must be strings")
            return
        n = batch.count
        try:
            self.sink.append(topic, data, n)
        except SinkError as exc:
            self.refused[key] = (batch.agent, batch.stream, batch.seq, topic, expected)
            self.on_write_error(topic, exc, len(data))
            return
        self.accepted[key] = batch.end
        self.pending[key] = batch.end
        self.pending_bytes += len(data)
        stats = self.topics.get(batch.topic)
        if stats is None:
            stats = self.topics[batch.topic] = TopicStats()
        stats.lines += n
        stats.bytes += len(data)
        t = self.totals
        t.lines_written += n
        t.bytes_written += len(data)
        t.batches += 1
        agent = self.agents.get(batch.agent)
        if agent is None:
            agent = self.agents[batch.agent] = AgentInfo(batch.agent, mode="push" if via == "pull" else "pub")
        agent.lines += n
        agent.bytes += len(data)
        agent.last_seen = time.monotonic()
        agent.heard = True
        if self.subscriptions:
            # Subscribers always get version 1 (a list of lines): one shape for consumers.
            proxy.publish(self.sockets["xpub"], frames, batch)

    def format_batch(self, batch: wire.Batch, fmt: str) -> bytes:
        return format_lines(batch.lines, fmt, agent=batch.agent, path=batch.path, topic=batch.topic,
                            received=self.clock(), fields=batch.fields)

    # -- failed writes: a topic held back alone, the journal holding everything -------------------

    def refuse(self, batch: wire.Batch) -> bool:
        """Whether ``batch`` is held back: the journal cannot be written, or its topic cannot.
        Its stream is remembered, and its agent asked to resend once that has changed."""
        hold = self.state_error
        if hold is None:
            hold = self.sink.held.get(batch.topic)
            if hold is None or hold.retrying:
                return False
        key = stream_key(batch.agent, batch.stream)
        self.refused[key] = (batch.agent, batch.stream, batch.seq, batch.topic,
                             max(self.accepted.get(key, batch.base), batch.base))
        hold.refused_batches += 1
        return True

    def set_stream_topic(self, key: str, batch: wire.Batch, expected: int) -> bool:
        """Record a stream's topic; False (the batch waits) while batches of it for another topic
        are uncommitted: one topic's failure must be able to take back all of a stream's."""
        if key in self.pending:
            self.refused[key] = (batch.agent, batch.stream, batch.seq, batch.topic, expected)
            self.commit_wake.set()
            return False
        self.stream_topic[key] = batch.topic
        if len(self.stream_topic) > 2 * len(self.accepted) + 1024:
            self.stream_topic = {k: t for k, t in self.stream_topic.items() if k in self.accepted}
        return True

    def take_agents_base(self, key: str, batch: wire.Batch, expected: int) -> int:
        """The agent says its stream starts at ``batch.base``, past where our state has it: it
        rebased after we asked for an offset it had seen acknowledged (our journal was damaged or
        state_dir restored). Its acknowledgements were real, so its word wins: both sides agree
        on one offset at once instead of asking each other forever."""
        self.totals.rebased_streams += 1
        log.warning("agent %s, %s: continuing its stream at %d, where the agent's acknowledged"
                    " offset stands; our state had it at %d (journal damaged or state_dir restored)",
                    batch.agent, batch.path, batch.base, expected)
        self.accepted[key] = batch.base
        return batch.base

    def on_write_error(self, topic: str, exc: SinkError, need_bytes: int) -> None:
        """A batch for ``topic`` could not be written (the file is as before it)."""
        self.totals.write_errors += 1
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            now = time.monotonic()
            if self.descriptors_short_at is None:
                log.warning("out of file descriptors (%s; %d topic files open, at most %d kept open):"
                            " batches for topics without an open file wait for the next commit, which"
                            " lets files be closed; nothing is lost or doubled. Raise LimitNOFILE if"
                            " this lasts", exc.strerror, len(self.sink.open_files),
                            self.sink.max_open)
            self.descriptors_short_at = now
            self.totals.descriptor_waits += 1
            self.commit_wake.set()
            return
        self.hold_topic(topic, exc, need_bytes)

    def hold_topic(self, topic: str, exc: OSError, need_bytes: int = 0) -> None:
        now = time.monotonic()
        hold = self.sink.held.get(topic)
        if hold is None:
            hold = self.sink.held[topic] = Hold(str(exc), exc.errno, now)
            self.refusing = True
            if len(self.sink.held) <= _HOLDS_LOGGED:
                log.error("cannot write output of topic %s (%s): holding it back; its batches are not"
                          " acknowledged (agents keep them and resend), the other topics go on", topic, exc)
            else:
                self._holds_unlogged += 1
            self.show_disk_error()
        elif hold.errno != exc.errno:
            log.error("topic %s still held back, now: %s", topic, exc)
            hold.error, hold.errno = str(exc), exc.errno
            self.show_disk_error()
        # A retry needs room for a page at least, and for the write that failed at most (a batch
        # bigger than a nearly full partition may still fit once the agent splits its resend).
        hold.need_bytes = min(need_bytes, 4096)
        hold.failed_again(now)

    def release_topic(self, topic: str) -> None:
        """A real write to a held topic succeeded."""
        hold = self.sink.held.pop(topic)
        if len(self.sink.held) < _HOLDS_LOGGED:
            log.warning("topic %s writable again after %.0fs; its agents resend the batches refused"
                        " meanwhile (%d)", topic, time.monotonic() - hold.since, hold.refused_batches)
        self.refusing = bool(self.sink.held) or self.state_error is not None
        self.show_disk_error()

    def on_state_error(self, exc: OSError) -> None:
        """Nothing can be committed (the journal, or a rotation, failed): take no batches at all."""
        self.totals.write_errors += 1
        now = time.monotonic()
        hold = self.state_error
        if hold is None:
            log.error("cannot commit (%s): taking no batches and acknowledging nothing until it can;"
                      " agents keep their data and resend", exc)
            hold = self.state_error = Hold(str(exc), exc.errno, now)
            self.refusing = True
        elif hold.errno != exc.errno:
            log.error("still cannot commit, now: %s", exc)
            hold.error, hold.errno = str(exc), exc.errno
        hold.failed_again(now)
        self.show_disk_error()

    def show_disk_error(self) -> None:
        """``disk_error`` (status, metrics, systemd STATUS=): the state's error, else the topics'."""
        if self.state_error is not None:
            error: str | None = self.state_error.error
        elif self.sink.held:
            topic, hold = next(iter(self.sink.held.items()))
            more = len(self.sink.held) - 1
            error = f"topic {topic}: {hold.error}" + (f" (and {more} more topics)" if more else "")
        else:
            error = None
        if error != self.disk_error:
            self.notifier.notify(f"STATUS=output not writable: {error}" if error else
                                 "STATUS=output writable again")
        self.disk_error = error

    def on_disk_error(self, exc: SinkError) -> None:
        """A rotation failed. The batches its journal record took along are committed again;
        a rotation left half done holds its topic until it is finished."""
        for key, end in self.journal.take_unwritten().items():
            durable = self.journal.state.streams.get(key)
            if durable is None or durable[0] < end:
                self.pending[key] = max(end, self.pending.get(key, 0))
        unfinished = list(self.journal.state.rotations)
        if unfinished and not isinstance(exc, JournalError):
            for topic in unfinished:
                self.sink.forget(topic)  # the rename may or may not have happened
                self.hold_topic(topic, exc)
        else:
            self.on_state_error(exc)

    def resync_refused(self) -> None:
        """Ask the agents of batches refused meanwhile to resend them now, where they can be taken."""
        if self.state_error is not None:
            return
        held = self.sink.held
        for key, (agent, stream, seq, topic, offset) in list(self.refused.items()):
            hold = held.get(topic)
            if hold is not None and not hold.retrying:
                continue
            del self.refused[key]
            self.send_event(agent, wire.encode_event(
                "resync", stream=stream, offset=max(self.accepted.get(key, offset), offset), seq=seq))

    def take_back(self, topic: str, *windows: dict[str, int]) -> None:
        """A topic's fsync failed: cut its file back to its last commit and take back every batch
        of its streams since (not acknowledged; their agents are asked to resend)."""
        durable_size = self.journal.state.topics.get(topic)
        try:
            self.sink.cut_back(topic, durable_size)
        except SinkError as exc:
            log.error("%s (cut again before its next write)", exc)
        durable = self.journal.state.streams
        for window in windows:
            for key in [k for k in window if self.stream_topic.get(k) == topic]:
                del window[key]
                committed = durable.get(key)
                if committed is None:
                    self.accepted.pop(key, None)
                else:
                    self.accepted[key] = int(committed[0])
                agent, _, stream = key.partition("\x1f")
                self.refused[key] = (agent, stream, None, topic, self.accepted.get(key, 0))

    # -- commit and acknowledge ---------------------------------------------------------------

    def owe_ack(self, agent: str, stream: str, end: int) -> None:
        self.owed_acks.setdefault(agent, {})[stream] = end

    def touch_agent(self, args: dict[str, Any], peer: Any) -> AgentInfo:
        """Record a hello or heartbeat: who the agent is and where to send its acks."""
        name = args.get("agent")
        if type(name) is not str or not 0 < len(name) <= 256:
            raise ValueError("agent must be a non-empty name")
        info = self.agents.get(name)
        if info is None:
            info = self.agents[name] = AgentInfo(name)
        agent_id = args.get("agent_id")
        agent_id = agent_id if type(agent_id) is str and 0 < len(agent_id) <= 64 else ""
        now = time.monotonic()
        # Live: heard from within three of its heartbeats (5 s at least, for a loaded host).
        live_s = min(max(3 * info.heartbeat_s, 5.0), self.cfg.agent_timeout_s)
        if agent_id and info.agent_id and agent_id != info.agent_id and info.last_seen \
                and now - info.last_seen < live_s:
            self.refuse_name_clash(info, agent_id, peer.address, now)
        host = peer.address.rsplit(":", 1)[0]
        if (not agent_id and info.address and info.address.rsplit(":", 1)[0] != host
                and not info.name_clash_warned and now - info.last_seen < 2 * self.cfg.agent_timeout_s):
            # Identities are agent names: two hosts with one name take each other's acks (they
            # resend, so nothing is lost, but both crawl). Say so once.
            info.name_clash_warned = True
            log.warning("agent name %r is used from %s and from %s: give each agent its own"
                        " agent.name", name, info.address, peer.address)
        info.routing_id = peer.routing_id
        info.route = peer.sock
        info.address = peer.address
        if agent_id:
            info.agent_id = agent_id
        was_catching_up = info.catching_up
        info.take_report(args)
        info.last_seen = time.monotonic()
        info.connected = info.heard = True
        info.stopped = False
        if info.catching_up and not was_catching_up:
            # Counted at once, not at the next tick: when a whole fleet reconnects with
            # backlogs, each hello already gets a smaller share.
            self.catching_up += 1
            self.share_window()
        return info

    def say_goodbye(self, name: str, peer: Any) -> None:
        """An agent stopping cleanly: disconnected at once, its window back in the budget."""
        info = self.agents.get(name)
        if info is None or info.routing_id != peer.routing_id:
            return  # not the connection we know for that name (a clash, or a stale one)
        info.connected, info.stopped = False, True
        self.granted -= info.window
        info.window = 0
        log.info("agent %s (%s) stopped", name, info.address)

    def refuse_name_clash(self, info: AgentInfo, agent_id: str, address: str, now: float) -> None:
        """A second live agent with ``info``'s name (another id, so another host or state_dir):
        refused, told why (the error of its hello or heartbeat), and the first told in its
        replies (``warnings``) while the second keeps trying. Raises ValueError."""
        if info.clash is None or info.clash[1] != agent_id or now - info.clash[2] > 10 * info.heartbeat_s:
            log.warning("agent name %r is used by two live agents: %s (id %s, connected) and %s (id %s,"
                        " refused while the first is connected): give each agent its own agent.name",
                        info.name, info.address, info.agent_id, address, agent_id)
        info.clash = (address, agent_id, now)
        raise ValueError(f"agent name {info.name!r} is in use by another live agent at {info.address}"
                         f" (id {info.agent_id}; this agent is {agent_id}): give each agent its own"
                         " agent.name; refused while the other is connected")

    def agent_warnings(self, info: AgentInfo) -> list[str]:
        """What the aggregator tells an agent about itself in its replies."""
        clash = info.clash
        if clash is None or time.monotonic() - clash[2] > 5 * info.heartbeat_s:
            return []
        return [f"agent name {info.name!r} is also used by another agent at {clash[0]} (id {clash[1]}),"
                " refused while this one is connected: give each agent its own agent.name"]

    def share_window(self) -> None:
        """Each catching-up agent's share: an equal part of the budget (wire.MIN_WINDOW at least)."""
        budget = self.cfg.window_budget_bytes
        window = max(wire.MIN_WINDOW, budget // max(1, self.catching_up)) if budget else None
        if window != self.window:
            log.debug("each agent's window is now %s bytes (%d catching up)", window, self.catching_up)
            self.window = window

    def grant(self, info: AgentInfo) -> int | None:
        """The window for ``info``'s next reply or ack (None: no budget, agents keep their own).

        An agent catching up is given its share, and one that is not wire.MIN_WINDOW (it has
        less than that in flight). A window shrinks at once but grows only into what the
        others' windows leave of the budget: otherwise agents arriving one after the other
        would each get the share of the moment, and the early ones keep theirs in flight until
        their next ack. So the windows granted stay within the budget, plus MIN_WINDOW for each
        agent beyond budget / MIN_WINDOW, which is what bounds the receive queues.
        """
        if self.window is None:
            return None
        target = self.window if info.catching_up else wire.MIN_WINDOW
        if info.max_window:
            target = max(wire.MIN_WINDOW, min(target, info.max_window))
        free = self.cfg.window_budget_bytes - (self.granted - info.window)
        window = min(target, max(info.window, free, wire.MIN_WINDOW))
        self.granted += window - info.window
        info.window = window
        return window

    def replies(self, info: AgentInfo, result: dict[str, Any]) -> dict[str, Any]:
        """A hello or heartbeat reply, with this agent's window when there is one, and what is
        wrong with it (``warnings``, always present: an empty list says it is over)."""
        window = self.grant(info)
        if window is not None:
            result["window"] = window
        result["warnings"] = self.agent_warnings(info)
        return result

    def send_event(self, agent: str, body: bytes) -> None:
        info = self.agents.get(agent)
        if info is not None and info.routing_id and self.control is not None:
            self.control.send_to(info.route, info.routing_id, body)

    async def commit_loop(self) -> None:
        interval = self.cfg.commit_interval_ms / 1000
        while True:
            await self.commit_wake.wait(interval)
            self.commit_wake.clear()
            try:
                async with self.commit_lock:
                    await self.commit()
                    if self.state_error is None:
                        await self.rotate_due()
            except SinkError as exc:
                self.on_disk_error(exc)
            except OSError as exc:
                self.on_disk_error(SinkError(exc.errno, f"rotation failed: {exc.strerror}"))
            if self.refusing or self.refused or self.descriptors_short_at is not None:
                self.probe_disk()

    async def commit(self) -> None:
        """Group commit: fsync the files, journal their lengths and the streams, then ack.

        A file whose fsync fails is cut back to its last commit and its topic held back alone
        (its batches since are taken back: not acknowledged, resent by their agents); the others
        are committed. If the journal record cannot be written, nothing of this commit is
        acknowledged, the batches stay pending (their data stays in the files) and no batch is
        taken until a later commit, retried with back-off, succeeds.
        """
        state_error = self.state_error
        if state_error is not None and time.monotonic() < state_error.retry_at:
            return
        if self.pending or state_error is not None:
            if not await self.commit_pending():
                return
            if state_error is not None:
                self.state_error = None
                self.refusing = bool(self.sink.held)
                log.warning("commits work again after %.0fs; taking batches (agents resend the %d"
                            " refused meanwhile)", time.monotonic() - state_error.since,
                            state_error.refused_batches)
                self.show_disk_error()
            if self.journal.state.rotations:
                self.finish_rotations()
        if self.refused:
            self.resync_refused()
        if self.owed_acks:
            owed, self.owed_acks = self.owed_acks, {}
            for agent, streams in owed.items():
                info = self.agents.get(agent)
                window = self.grant(info) if info is not None else None
                self.send_event(agent, wire.encode_event("ack", streams=streams) if window is None else
                                wire.encode_event("ack", streams=streams, window=window))

    async def commit_pending(self) -> bool:
        """fsync, take back what failed, journal the rest and owe its acks; False if the journal
        record could not be written (everything stays pending)."""
        pending, self.pending = self.pending, {}
        self.pending_bytes = 0
        dirty = self.sink.dirty_files()
        positions = self.sink.positions()
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        for tf in dirty:
            tf.syncing = True
        try:
            failed = await loop.run_in_executor(None, self._sync, dirty) if self.cfg.fsync else {}
        finally:
            for tf in dirty:
                tf.syncing = False
        for topic, exc in failed.items():
            self.take_back(topic, pending, self.pending)
            positions.pop(topic, None)
            self.hold_topic(topic, SinkError(exc.errno, f"fsync of {topic}/{topic}.log failed:"
                                                        f" {exc.strerror}"))
        try:
            await loop.run_in_executor(None, self._sync_and_journal, [], positions, pending)
        except SinkError as exc:
            self.journal.take_unwritten()
            for key, end in pending.items():
                self.pending[key] = max(end, self.pending.get(key, 0))
            self.on_state_error(exc)
            return False
        self.sink.mark_committed(positions)
        if self.sink.held:
            # Writable again once a real write to it is durable, not when a probe passes.
            for topic in [t for t, h in self.sink.held.items() if h.retrying and t in positions]:
                self.release_topic(topic)
        self.commit_latency.observe(time.monotonic() - started)
        self.totals.commits += 1
        for key, end in pending.items():
            agent, _, stream = key.partition("\x1f")
            self.owe_ack(agent, stream, end)
        return True

    def _sync(self, dirty: list[TopicFile]) -> dict[str, OSError]:
        return self.sink.sync_each(dirty)

    def _sync_and_journal(self, dirty: list[Any], positions: dict[str, int], pending: dict[str, int]) -> None:
        """fsync ``dirty`` and write the commit record (blocking; SinkError if either failed)."""
        try:
            if self.cfg.fsync:
                self.sink.sync_files(dirty)
        except OSError as exc:
            raise SinkError(exc.errno, f"commit failed: {exc.strerror}") from None
        self.journal.append(positions, pending, sync=self.cfg.fsync)

    def finish_rotations(self) -> None:
        """Finish rotations a failure left half done (their topics are held meanwhile)."""
        leftovers = dict(self.journal.state.rotations)
        for topic in leftovers:
            self.sink.forget(topic)
        try:
            self.recover_rotations(leftovers)
        except OSError as exc:
            # Not done: the topics stay held (the journal keeps the intent) and are tried again.
            self.on_disk_error(exc if isinstance(exc, SinkError) else
                               SinkError(exc.errno, f"finishing a rotation failed: {exc.strerror}"))
            return
        for topic in leftovers:
            if topic in self.sink.held:
                self.release_topic(topic)

    def probe_disk(self) -> None:
        """Held topics whose retry is due: if the cheap probe passes (directory and file open,
        room for the write that failed; no fixed-size test write, so a nearly full partition
        recovers too) their agents are asked to resend, and the next real write decides."""
        now = time.monotonic()
        probed = False
        for topic, hold in list(self.sink.held.items()):
            if hold.retrying or now < hold.retry_at:
                continue
            if topic in self.journal.state.rotations:
                self.finish_rotations()
                continue
            why = self.sink.probe(topic, hold.need_bytes)
            hold.failed_again(now)
            if why is None:
                hold.retrying = probed = True
            else:
                log.debug("topic %s still held back: %s", topic, why)
        if probed:
            self.resync_refused()
        if self._holds_unlogged:
            log.error("%d more topics held back (aggregatorctl status lists them)", self._holds_unlogged)
            self._holds_unlogged = 0
        if self.descriptors_short_at is not None and now - self.descriptors_short_at > 60:
            log.info("no shortage of file descriptors for 60s")
            self.descriptors_short_at = None

    # -- status -------------------------------------------------------------------------------

    async def ticker(self) -> None:
        """Once a second: rates, agent liveness; every 10 s a systemd STATUS=; every minute retention."""
        ticks = 0
        wall, mono = self.clock(), time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            wall, mono = self.check_clock(wall, mono)
            if ticks % 10 == 0:
                self.notifier.notify("STATUS=" + self.status_line())
                self.save_registry()
            if ticks % 3600 == 0:
                self.forget_old_streams()
            if ticks % 60 == 0:
                self._retain_later(None)
            now = time.monotonic()
            counted: list[TopicStats | AgentInfo] = [*self.topics.values(), *self.agents.values()]
            for stats in counted:
                delta = stats.lines - stats._last_lines
                stats._last_lines = stats.lines
                stats.rate = 0.7 * stats.rate + 0.3 * delta
            for agent in self.agents.values():
                agent.connected = (agent.heard and not agent.stopped
                                   and now - agent.last_seen < self.cfg.agent_timeout_s)
                if not agent.connected:
                    agent.window = 0  # granted again at its next hello
            self.catching_up = sum(1 for a in self.agents.values() if a.catching_up)
            self.granted = sum(a.window for a in self.agents.values())
            self.share_window()

    def check_clock(self, wall: float, mono: float) -> tuple[float, float]:
        """Say so when the wall clock was stepped (NTP after a bad start, an operator, a VM
        resumed): time-based rotation and rotated names follow the new time (README, Output)."""
        now_wall, now_mono = self.clock(), time.monotonic()
        step = (now_wall - wall) - (now_mono - mono)
        if abs(step) >= 5.0:
            log.warning("the wall clock was stepped %s by %.0f s: files roll over at the next period"
                        " of the new time, and rotated names never sort before older ones",
                        "forward" if step > 0 else "back", abs(step))
        return now_wall, now_mono

    async def loop_probe(self, interval_s: float = 0.1) -> None:
        """Measure the event loop's stalls: how much later than asked a timer fires."""
        window_end = time.monotonic() + 10
        while True:
            asked = time.monotonic()
            await asyncio.sleep(interval_s)
            now = time.monotonic()
            stall = max(0.0, now - asked - interval_s)
            if now >= window_end:
                self.loop_stall_windows = [0.0, self.loop_stall_windows[0]]
                window_end = now + 10
            if stall > self.loop_stall_windows[0]:
                self.loop_stall_windows[0] = stall
                self.loop_stall_max_s = max(self.loop_stall_max_s, stall)

    def status_line(self) -> str:
        connected = sum(1 for a in self.agents.values() if a.connected)
        rate = sum(s.rate for s in self.topics.values())
        line = (f"{connected} agents connected, {rate:.0f} lines/s, {self.totals.lines_written} lines "
                f"written to {len(self.topics)} topics")
        return f"{line}; OUTPUT NOT WRITABLE: {self.disk_error}" if self.disk_error else line

    def forget_old_streams(self) -> None:
        """Drop in-memory offsets of streams the journal has forgotten (idle past stream_ttl_s),
        so a long-running aggregator does not grow with every file its agents ever rotated."""
        durable = self.journal.state.streams
        stale = [k for k in self.accepted if k not in durable and k not in self.pending]
        for key in stale:
            del self.accepted[key]

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        try:
            usage = shutil.disk_usage(self.cfg.output_dir)
            disk = {"output_free_bytes": usage.free, "output_total_bytes": usage.total,
                    "output_used_bytes": usage.used}
        except OSError:
            disk = {}
        t = self.totals
        return {
            "instance": self.instance,
            "version": __version__,
            "uptime_s": round(now - self.started, 1),
            "endpoints": {"pull": self.cfg.pull, "xsub": self.cfg.xsub, "xpub": self.cfg.xpub,
                          "control": list(self.cfg.control)},
            "output_dir": self.cfg.output_dir,
            "disk": disk,
            "journal_bytes": _size_or_none(self.journal.journal_path),
            "disk_error": self.disk_error,
            "expected_missing": sorted(n for n in self.cfg.expected_agents
                                       if n not in self.agents or not self.agents[n].connected),
            "state_error": self.state_error.error if self.state_error else None,
            "held_topics": [
                {"name": topic, "error": hold.error, "held_s": round(now - hold.since, 1),
                 "refused_batches": hold.refused_batches, "retrying": hold.retrying}
                for topic, hold in sorted(self.sink.held.items())
            ],
            "open_files": len(self.sink.open_files), "open_files_max": self.sink.max_open,
            "agents": [
                {"name": a.name, "address": a.address, "mode": a.mode, "connected": a.connected,
                 "stopped": a.stopped, "version": a.version or None,
                 "uptime_s": round(time.time() - a.started_at, 1) if a.started_at and a.connected else None,
                 "last_seen_s": round(now - a.last_seen, 1) if a.last_seen else None,
                 "lines": a.lines, "bytes": a.bytes, "lines_per_s": round(a.rate, 1),
                 "lag_bytes": a.lag_bytes, "lag_s": a.lag_s, "window_bytes": a.window or None,
                 "files": a.files, "file_list": a.file_list, "errors": a.errors,
                 "agent_id": a.agent_id or None, "problems": a.problems + self.agent_warnings(a),
                 "journal_lag_entries": a.journal_lag_entries, "journal_lag_s": a.journal_lag_s}
                for a in sorted(self.agents.values(), key=lambda a: a.name)
            ],
            "topics": [
                {"name": name, "lines": s.lines, "bytes": s.bytes, "lines_per_s": round(s.rate, 1),
                 "file_bytes": self.sink.files[name].size if name in self.sink.files else None}
                for name, s in sorted(self.topics.items())
            ],
            "totals": {
                "lines_written": t.lines_written, "bytes_written": t.bytes_written,
                "batches": t.batches, "duplicates_dropped": t.duplicates_dropped,
                "malformed_dropped": t.malformed_dropped, "resyncs": t.resyncs,
                "commits": t.commits, "write_errors": t.write_errors, "streams": len(self.accepted),
                "rotations": t.rotations, "retention_removed": t.retention_removed,
                "rebased_streams": t.rebased_streams, "descriptor_waits": t.descriptor_waits,
                "pending_bytes": self.pending_bytes, "compressions_running": len(self._compressions),
            },
            "malformed": dict(t.malformed),
            "refusals": self.guard.refusals.status(),
            "control": {"messages_received": self.control.messages_received if self.control else 0,
                        "commands": dict(self.control.commands) if self.control else {}},
            "subscriptions": len(self.subscriptions),
            "loop": {"stall_max_ms": round(1000 * self.loop_stall_max_s, 1),
                     "stall_recent_ms": round(1000 * max(self.loop_stall_windows), 1)},
            "flow": {"window_budget_bytes": self.cfg.window_budget_bytes, "agent_window_bytes": self.window,
                     "agents_catching_up": self.catching_up, "granted_bytes": self.granted},
        }


def _loop_deadline(monotonic_deadline: float) -> float:
    """A time.monotonic() deadline in the running loop's time (uvloop's clock differs)."""
    return asyncio.get_running_loop().time() + (monotonic_deadline - time.monotonic())


def peer_address(frame: zmq.Frame) -> str:
    try:
        return str(frame.get("Peer-Address"))
    except zmq.ZMQError:
        return "local"


def _size_or_none(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None
