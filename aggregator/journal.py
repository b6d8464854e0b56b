"""The commit journal: what is durable, so that a crash loses and doubles nothing.

Each group commit appends one record after the topic files were fsynced::

    {"seq": 42, "t": 1700000000.0, "topics": {"nginx": 1048576}, "streams": {"web-01\\x1f9f2c": 81920}}

``topics`` gives the committed length of each topic's active file (of those that changed),
``streams`` the end offset of the last committed batch of each (agent, stream). Records are
framed as ``<u32 length><u32 crc32><orjson>``.

A write that fails (ENOSPC, EIO) leaves the file and the in-memory state exactly as before it:
the partial frame is cut off again and the next record is written where it began, so no torn
frame ever sits between two good ones. The streams of a record that could not be written are
kept in ``unwritten`` for the caller to commit again.

Recovery tells a crash from damage:

* a **torn tail** is what a crash leaves: the last record incomplete, ending on a 512-byte
  boundary (the kernel copies a write page by page, and a disk writes whole sectors), or zeros
  (a size that got to disk before its data). It was never acknowledged: it is cut off, and the
  topic files are cut back to the last commit (``DurableState.damage`` is None);
* anything else (a bad record followed by good ones, a file cut at an arbitrary length, an
  unreadable snapshot) is **damage**: every good record is replayed, the damaged file is kept
  as ``journal.bin.damaged-<UTC>`` for the operator, and ``damage`` says what was found. The
  daemon then keeps the topic files as they are rather than cut what may have been
  acknowledged (duplicates over loss) and rebuilds the journal from them.

When the journal grows past ``compact_bytes`` a snapshot of the whole state is written (write,
fsync, rename) and the journal starts again; records carry ``seq`` so that a crash between the two
steps replays nothing stale.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from aggregator.files import SinkError
from fleetlog.durable import write_atomic

log = logging.getLogger("fleetlog.aggregator.journal")

_HEADER = struct.Struct("<II")
SNAPSHOT = "state.json"
JOURNAL = "journal.bin"
# Every record starts with its seq (orjson keeps the key order): a quick test before the CRC
# when looking for good records after damage.
_BODY_START = b'{"seq":'
# No record is this big (one entry per changed topic and stream of one commit).
_MAX_RECORD_BYTES = 256 * 1024 * 1024
_SECTOR = 512


class JournalError(SinkError):
    """The commit journal could not be written (nothing can be committed until it can)."""


def stream_key(agent: str, stream: str) -> str:
    return f"{agent}\x1f{stream}"


@dataclass
class DurableState:
    seq: int = 0
    topics: dict[str, int] = field(default_factory=dict)
    # key -> [end offset, last commit time]
    streams: dict[str, list[float]] = field(default_factory=dict)
    rotations: dict[str, Any] = field(default_factory=dict)
    # A consumer's own position beside the files (fleetlog-writer: the last applied stream
    # sequence); each record's "marks" update it, and a snapshot keeps it.
    marks: dict[str, Any] = field(default_factory=dict)
    # Set by recovery when the journal or snapshot was damaged (not a crash's torn tail): what
    # was found, for the log. The topic files must then not be cut back.
    damage: str | None = None

    def apply(self, record: dict[str, Any]) -> None:
        self.seq = record["seq"]
        now = record.get("t", 0.0)
        self.topics.update(record.get("topics", {}))
        for key, end in record.get("streams", {}).items():
            self.streams[key] = [end, now]
        for topic, info in record.get("rotations", {}).items():
            if info is None:
                self.rotations.pop(topic, None)
            else:
                self.rotations[topic] = info
        self.marks.update(record.get("marks", {}))


def _record_at(data: bytes, pos: int) -> tuple[dict[str, Any], int] | None:
    """The good record framed at ``pos`` and the position after it, or None."""
    if pos + _HEADER.size > len(data):
        return None
    length, crc = _HEADER.unpack_from(data, pos)
    start = pos + _HEADER.size
    if length > len(data) - start or not data.startswith(_BODY_START, start):
        return None
    body = data[start: start + length]
    if zlib.crc32(body) != crc:
        return None
    try:
        record = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict) or type(record.get("seq")) is not int:
        return None
    return record, start + length


def _torn_tail(data: bytes, pos: int) -> bool:
    """Whether ``data[pos:]`` (not a good record) is what a crash leaves while appending one."""
    tail = data[pos:]
    if not tail.strip(b"\0"):
        return True  # the size reached the disk, the data did not
    if len(data) % _SECTOR:
        return False  # a write stops at a page, a disk at a sector; a cut elsewhere is damage
    if len(tail) < _HEADER.size:
        return True
    length, _ = _HEADER.unpack_from(data, pos)
    body = tail[_HEADER.size:]
    return len(body) < length <= _MAX_RECORD_BYTES and _BODY_START.startswith(body[:len(_BODY_START)])


class Journal:
    def __init__(self, state_dir: str, compact_bytes: int = 32 * 1024 * 1024,
                 stream_ttl_s: float | None = None) -> None:
        self.state_dir = state_dir
        self.compact_bytes = compact_bytes
        self.stream_ttl_s = stream_ttl_s
        self.snapshot_path = os.path.join(state_dir, SNAPSHOT)
        self.journal_path = os.path.join(state_dir, JOURNAL)
        self.state = DurableState()
        # Streams of records that could not be written: the caller commits them again.
        self.unwritten: dict[str, int] = {}
        self._fd = -1
        self._size = 0
        # Rotations whose end could not be journaled: the next record closes them.
        self._closing: set[str] = set()
        # A failed write whose partial frame could not be cut off yet: cut before the next one.
        self._tail_dirty = False
        self._compact_failed = False

    def recover(self) -> DurableState:
        """Load the snapshot and replay the journal; cut a crash's torn tail, keep damage aside."""
        os.makedirs(self.state_dir, exist_ok=True)
        state = DurableState()
        damage: list[str] = []
        try:
            with open(self.snapshot_path, "rb") as fh:
                snap = orjson.loads(fh.read())
            state = DurableState(seq=snap["seq"], topics=snap["topics"], streams=snap["streams"],
                                 rotations=snap.get("rotations", {}), marks=snap.get("marks", {}))
        except FileNotFoundError:
            pass
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            # The snapshot is only ever replaced by rename, so this is damage from outside.
            damage.append(f"snapshot {self.snapshot_path} unreadable ({exc})")
        try:
            with open(self.journal_path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            data = b""
        replayed, good_end, skipped = self._replay(data, state)
        if skipped:
            damage.append(f"{skipped} damaged bytes in the middle of {self.journal_path}")
        cut = len(data) - good_end
        if cut and not _torn_tail(data, good_end):
            damage.append(f"{self.journal_path} ends inside a record at byte {len(data)} (cut or"
                          f" overwritten: {cut} bytes after the last good record)")
        self._fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self.state = state
        if damage:
            state.damage = "; ".join(damage)
            kept = self._keep_damaged(data)
            log.error("journal damaged: %s; replayed every good record (%d), kept the damaged file as"
                      " %s; commits after the damage may be unknown, so no output is cut back", state.damage,
                      replayed, kept)
            self._size = len(data)
            self.compact()  # a fresh snapshot of what was recovered, and an empty journal
        else:
            if cut:
                log.warning("journal %s: cut a torn tail of %d bytes (a crash mid-commit; those batches"
                            " were never acknowledged and will be resent)", self.journal_path, cut)
            os.ftruncate(self._fd, good_end)
            os.fsync(self._fd)
            self._size = good_end
        log.info("journal recovered: commit %d, %d topics, %d streams (%d records replayed)",
                 state.seq, len(state.topics), len(state.streams), replayed)
        return state

    @staticmethod
    def _replay(data: bytes, state: DurableState) -> tuple[int, int, int]:
        """Apply every good record of ``data`` newer than ``state``; (records applied, end of
        the last good record, damaged bytes skipped before good records)."""
        pos = good_end = replayed = skipped = 0
        while pos < len(data):
            found = _record_at(data, pos)
            if found is None:
                # Damage or a torn tail: look for a good record further on (damage in the middle).
                nxt = data.find(_BODY_START, pos + 1 + _HEADER.size)
                while nxt != -1 and _record_at(data, nxt - _HEADER.size) is None:
                    nxt = data.find(_BODY_START, nxt + 1)
                if nxt == -1:
                    break
                skipped += nxt - _HEADER.size - pos
                pos = nxt - _HEADER.size
                continue
            record, pos = found
            good_end = pos
            if record["seq"] > state.seq:
                state.apply(record)
                replayed += 1
        return replayed, good_end, skipped

    def _keep_damaged(self, data: bytes) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        path = f"{self.journal_path}.damaged-{stamp}"
        try:
            shutil.copyfile(self.journal_path, path)
        except FileNotFoundError:
            return "(no journal file)"
        except OSError as exc:
            return f"(not kept: {exc.strerror})"
        return path

    def append(self, topics: dict[str, int], streams: dict[str, int],
               rotations: dict[str, Any] | None = None, sync: bool = True,
               marks: dict[str, Any] | None = None) -> int:
        """Make one commit record durable. Blocking (fsync): run it off the event loop.

        Raises JournalError if it could not; the journal and ``state`` are then as before the call
        and ``streams`` are added to ``unwritten``.
        """
        record: dict[str, Any] = {"seq": self.state.seq + 1, "t": time.time(),
                                  "topics": topics, "streams": streams}
        if self._closing:
            rotations = {**dict.fromkeys(self._closing), **(rotations or {})}
        if rotations:
            record["rotations"] = rotations
        if marks:
            record["marks"] = marks
        body = orjson.dumps(record)
        frame = _HEADER.pack(len(body), zlib.crc32(body)) + body
        try:
            if self._tail_dirty:
                os.ftruncate(self._fd, self._size)
                self._tail_dirty = False
            # At the end of the good records (one system call: no lseek per commit).
            view, at = memoryview(frame), self._size
            while view:
                written = os.pwrite(self._fd, view, at)
                view, at = view[written:], at + written
            if sync:
                os.fdatasync(self._fd)
        except OSError as exc:
            self._forget_partial()
            for key, end in streams.items():
                self.unwritten[key] = max(end, self.unwritten.get(key, end))
            raise JournalError(exc.errno, f"cannot write the commit journal {self.journal_path}:"
                                       f" {exc.strerror}") from None
        self._size += len(frame)
        self.state.apply(record)
        self._closing.clear()
        for key in streams:
            self.unwritten.pop(key, None)
        if self._size > self.compact_bytes:
            self.compact_quietly()
        return int(record["seq"])

    def _forget_partial(self) -> None:
        """Cut a failed write's partial frame off (or remember to, before the next write)."""
        try:
            os.ftruncate(self._fd, self._size)
        except OSError as exc:
            self._tail_dirty = True
            log.error("journal %s: could not cut a failed write back (%s); will before the next",
                      self.journal_path, exc.strerror)

    def compact_quietly(self) -> None:
        """Compaction is housekeeping: a failure (no room for the snapshot) is retried later."""
        try:
            self.compact(self.stream_ttl_s)
        except OSError as exc:
            if not self._compact_failed:
                log.warning("journal compaction failed (%s); the journal keeps growing until it can",
                            exc.strerror)
            self._compact_failed = True
        else:
            if self._compact_failed:
                log.info("journal compacted again")
            self._compact_failed = False

    def take_unwritten(self) -> dict[str, int]:
        """The streams of records that failed and were not written since (and forget them)."""
        unwritten, self.unwritten = self.unwritten, {}
        return unwritten

    def close_rotations_later(self, topics: Any) -> None:
        """Mark the rotation intents of ``topics`` (an iterable of names) as finished in the next
        record, whatever it is: their files were put back where the intent says."""
        self._closing.update(topics)

    def compact(self, ttl_s: float | None = None) -> None:
        """Snapshot the state (dropping streams idle longer than ``ttl_s``) and restart the journal."""
        state = self.state
        if ttl_s is not None:
            horizon = time.time() - ttl_s
            stale = [k for k, (_, t) in state.streams.items() if t < horizon]
            for key in stale:
                del state.streams[key]
            if stale:
                log.info("forgot %d streams idle for more than %ds", len(stale), int(ttl_s))
        write_atomic(self.snapshot_path, orjson.dumps(
            {"seq": state.seq, "topics": state.topics, "streams": state.streams,
             "rotations": state.rotations, "marks": state.marks}))
        # The snapshot holds everything: a crash before the truncate only replays older seqs.
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)
        self._size = 0
        self._tail_dirty = False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
