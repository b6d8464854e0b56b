"""fleetlog-writer's reading of the stream: the consumer loop (fetch, apply, group commit when
due), the consumer made again from the last applied sequence (after a lost connection, a detected
gap or a stall), the gap check (a jump over sequences the stream no longer holds is discarded and
alarmed; one over sequences it still holds is the consumer's fault: read again), and the lag.

``StreamReading`` is a part of ``Writer`` (writer/daemon.py), as ``Rolling`` is: it expects the
attributes ``Writer.__init__`` sets and the group commit ``Writer`` defines.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import nats.js.errors
from nats.aio.msg import Msg

from aggregator.files import SinkError
from aggregator.journal import Journal
from writer.apply import Applier, Totals
from writer.config import WriterConfig
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


class StreamReading:
    """Expects the attributes ``Writer.__init__`` sets (writer/daemon.py)."""

    wcfg: WriterConfig
    source: Source
    journal: Journal
    applier: Applier
    totals: Totals
    stopping: asyncio.Event
    commit_lock: asyncio.Lock
    applied_seq: int
    applied_id: str
    stream_created: str
    stream: StreamState
    lag_s: float | None
    alarm: Alarm | None
    last_discard: Alarm | None
    disk_error: str | None
    source_problem: str | None
    read_again: bool
    progress_at: float
    pending_messages: int | None
    _stalled: bool
    msg_bytes: float
    pending: dict[str, int]
    pending_bytes: int

    if TYPE_CHECKING:  # Writer's (and Rolling's), declared for the type checker alone
        async def commit(self) -> None: ...
        async def rotate_due(self, force: set[str | None] | None = None) -> list[str]: ...
        def on_disk_error(self, exc: SinkError) -> None: ...
        def save_counts(self) -> None: ...

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

    @property
    def lag_messages(self) -> int:
        """Messages of the stream not applied yet: the consumer's count (only subjects under the
        prefix), else the stream's last sequence minus the applied one."""
        if self.pending_messages is not None and self.source.sub is not None:
            return self.pending_messages
        return max(0, self.stream.last_seq - self.applied_seq)
