"""The aggregator daemon: binds the sockets, accepts batches, commits, acknowledges."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import zmq
import zmq.asyncio

from aggregator import metrics, proxy
from aggregator.config import Config, load_config
from aggregator.control import ControlServer
from aggregator.journal import Journal, stream_key
from aggregator.rolling import Rolling
from aggregator.security import Guard
from aggregator.writer import RollingFileSink, SinkError, uncompressed_rotated
from fleetlog import curve, wire
from fleetlog.runtime import SystemdNotifier, Wakeup, start_zmq_threads, supervise
from fleetlog.tomlconf import ConfigError

log = logging.getLogger("fleetlog.aggregator")

_NOW = int(zmq.NOBLOCK)


@dataclass
class AgentInfo:
    name: str
    routing_id: bytes = b""
    route: Any = None  # the control socket the agent talks on
    name_clash_warned: bool = False
    address: str = ""
    mode: str = ""
    last_seen: float = 0.0
    connected: bool = False
    lag_bytes: int = 0
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
        self.ctx: zmq.asyncio.Context | None = None
        self.sink = RollingFileSink(self.cfg.output_dir, clock=clock)
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
        self.commit_wake = Wakeup()
        self.readable: dict[str, Wakeup] = {}
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self._warned_peers: set[tuple[str, str]] = set()
        self._tasks: list[asyncio.Task[Any]] = []
        self._compressions: set[asyncio.Future[Any]] = set()
        # Its own thread: a backlog of big files to compress never delays a commit's fsync.
        self._compressor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compress")
        self.sockets: dict[str, zmq.asyncio.Socket] = {}
        self.control: ControlServer | None = None
        # Prefixes XPUB subscribers asked for: no subscriber, nothing to publish.
        self.subscriptions: set[bytes] = set()
        self.commit_lock = asyncio.Lock()
        self.commit_latency = metrics.LatencyHistogram()
        self.metrics: metrics.MetricsServer | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def startup(self) -> None:
        cfg = self.cfg
        os.makedirs(cfg.output_dir, exist_ok=True)
        os.makedirs(cfg.state_dir, exist_ok=True)
        self.guard.load(cfg)
        journal_existed = os.path.exists(self.journal.journal_path)
        state = self.journal.recover()
        # Streams idle for longer than stream_ttl_s are forgotten here and at each compaction.
        self.journal.compact(cfg.stream_ttl_s)
        self.recover_rotations(state.rotations)
        positions = dict(state.topics)
        if journal_existed:
            # A topic's first batches are written before its first commit: after a crash in
            # between no record names it, and its whole active file is uncommitted (agents
            # resend it). Without a journal (a new or lost state_dir) nothing can be known.
            for topic in self.sink.topics_on_disk():
                positions.setdefault(topic, 0)
        self.sink.recover(positions)
        # Before anything is compressed: the scan removes stale temporaries, and must not take
        # one a compression started below is still writing.
        leftovers = uncompressed_rotated(cfg.output_dir)
        # A file whose period ended while we were down rolls over before it takes a new line.
        for topic in self.sink.topics_on_disk():
            if wire.valid_topic(topic):
                self.sink.open_existing(topic)
        self.rotate_due()
        self.accepted = {k: int(v[0]) for k, v in state.streams.items()}
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
            asyncio.create_task(self.notifier.watchdog(), name="watchdog"),
        ]
        supervise(self._tasks, self.request_stop)
        self.ready.set()
        self.notifier.notify("READY=1", f"STATUS=listening; {len(self.accepted)} streams known")
        log.info("aggregator %s ready: pull %s, xsub %s, xpub %s, control %s; output %s",
                 self.instance, cfg.pull, cfg.xsub, cfg.xpub, ", ".join(cfg.control), cfg.output_dir)

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

    async def shutdown(self) -> None:
        """Stop taking batches, commit and acknowledge what we hold, then close, within budget."""
        self.notifier.notify("STOPPING=1")
        log.info("aggregator stopping")
        receivers = [t for t in self._tasks if t.get_name() in ("pull", "xsub", "ticker", "watchdog",
                                                                "subscriptions")]
        for task in receivers:
            task.cancel()
        await asyncio.gather(*receivers, return_exceptions=True)
        try:
            async with self.commit_lock:
                await asyncio.wait_for(self.commit(), timeout=self.cfg.shutdown_timeout_s)
        except (TimeoutError, SinkError) as exc:
            log.warning("final commit did not finish (%s); agents will resend what was not acknowledged",
                        exc or "timeout")
        await self.release()

    async def release(self) -> None:
        """Cancel the tasks, finish compressions within budget, close files and sockets."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._compressions:
            _, pending = await asyncio.wait(self._compressions, timeout=self.cfg.shutdown_timeout_s)
            for compression in pending:
                compression.cancel()
        self._compressor.shutdown(wait=False, cancel_futures=True)
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
        log.info("aggregator stopped")

    async def reload(self, path: str | None = None) -> dict[str, Any]:
        """Load, validate, diff, apply; a bad config is reported and the running one stays."""
        source = path or (None if self.config.source.startswith("<") else self.config.source)
        try:
            new = load_config(source, self.overrides)
        except ConfigError as exc:
            log.warning("reload refused, keeping the running config: %s", "; ".join(exc.problems))
            return {"reloaded": False, "problems": exc.problems}
        fixed = ("output_dir", "state_dir", "pull", "xsub", "xpub", "control", "metrics_listen", "loop",
                 "curve_secret_key")
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
            self.sink.close()

    async def rotate_now(self, topic: str | None) -> list[str]:
        """``aggregatorctl rotate [TOPIC]``: commit, then roll the topic (or all) over."""
        async with self.commit_lock:
            await self.commit()
            return self.rotate_due({topic})

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
        if self.disk_error is not None:
            return  # not taken, not acknowledged: the agent resends when we can write again
        key = stream_key(batch.agent, batch.stream)
        expected = self.accepted.get(key, batch.base)
        if batch.start == batch.end:
            return
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
        fmt = self.cfg.topic_format(batch.topic)
        try:
            data = self.format_batch(batch, fmt)
        except TypeError:
            self.malformed("bad_lines", f"{via}:{peer_address(frames[-1])}", "lines must be strings")
            return
        n = batch.count
        try:
            self.sink.append(batch.topic, data, n)
        except SinkError as exc:
            self.on_disk_error(exc)
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
        if self.subscriptions:
            # Subscribers always get version 1 (a list of lines): one shape for consumers.
            proxy.publish(self.sockets["xpub"], frames if isinstance(batch.lines, list) else
                          wire.encode_batch(dataclasses.replace(batch, lines=batch.line_list())))

    def format_batch(self, batch: wire.Batch, fmt: str) -> bytes:
        if fmt == "raw":
            if isinstance(batch.lines, str):
                return batch.lines.encode()  # version 2: the lines as written, newlines included
            if not batch.lines:
                return b""
            # One join and one encode, the trailing newline included (no third copy).
            batch.lines.append("")
            try:
                return "\n".join(batch.lines).encode()
            finally:
                batch.lines.pop()
        now = self.clock()
        agent, path = batch.agent, batch.path
        if batch.fields is not None:  # a journal batch: each entry's fields beside its line
            return b"".join(
                orjson.dumps({"line": line, "agent": agent, "path": path, "received": now, **fields},
                             option=orjson.OPT_APPEND_NEWLINE)
                for line, fields in zip(batch.line_list(), batch.fields, strict=True)
            )
        return b"".join(
            orjson.dumps({"line": line, "agent": agent, "path": path, "received": now},
                         option=orjson.OPT_APPEND_NEWLINE)
            for line in batch.line_list()
        )

    def on_disk_error(self, exc: SinkError) -> None:
        self.totals.write_errors += 1
        if self.disk_error is None:
            log.error("cannot write output (%s): not acknowledging anything until it can; agents keep"
                      " their data and resend", exc)
            self.notifier.notify(f"STATUS=output not writable: {exc}")
        self.disk_error = str(exc)
        # Everything accepted but not committed is being resent: forget it.
        for key in self.pending:
            durable = self.journal.state.streams.get(key)
            if durable is None:
                self.accepted.pop(key, None)
            else:
                self.accepted[key] = int(durable[0])
        self.pending.clear()
        self.pending_bytes = 0
        self.sink.recover(self.journal.state.topics)
        self.sink.close()

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
        host = peer.address.rsplit(":", 1)[0]
        if (info.address and info.address.rsplit(":", 1)[0] != host and not info.name_clash_warned
                and time.monotonic() - info.last_seen < 2 * self.cfg.agent_timeout_s):
            # Identities are agent names: two hosts with one name take each other's acks (they
            # resend, so nothing is lost, but both crawl). Say so once.
            info.name_clash_warned = True
            log.warning("agent name %r is used from %s and from %s: give each agent its own"
                        " agent.name", name, info.address, peer.address)
        info.routing_id = peer.routing_id
        info.route = peer.sock
        info.address = peer.address
        mode = args.get("mode")
        if mode in ("push", "pub"):
            info.mode = mode
        was_catching_up = info.catching_up
        fields = (("lag_bytes", "lag_bytes"), ("files", "files"), ("max_window", "max_inflight_bytes"))
        for attr, key in fields:
            value = args.get(key)
            if type(value) is int and value >= 0:
                setattr(info, attr, value)
        if type(args.get("journal_lag_entries")) is int:
            info.journal_lag_entries = args["journal_lag_entries"]
        if type(args.get("journal_lag_s")) in (int, float):
            info.journal_lag_s = float(args["journal_lag_s"])
        info.last_seen = time.monotonic()
        info.connected = True
        if info.catching_up and not was_catching_up:
            # Counted at once, not at the next tick: when a whole fleet reconnects with
            # backlogs, each hello already gets a smaller share.
            self.catching_up += 1
            self.share_window()
        return info

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
        """A hello or heartbeat reply, with this agent's window when there is one."""
        window = self.grant(info)
        if window is not None:
            result["window"] = window
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
                    self.rotate_due()
            except SinkError as exc:
                self.on_disk_error(exc)
            except OSError as exc:
                self.on_disk_error(SinkError(exc.errno, f"commit failed: {exc.strerror}"))
            if self.disk_error is not None:
                await self.probe_disk()

    async def commit(self) -> None:
        """Group commit: fsync the files, journal their lengths and the streams, then ack."""
        if self.pending:
            pending, self.pending = self.pending, {}
            self.pending_bytes = 0
            positions = self.sink.positions()
            dirty = self.sink.dirty_files()
            loop = asyncio.get_running_loop()
            started = time.monotonic()
            await loop.run_in_executor(None, self._sync_and_journal, dirty, positions, pending)
            self.commit_latency.observe(time.monotonic() - started)
            self.totals.commits += 1
            for key, end in pending.items():
                agent, _, stream = key.partition("\x1f")
                self.owe_ack(agent, stream, end)
        if self.owed_acks:
            owed, self.owed_acks = self.owed_acks, {}
            for agent, streams in owed.items():
                info = self.agents.get(agent)
                window = self.grant(info) if info is not None else None
                self.send_event(agent, wire.encode_event("ack", streams=streams) if window is None else
                                wire.encode_event("ack", streams=streams, window=window))

    def _sync_and_journal(self, dirty: list[Any], positions: dict[str, int], pending: dict[str, int]) -> None:
        try:
            if self.cfg.fsync:
                self.sink.sync_files(dirty)
            self.journal.append(positions, pending, sync=self.cfg.fsync)
        except OSError as exc:
            raise SinkError(exc.errno, f"commit failed: {exc.strerror}") from None

    async def probe_disk(self) -> None:
        """After a write error, wait until the output has room for a commit's worth of lines
        and a test write succeeds (in output_dir and state_dir), then take batches again."""
        need = 2 * self.cfg.commit_max_bytes
        while True:
            await asyncio.sleep(1.0)
            try:
                if shutil.disk_usage(self.cfg.output_dir).free < need:
                    continue
                for directory in (self.cfg.output_dir, self.cfg.state_dir):
                    probe = os.path.join(directory, ".fleetlog-probe")
                    try:
                        with open(probe, "wb") as fh:
                            fh.write(b"\0" * 65536)
                            fh.flush()
                            os.fsync(fh.fileno())
                    finally:
                        with contextlib.suppress(OSError):
                            os.unlink(probe)
                for topic in list(self.topics):
                    self.sink.topic_dir(topic)
            except OSError:
                continue
            log.warning("output is writable again; taking batches (agents resend what was refused)")
            self.notifier.notify("STATUS=output writable again")
            self.disk_error = None
            return

    # -- status -------------------------------------------------------------------------------

    async def ticker(self) -> None:
        """Once a second: rates, agent liveness; every 10 s a systemd STATUS=; every minute retention."""
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            if ticks % 10 == 0:
                self.notifier.notify("STATUS=" + self.status_line())
            if ticks % 3600 == 0:
                self.forget_old_streams()
            if ticks % 60 == 0 and (self.cfg.retain_days or self.cfg.retain_files):
                for topic in self.sink.topics_on_disk():
                    self.apply_retention(topic)
            now = time.monotonic()
            counted: list[TopicStats | AgentInfo] = [*self.topics.values(), *self.agents.values()]
            for stats in counted:
                delta = stats.lines - stats._last_lines
                stats._last_lines = stats.lines
                stats.rate = 0.7 * stats.rate + 0.3 * delta
            for agent in self.agents.values():
                agent.connected = now - agent.last_seen < self.cfg.agent_timeout_s
                if not agent.connected:
                    agent.window = 0  # granted again at its next hello
            self.catching_up = sum(1 for a in self.agents.values() if a.catching_up)
            self.granted = sum(a.window for a in self.agents.values())
            self.share_window()

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
            disk = {"output_free_bytes": usage.free, "output_total_bytes": usage.total}
        except OSError:
            disk = {}
        t = self.totals
        return {
            "instance": self.instance,
            "uptime_s": round(now - self.started, 1),
            "endpoints": {"pull": self.cfg.pull, "xsub": self.cfg.xsub, "xpub": self.cfg.xpub,
                          "control": list(self.cfg.control)},
            "output_dir": self.cfg.output_dir,
            "disk": disk,
            "disk_error": self.disk_error,
            "agents": [
                {"name": a.name, "address": a.address, "mode": a.mode, "connected": a.connected,
                 "last_seen_s": round(now - a.last_seen, 1) if a.last_seen else None,
                 "lines": a.lines, "bytes": a.bytes, "lines_per_s": round(a.rate, 1),
                 "lag_bytes": a.lag_bytes, "window_bytes": a.window or None,
                 "files": a.files, "journal_lag_entries": a.journal_lag_entries,
                 "journal_lag_s": a.journal_lag_s}
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
                "pending_bytes": self.pending_bytes, "compressions_running": len(self._compressions),
            },
            "malformed": dict(t.malformed),
            "control": {"messages_received": self.control.messages_received if self.control else 0},
            "flow": {"window_budget_bytes": self.cfg.window_budget_bytes, "agent_window_bytes": self.window,
                     "agents_catching_up": self.catching_up, "granted_bytes": self.granted},
        }


def peer_address(frame: zmq.Frame) -> str:
    try:
        return str(frame.get("Peer-Address"))
    except zmq.ZMQError:
        return "local"

