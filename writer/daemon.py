"""fleetlog-writer: turns the JetStream stream into per-topic rolling files, exactly once.

It owns its position. Each group commit fsyncs the files, then appends one journal record
(aggregator/journal.py) holding the files' committed lengths, each (agent, stream)'s end offset
and, as a mark, the last applied stream sequence. On every start it cuts the files back to the
journal's lengths and reads on from the sequence after the mark with a fresh consumer
(writer/source.py). Every message must carry the next stream sequence: a jump is accepted only
when the stream no longer holds the sequences skipped (discarded by its limits, or deleted), and
then raises the "discarded unwritten" alarm; otherwise the consumer is made again from the
right place. A second safety net drops a message whose End is not past its (agent, stream)'s
recorded end (a duplicate), and reports a Start past it (a gap in that stream).

Rotation, compression and retention are the aggregator's own (aggregator/rolling.py, the
``Rolling`` mixin), on the aggregator's rolling-file sink.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import nats.js.errors
import zmq
import zmq.asyncio
from nats.aio.msg import Msg

from aggregator import registry
from aggregator.control import ControlServer
from aggregator.files import RollingFileSink, SinkError, open_files_bound, uncompressed_rotated
from aggregator.journal import Journal
from aggregator.metrics import LatencyHistogram
from aggregator.rolling import Rolling
from aggregator.security import Guard
from fleetlog import wire
from fleetlog.dirlock import DirectoryLock
from fleetlog.runtime import SystemdNotifier, raise_open_files_limit, start_zmq_threads, supervise
from fleetlog.tomlconf import ConfigError
from writer import commands, metrics, status
from writer.apply import Applier, TopicStats, Totals
from writer.config import Config, load_config
from writer.source import NATS_ERRORS, Source, StreamState

log = logging.getLogger("fleetlog.writer")

# Missing sequences probed one by one (a get per sequence) before a jump is called discarded.
_PROBE_MAX = 1000
# With messages waiting and none applied for this long, the consumer is made again.
_STALL_S = 5.0
# One pull asks for about this many bytes at most (messages are up to the server's max_payload,
# 1 MiB by default: 1,000 of them must not be asked for at once).
_FETCH_BYTES = 16 * 1024 * 1024


class ReadAgain(Exception):
    """The consumer skipped messages the stream still holds: make it again from the position."""


@dataclass
class Alarm:
    """Messages discarded by the stream before this writer wrote them: on until caught up."""

    since: float              # time.time()
    messages: int
    first_seq: int
    last_seq: int


class Writer(Rolling):
    def __init__(self, config: Config, overrides: list[str] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.overrides = list(overrides or [])
        self.wcfg = config.writer
        self.cfg = self.wcfg.files()   # the output keys as the shared rolling code reads them
        self.clock = clock
        self.instance = uuid.uuid4().hex[:12]
        self.started = time.monotonic()
        self.started_wall = clock()
        self.sink = RollingFileSink(self.cfg.output_dir, clock=clock)
        self.locks = [DirectoryLock(self.wcfg.state_dir, "writer.state_dir"),
                      DirectoryLock(self.wcfg.output_dir, "writer.output_dir")]
        self.journal = Journal(self.wcfg.state_dir, stream_ttl_s=self.wcfg.stream_ttl_s)
        self.source = Source(self.wcfg.servers, self.wcfg.stream, self.wcfg.subject_prefix,
                             self.wcfg.credentials)
        self.notifier = SystemdNotifier()
        self.guard = Guard(self.cfg)
        self.totals = Totals()
        self.applier = Applier(self.sink, self.cfg, self.totals)
        self.applied_seq = 0      # the last stream sequence applied to the files
        self.applied_id = ""      # and the Nats-Msg-Id of the message there (a rewritten tail)
        self._saved_counts: dict[str, dict[str, int]] | None = None  # what save_counts wrote last
        self.committed_seq = 0    # ... and made durable by a commit
        self.stream_created = ""  # the creation time of the stream we read (another: made anew)
        self.stream = StreamState()
        self.lag_s: float | None = None
        self.alarm: Alarm | None = None
        self.last_discard: Alarm | None = None
        self.disk_error: str | None = None
        self.source_problem: str | None = None
        self.read_again = False
        self.progress_at = time.monotonic()
        self.pending_messages: int | None = None  # the consumer's count of messages to deliver
        self._stalled = False
        self.msg_bytes = 4096.0   # the mean size of recent messages (sizes the pulls)
        self.commit_lock = asyncio.Lock()
        self.commit_latency = LatencyHistogram()
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.ctx: zmq.asyncio.Context | None = None
        self.control: ControlServer | None = None
        self.metrics: Any = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._consume: asyncio.Task[Any] | None = None
        self._compressions: set[asyncio.Future[Any]] = set()
        self._compressor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compress")
        self._compress_cancel = threading.Event()
        self._retention: asyncio.Future[Any] | None = None
        self._retain_waiting: set[str] = set()
        self._retain_all = False
        self._ahead_warned: set[str] = set()

    # -- lifecycle -----------------------------------------------------------------------------

    async def startup(self) -> None:
        cfg = self.wcfg
        os.makedirs(cfg.output_dir, exist_ok=True)
        os.makedirs(cfg.state_dir, exist_ok=True)
        for lock in self.locks:
            if not lock.same_directory_as(self.locks[0]) or lock is self.locks[0]:
                lock.acquire()
        limit = raise_open_files_limit()
        self.sink.max_open = open_files_bound(limit)
        self.recover()
        # Per-topic counts as of the last save (every 10 s and at stop), as the aggregator's.
        for name, t in registry.load(cfg.state_dir).topics.items():
            self.applier.topics[name] = TopicStats(lines=int(t.get("lines", 0)), bytes=int(t.get("bytes", 0)))
        leftovers = uncompressed_rotated(cfg.output_dir)
        for topic in self.sink.topics_on_disk():
            if wire.valid_topic(topic):
                self.sink.open_existing(topic)
        await self.rotate_due()
        self.ctx = zmq.asyncio.Context()
        start_zmq_threads(self.ctx)
        self.control = ControlServer(self, self.ctx, cfg.control, self.guard, commands=commands.COMMANDS)
        self.control.bind()
        self.metrics = metrics.serve(self)
        for name in leftovers:
            self._compress_later(name)
        self._consume = asyncio.create_task(self.consume_loop(), name="consume")
        self._tasks = [
            self._consume,
            asyncio.create_task(self.control.serve(), name="control"),
            asyncio.create_task(self.ticker(), name="ticker"),
            asyncio.create_task(self.notifier.watchdog(), name="watchdog"),
        ]
        supervise(self._tasks, self.request_stop)
        self.ready.set()
        self.notifier.notify("READY=1", f"STATUS=reading {cfg.stream} after sequence {self.applied_seq}")
        log.info("writer %s ready: stream %s on %s after sequence %d, control %s, output %s",
                 self.instance, cfg.stream, ", ".join(cfg.servers), self.applied_seq,
                 ", ".join(cfg.control), cfg.output_dir)

    def recover(self) -> None:
        """The journal's state, and the files cut back to it (a kill -9 leaves uncommitted tails)."""
        journal_existed = os.path.exists(self.journal.journal_path)
        state = self.journal.recover()
        self.journal.compact_quietly()
        on_disk = self.sink.topics_on_disk()
        if state.damage is None:
            self.recover_rotations(state.rotations)
            positions = dict(state.topics)
            if journal_existed:
                for topic in on_disk:
                    positions.setdefault(topic, 0)
            elif on_disk:
                log.warning("no journal in %s but %d topic directories in %s: the stream is written again"
                            " from its start after what they hold", self.wcfg.state_dir, len(on_disk),
                            self.wcfg.output_dir)
            self.sink.recover(positions)
        else:
            # Commits after the damage may be unknown: keep the files whole (duplicates over loss);
            # the (agent, stream) ends the good records hold still drop most of what is read again.
            extra = self.sink.uncommitted(state.topics)
            sizes = {t: state.topics.get(t, 0) + n for t, n in extra.items()}
            self.journal.append(sizes, {}, rotations=dict.fromkeys(state.rotations) or None)
            log.error("journal damaged: output kept whole; lines after sequence %s may appear twice",
                      state.marks.get("stream_seq", 0))
        self.applier.ends = {k: int(v[0]) for k, v in state.streams.items()}
        marks = state.marks
        self.applied_seq = self.committed_seq = int(marks.get("stream_seq", 0))
        self.stream_created = str(marks.get("stream_created", ""))
        self.applied_id = str(marks.get("stream_msg_id", ""))
        self.totals.discarded_unwritten = int(marks.get("discarded_unwritten", 0))

    async def serve(self) -> None:
        try:
            await self.startup()
        except BaseException:
            await self.release()
            raise
        try:
            await self.stopping.wait()
        finally:
            await self.shutdown()

    def request_stop(self) -> None:
        self.stopping.set()

    async def shutdown(self) -> None:
        """Stop reading, commit what was applied, close; within ``shutdown_timeout_s``."""
        deadline = time.monotonic() + self.wcfg.shutdown_timeout_s
        self.notifier.notify("STOPPING=1")
        log.info("writer stopping")
        if self._consume is not None:
            # It ends by itself between two fetches (a fetch waits 1 s at most).
            done, _ = await asyncio.wait({self._consume}, timeout=max(0.0, deadline - time.monotonic() - 1))
            if not done:
                self._consume.cancel()
        try:
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                async with self.commit_lock:
                    await self.commit()
        except (TimeoutError, SinkError) as exc:
            log.warning("final commit did not finish (%s); what was not committed is read again at the"
                        " next start", exc or "timeout")
        self.save_counts()
        await self.release(deadline)

    def save_counts(self) -> None:
        """Keep the per-topic counts for the next start (aggregator/registry.py's file)."""
        topics = {name: {"lines": t.lines, "bytes": t.bytes} for name, t in self.applier.topics.items()}
        if topics == self._saved_counts:
            return  # nothing new since the last save: no write
        try:
            registry.save(self.wcfg.state_dir, {}, topics)
            self._saved_counts = topics
        except OSError as exc:
            log.debug("cannot save the topic counts (%s); status counts from zero after a restart", exc)

    async def release(self, deadline: float | None = None) -> None:
        if deadline is None:
            deadline = time.monotonic() + self.wcfg.shutdown_timeout_s
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        margin = min(0.5, self.wcfg.shutdown_timeout_s / 4)
        if self._compressions:
            await asyncio.wait(self._compressions, timeout=max(0.0, deadline - margin - time.monotonic()))
        self._compress_cancel.set()
        if self._compressions:
            await asyncio.wait(self._compressions, timeout=margin)
        self._compressor.shutdown(wait=False, cancel_futures=True)
        await self.close_files()
        self.sink.close()
        self.journal.close()
        await self.source.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.control is not None:
            self.control.close()
        if self.ctx is not None:
            self.ctx.term()
        self.notifier.close()
        for lock in self.locks:
            lock.release()
        log.info("writer stopped")

    async def reload(self, path: str | None = None) -> dict[str, Any]:
        """Load, validate, diff, apply (the output keys); then commit and reopen the files."""
        source = path or (None if self.config.source.startswith("<") else self.config.source)
        try:
            new = load_config(source, self.overrides)
        except ConfigError as exc:
            log.warning("reload refused, keeping the running config: %s", "; ".join(exc.problems))
            return {"reloaded": False, "problems": exc.problems}
        fixed = ("output_dir", "state_dir", "servers", "stream", "subject_prefix", "control",
                 "credentials", "metrics_listen", "loop")
        changed = [k for k in fixed if getattr(new.writer, k) != getattr(self.wcfg, k)]
        if changed:
            log.warning("reload: %s need a restart to change; keeping the running values", ", ".join(changed))
            kept = {k: getattr(self.wcfg, k) for k in fixed}
            new = Config(writer=dataclasses.replace(new.writer, **kept), source=new.source)
        if new.writer.log_level != self.wcfg.log_level:
            logging.getLogger().setLevel(new.writer.log_level.upper())
        self.config, self.wcfg, self.cfg = new, new.writer, new.writer.files()
        self.applier.cfg = self.cfg
        async with self.commit_lock:
            await self.commit()
            await self.close_files()
        log.info("configuration reloaded from %s", new.source)
        return {"reloaded": True, "restart_needed": changed}

    async def rotate_now(self, topic: str | None) -> list[str]:
        async with self.commit_lock:
            await self.commit()
            return await self.rotate_due({topic})

    def owe_ack(self, agent: str, stream: str, end: int) -> None:
        """Nobody to acknowledge: the stream keeps the messages, the journal our position."""

    def on_disk_error(self, exc: SinkError) -> None:
        self.totals.write_errors += 1
        if self.disk_error is None:
            log.error("output not writable (%s): reading stops and resumes after the last message"
                      " written", exc)
        self.disk_error = str(exc)

    def malformed(self, reason: str, where: str, detail: str = "") -> None:
        """A control request that cannot be used (the control server reports them here)."""
        self.applier.malformed(reason, where, detail)

    # -- reading the stream --------------------------------------------------------------------

    async def consume_loop(self) -> None:
        backoff = 1.0
        last_commit = time.monotonic()
        while not self.stopping.is_set():
            try:
                if (self.source.sub is None or self.read_again) and not await self.open_consumer():
                    await self.pause(backoff)
                    backoff = min(8.0, backoff * 2)
                    continue
                # Applied lines wait for a commit at most commit_interval_ms (the fetch's timeout).
                wait_s = max(0.05, self.wcfg.commit_interval_ms / 1000) if self.pending else 1.0
                msgs = await self.source.fetch(self.fetch_size(), wait_s)
            except NATS_ERRORS as exc:
                self.say_source_problem(f"reading {self.wcfg.stream}: {exc or type(exc).__name__}")
                await self.source.close_consumer()
                await self.pause(backoff)
                backoff = min(8.0, backoff * 2)
                continue
            if self.disk_error is None:
                backoff = 1.0
            async with self.commit_lock:
                try:
                    await self.apply_all(msgs)
                except ReadAgain as exc:
                    log.warning("%s; reading again from sequence %d", exc, self.applied_seq + 1)
                    self.read_again = True
                except SinkError as exc:
                    self.on_disk_error(exc)
                    self.read_again = True
                due = (not msgs or len(msgs) < self.fetch_size()
                       or self.pending_bytes >= self.wcfg.commit_max_bytes
                       or time.monotonic() - last_commit >= self.wcfg.commit_interval_ms / 1000)
                if due:
                    await self.commit()
                    last_commit = time.monotonic()
                    if self.disk_error is None:
                        await self.rotate_due()
            if self.disk_error is not None and self.read_again:
                await self.pause(backoff)
                backoff = min(8.0, backoff * 2)

    def fetch_size(self) -> int:
        """Messages per pull: fetch_batch, fewer when messages are big (about _FETCH_BYTES a pull)."""
        return max(1, min(self.wcfg.fetch_batch, int(_FETCH_BYTES / self.msg_bytes)))

    async def pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less if asked to stop."""
        try:
            async with asyncio.timeout(seconds):
                await self.stopping.wait()
        except TimeoutError:
            pass

    def say_source_problem(self, problem: str) -> None:
        if self.source_problem is None:
            log.warning("%s; retrying (nothing is lost: reading resumes after sequence %d)", problem,
                        self.applied_seq)
        self.source_problem = problem

    async def open_consumer(self) -> bool:
        """Connect if needed, check the stream, and read on from the last applied sequence."""
        try:
            if self.source.nc is None:
                await self.source.connect()
            state = await self.source.stream_state()
        except nats.js.errors.NotFoundError:
            self.say_source_problem(f"stream {self.wcfg.stream} does not exist (the aggregators create it)")
            return False
        except NATS_ERRORS as exc:
            if self.source.nc is not None and not self.source.nc.is_connected:
                await self.source.close()
            self.say_source_problem(f"NATS at {', '.join(self.wcfg.servers)}: {exc or type(exc).__name__}")
            return False
        self.stream = state
        # (The applied sequence, not the committed one: after a reset to the new stream's start it
        # is below the old commit until the next one, and must not be taken for a second renewal.)
        if (self.stream_created and state.created and state.created != self.stream_created) \
                or state.last_seq < self.applied_seq:
            log.error("stream %s was made anew (created %s, last sequence %d; this writer had read to"
                      " %d of the one created %s): reading the new one from its start; what is already"
                      " written is dropped by its (agent, stream) end offsets", self.wcfg.stream,
                      state.created, state.last_seq, self.applied_seq, self.stream_created or "?")
            self.applied_seq = 0
        elif self.applied_seq and self.applied_id and \
                (held := await self.source.msg_id_at(self.applied_seq)) not in (None, self.applied_id):
            # Same stream, but another message where ours was: it lost its tail (a NATS server's
            # crash with the default sync_interval) and new messages took those sequences.
            log.error("stream %s holds another message at sequence %d than the one this writer applied"
                      " there (%s, not %s): it lost messages and new ones took their sequences; reading"
                      " it again from its start; what is already written is dropped by its (agent,"
                      " stream) end offsets", self.wcfg.stream, self.applied_seq, held, self.applied_id)
            self.totals.stream_rewritten += 1
            self.applied_seq = 0
        self.stream_created = state.created or self.stream_created
        try:
            await self.source.open_consumer(self.applied_seq + 1)
        except NATS_ERRORS as exc:
            self.say_source_problem(f"cannot make a consumer on {self.wcfg.stream}: {exc}")
            return False
        self.totals.consumers_made += 1
        self.pending_messages = None  # the old consumer's count; the ticker asks the new one
        self.read_again = False
        self.progress_at = time.monotonic()
        if self.source_problem is not None:
            log.info("reading %s again from sequence %d", self.wcfg.stream, self.applied_seq + 1)
            self.source_problem = None
        return True

    async def apply_all(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            self.msg_bytes = 0.9 * self.msg_bytes + 0.1 * max(256, len(msg.data))
            seq = msg.metadata.sequence.stream
            if seq <= self.applied_seq:
                continue  # delivered again (a consumer made again overlaps what we had)
            if seq != self.applied_seq + 1:
                await self.account_gap(self.applied_seq + 1, seq)
            written = self.applier.apply(seq, msg)  # SinkError: not applied, read again
            self.applied_seq = seq
            self.applied_id = str((msg.headers or {}).get("Nats-Msg-Id", ""))
            self.progress_at = time.monotonic()
            if written and self.disk_error is not None:
                log.warning("output writable again; writing on from sequence %d", seq)
                self.disk_error = None

    async def account_gap(self, first: int, after: int) -> None:
        """Sequences ``first``..``after - 1`` were not delivered: fine if the stream no longer
        holds them (then counted and alarmed as discarded unwritten); else ReadAgain."""
        try:
            state = await self.source.stream_state()
        except NATS_ERRORS as exc:
            raise ReadAgain(f"sequences {first}-{after - 1} skipped and the stream cannot be asked ({exc})"
                            ) from None
        self.stream = state
        gone = max(0, min(after, state.first_seq) - first)
        for seq in range(max(first, state.first_seq), min(after, max(first, state.first_seq) + _PROBE_MAX)):
            held = await self.source.holds(seq)
            if held in ("ours", None):
                raise ReadAgain(f"the consumer skipped sequence {seq}, which the stream "
                                f"{'still holds' if held else 'may still hold'}")
            gone += held == "gone"  # "other": a subject outside the prefix, not for us
        gone += max(0, after - max(first, state.first_seq) - _PROBE_MAX)  # deleted en masse
        if gone:
            self.discarded(first, after - 1, gone)

    def discarded(self, first: int, last: int, count: int) -> None:
        self.totals.discarded_unwritten += count
        self.last_discard = Alarm(time.time(), count, first, last)
        if self.alarm is None:
            self.alarm = Alarm(time.time(), count, first, last)
            log.error("stream %s discarded %d messages (sequences %d-%d) before this writer wrote them:"
                      " their lines are missing from %s (the stream's limits, max_msgs/max_bytes/"
                      "max_age, are too small for how far this writer is behind); %d in total",
                      self.wcfg.stream, count, first, last, self.wcfg.output_dir,
                      self.totals.discarded_unwritten)
        else:
            self.alarm.messages += count
            self.alarm.last_seq = last

    # -- group commit ----------------------------------------------------------------------------

    async def commit(self) -> None:
        """fsync the files, then journal their lengths, the streams' ends and the applied sequence."""
        marks = {"stream_seq": self.applied_seq, "stream_msg_id": self.applied_id,
                 "stream_created": self.stream_created,
                 "discarded_unwritten": self.totals.discarded_unwritten}
        if not self.pending and self.journal.state.marks == marks:
            return
        pending = self.applier.take_pending()
        dirty = self.sink.dirty_files()
        positions = self.sink.positions()
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._sync_and_journal, dirty, positions, pending, marks)
        except SinkError:
            self.applier.restore_pending(pending)
            raise
        self.sink.mark_committed(positions)
        self.committed_seq = marks["stream_seq"]
        self.totals.commits += 1
        self.commit_latency.observe(time.monotonic() - started)

    def _sync_and_journal(self, dirty: list[Any], positions: dict[str, int], pending: dict[str, int],
                          marks: dict[str, Any]) -> None:
        if self.cfg.fsync:
            failed = self.sink.sync_each(dirty)
            if failed:
                topic, exc = next(iter(failed.items()))
                raise SinkError(exc.errno, f"fsync of {topic}/{topic}.log failed: {exc.strerror}")
        self.journal.append(positions, pending, sync=self.cfg.fsync, marks=marks)

    # -- status ------------------------------------------------------------------------------------

    async def ticker(self) -> None:
        """Once a second: the stream's last sequence (lag), the age of the oldest unapplied
        message, the alarm's end, and a consumer that stopped delivering."""
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            if ticks % 10 == 0:
                self.save_counts()
            if self.source.sub is None or not self.source.connected:
                continue
            try:
                self.stream = await self.source.stream_state()
                self.pending_messages = await self.source.pending()
            except nats.js.errors.NotFoundError:
                self.pending_messages = None
                self.stall("the consumer is gone (its server restarted?)")
                continue
            except NATS_ERRORS:
                continue
            self.applier.forget(self.journal.state.streams)
            lag = self.lag_messages
            if lag == 0:
                self._stalled = False
                self.lag_s = 0.0
                if self.alarm is not None:
                    log.info("caught up with stream %s; %d messages were discarded before this writer"
                             " wrote them (alarm over)", self.wcfg.stream, self.alarm.messages)
                    self.alarm = None
                continue
            when = await self.source.received_at(self.applied_seq + 1)
            self.lag_s = max(0.0, time.time() - when) if when is not None else None
            if time.monotonic() - self.progress_at > _STALL_S:
                self.stall(f"{lag} messages waiting and none delivered for {_STALL_S:.0f}s")
            else:
                self._stalled = False

    def stall(self, why: str) -> None:
        """The consumer delivers nothing while messages wait: make it again (said once a stall)."""
        if self.read_again:
            return
        (log.debug if self._stalled else log.info)("%s: making the consumer again", why)
        self._stalled = True
        self.read_again = True
        self.progress_at = time.monotonic()

    # The shared rolling code (Rolling) reads and resets what was applied since the last commit.
    @property
    def pending(self) -> dict[str, int]:
        return self.applier.pending

    @pending.setter
    def pending(self, value: dict[str, int]) -> None:
        self.applier.pending = value

    @property
    def pending_bytes(self) -> int:
        return self.applier.pending_bytes

    @pending_bytes.setter
    def pending_bytes(self, value: int) -> None:
        self.applier.pending_bytes = value

    @property
    def lag_messages(self) -> int:
        """Messages of the stream not applied yet: the consumer's count (only subjects under the
        prefix), else the stream's last sequence minus the applied one."""
        if self.pending_messages is not None and self.source.sub is not None:
            return self.pending_messages
        return max(0, self.stream.last_seq - self.applied_seq)

    def status(self) -> dict[str, Any]:
        return status.status(self)
