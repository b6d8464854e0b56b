"""Rolling the per-topic files over: by size and UTC time, on request, and after a crash.

A mixin of ``Aggregator`` (aggregator/daemon.py). The topics due at one boundary roll over
together and are journaled twice: the intent (each rotating topic's new name and committed size,
with a commit of what was accepted) before the renames, the end (with a commit of what arrived
meanwhile) after; a crash in between is finished at start by ``recover_rotations``. Nothing
blocking runs on the event loop: fsyncs, renames and retention's directory scans run in executor
threads, compression in its own (cancellable between chunks at shutdown).

Clock steps: rotated names only grow (``RollingFileSink.rotate_name``), a period ends when the
clock is in another one (earlier or later), and retention by age never counts from a clock that
jumped ahead of the monotonic time since start.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from aggregator.config import AggregatorConfig
from aggregator.files import (
    CompressionCancelled,
    RollingFileSink,
    SinkError,
    TopicFile,
    compress_file,
    key_topic,
)
from aggregator.journal import Journal
from fleetlog.durable import fsync_dir, syncfs

log = logging.getLogger("fleetlog.aggregator")


class Rolling:
    """Expects the attributes ``Aggregator.__init__`` sets."""

    cfg: AggregatorConfig
    clock: Callable[[], float]
    sink: RollingFileSink
    journal: Journal
    pending: dict[str, int]
    pending_bytes: int
    _compressor: concurrent.futures.ThreadPoolExecutor
    _compressions: set[asyncio.Future[Any]]
    totals: Any  # the daemon's Totals: rotations and retention_removed are counted here
    _compress_cancel: threading.Event
    _retention: asyncio.Future[Any] | None
    _retain_waiting: set[str]
    _retain_all: bool
    _ahead_warned: set[str]
    started: float  # time.monotonic() at start
    started_wall: float  # the clock at start

    def owe_ack(self, agent: str, stream: str, end: int) -> None:
        raise NotImplementedError

    async def rotate_due(self, force: set[str | None] | None = None) -> list[str]:
        """Roll over every topic that is due (or in ``force``; ``None`` in it: all topics) and
        return the rotated names. Called with the commit lock held, right after a commit.

        All topics due at one boundary roll over together, in two journal records whatever their
        number (each listing only what changed), and every fsync, rename and directory scan runs
        in an executor thread: the loop goes on taking batches meanwhile (those for a rotating
        topic land at the end of its renamed file or in its new one, and are committed by the
        second record).
        """
        topics = self._due_topics(force or set())
        if not topics:
            return []
        loop = asyncio.get_running_loop()
        sizes = {t: self.sink.files[t].size for t in topics}
        pending, self.pending = self.pending, {}
        self.pending_bytes = 0
        dirty = self.sink.dirty_files()
        positions = {tf.topic: tf.size for tf in dirty} | sizes
        try:
            names = await loop.run_in_executor(None, self._start_rotations, sizes, dirty, positions, pending)
        except OSError as exc:
            self._restore_pending(pending)
            raise SinkError(exc.errno, f"rotation failed: {exc.strerror}") from None
        self._owe_acks(pending)
        self._warn_names_ahead()
        # From here on a batch for a rotated topic opens its new active file.
        now = self.clock()
        retired = []
        for topic in names:
            tf = self.sink.retire(topic)  # None: a write error closed every file meanwhile
            if tf is not None and tf.fd >= 0:  # one closed for the descriptor bound was synced first
                retired.append(tf)
            self.sink.started[topic] = now
        pending, self.pending = self.pending, {}
        self.pending_bytes = 0
        dirty = self.sink.dirty_files()
        positions = {tf.topic: tf.size for tf in dirty}
        ends = {t: positions.get(t, 0) for t in names} | {t: None for t in topics if t not in names}
        try:
            await loop.run_in_executor(None, self._finish_rotations, retired, ends, dirty, positions, pending)
        except OSError as exc:
            self._undo_rotations({t: (names[t], sizes[t]) for t in names})
            self._restore_pending(pending)
            raise SinkError(exc.errno, f"rotation failed: {exc.strerror}") from None
        self._owe_acks(pending)
        for topic, name in names.items():
            log.debug("rotated %s to %s", topic, name)
            self._compress_later(os.path.join(self.cfg.output_dir, topic, name))
        some = ", ".join(f"{t} to {n}" for t, n in itertools.islice(names.items(), 3))
        log.info("rotated %d topics (%s%s)", len(names), some, ", ..." if len(names) > 3 else "")
        self.totals.rotations += len(names)
        self._retain_later(list(names))
        # The names the files end up with (``.log.gz`` once compressed, as `ls` will show them);
        # an agent's file (split by agent) is named with its directory: app/web-01/app.<stamp>.log.
        final = {t: n + ".gz" if self.cfg.compress == "gzip" and not n.endswith(".gz") else n
                 for t, n in names.items()}
        return [f"{t}/{n}" if "/" in t else n for t, n in final.items()]

    async def close_files(self) -> None:
        """Make the active files durable and close them, off the loop: an fsync per file costs
        even when the file is clean (2,000 clean files took 4.2 s on the development machine),
        one syncfs(2) does. Call with the commit lock held (so no commit journals a batch whose
        bytes are in a file being closed); the next batch of each topic reopens it by name."""
        files = self.sink.detach_open_files()
        if not files:
            return

        def close() -> None:
            try:
                if self.cfg.fsync:
                    self._sync_rotation(files, set())
            finally:
                for tf in files:
                    os.close(tf.fd)

        try:
            await asyncio.get_running_loop().run_in_executor(None, close)
        except OSError as exc:
            log.error("closing the active files: %s", exc)

    def _warn_names_ahead(self) -> None:
        """Once per topic that enters the state: its rotated files are named after one from the future."""
        ahead = dict(self.sink.ahead)
        new = sorted(set(ahead) - self._ahead_warned)
        if new:
            log.warning("the clock is behind the newest rotated file of %d topics (%s has %s): was it"
                        " stepped back? Their rotated files are named after it (with _NNN) until the"
                        " clock passes it, so that names keep the rotation order and retention keeps"
                        " the newest", len(new), new[0], ahead[new[0]])
        self._ahead_warned = set(ahead)

    def _due_topics(self, force: set[str | None]) -> list[str]:
        cfg = self.cfg
        # Forced rotations also reach files not written to since the start or a reopen (a
        # topic's: its own and, split by agent, its agents').
        if force:
            keys = self.sink.keys_on_disk() if None in force else \
                [key for topic in force if topic is not None for key in self.sink.keys_of(topic)]
            for key in keys:
                if key not in self.sink.files:
                    self.sink.open_existing(key)
        due = self.sink.due
        return [topic for topic, tf in self.sink.files.items() if tf.size and (
            None in force or key_topic(topic) in force
            or due(topic, cfg.rotate_max_bytes, cfg.rotate_interval_s))]

    def _start_rotations(self, sizes: dict[str, int], dirty: list[TopicFile], positions: dict[str, int],
                         pending: dict[str, int]) -> dict[str, str]:
        """Thread: commit what was accepted, journal the intent (name and committed size of each
        rotating topic), rename. Returns the names of the topics renamed."""
        if self.cfg.fsync:
            self._sync_rotation(dirty, set())
        names = {topic: self.sink.rotate_name(topic) for topic in sizes}
        self.journal.append(positions, pending, sync=self.cfg.fsync,
                            rotations={t: {"name": names[t], "size": sizes[t]} for t in sizes})
        renamed = {}
        for topic, name in names.items():
            directory = os.path.join(self.cfg.output_dir, topic)
            active = os.path.join(directory, f"{key_topic(topic)}.log")
            try:
                os.rename(active, os.path.join(directory, name))
            except OSError as exc:
                # The file stays the active one; the second record closes the rotation as not done.
                log.error("cannot rotate %s/%s.log to %s: %s; it stays the active file", topic, topic,
                          name, exc)
                continue
            renamed[topic] = name
            # The new active file exists at once (for tail -F), empty until its first batch.
            with contextlib.suppress(OSError):  # if not, the first batch creates it
                os.close(os.open(active, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
        return renamed

    def _finish_rotations(self, retired: list[TopicFile], ends: dict[str, int | None],
                          dirty: list[TopicFile], positions: dict[str, int], pending: dict[str, int]) -> None:
        """Thread: make the renamed files (with what reached them after the intent) and the
        renames durable, commit what was accepted meanwhile, journal the end of the rotations."""
        try:
            if self.cfg.fsync:
                self._sync_rotation([*retired, *dirty], {os.path.dirname(tf.path) for tf in retired})
        finally:
            for tf in retired:
                os.close(tf.fd)
        topics = {**positions, **{t: end for t, end in ends.items() if end is not None}}
        self.journal.append(topics, pending, rotations=dict.fromkeys(ends), sync=self.cfg.fsync)

    def _sync_rotation(self, files: list[TopicFile], directories: set[str]) -> None:
        """Thread: make ``files`` and ``directories`` durable; with more than a few, by one
        syncfs(2) of the output filesystem (what is elsewhere gets its own fsync)."""
        if len(files) + len(directories) <= 8:
            self.sink.sync_files(files)
            for directory in directories:
                fsync_dir(directory)
            return
        dev = os.stat(self.cfg.output_dir).st_dev
        elsewhere = [tf for tf in files if os.fstat(tf.fd).st_dev != dev]
        syncfs(self.cfg.output_dir)
        self.sink.sync_files(elsewhere)
        for directory in directories:
            if os.stat(directory).st_dev != dev:
                fsync_dir(directory)

    def _undo_rotations(self, rotated: dict[str, tuple[str, int]]) -> None:
        """The end of a rotation could not be journaled: put the files where the journal's
        intent says (as a restart would), and close the intent with the next record."""
        for topic, (name, size) in rotated.items():
            directory = os.path.join(self.cfg.output_dir, topic)
            rotated_path = os.path.join(directory, name)
            active = os.path.join(directory, f"{key_topic(topic)}.log")
            for path, keep in ((rotated_path, size), (active, 0)):
                try:
                    os.truncate(path, keep)
                except OSError as exc:
                    log.error("%s: could not cut back to %d bytes after a failed rotation (%s); its"
                              " uncommitted end may be doubled when agents resend", path, keep, exc)
            self.journal.state.topics[topic] = 0
        self.journal.close_rotations_later(rotated)

    def _restore_pending(self, pending: dict[str, int]) -> None:
        """Batches taken for a record that failed: pending again (later ends win)."""
        pending.update(self.pending)
        self.pending = pending

    def _owe_acks(self, pending: dict[str, int]) -> None:
        for key, end in pending.items():
            agent, _, stream = key.partition("\x1f")
            self.owe_ack(agent, stream, end)

    def recover_rotations(self, rotations: dict[str, Any]) -> None:
        """Finish the rotations a crash interrupted (the journal holds their intent), with one
        record for all of them."""
        for topic, info in list(rotations.items()):
            name, size = info["name"], info["size"]
            directory = os.path.join(self.cfg.output_dir, topic)
            active = os.path.join(directory, f"{key_topic(topic)}.log")
            target = os.path.join(directory, name)
            if not os.path.exists(target) and os.path.exists(active):
                os.truncate(active, size)
                os.rename(active, target)
            elif os.path.exists(active):
                os.truncate(active, 0)  # written after the rename, never committed
            if os.path.exists(target) and os.path.getsize(target) > size:
                os.truncate(target, size)
            fsync_dir(directory)
            log.warning("finished the rotation of %s to %s that a crash interrupted", topic, name)
        if rotations:
            self.journal.append(dict.fromkeys(rotations, 0), {}, rotations=dict.fromkeys(rotations))

    def _compress_later(self, path: str) -> None:
        if self.cfg.compress != "gzip" or path.endswith(".gz"):
            return
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(loop.run_in_executor(
            self._compressor, compress_file, path, self._compress_cancel))
        self._compressions.add(task)

        def done(t: asyncio.Future[Any]) -> None:
            self._compressions.discard(t)
            if t.cancelled() or isinstance(t.exception(), CompressionCancelled):
                return  # stopping: the next start compresses it again
            if t.exception() is not None:
                log.warning("compressing %s failed (it stays uncompressed): %s", path, t.exception())

        task.add_done_callback(done)

    def retention_now(self) -> float:
        """The time retain_days counts back from: the clock, but never later than the clock at
        start plus the time elapsed since (a monotonic clock), so that a step forward never
        makes files seem old enough to delete (deleting cannot be undone; a step back only
        keeps them longer). A clock set right while we were down counts from the next start."""
        return min(self.clock(), self.started_wall + (time.monotonic() - self.started))

    def _retain_later(self, topics: list[str] | None) -> None:
        """Apply retention to ``topics`` (None: every topic on disk) in an executor thread: a
        directory scan per topic must not stall the loop. One pass at a time; topics asked for
        meanwhile are done by the next."""
        cfg = self.cfg
        if not (cfg.retain_files or cfg.retain_days):
            return
        if topics is None:
            self._retain_all = True
        else:
            self._retain_waiting.update(topics)
        if self._retention is not None:
            return
        everything, self._retain_all = self._retain_all, False
        batch = None if everything else sorted(self._retain_waiting)
        self._retain_waiting.clear()

        def retain() -> None:
            topics = self.sink.keys_on_disk() if batch is None else batch
            for topic in topics:
                try:
                    self.apply_retention(topic)
                except OSError as exc:
                    log.warning("retention of %s failed: %s", topic, exc)
            log.debug("retention pass over %d topics done", len(topics))

        self._retention = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(None, retain))

        def done(_: asyncio.Future[Any]) -> None:
            self._retention = None
            if (self._retain_all or self._retain_waiting) and not self._compress_cancel.is_set():
                self._retain_later([])

        self._retention.add_done_callback(done)

    def apply_retention(self, topic: str) -> None:
        """Remove the topic's oldest rotated files beyond retain_files and those older than
        retain_days. Blocking (a directory scan): run in a thread except in tests."""
        cfg = self.cfg
        names = self.sink.rotated_files(topic)
        directory = os.path.join(cfg.output_dir, topic)
        doomed = set(names[: max(0, len(names) - cfg.retain_files)]) if cfg.retain_files else set()
        if cfg.retain_days:
            horizon = self.retention_now() - cfg.retain_days * 86400
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    if os.path.getmtime(os.path.join(directory, name)) < horizon:
                        doomed.add(name)
        for name in sorted(doomed):
            removed = False
            # Both forms: a compression in progress, seeing its original gone, removes its result.
            for form in {name, name.removesuffix(".gz")}:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, form))
                    log.info("retention removed %s/%s", topic, form)
                    removed = True
            self.totals.retention_removed += removed
