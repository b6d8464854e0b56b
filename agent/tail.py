"""Following one file incarnation: identity, reading complete lines in large blocks.

A ``Tailer`` owns one *stream*: one file identity (device, inode, a fingerprint of the first
bytes, and *marks*: the bytes just before the ends of what it shipped) on this agent. Before each
read it checks that the bytes before ``ship_pos`` are still the ones it shipped: a file truncated
and written again past the offset while the agent was not looking has other bytes there
(``Rewritten``), even when it starts with the same banner.

It reads from ``ship_pos`` (the end of what was handed to the shipper) with one ``pread`` of up
to a batch's worth, cuts at the last newline and splits in C; no Python work happens per line
on this path. What lies after the last newline is a partial line: it stays in
the file (the file is the buffer) until its newline arrives, or is shipped as it is after
``partial_line_timeout_ms``.

Undecodable bytes are replaced by U+FFFD (one per bad sequence); line count and offsets are
unchanged, as offsets are always counted in the file's bytes. A line longer than
``max_line_bytes`` is cut there; the rest up to its newline is skipped and counted, and the file
keeps being followed.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar

from agent.config import SourceConfig
from fleetlog import wire

FP_LEN = 1024
# How many bytes before a shipped offset a mark holds: enough that two files of lines that differ
# only in a counter or a time stamp differ here too.
MARK_LEN = 1024
# Marks of batches in flight (ends not yet acknowledged); older ones are dropped, which only
# leaves an older acknowledged mark to compare against.
MAX_MARKS = 512
# Up to this many new bytes, the mark check and the read are one pread (the copy is cheaper than
# a second system call).
SMALL_READ = 16384


class Rewritten(Exception):
    """The bytes before the offset about to be read are not the ones shipped from there."""


def shown(path: str) -> str:
    """A file name as text that JSON and a terminal carry: the name itself if it is UTF-8,
    else its bytes with each undecodable one written ``\\xNN``."""
    if path.isascii():
        return path
    try:
        path.encode()
        return path
    except UnicodeEncodeError:  # surrogateescape'd bytes of a name that is not UTF-8
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def name_base64(path: str) -> str | None:
    """The exact bytes of a name that is not UTF-8, base64 (None for a UTF-8 name)."""
    if shown(path) is path:
        return None
    return base64.b64encode(os.fsencode(path)).decode()


def name_from_base64(text: str) -> str:
    """The name ``name_base64`` encoded, as Python holds file names (surrogateescape)."""
    return os.fsdecode(base64.b64decode(text))


def mark_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def bytes_before(fd: int, end: int, length: int = MARK_LEN) -> bytes:
    """Up to ``length`` bytes of the file just before offset ``end``."""
    start = max(0, end - length)
    return os.pread(fd, end - start, start)


# How every followed file is opened by name. O_NONBLOCK: a FIFO put in a file's place since the
# glob would hold the open (and the agent) until a writer came; on a regular file it changes nothing.
OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK


def file_size(fd: int) -> int:
    """The size of the regular file open as ``fd`` (its offset moves; every read here is a
    pread). An lseek to the end returns it as an int: ``os.fstat`` builds a 19-field result
    with float times, which made it the dearest call of a typical node's read cycle (9 us of
    CPU against 4 for a pread, once per changed file and cycle)."""
    return os.lseek(fd, 0, os.SEEK_END)


def fingerprint(fd: int, length: int = FP_LEN) -> tuple[str, int]:
    """Hash of the first ``length`` bytes (fewer if the file is shorter) and how many there were."""
    head = os.pread(fd, length, 0)
    return head_hash(head), len(head)


def head_hash(head: bytes) -> str:
    return hashlib.blake2b(head, digest_size=8).hexdigest()


def new_stream_id() -> str:
    return uuid.uuid4().hex[:16]


@dataclass(slots=True)
class Chunk:
    start: int
    end: int
    # A list of lines, or (plain lines, the hot path) one string in which every line ends
    # with "\n": what the wire's version 2 carries.
    lines: list[str] | str
    # How many lines: counted once, in the bytes, where the read is cut (counting the string
    # again was a sixth of the agent's CPU on a backlog).
    count: int = -1

    def __post_init__(self) -> None:
        if self.count < 0:
            self.count = wire.line_count(self.lines)

    def line_list(self) -> list[str]:
        return wire.line_list(self.lines)


@dataclass(eq=False)
class Tailer:
    open_files: ClassVar[int] = 0  # descriptors held by all tailers of this process
    nul_bytes_total: ClassVar[int] = 0  # NUL runs skipped by all tailers (copytruncate holes)

    source: SourceConfig
    path: str
    stream: str
    dev: int
    ino: int
    fp: str
    fp_len: int
    base: int
    acked: int
    seq: int = 0
    ship_pos: int = field(init=False)
    fd: int | None = None
    size: int = 0
    # ``size`` was just seen (a change event's fstat, a rescan's stat) and nothing read since:
    # the next read takes it rather than an fstat of its own. Bytes written after it was seen
    # make a change event of their own, which sees the size again.
    size_seen: bool = False
    # The name no longer leads here (renamed away or deleted): read to the end, then let go.
    rotated_at: float | None = None
    partial_since: float | None = None
    skipping: bool = False
    multiline_since: float | None = None
    multiline_seen: int = -1
    rewind_seq: int = 0
    # loop.time()-like monotonic seconds of this stream's last acknowledgement progress (or of
    # its first unacknowledged batch): the ack timeout is per stream.
    ack_progress: float = 0.0
    last_data: float = field(default_factory=time.monotonic)
    next_read: float = 0.0
    discarded_bytes: int = 0
    cut_lines: int = 0
    nul_bytes_skipped: int = 0
    # Where the name leads when it is a symlink (events and rotations happen there).
    real_path: str = ""
    # (end, the bytes just before end) for batches shipped and not yet acknowledged, and for the
    # acknowledged offset: what "is this still the file I shipped from?" is checked against.
    marks: deque[tuple[int, bytes]] = field(default_factory=lambda: deque(maxlen=MAX_MARKS), repr=False)
    acked_mark: tuple[int, bytes] | None = field(default=None, repr=False)
    # From a checkpoint, until verified against the file: (end, length, hash).
    saved_mark: tuple[int, int, str] | None = None
    _acked_mark_fp: tuple[int, str] = (-1, "")
    _buf: bytes = field(default=b"", repr=False)
    _buf_at: int = 0
    _start_re: re.Pattern[bytes] | None = None
    # The rotated file this one replaced: read to its end first. And, on that rotated file,
    # whether its successor waits (then a partial last line is final and ships at once).
    predecessor: Tailer | None = None
    successor_waiting: bool = False
    # The head last found to hash to ``fp``, and that ``fp``: comparing the bytes costs a fifth
    # of hashing them again, which a busy file's every change did.
    _head: bytes = field(default=b"", repr=False)
    _head_fp: str = ""
    # (size, mtime_ns) when the descriptor was closed (the open-files limit, a deleted file let
    # go): a closed file found unchanged needs no look at its head.
    closed_stat: tuple[int, int] = (-1, -1)

    def __post_init__(self) -> None:
        self.ship_pos = self.acked
        self.use_source(self.source)

    def use_source(self, source: SourceConfig) -> None:
        """Read from now on with ``source``'s settings (topic, line limits, multi-line records):
        a reload changed the source that matches the file."""
        self.source = source
        self._start_re = re.compile(source.multiline_start.encode(), re.MULTILINE) \
            if source.multiline_start else None

    @property
    def identity(self) -> str:
        return f"{self.dev}:{self.ino}:{self.fp}"

    @property
    def lag_bytes(self) -> int:
        return max(0, self.size - self.acked)

    # -- marks: the bytes just before what was shipped ------------------------------------------

    def saved_mark_holds(self, fd: int) -> bool:
        """Whether the file open as ``fd`` has the checkpoint's mark; if so, keep its bytes."""
        if self.saved_mark is None:
            return True
        end, length, digest = self.saved_mark
        data = os.pread(fd, length, end - length) if end >= length else b""
        if len(data) != length or mark_hash(data) != digest:
            return False
        self.acked_mark = (end, data)
        self.saved_mark = None
        return True

    def acked_to(self, end: int) -> None:
        """Acknowledged up to ``end``: the mark of the batch ending there becomes the acked one."""
        marks = self.marks
        while marks and marks[0][0] <= end:
            mark = marks.popleft()
            if mark[0] == end:
                self.acked_mark = mark

    def mark_fields(self) -> tuple[int, int, str]:
        """The acknowledged mark for the checkpoint: (end, length, hash); (0, 0, "") if none."""
        if self.acked_mark is not None:
            end, data = self.acked_mark
            if self._acked_mark_fp[0] != end:  # hashed once per acknowledged batch, not per save
                self._acked_mark_fp = (end, mark_hash(data))
            return end, len(data), self._acked_mark_fp[1]
        return self.saved_mark or (0, 0, "")

    def head_unchanged(self) -> bool:
        """Whether the file (open) still starts with the ``fp_len`` bytes hashed as ``fp``."""
        head = os.pread(self.fd, self.fp_len, 0)  # type: ignore[arg-type]
        if head == self._head and self._head_fp == self.fp:
            return True
        if head_hash(head) != self.fp:
            return False
        self._head, self._head_fp = head, self.fp
        return True

    def open(self) -> bool:
        """(Re)open by name, only if the name still leads to our inode."""
        if self.fd is not None:
            return True
        try:
            fd = os.open(self.path, OPEN_FLAGS)
        except OSError:
            return False
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (self.dev, self.ino) or not self.holds_our_head(fd):
            os.close(fd)
            return False
        self.attach(fd, st.st_size)
        return True

    def holds_our_head(self, fd: int) -> bool:
        """Whether the file open as ``fd`` starts with our head (``fp``): an inode number is
        reused once a deleted file is released, so a file found again by inode after our
        descriptor was closed may be another one."""
        if not self.fp_len:
            return True
        head = os.pread(fd, self.fp_len, 0)
        return len(head) == self.fp_len and head_hash(head) == self.fp

    def other_file_at(self, path: str, st: os.stat_result) -> bool:
        """Closed (no descriptor), and the file now at ``path`` with our inode is another file
        (another head). False when it is ours, cannot be opened (the scan's other checks see
        to that), or is unchanged since we closed it (name, size and mtime: no read needed)."""
        if self.fd is not None:
            return False
        if path == self.path and (st.st_size, st.st_mtime_ns) == self.closed_stat:
            return False
        try:
            fd = os.open(path, OPEN_FLAGS)
        except OSError:
            return False
        try:
            mine = os.fstat(fd)
            return (mine.st_dev, mine.st_ino) == (self.dev, self.ino) and not self.holds_our_head(fd)
        finally:
            os.close(fd)

    def reopen(self, path: str) -> bool:
        """Open under ``path`` (its new name), if that leads to our inode."""
        old, self.path = self.path, path
        if self.open():
            return True
        self.path = old
        return False

    def attach(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        Tailer.open_files += 1

    def close(self) -> None:
        if self.fd is not None:
            try:
                st = os.fstat(self.fd)
                self.closed_stat = (st.st_size, st.st_mtime_ns)
            except OSError:
                self.closed_stat = (-1, -1)
            os.close(self.fd)
            self.fd = None
            Tailer.open_files -= 1

    def restart_stream(self, fp: str, fp_len: int) -> None:
        """The file was truncated: its new content is a new stream, read from offset 0."""
        self.marks.clear()
        self.acked_mark = None
        self.saved_mark = None
        self.stream = new_stream_id()
        self.fp, self.fp_len = fp, fp_len
        self.base = self.acked = self.ship_pos = 0
        self.seq = 0
        self.rewind_seq = 0
        self.partial_since = None
        self.skipping = False
        self.multiline_since = None

    def rewind(self, offset: int) -> None:
        """Ship again from ``offset`` (unacknowledged data, or where the aggregator says it stands)."""
        self.ship_pos = offset
        while self.marks and self.marks[-1][0] > offset:
            self.marks.pop()  # read again, and marked again, from here
        self.rewind_seq = self.seq
        self.partial_since = None
        self.skipping = False
        self.multiline_since = None
        self.next_read = 0.0

    def read(self, max_bytes: int, max_lines: int, now: float, final: bool = False) -> Chunk | None:
        """The next batch of complete lines from ``ship_pos``, or None if there is nothing to ship.

        ``final`` ships a held partial line or record at once (the file was rotated away).
        Raises ``Rewritten`` if the bytes before ``ship_pos`` are not the ones shipped, and
        OSError from the file.
        """
        mark = self.marks[-1] if self.marks else self.acked_mark
        check = mark[1] if mark is not None and mark[0] == self.ship_pos else None
        chunk = self._read(max_bytes, max_lines, now, final, check)
        if chunk is not None and chunk.end > chunk.start:
            # The mark of this batch: the bytes before its end, from the block just read (one
            # more small pread only when the block began less than MARK_LEN before it).
            end = chunk.end
            off = end - self._buf_at
            data = self._buf[off - MARK_LEN if off > MARK_LEN else 0:off]
            if len(data) < MARK_LEN and end > len(data) and self.fd is not None:
                data = bytes_before(self.fd, end - len(data), MARK_LEN - len(data)) + data
            self.marks.append((end, data))
        self._buf = b""  # a batch's worth per file would add up over thousands of files
        return chunk

    def _read(self, max_bytes: int, max_lines: int, now: float, final: bool,
              check: bytes | None) -> Chunk | None:
        src = self.source
        start = self.ship_pos
        data = self._pread(start, max_bytes, check)
        if not data:
            return None
        self.last_data = now
        skipped = 0
        if self.skipping:
            nl = data.find(b"\n")
            if nl < 0:
                self.discarded_bytes += len(data)
                return Chunk(start, start + len(data), [])
            self.discarded_bytes += nl
            skipped = nl + 1
            data = data[skipped:]
            self.skipping = False
        if data[:1] == b"\0":
            # A run of NULs where a line starts: the hole a writer without O_APPEND leaves when
            # it writes on at its old offset after copytruncate. Not a line: skipped, counted.
            run = len(data) - len(data.lstrip(b"\0"))
            self.nul_bytes_skipped += run
            Tailer.nul_bytes_total += run
            if run == len(data):
                return Chunk(start, start + skipped + run, [])
            skipped += run
            data = data[run:]
        nl = data.rfind(b"\n")
        if nl < 0:
            return self._no_newline(start, skipped, data, now, final)
        self.partial_since = None
        if self._start_re is None and nl < src.max_line_bytes:
            count = data.count(b"\n", 0, nl + 1)
            if count <= max_lines:
                # The hot path: no line can be too long. One string for the batch, decoded
                # without copying the bytes first; no object per line.
                text = str(memoryview(data)[:nl + 1], "utf-8", "replace")
                return Chunk(start, start + skipped + nl + 1, text, count)
        body = data[:nl]
        consumed = nl + 1
        if body.count(b"\n") >= max_lines:
            idx = -1
            for _ in range(max_lines):
                idx = body.find(b"\n", idx + 1)
            body = body[:idx]
            consumed = idx + 1
        if self._start_re is not None:
            held = self._hold_last_record(body, now, final)
            if held is not None:
                if held == 0:
                    return Chunk(start, start + skipped, []) if skipped else None
                body = body[:held - 1]
                consumed = held
        lines = self._split(body)
        return Chunk(start, start + skipped + consumed, lines)

    def _pread(self, start: int, max_bytes: int, check: bytes | None = None) -> bytes:
        """What is there from ``start``, up to a batch (or up to a line's cut, for a line longer
        than a batch). ``check``: the bytes shipped just before ``start``; Rewritten if the file
        has others there."""
        if self.fd is None:
            return b""
        # Ask for what is there: a 1 MiB pread near the end of a file costs an allocation of
        # 1 MiB each time, 25x the cost of the fstat.
        if self.size_seen:
            self.size_seen = False  # seen by the change that queued this read: no second fstat
        else:
            self.size = file_size(self.fd)
        if self.size <= start:
            return b""
        n = min(max_bytes, self.size - start)
        if check is None:
            data = os.pread(self.fd, n, start)
        elif n <= SMALL_READ and n < max_bytes:
            # A small read takes the mark's bytes with it: one system call, a small copy; and
            # the next mark is then in the block even if the new bytes are fewer than MARK_LEN.
            both = os.pread(self.fd, len(check) + n, start - len(check))
            if not both.startswith(check):
                raise Rewritten(self.path)
            self._buf, self._buf_at = both, start - len(check)
            return both[len(check):]
        else:
            if os.pread(self.fd, len(check), start - len(check)) != check:
                raise Rewritten(self.path)
            data = os.pread(self.fd, n, start)
        max_line = self.source.max_line_bytes
        if len(data) == max_bytes and max_line >= max_bytes and data.find(b"\n") < 0:
            data += os.pread(self.fd, max_line + 1 - len(data), start + len(data))
        self._buf, self._buf_at = data, start
        return data

    def _no_newline(self, start: int, skipped: int, data: bytes, now: float, final: bool) -> Chunk | None:
        src = self.source
        if len(data) > src.max_line_bytes:
            self.skipping = True
            self.cut_lines += 1
            self.discarded_bytes += len(data) - src.max_line_bytes
            line = data[: src.max_line_bytes].decode("utf-8", "replace")
            return Chunk(start, start + skipped + len(data), [line])
        if self.partial_since is None:
            self.partial_since = now
        if final or now - self.partial_since >= src.partial_line_timeout_ms / 1000:
            self.partial_since = None
            return Chunk(start, start + skipped + len(data), [data.decode("utf-8", "replace")])
        return Chunk(start, start + skipped, []) if skipped else None

    def _split(self, body: bytes) -> list[str]:
        src = self.source
        if len(body) > src.max_line_bytes:
            parts = body.split(b"\n")
            if max(map(len, parts)) > src.max_line_bytes:
                for i, part in enumerate(parts):
                    if len(part) > src.max_line_bytes:
                        self.cut_lines += 1
                        self.discarded_bytes += len(part) - src.max_line_bytes
                        parts[i] = part[: src.max_line_bytes]
                return b"\n".join(parts).decode("utf-8", "replace").split("\n") if self._start_re is None \
                    else self._records(b"\n".join(parts))
        if self._start_re is not None:
            return self._records(body)
        return body.decode("utf-8", "replace").split("\n")

    # -- multi-line records ------------------------------------------------------------------

    def _hold_last_record(self, body: bytes, now: float, final: bool) -> int | None:
        """Where the last (maybe unfinished) record starts, to hold it back; None to ship all.

        A record is finished when the next one starts; the last one is held until then, or
        until ``multiline_timeout_ms`` passes without a new line.
        """
        assert self._start_re is not None
        last = 0
        for line_start in _line_starts(body):
            if self._start_re.match(body, line_start):
                last = line_start
        if final:
            self.multiline_since = None
            return None
        if self.multiline_since is None or len(body) != self.multiline_seen:
            self.multiline_since = now
            self.multiline_seen = len(body)
        if now - self.multiline_since >= self.source.multiline_timeout_ms / 1000:
            self.multiline_since = None
            return None
        return last

    def _records(self, body: bytes) -> list[str]:
        assert self._start_re is not None
        records: list[bytes] = []
        limit = self.source.multiline_max_lines
        count = 0
        for line in body.split(b"\n"):
            if records and count < limit and not self._start_re.match(line):
                records[-1] += b"\n" + line
                count += 1
            else:
                records.append(line)
                count = 1
        return [r.decode("utf-8", "replace") for r in records]


def _line_starts(body: bytes) -> list[int]:
    starts = [0]
    idx = body.find(b"\n")
    while idx >= 0:
        starts.append(idx + 1)
        idx = body.find(b"\n", idx + 1)
    return starts


def line_start_before(fd: int, size: int) -> int:
    """The offset just after the last newline before ``size`` (where ``start_at = "end"`` begins)."""
    pos = size
    while pos > 0:
        step = min(pos, 65536)
        block = os.pread(fd, step, pos - step)
        nl = block.rfind(b"\n")
        if nl >= 0:
            return pos - step + nl + 1
        pos -= step
    return 0
