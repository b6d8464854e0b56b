"""Per-topic rolling files: the embedded default sink.

The sink interface is small on purpose (receive batch -> durable -> ack) so that a sink writing
to a distributed log (NATS JetStream, Kafka) can take this one's place:

* ``append(topic, data, lines)`` buffers or writes a formatted batch;
* ``sync()`` (blocking, run off the loop) makes everything appended so far durable and returns the
  durable position of each topic, which the commit journal records;
* ``recover(positions)`` brings the sink back to the positions of the last commit after a crash.

Files are opened with O_NOFOLLOW under ``<output_dir>/<topic>/`` only; topic names were checked
against the wire alphabet before they get here, so no path can leave ``output_dir``.

Each file has a key: its topic, or ``<topic>/<agent>`` for a topic split by agent (the agent's
name as ``formats.safe_name`` gives it), whose files are ``<output_dir>/<topic>/<agent>/<topic>.log``
and its rotated files beside it. The methods' ``topic`` arguments are such keys: each file is
rolled, compressed, retained, journaled and recovered on its own.
"""

from __future__ import annotations

import calendar
import contextlib
import errno
import gzip
import logging
import os
import re
import resource
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aggregator.sink import Accepted
from fleetlog.durable import fsync_dir, write_all

log = logging.getLogger("fleetlog.aggregator.files")

_STAMP_RE = re.compile(r"\d{8}T\d{6}Z")
# A commit fsyncs its dirty files from one thread per _SYNC_PER_THREAD of them, at most
# _SYNC_THREADS (10,000 files on the CI VM: 2.4 s from 4 threads, 0.26-0.41 s from 16).
_SYNC_PER_THREAD = 64
_SYNC_THREADS = 16
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC


class SinkError(OSError):
    """A write the sink could not make (ENOSPC, EIO...); the batch was not taken."""


class PublishError(SinkError):
    """JetStream did not take what was published (NATS down, stream full, timeouts): said as
    the sink says it, without an errno."""

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass
class Hold:
    """Why a topic (or, for the journal, everything) takes no batches now, and when to try again.

    Batches refused meanwhile are not acknowledged: agents keep them and resend. Retries back
    off from 1 s to 8 s; ``retrying`` means the cheap probe passed and agents were asked to
    resend, so the next real write decides (and only a real write logs "writable again")."""

    error: str
    errno: int | None
    since: float            # time.monotonic()
    need_bytes: int = 0     # the size of the write that failed: room a retry needs
    retry_at: float = 0.0
    backoff_s: float = 1.0
    retrying: bool = False
    refused_batches: int = 0

    def failed_again(self, now: float) -> None:
        self.retrying = False
        self.retry_at = now + self.backoff_s
        self.backoff_s = min(8.0, self.backoff_s * 2)


@dataclass
class TopicFile:
    topic: str
    path: str
    fd: int             # -1: closed (least recently used, or not written yet); opened on the next write
    size: int
    opened_at: float
    dirty: bool = False  # written since its last fsync
    # The length the journal holds as far as this run's commits know (what ``positions``
    # leaves out when unchanged); never the target of a cut, which is the journal's own.
    committed: int = 0
    syncing: bool = False  # a commit fsyncs it in a thread: not closed meanwhile
    needs_cut: bool = False  # a failed write could not be cut back yet: cut before the next


def key_topic(key: str) -> str:
    """The topic of a file key (``web`` for ``web`` and for ``web/web-01``): the stem of its names."""
    return key.partition("/")[0]


def rotated_name(topic: str, when: float, n: int = 0) -> str:
    """``<topic>.<UTC timestamp>.log``; the ``n``-th extra rotation within one second gets ``_NNN``,
    which sorts after the plain name, so ``ls`` (and retention) see rotated files oldest first."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
    return f"{topic}.{stamp}.log" if n == 0 else f"{topic}.{stamp}_{n:03d}.log"


def open_files_bound(limit: int) -> int:
    """How many topic files stay open at once under a descriptor ``limit``: half of it; the other
    half is for ZeroMQ's connections (one per agent and endpoint), the journal and the rest."""
    return max(8, limit // 2)


class RollingFileSink:
    """Appends batches to ``<output_dir>/<topic>/<topic>.log`` and rolls them over.

    ``files`` knows every topic written (or found on disk) since the start or the last
    ``close()``; at most ``max_open`` of them hold a descriptor, the least recently written
    is closed first (only once fsynced: a file with uncommitted data stays open until the next
    commit). A write that finds no descriptor left (EMFILE) is refused whole, never half-done.
    """

    def __init__(self, output_dir: str, clock: Callable[[], float] = time.time,
                 max_open: int = 1 << 20) -> None:
        self.output_dir = os.path.abspath(output_dir)
        self.clock = clock
        self.max_open = max_open
        self.files: dict[str, TopicFile] = {}
        self._open_files: OrderedDict[str, TopicFile] = OrderedDict()
        # Topics whose size changed since our last commit journaled it.
        self._changed: set[str] = set()
        # When each active file was started: kept across close() (SIGHUP reopens) so that
        # reopening does not postpone a time-based rotation.
        self.started: dict[str, float] = {}
        # Topics whose newest rotated file is named later than the clock: topic -> that name.
        self.ahead: dict[str, str] = {}
        self.reopened = 0  # files opened again after being closed for the bound
        # Topics that take no batches now (a failed write), with why and when to try again.
        self.held: dict[str, Hold] = {}
        self._sync_pool: ThreadPoolExecutor | None = None

    @property
    def open_files(self) -> list[str]:
        """The topics whose file holds a descriptor now, least recently written first."""
        return list(self._open_files)

    # -- paths -------------------------------------------------------------------------------

    def topic_dir(self, topic: str) -> str:
        """The key's directory (and its topic's), created if needed. SinkError (with the errno)
        if it cannot be."""
        parts = [key_topic(topic), topic] if "/" in topic else [topic]
        for part in parts:
            path = os.path.join(self.output_dir, part)
            try:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(path, 0o755)
                st = os.lstat(path)
            except OSError as exc:
                raise SinkError(exc.errno, f"cannot create {path}: {exc.strerror}") from None
            if not stat.S_ISDIR(st.st_mode):
                raise SinkError(errno.ENOTDIR, f"{path} is not a directory (a symlink or file is in the way)")
        return path

    def active_path(self, topic: str) -> str:
        return os.path.join(self.output_dir, topic, f"{key_topic(topic)}.log")

    def _open(self, topic: str) -> TopicFile:
        """The topic's file, with a descriptor (SinkError if it cannot get one)."""
        tf = self.files.get(topic)
        if tf is not None and tf.fd >= 0:
            self._open_files.move_to_end(topic)
            return tf
        path = os.path.join(self.topic_dir(topic), f"{key_topic(topic)}.log")
        if len(self._open_files) >= self.max_open:
            self._close_least_recent(len(self._open_files) - self.max_open + 1)
        try:
            fd = os.open(path, _OPEN_FLAGS, 0o644)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self._fit_descriptor_limit()
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or not self._close_least_recent(
                    max(1, len(self._open_files) - self.max_open, len(self._open_files) // 4)):
                raise SinkError(exc.errno, f"cannot open {path}: {exc.strerror}") from None
            try:
                fd = os.open(path, _OPEN_FLAGS, 0o644)
            except OSError as exc2:
                raise SinkError(exc2.errno, f"cannot open {path}: {exc2.strerror}") from None
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            raise SinkError(exc.errno, f"cannot stat {path}: {exc.strerror}") from None
        if tf is None:
            started = self.started.get(topic)
            if started is None:
                # A file left by an earlier run: it holds data from its last write at the latest.
                started = min(self.clock(), st.st_mtime) if st.st_size else self.clock()
                self.started[topic] = started
            tf = TopicFile(topic, path, fd, st.st_size, opened_at=started, committed=st.st_size)
            self.files[topic] = tf
        else:
            self.reopened += 1
            if st.st_size != tf.size and not tf.needs_cut:
                log.warning("%s: %d bytes on reopening, %d expected (changed from outside?)",
                            path, st.st_size, tf.size)
                tf.size = st.st_size
                self._changed.add(topic)
            tf.fd = fd
        self._open_files[topic] = tf
        return tf

    def _fit_descriptor_limit(self) -> None:
        """Out of descriptors: if the limit was lowered under us (prlimit), lower the bound so
        that new connections and the journal find descriptors too."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        bound = open_files_bound(soft if soft != resource.RLIM_INFINITY else 1 << 20)
        if bound < self.max_open:
            log.warning("descriptor limit is now %d: keeping at most %d topic files open", soft, bound)
            self.max_open = bound

    def _close_least_recent(self, n: int) -> int:
        """Close up to ``n`` open files, least recently written first, of those holding nothing
        unsynced (a dirty file keeps its descriptor until the commit has fsynced it)."""
        closed = 0
        for topic, tf in list(self._open_files.items()):
            if closed >= n:
                break
            if tf.dirty or tf.syncing:
                continue
            del self._open_files[topic]
            fd, tf.fd = tf.fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)
            closed += 1
        return closed

    def open_existing(self, topic: str) -> TopicFile | None:
        """The topic's active file if it exists on disk and is not empty (for rotation of a topic
        that has not been written to since the start or a reopen); known, not necessarily open."""
        tf = self.files.get(topic)
        if tf is not None:
            return tf
        path = self.active_path(topic)
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return None
        started = self.started.get(topic)
        if started is None:
            started = self.started[topic] = min(self.clock(), st.st_mtime)
        tf = self.files[topic] = TopicFile(topic, path, -1, st.st_size, opened_at=started,
                                           committed=st.st_size)
        return tf

    def keys_on_disk(self) -> list[str]:
        """The keys of every file directory under output_dir: each topic's, and each of its
        agents' (``<topic>/<agent>``) for topics split by agent now or earlier."""
        return [key for topic in self.topics_on_disk() for key in self.keys_of(topic)]

    def keys_of(self, topic: str) -> list[str]:
        """The topic's key and those of its agents' directories on disk."""
        try:
            entries = os.scandir(os.path.join(self.output_dir, topic))
        except OSError:
            return [topic]
        with entries:
            return [topic, *sorted(f"{topic}/{e.name}" for e in entries
                                   if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))]

    def topics_on_disk(self) -> list[str]:
        """Topic directories under output_dir (from this run or earlier ones)."""
        try:
            entries = os.scandir(self.output_dir)
        except FileNotFoundError:
            return []
        with entries:
            return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))

    # -- the sink interface (aggregator/sink.py) ------------------------------------------------

    def add(self, batch: Accepted) -> None:
        """Take one accepted batch: its text appended to its topic's active file (durable at the
        next group commit, aggregator/commit.py). Raises SinkError with the file as it was."""
        self.append(batch.topic, batch.text, batch.lines)

    def append(self, topic: str, data: bytes, lines: int) -> None:
        """Write one batch whole, or raise SinkError with the file as it was (nothing taken)."""
        tf = self._open(topic)
        if tf.needs_cut:
            self._cut(tf, tf.size)
        try:
            write_all(tf.fd, data)
        except OSError as exc:
            # Take nothing of a batch we could not write whole: cut the file back.
            self._cut(tf, tf.size)
            raise SinkError(exc.errno, f"write to {tf.path} failed: {exc.strerror}") from None
        tf.size += len(data)
        tf.dirty = True
        self._changed.add(topic)

    def _cut(self, tf: TopicFile, size: int) -> None:
        try:
            if tf.fd >= 0:
                os.ftruncate(tf.fd, size)
            else:
                os.truncate(tf.path, size)
        except OSError as exc:
            tf.needs_cut = True
            raise SinkError(exc.errno, f"{tf.path}: cannot cut back to {size} bytes: {exc.strerror}"
                            ) from None
        tf.needs_cut = False

    def cut_back(self, topic: str, size: int | None) -> None:
        """Drop what a topic's file holds past ``size`` (its committed length; None: the length
        it had when this run first opened it). SinkError if it cannot be cut yet: the next
        append to it cuts first."""
        tf = self.files.get(topic)
        if tf is None:
            return
        size = tf.committed if size is None else size
        tf.size = min(tf.size, size) if not tf.needs_cut else size
        tf.committed = min(tf.committed, tf.size)
        tf.dirty = False
        self._changed.discard(topic)
        self._cut(tf, tf.size)

    def positions(self) -> dict[str, int]:
        """The length of every file changed since the last ``mark_committed`` (for the journal)."""
        files = self.files
        return {t: files[t].size for t in self._changed if t in files}

    def mark_committed(self, positions: dict[str, int]) -> None:
        """The journal now holds ``positions``."""
        for topic, size in positions.items():
            tf = self.files.get(topic)
            if tf is not None:
                tf.committed = size
                if tf.size == size:
                    self._changed.discard(topic)

    def trim_open_files(self) -> int:
        """After a commit: close the least recently written files beyond ``max_open`` (a file
        holding unsynced data keeps its descriptor until a commit has fsynced it, so a burst
        over many topics can leave more open than the bound). Returns how many were closed."""
        over = len(self._open_files) - self.max_open
        return self._close_least_recent(over) if over > 0 else 0

    def dirty_files(self) -> list[TopicFile]:
        """The files to fsync for the next commit, marked clean (call on the loop thread)."""
        files = self.files
        dirty = [tf for t in self._changed if (tf := files.get(t)) is not None and tf.dirty and tf.fd >= 0]
        for tf in dirty:
            tf.dirty = False
        return dirty

    @staticmethod
    def sync_files(files: list[TopicFile]) -> None:
        """fsync the given files; blocking. Raises the first error."""
        for tf in files:
            if tf.fd >= 0:
                os.fdatasync(tf.fd)

    def sync_each(self, files: list[TopicFile]) -> dict[str, OSError]:
        """fsync every given file, whatever the others do; blocking, run off the event loop with
        the files marked ``syncing`` (they keep their descriptors meanwhile). The errors by topic.

        Many files are synced from several threads at once: the filesystem's journal then commits
        them together (ext4, 2,000 files on this project's CI VM: 2.97 s one after the other,
        0.13 s from 4 threads), which is what lets one commit cover thousands of topics.
        """
        failed: dict[str, OSError] = {}

        def sync(chunk: list[TopicFile]) -> None:
            for tf in chunk:
                try:
                    os.fdatasync(tf.fd)
                except OSError as exc:
                    failed[tf.topic] = exc

        threads = min(_SYNC_THREADS, len(files) // _SYNC_PER_THREAD)
        if threads <= 1:
            sync(files)
            return failed
        if self._sync_pool is None:
            self._sync_pool = ThreadPoolExecutor(_SYNC_THREADS, thread_name_prefix="fsync")
        list(self._sync_pool.map(sync, [files[i::threads] for i in range(threads)]))
        return failed

    def sync(self) -> dict[str, int]:
        positions = self.positions()
        self.sync_files(self.dirty_files())
        return positions

    def probe(self, topic: str, need_bytes: int) -> str | None:
        """Whether a held-back topic can take a write of ``need_bytes`` again: its directory and
        file open, a failed write is cut off, and its filesystem has that much free. None if so,
        else why not (a cheap test before agents are asked to resend; the real write decides)."""
        try:
            tf = self._open(topic)
            if tf.needs_cut:
                self._cut(tf, tf.size)
            fs = os.statvfs(os.path.dirname(tf.path))
        except OSError as exc:
            return str(exc)
        free = fs.f_bavail * fs.f_frsize
        return None if free >= need_bytes else f"{free} bytes free, {need_bytes} needed"

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

    def uncommitted(self, positions: dict[str, int]) -> dict[str, int]:
        """Bytes each active file holds past ``positions`` (topics on disk the journal does not
        know count whole), without changing anything."""
        extra = {}
        for topic in self.keys_on_disk():
            try:
                st = os.lstat(self.active_path(topic))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_size > positions.get(topic, 0):
                extra[topic] = st.st_size - positions.get(topic, 0)
        return extra

    def detach_open_files(self) -> list[TopicFile]:
        """Take the files holding a descriptor out of the sink, for the caller to sync and close
        (off the loop): copies holding the descriptors are returned, and the sink forgets them
        as ``close`` does (those with data no commit has journaled stay known, closed)."""
        detached = []
        for tf in self._open_files.values():
            detached.append(TopicFile(tf.topic, tf.path, tf.fd, tf.size, tf.opened_at))
            tf.fd = -1
        self._open_files.clear()
        self.files = {t: tf for t, tf in self.files.items() if t in self._changed}
        return detached

    def close(self) -> None:
        """Close every file; the next write reopens by name. Files holding data no commit has
        journaled yet stay known (their lengths go into the next commit's record)."""
        for tf in self._open_files.values():
            try:
                os.fsync(tf.fd)
            except OSError as exc:
                log.error("%s: fsync at close failed: %s", tf.path, exc)
            os.close(tf.fd)
            tf.fd = -1
        self._open_files.clear()
        self.files = {t: tf for t, tf in self.files.items() if t in self._changed}

    # -- rolling -------------------------------------------------------------------------------

    def due(self, topic: str, max_bytes: int, interval_s: int) -> bool:
        """Whether the topic's active file rolls over now: at ``max_bytes``, or once the clock is
        in another UTC period of ``interval_s`` than when the file was started. Another, not a
        later one: after the clock was stepped back the file rolls over once and the periods go
        on from the new time (waiting for the clock to catch up would stop rotation for as long
        as the step)."""
        tf = self.files.get(topic)
        if tf is None or tf.size == 0 or topic in self.held:
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
        stem = key_topic(topic)
        base = rotated_name(stem, now)
        prefix = base[: -len(".log")]
        keys = (_order_key(stem, n) for n in self.rotated_files(topic))
        newest = max((k for k in keys if _STAMP_RE.fullmatch(k[0], len(stem) + 1)), default=None)
        if newest is None or newest[0] < prefix:
            self.ahead.pop(topic, None)
            return base
        newest_stem, taken = newest
        if newest_stem > prefix:
            self.ahead.setdefault(topic, f"{newest_stem}.log")
        when = calendar.timegm(time.strptime(newest_stem[len(stem) + 1:], "%Y%m%dT%H%M%SZ"))
        return rotated_name(stem, when, taken + 1)

    def retire(self, topic: str) -> TopicFile | None:
        """A rotating topic's file, taken out of the sink (the next write opens a new active
        file): the caller fsyncs and closes it, if it holds a descriptor (``fd >= 0``)."""
        tf = self.files.pop(topic, None)
        self._changed.discard(topic)
        if tf is not None and tf.fd >= 0:
            self._open_files.pop(topic, None)
        return tf

    def forget(self, topic: str) -> None:
        """Close and forget a topic's file (its next write opens it again by name)."""
        tf = self.files.pop(topic, None)
        self._changed.discard(topic)
        if tf is not None and tf.fd >= 0:
            del self._open_files[topic]
            with contextlib.suppress(OSError):
                os.close(tf.fd)
            tf.fd = -1

    def rotated_files(self, topic: str) -> list[str]:
        """The topic's rotated files, oldest first, each once: while ``X.log`` is being compressed
        (or after a crash in between) ``X.log`` and ``X.log.gz`` both exist; only the ``.gz`` is
        listed, so retention does not count one file twice."""
        directory = os.path.join(self.output_dir, topic)
        stem = key_topic(topic)
        try:
            with os.scandir(directory) as entries:
                # Files only: an agent's directory may be named like a rotated file.
                names = {e.name for e in entries if e.is_file(follow_symlinks=False)}
        except FileNotFoundError:
            return []
        prefix = f"{stem}."
        active = f"{stem}.log"
        return sorted((n for n in names if n.startswith(prefix) and n != active
                       and (n.endswith(".log.gz") or (n.endswith(".log") and f"{n}.gz" not in names))),
                      key=lambda n: _order_key(stem, n))


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
    """Rotated files a crash left uncompressed (and stale temporaries, which are removed), in
    topic directories and in their agents' directories."""
    found: list[str] = []
    try:
        topics = os.listdir(output_dir)
    except FileNotFoundError:
        return []
    for topic in topics:
        directory = os.path.join(output_dir, topic)
        if not os.path.isdir(directory) or os.path.islink(directory):
            continue
        _uncompressed_in(directory, topic, found)
        with os.scandir(directory) as entries:
            agents = [e.path for e in entries
                      if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
        for agent_dir in agents:
            _uncompressed_in(agent_dir, topic, found)
    return sorted(found)


def _uncompressed_in(directory: str, topic: str, found: list[str]) -> None:
    with os.scandir(directory) as entries:
        files = [e.name for e in entries if e.is_file(follow_symlinks=False)]
    for name in files:
        path = os.path.join(directory, name)
        if name.endswith(".gz.tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        elif name.startswith(f"{topic}.") and name.endswith(".log") and name != f"{topic}.log":
            found.append(path)
