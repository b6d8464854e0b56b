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
``Rolling`` mixin), on the aggregator's rolling-file sink. Reading the stream (the consumer loop,
the gap check, the lag) is writer/reading.py's ``StreamReading``; applying a message to the files
is writer/apply.py; the status object is writer/status.py.
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
from typing import Any

import zmq
import zmq.asyncio

from aggregator import registry
from aggregator.control import ControlServer
from aggregator.files import RollingFileSink, SinkError, key_topic, open_files_bound, uncompressed_rotated
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
from writer.reading import Alarm, StreamReading
from writer.source import Source, StreamState

log = logging.getLogger("fleetlog.writer")


class Writer(Rolling, StreamReading):
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
        for key in self.sink.keys_on_disk():   # topics', and their agents' when split by agent
            if wire.valid_topic(key_topic(key)):
                self.sink.open_existing(key)
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
        on_disk = self.sink.keys_on_disk()
        if state.damage is None:
            self.recover_rotations(state.rotations)
            positions = dict(state.topics)
            if journal_existed:
                for topic in on_disk:
                    positions.setdefault(topic, 0)
            elif on_disk:
                log.warning("no journal in %s but %d output directories in %s: the stream is written again"
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
                raise SinkError(exc.errno, f"fsync of {topic}/{key_topic(topic)}.log failed: {exc.strerror}")
        self.journal.append(positions, pending, sync=self.cfg.fsync, marks=marks)

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
    def topics(self) -> dict[str, TopicStats]:
        """The topics written, by name (the shared rotate command checks a topic's name here)."""
        return self.applier.topics

    def status(self) -> dict[str, Any]:
        return status.status(self)
