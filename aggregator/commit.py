"""Group commit: fsync the files, journal their lengths and the streams' offsets, then acknowledge."""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import time

from aggregator.files import PublishError, SinkError, TopicFile
from aggregator.journal import stream_key
from aggregator.stages import Stages
from fleetlog import wire

log = logging.getLogger("fleetlog.aggregator")


class GroupCommit(Stages):
    """Committing and acknowledging (the last stage a batch visits)."""

    def owe_ack(self, agent: str, stream: str, end: int) -> None:
        self.owed_acks.setdefault(agent, {})[stream] = end

    def commit_work(self) -> bool:
        """Whether the commit loop has anything to do: batches to commit, acks to send, streams
        to ask again, a hold to retry or probe, a rotation to finish."""
        return bool(self.pending or self.owed_acks or self.refused or self.refusing
                    or self.state_error is not None or self.descriptors_short_at is not None
                    or self.journal.state.rotations)

    def poke_commit(self) -> None:
        """Wake the sleeping commit loop if there is work now (called after each receive, each
        control message and each tick: whatever a batch, a hello or a failed write left to do,
        a batch to commit, an ack owed for a duplicate, a held topic to probe)."""
        if self.commit_idle and self.commit_work():
            self.commit_idle = False
            self.commit_wake.set()

    def rotation_due(self) -> bool:
        """Whether a topic's active file is due to roll over (asked once a second by the ticker
        while the commit loop sleeps; after every commit otherwise)."""
        if self.stream_sink is not None:
            return False
        cfg, due = self.cfg, self.sink.due
        return any(due(topic, cfg.rotate_max_bytes, cfg.rotate_interval_s) for topic in self.sink.files)

    async def commit_loop(self) -> None:
        """Commit every ``commit_interval_ms`` while there is work; with none, sleep until the
        first batch (then wait the interval, so a group commit still gathers what comes in it),
        or until something asks for a commit now (``commit_max_bytes`` reached, an agent with half
        its window uncommitted, a stream waiting, descriptors short, a rotation due: the ticker
        looks once a second). An idle aggregator
        then has no timer here at all: it costs nothing per commit interval."""
        while True:
            interval = self.cfg.commit_interval_ms / 1000
            if not self.commit_work():
                self.commit_idle = True
                try:
                    await self.commit_wake.wait(None)
                finally:
                    self.commit_idle = False
                self.commit_wake.clear()
                # Woken by a first batch: its group's window. By anything else: commit now.
                gather = (self.pending and not self.refused and self.descriptors_short_at is None
                          and self.pending_bytes < self.cfg.commit_max_bytes and not self.commit_soon)
            else:
                # (A commit waiting for the journal's retry time waits here, even if due.)
                gather = not self.commit_soon or self.state_error is not None
            # Early: a commit before its interval is up (asked for at once, or the wait cut short).
            early = not gather
            if gather:
                due = time.monotonic() + interval
                if not await self.commit_wake.wait(interval):
                    self.note_stall(time.monotonic() - due)  # the loop's lateness, for status
                else:
                    early = True
                self.commit_wake.clear()
            try:
                async with self.commit_lock:
                    commits = self.totals.commits
                    await self.commit()
                    if early and self.totals.commits > commits:
                        self.totals.early_commits += 1
                    if self.state_error is None and self.stream_sink is None:
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
            committed = self.commit_pending() if self.stream_sink is None else self.publish_pending()
            if not await committed:
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
        self.uncommitted_bytes = {}
        self.commit_soon = False
        dirty = self.sink.dirty_files()
        positions = self.sink.positions()
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        for tf in dirty:
            tf.syncing = True
        try:
            # One trip to a thread for the whole commit: the files' fsyncs, then (if all of
            # them worked) the journal record. JournalError (a SinkError) if that failed.
            try:
                failed, journaled = await loop.run_in_executor(None, self._sync_then_journal, dirty,
                                                               positions, pending)
            finally:
                for tf in dirty:
                    tf.syncing = False
            for topic, exc in failed.items():
                self.take_back(topic, pending, self.pending)
                positions.pop(topic, None)
                self.hold_topic(topic, SinkError(exc.errno, f"fsync of {self.sink.active_path(topic)}"
                                                            f" failed: {exc.strerror}"))
            if not journaled:
                # Without the topics whose fsync failed (their streams taken back above).
                await loop.run_in_executor(None, functools.partial(self.journal.append, positions, pending,
                                                                   sync=self.cfg.fsync))
        except SinkError as exc:
            self.journal.take_unwritten()
            for key, end in pending.items():
                self.pending[key] = max(end, self.pending.get(key, 0))
            self.on_state_error(exc)
            return False
        self.sink.mark_committed(positions)
        self.sink.trim_open_files()
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

    def _sync_then_journal(self, dirty: list[TopicFile], positions: dict[str, int],
                           pending: dict[str, int]) -> tuple[dict[str, OSError], bool]:
        """Thread: fsync ``dirty``; if every fsync worked, append the commit record. Returns the
        failed fsyncs by topic and whether the record was written (not when one failed: the
        caller takes those topics back first). Raises the journal's SinkError."""
        failed = self.sink.sync_each(dirty) if self.cfg.fsync else {}
        if failed:
            return failed, False
        self.journal.append(positions, pending, sync=self.cfg.fsync)
        return failed, True

    async def publish_pending(self) -> bool:
        """sink = "jetstream": publish what was accepted since the last commit and owe the acks
        of what JetStream acknowledged; a stream JetStream already holds further (or less far)
        than this aggregator thought is resynced. False while some stay unpublished (NATS down,
        stream full, timeouts): nothing more is taken until a later commit gets them in.

        The journal's in-memory state stands for what JetStream acknowledged (``admit`` acks a
        resent duplicate from it); nothing is written to disk: the stream is the record."""
        sink = self.stream_sink
        assert sink is not None
        started = time.monotonic()
        # What the sink holds at the call is published; batches accepted meanwhile wait for the
        # next commit (they are pending again).
        pending, self.pending = self.pending, {}
        self.uncommitted_bytes = {}
        self.commit_soon = False
        outcome = await sink.commit()
        now = time.time()
        durable = self.journal.state.streams
        for (agent, stream), end in outcome.acked.items():
            durable[stream_key(agent, stream)] = [end, now]
            self.owe_ack(agent, stream, end)
        for (agent, stream), offset in outcome.resync.items():
            key = stream_key(agent, stream)
            pending.pop(key, None)
            self.pending.pop(key, None)
            self.accepted[key] = offset
            durable[key] = [offset, now]  # the stream holds exactly everything before it
            self.totals.resyncs += 1
            # "held": the stream holds exactly what is before offset (even below what an agent
            # saw acknowledged, if the stream lost its tail: the agent then sends it again).
            self.send_event(agent, wire.encode_event("resync", stream=stream, offset=offset, seq=None,
                                                     held=True))
        self.pending_bytes = sink.queued()[1]
        if outcome.error is not None:
            for key, end in pending.items():
                durable_end = durable.get(key)
                if durable_end is None or durable_end[0] < end:
                    self.pending[key] = max(end, self.pending.get(key, 0))
            self.on_state_error(PublishError(errno.EAGAIN, f"JetStream: {outcome.error}"))
            return False
        self.commit_latency.observe(time.monotonic() - started)
        self.totals.commits += 1
        return True
