"""The commit journal: what is durable, so that a crash loses and doubles nothing.

Each group commit appends one record after the topic files were fsynced::

    {"seq": 42, "t": 1700000000.0, "topics": {"nginx": 1048576}, "streams": {"web-01\\x1f9f2c": 81920}}

``topics`` gives the committed length of each topic's active file, ``streams`` the end offset of
the last committed batch of each (agent, stream). Records are framed as
``<u32 length><u32 crc32><orjson>`` so a torn tail after ``kill -9`` is detected and cut off.
After a crash the aggregator replays snapshot + journal, truncates every active file back to its
committed length (removing half-written, never-acknowledged lines) and drops resent batches that
end at or before a stream's committed offset.

When the journal grows past ``compact_bytes`` a snapshot of the whole state is written (write,
fsync, rename) and the journal starts again; records carry ``seq`` so that a crash between the two
steps replays nothing stale.
"""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from fleetlog.durable import write_all, write_atomic

log = logging.getLogger("fleetlog.aggregator.journal")

_HEADER = struct.Struct("<II")
SNAPSHOT = "state.json"
JOURNAL = "journal.bin"


def stream_key(agent: str, stream: str) -> str:
    return f"{agent}\x1f{stream}"


@dataclass
class DurableState:
    seq: int = 0
    topics: dict[str, int] = field(default_factory=dict)
    # key -> [end offset, last commit time]
    streams: dict[str, list[float]] = field(default_factory=dict)
    rotations: dict[str, Any] = field(default_factory=dict)

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


class Journal:
    def __init__(self, state_dir: str, compact_bytes: int = 32 * 1024 * 1024,
                 stream_ttl_s: float | None = None) -> None:
        self.state_dir = state_dir
        self.compact_bytes = compact_bytes
        self.stream_ttl_s = stream_ttl_s
        self.snapshot_path = os.path.join(state_dir, SNAPSHOT)
        self.journal_path = os.path.join(state_dir, JOURNAL)
        self.state = DurableState()
        self._fd = -1
        self._size = 0
        # Rotations whose end could not be journaled: the next record closes them.
        self._closing: set[str] = set()

    def recover(self) -> DurableState:
        """Load the snapshot, replay the journal up to its first torn or corrupt record."""
        os.makedirs(self.state_dir, exist_ok=True)
        state = DurableState()
        try:
            with open(self.snapshot_path, "rb") as fh:
                snap = orjson.loads(fh.read())
            state = DurableState(seq=snap["seq"], topics=snap["topics"], streams=snap["streams"],
                                 rotations=snap.get("rotations", {}))
        except FileNotFoundError:
            pass
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            # The snapshot is only ever replaced by rename, so this is damage from outside.
            log.error("snapshot %s is unreadable (%s); starting from the journal alone",
                      self.snapshot_path, exc)
        good_end = 0
        replayed = 0
        try:
            with open(self.journal_path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            data = b""
        pos = 0
        while pos + _HEADER.size <= len(data):
            length, crc = _HEADER.unpack_from(data, pos)
            body = data[pos + _HEADER.size: pos + _HEADER.size + length]
            if len(body) != length or zlib.crc32(body) != crc:
                break
            try:
                record = orjson.loads(body)
            except orjson.JSONDecodeError:
                break
            if record["seq"] > state.seq:
                state.apply(record)
                replayed += 1
            pos += _HEADER.size + length
            good_end = pos
        if good_end < len(data):
            log.warning("journal %s: cut a torn tail of %d bytes (a crash mid-commit; those batches"
                        " were never acknowledged and will be resent)", self.journal_path,
                        len(data) - good_end)
        self._fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
        os.ftruncate(self._fd, good_end)
        os.lseek(self._fd, good_end, os.SEEK_SET)
        os.fsync(self._fd)
        self._size = good_end
        self.state = state
        log.info("journal recovered: commit %d, %d topics, %d streams (%d records replayed)",
                 state.seq, len(state.topics), len(state.streams), replayed)
        return state

    def append(self, topics: dict[str, int], streams: dict[str, int],
               rotations: dict[str, Any] | None = None, sync: bool = True) -> int:
        """Make one commit record durable. Blocking (fsync): run it off the event loop."""
        record: dict[str, Any] = {"seq": self.state.seq + 1, "t": time.time(),
                                  "topics": topics, "streams": streams}
        if self._closing:
            rotations = {**dict.fromkeys(self._closing), **(rotations or {})}
        if rotations:
            record["rotations"] = rotations
        body = orjson.dumps(record)
        frame = _HEADER.pack(len(body), zlib.crc32(body)) + body
        write_all(self._fd, frame)
        if sync:
            os.fdatasync(self._fd)
        self._size += len(frame)
        self.state.apply(record)
        self._closing.clear()
        if self._size > self.compact_bytes:
            self.compact(self.stream_ttl_s)
        return record["seq"]

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
             "rotations": state.rotations}))
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.fsync(self._fd)
        self._size = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
