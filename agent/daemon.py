"""The agent daemon: discovery, reading, shipping, acknowledgements, checkpoints."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections import deque
from typing import Any

import zmq
import zmq.asyncio

from agent import batch, metrics
from agent.config import AgentConfig, Config, load_config
from agent.failover import Switch
from agent.follow import Following
from agent.journal_sources import JournalSources
from agent.offsets import Checkpoint, CheckpointStore
from agent.status import StatusServer
from agent.tail import Chunk, Rewritten, Tailer, file_size, name_base64, shown
from agent.transport import Transport
from agent.watch import BUSY_CYCLE_BYTES, Watcher
from fleetlog import __version__, wire
from fleetlog.dirlock import DirectoryLock
from fleetlog.runtime import SystemdNotifier, Wakeup, raise_open_files_limit, start_zmq_threads, supervise
from fleetlog.tomlconf import ConfigError
from fleetlog.wire import MIN_WINDOW

log = logging.getLogger("fleetlog.agent")
# How long an agent waits for an aggregator that commits nothing because the stream all of them
# share takes nothing, before it moves anyway (an election takes seconds; a partition the
# aggregator's NATS client has not noticed yet is found by its pings in 15-20 s).
SHARED_STREAM_PATIENCE_S = 30.0

# The most one read cycle holds before it is sent. Sharing a message pays for small batches (a
# typical node's cycle holds a few KiB); a backlog's batches (512 KiB) go out one by one as read:
# held together, a cycle's buffers outgrow the CPU caches and are copied once more into one
# message (backlog, 8 files: 1 MiB cycles cost the agent 1.07 CPU s per M lines against 0.56).
CYCLE_MAX_BYTES = 64 * 1024


class Agent(Following):
    def __init__(self, config: Config) -> None:
        self.config = config
        self.cfg = config.agent
        self.store = CheckpointStore(self.cfg.state_dir)
        self.lock = DirectoryLock(self.cfg.state_dir, "agent.state_dir")
        self.notifier = SystemdNotifier()
        self.ctx: zmq.asyncio.Context | None = None
        self.transport: Transport | None = None
        self.status_server: StatusServer | None = None
        self.watcher: Watcher | None = None
        self.tailers: dict[str, Tailer] = {}            # stream -> tailer
        self.by_inode: dict[tuple[int, int], Tailer] = {}
        self.by_path: dict[str, Tailer] = {}
        # Copies of followed files (copytruncate's app.log.1, a `cp`): identity -> stream copied.
        self.shadows: dict[tuple[int, int], Checkpoint] = {}
        self.unacked: set[Tailer] = set()
        # Bytes shipped and not acknowledged: kept up to date on shipping, recounted whenever
        # acks, resyncs or rewinds move offsets (a sum per batch would cost O(files)).
        self.inflight = 0
        # Tailers holding a partial line or a multi-line record, which a timer must revisit.
        self.timed: set[Tailer] = set()
        # The file that last had a name, while a new file there has not been found yet.
        self.predecessors: dict[str, Tailer] = {}
        self.ready: deque[Tailer] = deque()
        self.queued: set[Tailer] = set()
        self.wake = Wakeup()
        self.acked_event = Wakeup()
        # Batches as one string (wire version 2) once the aggregator's hello reply says it reads them.
        self.wire_v2 = False
        # Several streams' batches in one message (wire version 3), once the hello reply says so.
        self.wire_v3 = False
        # The in-flight window: max_inflight_bytes, or less while the aggregator asks for less
        # (its share for each agent catching up at once, so that its memory stays bounded).
        # Until the aggregator's hello reply says which, the least it may ask for: an agent
        # starting with a backlog would otherwise ship a whole window before hearing its share.
        self.window = min(MIN_WINDOW, self.cfg.max_inflight_bytes)
        # The lag the aggregator last heard of (hello, heartbeat): it grants a share of its
        # budget only to agents whose lag says they are catching up.
        self.reported_lag = 0
        self.scan_soon = Wakeup()
        self.stopping = asyncio.Event()
        self.started = asyncio.Event()
        # The journal sources' last acknowledgement progress (file streams keep their own).
        self.last_ack_progress = time.monotonic()
        # The last acknowledgement of anything, or the last move to another aggregator
        # (monotonic): none for two ack timeouts with batches out, and the agent moves on.
        self.last_any_ack = time.monotonic()
        # Streams an aggregator asked for from before their acknowledged offset (with several
        # aggregators: one that had the stream before another took it further).
        self.rebased_streams = 0
        self.waiting_for_stream = False  # said that we wait for the aggregators' shared stream
        # Moved once already because the shared stream kept taking nothing: the next aggregator
        # saying the same is waited for as long as it lasts (no ping-pong between them).
        self.moved_for_stream_hold = False
        self.checkpoints_dirty = True
        # The aggregator's max_message_bytes (its hello reply says; the default until then): no
        # batch is read larger than what encodes within it (see read_bytes).
        self.max_message_bytes = wire.DEFAULT_MAX_MESSAGE_BYTES
        self.read_bytes = read_bytes_for(self.cfg.batch_max_bytes, self.max_message_bytes)
        self.oversized_batches = 0
        # Lag in time: per stream with a lag, (monotonic time, size) samples; see measure_lag_s.
        self.size_seen: dict[str, deque[tuple[float, int]]] = {}
        self.lag_s = 0.0
        self.started_at = time.time()
        self.reported_paths: list[str] = []  # the file list the aggregator last heard
        self.empty_globs: set[tuple[int, str]] = set()  # (source index, glob) matching no file
        # Streams whose identity is not on disk yet: saved before their first batch ships, so a
        # crash can never make the agent ship the same bytes again under a new stream id.
        self.unsaved_streams = False
        self.pending_checkpoints: dict[tuple[int, int], Checkpoint] = {}
        self.unfollowed: dict[tuple[int, int], Checkpoint] = {}  # see Following.unmatched
        self.first_run = False
        self.lines_shipped = 0   # acknowledged as durable
        self.lines_sent = 0      # sent, resends included
        self.batch_lines: dict[str, deque[tuple[int, int]]] = {}
        self.batches_shipped = 0
        self.resends = 0
        self._warned: set[str] = set()
        # Batches out and no ack since (monotonic), and what that means (see check_acks_flow).
        self.stalled_since: float | None = None
        self.ack_problem: str | None = None
        self.unreadable: dict[tuple[int, int], tuple[str, str]] = {}
        self.failing: dict[tuple[int, int], str] = {}
        self.skipped: dict[str, str] = {}  # glob matches that are not log files (agent/follow.py)
        self._tasks: list[asyncio.Task[Any]] = []
        self.metrics: metrics.MetricsServer | None = None
        self.journals = JournalSources(self)  # [[journal]] sources (agent/journal_sources.py)
        self.names_changed = 0
        # Bytes read since start, and (time, bytes) when the read rate was last measured: the
        # rate paces the watcher (pace_watching).
        self.bytes_read = 0
        # When batches went out again after everything was acknowledged (resends do not count):
        # an idle spell since the last ack is no silence of the aggregator's (check_ack_stall).
        self.out_since = 0.0
        self.all_acked = True
        self._pace_mark = (time.monotonic(), 0)
        self.read_rate = 0.0
        self._last_cycle = (0.0, 0)  # (when, bytes) of the last read cycle (pace_up)
        # The last heartbeat's figures and what they were computed from (see heartbeat_args).
        self._beat_state: tuple[int, ...] | None = None
        self._beat_args: dict[str, Any] = {}

    # -- lifecycle -----------------------------------------------------------------------------

    async def startup(self) -> None:
        limit = raise_open_files_limit()
        # Descriptors for followed files stay below the limit, with a reserve for the sockets,
        # the watcher, the status socket and the checkpoint file (whose save must never fail
        # for want of one).
        bound = max(8, limit - 64)
        if self.cfg.max_open_files > bound:
            log.warning("descriptor limit %d: following at most %d files open at once (max_open_files "
                        "is %d)", limit, bound, self.cfg.max_open_files)
            self.cfg = dataclasses.replace(self.cfg, max_open_files=bound)
        os.makedirs(self.cfg.state_dir, exist_ok=True)
        # Before the checkpoints are read: a second agent here would overwrite them (and take
        # over the status socket).
        self.lock.acquire()
        cps = self.store.load()
        self.first_run = not self.store.existed
        for cp in cps.values():
            self.pending_checkpoints[(cp.dev, cp.ino)] = cp
        self.ctx = zmq.asyncio.Context()
        start_zmq_threads(self.ctx)
        self.transport = Transport(self.ctx, self.cfg, self.on_event, self.on_hello, self.on_window,
                                   self.hello_args, self.heartbeat_args, self.on_switch)
        self.transport.connect()
        self.status_server = StatusServer(self, self.ctx, self.cfg.status_endpoint)
        self.status_server.bind()
        self.metrics = metrics.serve(self)
        self.scan()
        self.resume_rotated_while_down()
        self.watcher = Watcher(self.config.sources, self.on_change, self.cfg)
        self.watcher.refresh()
        self._tasks = [
            asyncio.create_task(self.read_loop(), name="read"),
            asyncio.create_task(self.transport.receive_loop(), name="control"),
            asyncio.create_task(self.transport.heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self.scan_loop(), name="scan"),
            asyncio.create_task(self.checkpoint_loop(), name="checkpoint"),
            asyncio.create_task(self.status_server.serve(), name="status"),
            asyncio.create_task(self.notifier.watchdog(), name="watchdog"),
            *self.journals.start(self.store.journal),
        ]
        supervise(self._tasks, self.request_stop)
        self.started.set()
        self.notifier.notify("READY=1", f"STATUS=following {len(self.tailers)} files")
        ranked = self.transport.failover.ranked
        order = f" (aggregators in order: {', '.join(a.control for a in ranked)})" if len(ranked) > 1 else ""
        log.info("agent %s ready: %d files from %d sources, %s to %s%s", self.cfg.name, len(self.tailers),
                 len(self.config.sources), self.cfg.mode, self.transport.endpoint.data, order)

    async def serve(self) -> None:
        try:
            await self.startup()
        except BaseException:
            self.release()  # what startup opened before it failed; checkpoints stay as they were
            raise
        try:
            await self.stopping.wait()
        finally:
            await self.shutdown()

    def request_stop(self) -> None:
        self.stopping.set()

    def reload(self) -> None:
        """SIGHUP: load, validate, diff, apply. New or changed [[sources]] take effect now (a
        file whose first matching source changed goes on under its new topic and settings; a
        file no source matches any more is let go, where it was left kept: Following.unmatched);
        [agent] settings need a restart.
        A bad file is reported and the running config stays."""
        if self.config.source.startswith("<"):
            log.info("reload: running on built-in defaults and --set options; nothing to reload")
            return
        try:
            new = load_config(self.config.source)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", "; ".join(exc.problems))
            return
        if new.agent != self.cfg:
            changed = [f for f in AgentConfig.__dataclass_fields__
                       if getattr(new.agent, f) != getattr(self.cfg, f)]
            log.warning("reload: [agent] %s change only at restart; keeping the running values",
                        ", ".join(changed))
        if new.journals != self.config.journals:
            log.warning("reload: [[journal]] sources change only at restart; keeping the running ones")
        self.config = Config(agent=self.cfg, sources=new.sources, source=new.source,
                             journals=self.config.journals)
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = Watcher(self.config.sources, self.on_change, self.cfg)
            self.watcher.refresh()
        self.scan_soon.set()
        log.info("reloaded %s: %d sources", new.source, len(new.sources))

    async def shutdown(self) -> None:
        """Stop reading, give the aggregator a moment to acknowledge what is in flight, save."""
        self.notifier.notify("STOPPING=1")
        log.info("agent stopping")
        for task in self._tasks:
            if task.get_name() in ("read", "scan") or task.get_name().startswith("journal "):
                task.cancel()
        if self.watcher is not None:
            self.watcher.stop()
        deadline = time.monotonic() + min(self.cfg.shutdown_timeout_s, self.cfg.ack_timeout_ms / 1000 + 1)
        alive = self.transport is not None and self.transport.aggregator_alive(
            3 * self.cfg.heartbeat_interval_ms / 1000)
        # Waiting for acknowledgements only makes sense with an aggregator that answers.
        while alive and (self.unacked or self.journals.inflight_bytes()) and time.monotonic() < deadline:
            self.acked_event.clear()
            await self.acked_event.wait(deadline - time.monotonic())
        if self.unacked or self.journals.inflight_bytes():
            log.info("%d bytes shipped but not acknowledged; they are shipped again at restart",
                     self.inflight_bytes())
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.journals.stop()
        if self.transport is not None and self.transport.instance is not None:
            self.transport.goodbye()  # shown as stopped at once, not after agent_timeout_s
        self.save_checkpoints()
        self.release()

    def release(self) -> None:
        """Close the files and sockets (the tasks are done by now, or were never started)."""
        if self.watcher is not None:
            self.watcher.stop()
        for t in self.tailers.values():
            t.close()
        self.journals.kill_now()
        if self.status_server is not None:
            self.status_server.close()
        if self.transport is not None:
            self.transport.close()
        if self.ctx is not None:
            self.ctx.term()
        if self.metrics is not None:
            self.metrics.close()
        self.store.close()
        self.notifier.close()
        self.lock.release()
        log.info("agent stopped")

    # -- reading and shipping -------------------------------------------------------------------

    def enqueue(self, t: Tailer) -> None:
        if t not in self.queued:
            self.queued.add(t)
            self.ready.append(t)
            self.wake.set()

    def inflight_bytes(self) -> int:
        return sum(t.ship_pos - t.acked for t in self.unacked) + self.journals.inflight_bytes()

    async def read_loop(self) -> None:
        """Read cycles: each takes every file queued when it starts (and due), one batch each,
        and ships them together (see ``ship_cycle``). Files read full are queued again for the
        next cycle, so one busy file never keeps the others waiting."""
        timers_every = 0.1
        last_timers = 0.0
        while True:
            now = time.monotonic()
            if now - last_timers > timers_every:
                last_timers = now
                self.rearm_timers()
                self.check_ack_timeout(now)
                self.pace_watching(now)
            if self.unacked and self.inflight >= self.window:
                self.say_catching_up()
                self.acked_event.clear()
                await self.acked_event.wait(timers_every)
                continue
            if not self.ready:
                self.wake.clear()
                # The timers look after partial lines and acknowledgements: with none of
                # either, sleep until a file changes (an idle agent's loop wakes 4 times a
                # second instead of 24).
                await self.wake.wait(timers_every if self.timed or self.unacked else None)
                continue
            if not await self.read_cycle(now) and self.ready:
                # Nothing was due: sleep until the first file is (or yield, when one waits
                # on another file: that must not starve the other tasks).
                pause = min(t.next_read for t in self.ready) - time.monotonic()
                await asyncio.sleep(max(0.0, pause))

    async def read_cycle(self, now: float) -> bool:
        """One read cycle over the files queued now; whether any batch was read."""
        delay = self.cfg.batch_max_delay_ms / 1000
        cycle: list[tuple[Tailer, list[bytes]]] = []
        cycle_bytes = 0
        for _ in range(len(self.ready)):
            if self.unacked and self.inflight >= self.window:
                break  # the rest stay queued until acknowledgements make room
            if cycle_bytes >= CYCLE_MAX_BYTES:
                break  # a backlog: send this much first (the rest stay queued, in order)
            t = self.ready.popleft()
            if t.next_read > now:
                self.ready.append(t)
                continue
            self.queued.discard(t)
            if t.fd is None and not t.open():
                continue
            if t.predecessor is not None and self.predecessor_first(t):
                continue
            batch_read = self.read_batch(t, now)
            if batch_read is not None:
                self.shipped(t, batch_read[0], now, delay)
                cycle.append((t, batch_read[1]))
                cycle_bytes += len(batch_read[1][1])
        if not cycle:
            return False
        self.bytes_read += cycle_bytes
        if self.watcher is not None:
            self.pace_up(cycle_bytes, now)
        await self.ship_cycle(cycle)
        return True

    def pace_watching(self, now: float) -> None:
        """Every half second at most: how fast the files grow (bytes read per second, rising at
        once, falling by half per look) sets how long the watcher waits after a change before a
        read cycle (Watcher.pace): the whole latency budget on a quiet or typical node, less on
        a busy one, whose large cycles keep the cost per line low anyway."""
        since, before = self._pace_mark
        elapsed = now - since
        if elapsed < 0.5:
            return
        rate = (self.bytes_read - before) / elapsed
        self._pace_mark = (now, self.bytes_read)
        # Falling by half per half second that passed, also when the loop slept through them
        # (an idle node looks again only at its next change).
        self.read_rate = rate if rate > self.read_rate else \
            rate + (self.read_rate - rate) * 0.5 ** (elapsed / 0.5)
        if self.watcher is not None:
            self.watcher.pace(self.read_rate)

    def read_wait_ms(self) -> float | None:
        """The wait after a change in force now (ms), the rate looked at first (it is not
        while the loop sleeps: an idle node would show a burst's short wait for ever)."""
        if self.watcher is None:
            return None
        self.pace_watching(time.monotonic())
        return round(1000 * self.watcher.delay_s, 1)

    def pace_up(self, cycle_bytes: int, now: float) -> None:
        """Two cycles in a row each gathered more than a busy cycle's bytes: the files grow
        faster than the wait in force assumes, and it shortens now rather than at the next
        half-second look (``pace_watching``); a burst's first half second otherwise waited the
        whole budget (at 20,000 lines/s its lines were the only ones over 16 ms). The rate is
        the second cycle's bytes over the time since the first: one large write (nginx's
        ``access_log ... buffer=32k`` writes 32 KiB at once) is not a rate, and taking one cycle's
        bytes over the wait made each such write shorten the wait again, down to an eighth, on a
        node writing a third of a busy one's bytes."""
        assert self.watcher is not None
        last_at, last_bytes = self._last_cycle
        self._last_cycle = (now, cycle_bytes)
        if cycle_bytes <= BUSY_CYCLE_BYTES or last_bytes <= BUSY_CYCLE_BYTES:
            return
        rate = cycle_bytes / max(now - last_at, self.watcher.delay_s)
        if rate > self.read_rate:
            self.read_rate = rate
            self.watcher.pace(rate)

    def read_batch(self, t: Tailer, now: float) -> tuple[Chunk, list[bytes]] | None:
        """The next batch of ``t`` and its frames, or None. Nothing about the file (its bytes,
        its name, an error reading it) escapes: as in ``guard``, without a context manager per
        read."""
        cfg = self.cfg
        try:
            chunk = t.read(self.read_bytes, cfg.batch_max_lines, now,
                           final=t.rotated_at is not None and t.successor_waiting)
            if t.partial_since is not None or t.multiline_since is not None:
                self.timed.add(t)  # holds a partial line or record: look again when it times out
            if chunk is None:
                return None
            frames = batch.frames_for(cfg.name, t, chunk, self.wire_v2)
            if len(frames[1]) > self.max_message_bytes:
                if chunk.count != 1:
                    self.refuse_oversized(t, chunk, len(frames[1]), now)
                    return None
                frames = self.cut_to_fit(t, chunk)
        except Rewritten:
            self.truncated(t, "was written again before the agent read on (the bytes before "
                              "its offset are not the ones shipped)", doubt=True)
            return None
        except OSError as exc:
            said = f"read failed: {exc.strerror or exc}"
            if self.failing.get((t.dev, t.ino)) != said:  # once per file and error
                self.failing[(t.dev, t.ino)] = said
                log.warning("reading %s failed: %s; trying again when it changes or at the "
                            "next scan", shown(t.path), exc)
            return None
        except Exception as exc:  # on purpose: any bug must stay with this one file
            self.failed((t.dev, t.ino), t.path, exc)
            return None
        if self.failing:
            self.failing.pop((t.dev, t.ino), None)
        return chunk, frames

    def shipped(self, t: Tailer, chunk: Chunk, now: float, delay: float) -> None:
        """The bookkeeping of one batch of ``t`` going out (it is sent with its cycle's)."""
        cfg = self.cfg
        if self.unsaved_streams:
            self.save_checkpoints()
        t.seq += 1
        self.inflight += max(0, chunk.end - max(t.ship_pos, t.acked))
        t.ship_pos = chunk.end
        if chunk.end > t.acked and t not in self.unacked:
            t.ack_progress = now  # its ack timeout starts with its first unacknowledged batch
            if self.all_acked:
                self.out_since, self.all_acked = now, False  # out again after all was acknowledged
            self.unacked.add(t)
        lines = chunk.count
        self.lines_sent += lines
        # Lines count as shipped once acknowledged: (end offset, lines) of each batch in flight.
        sent = self.batch_lines.get(t.stream)
        if sent is None:
            sent = self.batch_lines[t.stream] = deque()
        while sent and sent[-1][0] > chunk.start:
            sent.pop()  # shipped again from an earlier offset: those batches went into the void
        sent.append((chunk.end, lines))
        self.batches_shipped += 1
        read_full = chunk.end - chunk.start >= self.read_bytes // 2 or \
            lines >= cfg.batch_max_lines
        t.next_read = batch.next_read_at(now, delay, read_full)
        if read_full:
            self.enqueue(t)
        elif Tailer.open_files > cfg.max_open_files and t.rotated_at is None:
            t.close()  # read to its end: reopened by name when it changes

    async def ship_cycle(self, cycle: list[tuple[Tailer, list[bytes]]]) -> None:
        """Send one read cycle's batches: to an aggregator that reads wire version 3, one message
        per topic holding all of its batches (within max_message_bytes); else one message each."""
        transport = self.transport
        assert transport is not None
        if not self.wire_v3 or len(cycle) == 1:
            for _, frames in cycle:
                await transport.send(frames)
            return
        for frames in batch.combine(cycle, self.max_message_bytes):
            await transport.send(frames)

    def predecessor_first(self, t: Tailer) -> bool:
        """Read a rotated file to its end before the file that took its name, so a topic keeps
        the order the application wrote in. True if ``t`` has to wait (it is queued again)."""
        p = t.predecessor
        assert p is not None
        if self.tailers.get(p.stream) is not p or p.fd is None:
            t.predecessor = None
            return False
        try:
            unread = file_size(p.fd) > p.ship_pos
        except OSError:
            unread = False
        if not unread:
            if p not in self.unacked:
                p.successor_waiting = False
                return False
            # Also wait for its acknowledgement: a resync may still send it back a few batches.
            t.next_read = time.monotonic() + 0.01
            self.enqueue(t)
            return True
        p.successor_waiting = True
        t.next_read = max(t.next_read, p.next_read)  # not looked at again before p can be read
        self.enqueue(p)
        self.enqueue(t)
        return True

    def check_ack_timeout(self, now: float) -> None:
        """Streams with nothing acknowledged for ack_timeout_ms while batches are out: ship them
        again. Per file stream: one lost batch (PUB dropped it) is resent after the timeout even
        while the agent's other files are acknowledged all along. Journal sources as one (their
        batches come from one reader, in order)."""
        timeout = self.cfg.ack_timeout_ms / 1000
        late = [t for t in self.unacked if now - t.ack_progress >= timeout]
        journals_late = bool(self.journals.inflight_bytes()) and now - self.last_ack_progress >= timeout
        if not late and not journals_late:
            return
        assert self.transport is not None
        if not self.transport.aggregator_alive(3 * self.cfg.heartbeat_interval_ms / 1000):
            return  # nobody to resend to: ship again once it answers (a restart also rewinds)
        if self.stream_hold() is not None:
            # It takes nothing while its stream takes nothing, and asks for what it refused
            # once it can (a resync): sending the window again every timeout is waste.
            for t in late:
                t.ack_progress = now
            self.last_ack_progress = now
            return
        self.resends += 1
        if late:
            log.info("no acknowledgement for %.1fs; shipping %d bytes of %d files again",
                     timeout, sum(t.ship_pos - t.acked for t in late), len(late))
        for t in late:
            t.rewind(t.acked)
            t.ack_progress = now
            self.unacked.discard(t)
            self.enqueue(t)
        if journals_late:
            log.info("no acknowledgement of journal entries for %.1fs; shipping them again", timeout)
            self.journals.rewind_unacked()
            self.last_ack_progress = now
        self.inflight = self.inflight_bytes()

    def cut_to_fit(self, t: Tailer, chunk: Chunk) -> list[bytes]:
        """One line (or record) that encodes larger than the aggregator takes, although it is
        within max_line_bytes: cut it further, as max_line_bytes would (the rest is counted in
        cut_lines and discarded_bytes), rather than let the file wait for good."""
        line = chunk.line_list()[0]
        keep = max(1, (self.max_message_bytes - 64 * 1024) // 6)  # characters, six bytes each at worst
        cut = Chunk(chunk.start, chunk.end, [line[:keep]], 1)
        t.cut_lines += 1
        t.discarded_bytes += len(line[keep:].encode())
        key = f"cut:{t.stream}"
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s: a line at offset %d encodes larger than the aggregator's max_message_bytes "
                        "(%d): cut to its first %d characters (lower max_line_bytes for this source, or "
                        "raise the aggregator's max_message_bytes)", t.path, chunk.start,
                        self.max_message_bytes, keep)
        return batch.frames_for(self.cfg.name, t, cut, self.wire_v2)

    def refuse_oversized(self, t: Tailer, chunk: Chunk, size: int, now: float) -> None:
        """A batch that encodes larger than the aggregator takes (orjson writes a control
        character as six bytes; one line is read whole however long): the aggregator would drop
        it and the connection without a word. Not sent; the file waits, said once at ERROR."""
        self.oversized_batches += 1
        t.rewind(chunk.start)
        t.next_read = now + 10.0
        self.enqueue(t)
        key = f"oversized:{t.stream}"
        if key not in self._warned:
            self._warned.add(key)
            log.error("%s: the batch at offset %d (%d bytes) encodes to %d bytes, more than the "
                      "aggregator's max_message_bytes (%d): not shipped, the file waits; raise the "
                      "aggregator's max_message_bytes or lower this source's max_line_bytes",
                      t.path, chunk.start, chunk.end - chunk.start, size, self.max_message_bytes)

    def on_switch(self, switch: Switch) -> None:
        """Moved to another aggregator (``switch`` says why and which): as after a restart of
        the aggregator, everything not acknowledged is shipped again, from the acknowledged
        offsets, to the new one only (the old sockets are closed with what they held)."""
        self.rewind_unacked()
        self.last_any_ack = time.monotonic()
        self.stalled_since = None
        # As at start, until the new aggregator's hello reply says otherwise.
        self.window = min(MIN_WINDOW, self.cfg.max_inflight_bytes)
        self.wire_v2 = False
        self.acked_event.set()
        self.wake.set()

    def rewind_unacked(self) -> None:
        """Ship everything not acknowledged again, from the files."""
        for t in self.unacked:
            t.rewind(t.acked)
            self.enqueue(t)
        self.unacked.clear()
        self.journals.rewind_unacked()
        self.inflight = 0

    # -- acknowledgements -----------------------------------------------------------------------

    def on_event(self, msg: dict[str, Any]) -> None:
        event = msg.get("event")
        if event == "ack":
            streams = msg.get("streams")
            if isinstance(streams, dict):
                for stream, end in streams.items():
                    self.ack(stream, end)
            self.stalled_since = None
            self.last_any_ack = time.monotonic()
            self.moved_for_stream_hold = False
        elif event == "resync":
            self.resync(msg.get("stream"), msg.get("offset"), msg.get("seq"),
                        resend_acknowledged=msg.get("held") is True)
        if "window" in msg:
            self.on_window(msg["window"])
        self.inflight = self.inflight_bytes()

    def on_window(self, window: Any) -> None:
        """The aggregator's share for this agent (in hello and heartbeat replies and in acks)."""
        if type(window) is not int or window < MIN_WINDOW:
            return
        window = min(window, self.cfg.max_inflight_bytes)
        if window != self.window:
            log.debug("in-flight window %d -> %d bytes (the aggregator's share)", self.window, window)
            if window > self.window:
                self.acked_event.set()  # room again: the read loop may be waiting for it
            self.window = window

    def ack(self, stream: str, end: Any) -> None:
        t = self.tailers.get(stream)
        if t is None and self.journals.ack(stream, end):
            self.last_ack_progress = time.monotonic()
            self.acked_event.set()
            return
        if t is None and self.unfollowed and type(end) is int:
            self.unfollowed_acked(stream, end)
            return
        if t is None or type(end) is not int or end <= t.acked:
            return
        t.acked = end
        t.acked_to(end)
        sent = self.batch_lines.get(stream)
        while sent and sent[0][0] <= end:
            self.lines_shipped += sent.popleft()[1]
        if t.ship_pos < end:
            t.ship_pos = end
        if t.ship_pos == t.acked:
            self.unacked.discard(t)
            if not self.unacked:
                self.all_acked = True
        t.ack_progress = time.monotonic()
        self.checkpoints_dirty = True
        self.acked_event.set()

    def resync(self, stream: Any, offset: Any, seq: Any, resend_acknowledged: bool = False) -> None:
        """The aggregator expects this stream to continue at ``offset``. ``seq`` is the batch that
        made it ask (stale if sent before our last rewind), or None when it asks on its own (it
        refused or took back batches and can take them now). ``resend_acknowledged``: its sink
        holds exactly what is before ``offset`` (JetStream), so an offset below what it had
        acknowledged means the sink lost those lines (a crash with JetStream's default
        sync_interval): they are sent again while the file still has them."""
        t = self.tailers.get(stream) if isinstance(stream, str) else None
        if t is None and isinstance(stream, str):
            self.journals.resync(stream, offset, seq)
            return
        if t is None or type(offset) is not int:
            return
        if seq is not None and (type(seq) is not int or seq < t.rewind_seq):
            return  # stale (sent before our last rewind)
        if offset < t.acked and resend_acknowledged and offset >= t.base:
            log.warning("the aggregator's JetStream stream no longer holds %d acknowledged bytes of %s"
                        " (from %d; lost in a crash?): sending them again", t.acked - offset, t.path,
                        offset)
            t.acked = offset
            t.acked_mark = None
            t.marks.clear()
            self.batch_lines.pop(t.stream, None)
            self.checkpoints_dirty = True
        if offset < t.acked:
            # The aggregator lost what it had acknowledged (its state_dir was lost or its journal
            # damaged), or, with several aggregators, this one last had the stream before
            # another took it further: start the stream again from what we know is durable,
            # rather than shipping it all twice. The new base tells it so, and it takes our
            # word: one answer, said once per stream (with several aggregators it is expected:
            # counted, at DEBUG).
            if t.base < t.acked:
                self.rebased_streams += 1
                if self.transport is not None and self.transport.failover.several:
                    log.debug("aggregator %s had %s at %d, another took it to %d: continuing from %d",
                              self.transport.endpoint.control, t.path, offset, t.acked, t.acked)
                else:
                    log.warning("aggregator asks for %s from %d but acknowledged %d before;"
                                " continuing from %d (rebasing the stream)", t.path, offset, t.acked,
                                t.acked)
                t.base = t.acked
                self.unsaved_streams = True
            offset = t.acked
        self.resends += 1
        t.rewind(offset)
        if t.ship_pos > t.acked:
            self.unacked.add(t)
        else:
            self.unacked.discard(t)
        self.enqueue(t)

    def on_hello(self, result: dict[str, Any], change: str | None) -> None:
        """The aggregator in use answered a hello. ``change``: what it follows, in words (a
        restart, a move, a refusal that ended), after which everything not acknowledged is
        shipped again; None for the first answer of this run."""
        committed = result.get("committed")
        if isinstance(committed, dict):
            for stream, end in committed.items():
                self.ack(stream, end)
        self.last_any_ack = time.monotonic()
        if change is not None:
            self.rewind_unacked()
        self.inflight = self.inflight_bytes()
        versions = result.get("wire")
        self.wire_v2 = isinstance(versions, list) and 2 in versions
        self.wire_v3 = isinstance(versions, list) and 3 in versions
        limit = result.get("max_message_bytes")
        if type(limit) is not int or limit < 1024:
            limit = wire.DEFAULT_MAX_MESSAGE_BYTES  # an older aggregator: the documented default
        self.max_message_bytes = limit
        self.read_bytes = read_bytes_for(self.cfg.batch_max_bytes, self.max_message_bytes)
        if "window" not in result:
            self.window = self.cfg.max_inflight_bytes  # an aggregator that sets no window
        assert self.transport is not None
        log.info("connected to aggregator %s at %s (wire version %d)%s", result.get("instance"),
                 self.transport.endpoint.control, 3 if self.wire_v3 else 2 if self.wire_v2 else 1,
                 "" if change is None else f": {change}; shipping everything not acknowledged again")

    def hello_args(self) -> dict[str, Any]:
        """Ask where the streams with something not yet acknowledged stand (at most 20,000, so
        the message stays far below the control socket's 1 MiB limit; the rest learn it from
        resyncs)."""
        streams = [s for s, t in self.tailers.items() if t.ship_pos > t.acked or t.size > t.acked]
        streams += self.journals.unacked_streams()
        self.reported_lag = self.lag_bytes()
        self.reported_paths = []  # a new aggregator instance: tell it the file list again
        assert self.transport is not None
        return {"agent": self.cfg.name, "agent_id": self.transport.agent_id, "mode": self.cfg.mode,
                "version": __version__, "started_at": self.started_at, "streams": streams[:20_000],
                "lag_bytes": self.reported_lag, "lag_s": self.measure_lag_s(),
                "max_inflight_bytes": self.cfg.max_inflight_bytes, "problems": self.problems(),
                "heartbeat_interval_ms": self.cfg.heartbeat_interval_ms,
                # Several: a stream further on than this aggregator knows is normal (another
                # one acknowledged it), not a sign of lost state.
                "aggregators": len(self.cfg.aggregator_list)}

    def heartbeat_args(self) -> dict[str, Any]:
        """A heartbeat's content; once a beat, it also looks at whether acks are flowing.

        Its figures are sums over every file: with 10,000 quiet files they were 95% of an idle
        agent's CPU. So a beat after one that found everything acknowledged, with nothing read,
        acknowledged, resent or renamed since, sends the same figures again."""
        self.check_acks_flow()
        self.check_ack_stall()
        assert self.transport is not None
        state = (self.names_changed, self.batches_shipped, self.lines_shipped, self.resends,
                 self.oversized_batches, len(self.tailers))
        if (state == self._beat_state and not self.reported_lag and not self.journals
                and (self.reported_paths or not self.tailers)):
            return {**self._beat_args, "agent_id": self.transport.agent_id, "problems": self.problems()}
        self.reported_lag = self.lag_bytes()
        args: dict[str, Any] = {"agent": self.cfg.name, "agent_id": self.transport.agent_id,
                                "mode": self.cfg.mode, "lag_bytes": self.reported_lag,
                                "lag_s": self.measure_lag_s(), "files": len(self.tailers),
                                "errors": self.error_counts(), "problems": self.problems()}
        self._beat_state, self._beat_args = state, dict(args)
        paths = sorted({t.path for t in self.tailers.values()})
        if paths != self.reported_paths:
            # The files followed, only when they changed (and at most 1,000 of them).
            self.reported_paths = paths
            args["file_list"] = [shown(p) for p in paths[:1000]]  # names as text JSON carries
        if self.journals:
            args["journal_lag_entries"], args["journal_lag_s"] = self.journals.lag()
        return args

    def sources_status(self) -> list[dict[str, Any]]:
        """Each configured source: its topic and globs, the files it follows, the globs that
        match nothing."""
        out = []
        for i, source in enumerate(self.config.sources):
            files = sorted(shown(t.path) for t in self.tailers.values()
                           if t.source is source and t.rotated_at is None)
            out.append({"topic": source.topic, "paths": list(source.paths), "files": files,
                        "empty_globs": [p for p in source.paths if (i, p) in self.empty_globs]})
        return out

    def error_counts(self) -> dict[str, int]:
        """What went wrong with the files, for the aggregator's status: lines cut at their limit,
        bytes discarded with them (over-long lines), batches too large to ship."""
        tailers = self.tailers.values()
        return {"cut_lines": sum(t.cut_lines for t in tailers),
                "discarded_bytes": sum(t.discarded_bytes for t in tailers),
                "oversized_batches": self.oversized_batches}

    def check_acks_flow(self) -> None:
        """Batches out, the aggregator answering heartbeats, and no ack for a long while: the
        batches go somewhere else (``data`` is not this aggregator's pull/xsub endpoint), or the
        aggregator cannot write. Say so once, and clear it when acks flow again."""
        now = time.monotonic()
        if not self.unacked:
            self.stalled_since = None
        elif self.stalled_since is None:
            self.stalled_since = now
        limit = max(5.0, 3 * self.cfg.ack_timeout_ms / 1000)
        transport = self.transport
        stalled = (self.stalled_since is not None and now - self.stalled_since >= limit
                   and transport is not None and transport.answers(limit))
        hold = self.stream_hold()
        if stalled and self.ack_problem is None and hold is not None:
            # The aggregator said why (it holds our batches: its stream takes nothing); the
            # waiting is logged by check_ack_stall, the status shows it here.
            self.ack_problem = ("no acknowledgement: the aggregator's JetStream stream takes nothing"
                                f" ({hold.get('error')})")
        elif stalled and self.ack_problem is None and transport is not None:
            endpoint = "pull" if self.cfg.mode == "push" else "xsub"
            self.ack_problem = (
                f"connected, but no acknowledgement for over {limit:g}s although the aggregator"
                f" answers heartbeats: is `data` ({transport.endpoint.data}) the aggregator's {endpoint}"
                f" endpoint ({self.cfg.mode} mode)? (if it is, `aggregatorctl status` says why it"
                " does not acknowledge)")
            log.warning("%s", self.ack_problem)
        elif not stalled and self.ack_problem is not None and self.stalled_since is None:
            log.info("acknowledgements arrive again")
            self.ack_problem = None

    def stream_hold(self) -> dict[str, Any] | None:
        """The aggregator's word in its last few replies (three heartbeats) that the JetStream
        stream every aggregator shares takes nothing (``Transport.held_by_shared_stream``)."""
        if self.transport is None:
            return None
        return self.transport.held_by_shared_stream(3 * self.cfg.heartbeat_interval_ms / 1000)

    def check_ack_stall(self) -> None:
        """Batches out and nothing at all acknowledged for two ack timeouts since the aggregator
        in use answered its hello (the first timeout resent them, if it still answered): with
        another aggregator configured, move to it, whether or not it answers heartbeats (with
        lines flowing this is noticed before a long heartbeat timeout). Looked at once a beat,
        here rather than in the read loop, which may be waiting for room on a data socket
        nobody reads."""
        transport = self.transport
        if transport is None or transport.instance is None or not (
                self.unacked or self.journals.inflight_bytes()):
            return
        # Since the last acknowledgement, or since the batches out now went out if that is later
        # (an idle spell between two is no silence of the aggregator's).
        silent_s = time.monotonic() - max(self.last_any_ack, self.out_since)
        if silent_s < 2 * self.cfg.ack_timeout_ms / 1000:
            self.waiting_for_stream = False
            return
        hold = self.stream_hold()
        # A full stream ends only with room, for every aggregator alike: wait as long as the
        # aggregator answers. Anything else (an election, no quorum, a server of a partitioned
        # minority) for a while, then try another.
        full = hold is not None and hold.get("kind") == "full"
        if hold is not None and (full or self.moved_for_stream_hold or silent_s < SHARED_STREAM_PATIENCE_S):
            # Every aggregator of the stream waits for the same thing (an election, a full
            # stream): moving would send the whole window again to one that waits too.
            if not self.waiting_for_stream:
                self.waiting_for_stream = True
                log.info("no acknowledgement for %.1fs: the aggregator holds this agent's batches"
                         " because its stream takes nothing (%s), as it does for every aggregator"
                         " of it: waiting rather than moving (%s)", silent_s, hold.get("error"),
                         "until it has room" if full
                         else "as long as it lasts" if self.moved_for_stream_hold
                         else f"for up to {SHARED_STREAM_PATIENCE_S:g}s")
            return
        if hold is not None:
            # One try elsewhere: this aggregator may reach only a cut-off part of the cluster.
            # If the next one is held the same way, it is the stream's: wait there.
            self.moved_for_stream_hold = True
            self.waiting_for_stream = False
        transport.fail_over(f"no acknowledgement for {silent_s:.1f}s with batches out")

    def problems(self) -> list[str]:
        """What is wrong now (connections, refusals, the aggregator's word, missing acks)."""
        out = self.transport.problems() if self.transport is not None else []
        return out + ([self.ack_problem] if self.ack_problem else []) + self.journals.problems()

    def say_catching_up(self) -> None:
        """Stopped at its window: if the aggregator still thinks this agent is not catching up
        (a quiet one that now has a backlog, granted the least window), tell it at once with a
        heartbeat, whose reply grants a share, rather than at the next beat."""
        transport = self.transport
        if (self.reported_lag >= MIN_WINDOW or self.window >= self.cfg.max_inflight_bytes
                or transport is None or transport.instance is None or self.lag_bytes() < MIN_WINDOW):
            return
        transport.request("heartbeat", self.heartbeat_args())

    def lag_bytes(self) -> int:
        return sum(t.lag_bytes for t in self.tailers.values()) + self.journals.lag_bytes()

    def measure_lag_s(self) -> float:
        """How old the oldest line not yet acknowledged is, in seconds (0: everything is).

        Each stream with a lag keeps (when, size) samples, one per call (heartbeats: once a
        second) when its size grew; the oldest unacknowledged byte was first seen at the first
        sample larger than the acknowledged offset. So the figure is exact to a heartbeat, and
        a file written to all the time still shows a small lag, not the time since it was last
        caught up. Called on the loop only; the result is kept for the metrics thread."""
        now = time.monotonic()
        oldest = now
        seen = self.size_seen
        for stream, t in self.tailers.items():
            samples = seen.get(stream)
            if t.size <= t.acked:
                if samples is not None:
                    del seen[stream]
                continue
            if samples is None:
                samples = seen[stream] = deque()
            if not samples or samples[-1][1] < t.size:
                samples.append((now, t.size))
                if len(samples) > 600:
                    del samples[1]  # keep the oldest exact, thin the middle
            while samples[0][1] <= t.acked:
                samples.popleft()
            oldest = min(oldest, samples[0][0])
        for stream in [s for s in seen if s not in self.tailers]:
            del seen[stream]
        for stream in [s for s in self.batch_lines if s not in self.tailers]:
            del self.batch_lines[stream]
        self.lag_s = round(now - oldest, 1)
        return self.lag_s

    # -- checkpoints --------------------------------------------------------------------------

    def checkpoints(self) -> list[Checkpoint]:
        now = time.time()
        out = [self.checkpoint_of(t) for t in self.tailers.values()]
        for cp in out:
            cp.updated = now
        return out + list(self.shadows.values()) + list(self.unfollowed.values())

    def save_checkpoints(self) -> None:
        try:
            self.store.save(self.checkpoints(), self.journals.checkpoints())
            self.checkpoints_dirty = False
            self.unsaved_streams = False
        except (OSError, TypeError, ValueError) as exc:  # ValueError: orjson's encoding errors
            log.error("cannot save checkpoints to %s: %s", self.store.path, exc)

    async def checkpoint_loop(self) -> None:
        """Save the checkpoints every checkpoint_interval_ms while they changed. Taken here on
        the loop, written by the store's one thread (``save_soon``): in order, and without
        stopping the loop for the fsyncs. (A new stream is still saved at once, and waited for,
        before its first batch ships: ``shipped``.)"""
        while True:
            await asyncio.sleep(self.cfg.checkpoint_interval_ms / 1000)
            if not self.checkpoints_dirty:
                continue
            self.checkpoints_dirty = False  # what changes from now on is for the next save
            try:
                saving = self.store.save_soon(self.checkpoints(), self.journals.checkpoints())
                await asyncio.wrap_future(saving)
            except (OSError, TypeError, ValueError) as exc:
                self.checkpoints_dirty = True
                log.error("cannot save checkpoints to %s: %s", self.store.path, exc)

    # -- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        files = []
        for t in sorted(self.tailers.values(), key=lambda t: t.path):
            if t.fd is not None:
                with contextlib.suppress(OSError):
                    t.size = file_size(t.fd)
            entry = {"path": shown(t.path), "topic": t.source.topic, "stream": t.stream,
                     "identity": t.identity, "offset": t.acked, "shipped": t.ship_pos,
                     "size": t.size, "lag_bytes": t.lag_bytes, "open": t.fd is not None,
                     "rotated": t.rotated_at is not None, "cut_lines": t.cut_lines,
                     "discarded_bytes": t.discarded_bytes, "nul_bytes_skipped": t.nul_bytes_skipped}
            raw = name_base64(t.path)
            if raw is not None:
                entry["path_base64"] = raw
            files.append(entry)
        unreadable = []
        for (dev, ino), (path, reason) in sorted(self.unreadable.items(), key=lambda i: i[1]):
            item = {"path": shown(path), "identity": f"{dev}:{ino}", "reason": reason}
            raw = name_base64(path)
            if raw is not None:
                item["path_base64"] = raw
            unreadable.append(item)
        transport = self.transport
        return {
            "agent": self.cfg.name, "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 1), "mode": self.cfg.mode,
            "data": transport.endpoint.data if transport else self.cfg.data,
            "aggregators": transport.status() if transport else None,
            "rebased_streams": self.rebased_streams,
            "torn_sends": transport.torn_sends if transport else 0,
            "aggregator": transport.instance if transport else None,
            "aggregator_last_reply_s": transport.last_reply_age_s() if transport else None,
            "agent_id": transport.agent_id if transport else None,
            "problems": self.problems(),
            "links": {link.role: link.status() for link in transport.links} if transport else {},
            "files": files, "lag_bytes": sum(f["lag_bytes"] for f in files), "lag_s": self.measure_lag_s(),
            "journal": self.journals.status(),
            "sources": self.sources_status(),
            "inflight_bytes": self.inflight_bytes(), "window_bytes": self.window,
            # How long a change waits for its read cycle now: the latency budget on a quiet or
            # typical node, shorter while the files grow fast (see pace_watching).
            "read_wait_ms": self.read_wait_ms(),
            "lines_shipped": self.lines_shipped, "lines_sent": self.lines_sent,
            "batches_shipped": self.batches_shipped,
            # Messages sent (several batches share one with wire version 3).
            "data_messages": transport.sent_batches if transport else 0,
            "resends": self.resends, "oversized_batches": self.oversized_batches,
            "open_files": sum(1 for t in self.tailers.values() if t.fd is not None),
            "copies_ignored": len(self.shadows),
            "nul_bytes_skipped": Tailer.nul_bytes_total,
            "unreadable": unreadable,
            # Files no source matches any more (the sources changed), where each was left.
            "unfollowed": [{"path": shown(cp.path), "topic": cp.topic, "stream": cp.stream,
                            "offset": cp.acked, "size": cp.size}
                           for cp in sorted(self.unfollowed.values(), key=lambda c: c.path)],
            # Glob matches that are not log files (FIFOs, sockets, devices, /proc files); not
            # the directories a glob matches as a matter of course.
            "skipped": [{"path": shown(p), "what": w} for p, w in sorted(self.skipped.items())
                        if not w.startswith("a directory")],
            "failing": [{"identity": f"{d}:{i}", "error": e} for (d, i), e in self.failing.items()],
            "control": {"messages_sent": transport.control_sent if transport else 0,
                        "messages_received": transport.control_received if transport else 0},
        }


def read_bytes_for(batch_max_bytes: int, max_message_bytes: int) -> int:
    """The most one read may take so that its batch always encodes within ``max_message_bytes``:
    orjson writes a control character as six bytes (``\\u0001``), and the document's other fields
    (a path, at most 4 KiB, escaped) fit in 32 KiB. The default 512 KiB batch is far below a
    16 MiB aggregator's ~2.7 MiB; a line longer than this is still read whole."""
    return max(1024, min(batch_max_bytes, (max_message_bytes - 32 * 1024) // 6))
