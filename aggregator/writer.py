"""Per-topic rolling files: the embedded default sink.

The sink interface is small on purpose (receive batch -> durable -> ack) so that a sink writing
to a distributed log (NATS JetStream, Kafka) can take this one's place:

* ``append(topic, data, lines)`` buffers or writes a formatted batch;
* ``sync()`` (blocking, run off the loop) makes everything appended so far durable and returns the
  durable position of each topic, which the commit journal records;
* ``recover(positions)`` brings the sink back to the positions of the last commit after a crash.

Files are opened with O_NOFOLLOW under ``<output_dir>/<topic>/`` only; topic names were checked
against the wire alphabet before they get here, so no path can leave ``output_dir``.
"""

from __future__ import annotations

import calendar
import contextlib
import gzip
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from fleetlog.durable import fsync_dir, write_all

log = logging.getLogger("fleetlog.aggregator.writer")

_STAMP_RE = re.compile(r"\d{8}T\d{6}Z")
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC


class SinkError(OSError):
    """A write the sink could not make (ENOSPC, EIO...); the batch was not taken."""


class Sink(Protocol):
    def append(self, topic: str, data: bytes, lines: int) -> None: ...
    def sync(self) -> dict[str, int]: ...
    def recover(self, positions: dict[str, int]) -> None: ...
    def close(self) -> None: ...


@dataclass
class TopicFile:
    topic: str
    path: str
    fd: int
    size: int
    opened_at: float
    dirty: bool = False


def rotated_name(topic: str, when: float, n: int = 0) -> str:
    """``<topic>.<UTC timestamp>.log``; the ``n``-th extra rotation within one second gets ``_NNN``,
    which sorts after the plain name, so ``ls`` (and retention) see rotated files oldest first."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
    return f"{topic}.{stamp}.log" if n == 0 else f"{topic}.{stamp}_{n:03d}.log"


class RollingFileSink:
    """Appends batches to ``<output_dir>/<topic>/<topic>.log`` and rolls them over."""

    def __init__(self, output_dir: str, clock: Callable[[], float] = time.time) -> None:
        self.output_dir = os.path.abspath(output_dir)
        self.clock = clock
        self.files: dict[str, TopicFile] = {}
        # When each active file was started: kept across close() (SIGHUP reopens) so that
        # reopening does not postpone a time-based rotation.
        self.started: dict[str, float] = {}
        # Topics whose newest rotated file is named later than the clock: topic -> that name.
        self.ahead: dict[str, str] = {}

    # -- paths -------------------------------------------------------------------------------

    def topic_dir(self, topic: str) -> str:
        path = os.path.join(self.output_dir, topic)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o755)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise SinkError(f"{path} is not a directory (a symlink or file is in the way)")
        return path

    def active_path(self, topic: str) -> str:
        return os.path.join(self.output_dir, topic, f"{topic}.log")

    def _open(self, topic: str) -> TopicFile:
        tf = self.files.get(topic)
        if tf is None:
            path = os.path.join(self.topic_dir(topic), f"{topic}.log")
            try:
                fd = os.open(path, _OPEN_FLAGS, 0o644)
            except OSError as exc:
                raise SinkError(exc.errno, f"cannot open {path}: {exc.strerror}") from None
            st = os.fstat(fd)
            started = self.started.get(topic)
            if started is None:
                # A file left by an earlier run: it holds data from its last write at the latest.
                started = min(self.clock(), st.st_mtime) if st.st_size else self.clock()
                self.started[topic] = started
            tf = TopicFile(topic, path, fd, st.st_size, opened_at=started)
            self.files[topic] = tf
        return tf

    def open_existing(self, topic: str) -> TopicFile | None:
        """The topic's active file, opened if it exists on disk and is not empty (for rotation
        of a topic that has not been written to since the start or a reopen)."""
        if topic not in self.files:
            try:
                st = os.lstat(self.active_path(topic))
            except OSError:
                return None
            if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                return None
        return self._open(topic)

    def topics_on_disk(self) -> list[str]:
        """Topic directories under output_dir (from this run or earlier ones)."""
        try:
            entries = os.scandir(self.output_dir)
        except FileNotFoundError:
            return []
        with entries:
            return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))

    # -- the sink interface --------------------------------------------------------------------

    def append(self, topic: str, data: bytes, lines: int) -> None:
        tf = self._open(topic)
        try:
            write_all(tf.fd, data)
        except OSError as exc:
            # Take nothing of a batch we could not write whole: cut the file back.
            try:
                os.ftruncate(tf.fd, tf.size)
            except OSError:
                log.error("%s: could not cut a partial batch back to %d bytes", tf.path, tf.size)
            raise SinkError(exc.errno, f"write to {tf.path} failed: {exc.strerror}") from None
        tf.size += len(data)
        tf.dirty = True

    def positions(self) -> dict[str, int]:
        return {t: tf.size for t, tf in self.files.items()}

    def dirty_files(self) -> list[TopicFile]:
        """The files to fsync for the next commit, marked clean (call on the loop thread)."""
        dirty = [tf for tf in self.files.values() if tf.dirty]
        for tf in dirty:
            tf.dirty = False
        return dirty

    @staticmethod
    def sync_files(files: list[TopicFile]) -> None:
        """fsync the given files; blocking, run off the event loop."""
        for tf in files:
            os.fdatasync(tf.fd)

    def sync(self) -> dict[str, int]:
        positions = self.positions()
        self.sync_files(self.dirty_files())
        return positions

    def recover(self, positions: dict[str, int]) -> None:
        """Cut every active file back to its last committed length (kill -9 leaves torn tails)."""
        for topic, size in positions.items():
            path = self.active_path(topic)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if size:
                    log.warning("%s: missing (committed %d bytes); removed from outside?", path, size)
                continue
            if not stat.S_ISREG(st.st_mode):
                log.error("%s is not a regular file; leaving it alone", path)
                continue
            if st.st_size > size:
                log.warning("%s: cutting %d uncommitted bytes left by a crash", path, st.st_size - size)
                fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            elif st.st_size < size:
                log.error("%s: %d bytes shorter than committed; was it truncated from outside?",
                          path, size - st.st_size)

    def close(self) -> None:
        for tf in self.files.values():
            try:
                os.fsync(tf.fd)
            except OSError as exc:
                log.error("%s: fsync at close failed: %s", tf.path, exc)
            os.close(tf.fd)
        self.files.clear()

    # -- rolling -------------------------------------------------------------------------------

    def due(self, topic: str, max_bytes: int, interval_s: int) -> bool:
        """Whether the topic's active file rolls over now: at ``max_bytes``, or once the clock is
        in another UTC period of ``interval_s`` than when the file was started. Another, not a
        later one: after the clock was stepped back the file rolls over once and the periods go
        on from the new time (waiting for the clock to catch up would stop rotation for as long
        as the step)."""
        tf = self.files.get(topic)
        if tf is None or tf.size == 0:
            return False
        if max_bytes and tf.size >= max_bytes:
            return True
        if interval_s:
            return int(self.clock() // interval_s) != int(tf.opened_at // interval_s)
        return False

    def rotate_name(self, topic: str) -> str:
        """A free ``<topic>.<UTC timestamp>.log`` name that sorts after every rotated file of the
        topic, so that names only grow and retention keeps the newest: normally the clock's
        time; if a rotated file is named later than that (the clock was stepped back), that
        file's time with the next ``_NNN`` (and ``ahead`` records the topic, for one warning)."""
        now = self.clock()
        base = rotated_name(topic, now)
        prefix = base[: -len(".log")]
        keys = (_order_key(topic, n) for n in self.rotated_files(topic))
        newest = max((k for k in keys if _STAMP_RE.fullmatch(k[0], len(topic) + 1)), default=None)
        if newest is None or newest[0] < prefix:
            self.ahead.pop(topic, None)
            return base
        stem, taken = newest
        if stem > prefix:
            self.ahead.setdefault(topic, f"{stem}.log")
        when = calendar.timegm(time.strptime(stem[len(topic) + 1:], "%Y%m%dT%H%M%SZ"))
        return rotated_name(topic, when, taken + 1)

    def rotated_files(self, topic: str) -> list[str]:
        """The topic's rotated files, oldest first, each once: while ``X.log`` is being compressed
        (or after a crash in between) ``X.log`` and ``X.log.gz`` both exist; only the ``.gz`` is
        listed, so retention does not count one file twice."""
        directory = os.path.join(self.output_dir, topic)
        try:
            names = set(os.listdir(directory))
        except FileNotFoundError:
            return []
        prefix = f"{topic}."
        active = f"{topic}.log"
        return sorted((n for n in names if n.startswith(prefix) and n != active
                       and (n.endswith(".log.gz") or (n.endswith(".log") and f"{n}.gz" not in names))),
                      key=lambda n: _order_key(topic, n))


def _order_key(topic: str, name: str) -> tuple[str, int]:
    """A rotated name's place in rotation order: ``(<topic>.<stamp>, n)`` for ``..._NNN.log``
    (numerically, so that ``_1000`` comes after ``_999``)."""
    stem = name.removesuffix(".gz").removesuffix(".log")
    head, sep, n = stem.rpartition("_")
    if sep and n.isdigit() and len(head) == len(topic) + 17:
        return head, int(n)
    return stem, 0


class CompressionCancelled(Exception):
    """A compression stopped between chunks because the daemon is stopping; its ``.gz.tmp`` is
    left for the next start's scan, which removes it and compresses the file again."""


_CHUNK_BYTES = 1024 * 1024


def compress_file(path: str, cancel: threading.Event | None = None) -> str | None:
    """gzip ``path`` to ``path.gz`` crash-safely (tmp, fsync, rename, then unlink the original),
    keeping its modification time.

    Blocking: the daemon runs it in an executor thread. A crash at any point leaves either the
    original (compressed again at the next start) or both (the same), never neither. If retention
    removed the original meanwhile, the result goes too; returns None then. ``cancel`` is looked
    at between 1 MiB chunks: once set, raises CompressionCancelled within one chunk (a 2 GiB file
    must not hold up a shutdown for a minute).
    """
    tmp = f"{path}.gz.tmp"
    try:
        src = open(path, "rb")  # noqa: SIM115 - closed below; FileNotFoundError is the expected race
    except FileNotFoundError:
        return None
    with src, open(tmp, "wb") as raw:
        st = os.fstat(src.fileno())
        with gzip.GzipFile(filename=os.path.basename(path), mode="wb", fileobj=raw, compresslevel=6,
                           mtime=int(st.st_mtime)) as gz:
            while chunk := src.read(_CHUNK_BYTES):
                if cancel is not None and cancel.is_set():
                    raise CompressionCancelled(path)
                gz.write(chunk)
        raw.flush()
        # As gzip(1) does: the file keeps its age, which retain_days goes by.
        os.utime(raw.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))
        os.fsync(raw.fileno())
    os.rename(tmp, f"{path}.gz")
    try:
        os.unlink(path)
    except FileNotFoundError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}.gz")
        return None
    fsync_dir(os.path.dirname(path))
    return f"{path}.gz"


def uncompressed_rotated(output_dir: str) -> list[str]:
    """Rotated files a crash left uncompressed (and stale temporaries, which are removed)."""
    found = []
    try:
        topics = os.listdir(output_dir)
    except FileNotFoundError:
        return []
    for topic in topics:
        directory = os.path.join(output_dir, topic)
        if not os.path.isdir(directory) or os.path.islink(directory):
            continue
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if name.endswith(".gz.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            elif name.startswith(f"{topic}.") and name.endswith(".log") and name != f"{topic}.log":
                found.append(path)
    return sorted(found)
