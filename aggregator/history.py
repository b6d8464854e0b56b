"""A topic's last lines, read back from its files for ``aggregatorctl tail -n N``.

The aggregator may run on another host than ``aggregatorctl``, so the history is read here and
sent over the control connection (the ``history`` command). What is read is fixed on the event
loop (the active file's descriptor and the length written so far, the rotated files' names):
every batch written before that moment is in the history, every later one is not, and the
command also returns each stream's end offset at that moment so that ``tail`` can drop, from
the live feed, what the history already holds (see aggregator/commands/history.py).

Reading happens in a thread: backwards from the end of an uncompressed file, whole for a
gzip-compressed rotated file (gzip cannot be read backwards; only the last lines are kept).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import zlib
from dataclasses import dataclass, field

_CHUNK_BYTES = 64 * 1024
# What one reply may carry: a history request for more is cut to its newest lines (and says so).
HISTORY_MAX_BYTES = 8 * 1024 * 1024
# What aggregatorctl tail subscribes to beside the topic (with a token of its own), so that the
# aggregator can tell when its subscription is in place. Not a topic: nothing is published to it.
PROBE_PREFIX = b"\x00fleetlog-history."
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Snapshot:
    """What one history request reads: ``fd`` (an own descriptor of the active file, -1: none)
    up to ``size`` bytes, then ``rotated`` (paths, newest first) while lines are missing."""

    fd: int = -1
    size: int = 0
    rotated: list[str] = field(default_factory=list)

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def tail_of(fd: int, end: int, n: int, max_bytes: int) -> tuple[list[bytes], bool]:
    """The last ``n`` lines of the first ``end`` bytes of ``fd`` (without their newlines), oldest
    first, and whether lines precede them (more than ``n``, or cut by ``max_bytes``)."""
    if n <= 0 or end <= 0:
        return [], end > 0
    chunks: list[bytes] = []
    pos = end
    newlines = held = 0
    ends_in_newline = False
    # Each newline but the last byte's starts a line: n of them give n whole lines.
    while pos > 0 and newlines - ends_in_newline < n and held < max_bytes:
        step = min(_CHUNK_BYTES, pos)
        pos -= step
        chunk = os.pread(fd, step, pos)
        if not chunks:
            ends_in_newline = chunk.endswith(b"\n")
        chunks.append(chunk)
        newlines += chunk.count(b"\n")
        held += len(chunk)
    data = b"".join(reversed(chunks))
    lines = (data[:-1] if ends_in_newline else data).split(b"\n")
    more = pos > 0
    if more:  # the first piece may be the end of a line that started before ``pos``
        lines = lines[1:]
    if len(lines) > n:
        lines, more = lines[-n:], True
    return _fit(lines, max_bytes, more)


def tail_of_gzip(path: str, n: int, max_bytes: int) -> tuple[list[bytes], bool]:
    """The last ``n`` lines of a gzip-compressed file, decompressed in chunks (the whole file is
    read; memory holds at most ``n`` lines and about twice ``max_bytes``). FileNotFoundError if
    it is gone."""
    tail: list[bytes] = []
    held = 0
    more = False
    rest = b""

    def take(parts: list[bytes]) -> None:
        nonlocal held, more
        tail.extend(parts)
        held += sum(map(len, parts)) + len(parts)
        if len(tail) > n:
            drop = len(tail) - n
            held -= sum(map(len, tail[:drop])) + drop
            del tail[:drop]
            more = True
        if held > 2 * max_bytes:  # trimmed now and then, not per line
            kept, more_now = _fit(tail, max_bytes, more)
            del tail[:len(tail) - len(kept)]
            held = sum(map(len, tail)) + len(tail)
            more = more_now

    with gzip.open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK_BYTES * 16):
            parts = (rest + chunk).split(b"\n")
            rest = parts.pop()
            take(parts)
    if rest:
        take([rest])
    return _fit(tail, max_bytes, more)


def _fit(lines: list[bytes], max_bytes: int, more: bool) -> tuple[list[bytes], bool]:
    """The newest of ``lines`` that fit in ``max_bytes`` (and whether some were left out)."""
    total = 0
    for i in range(len(lines) - 1, -1, -1):
        total += len(lines[i]) + 1
        if total > max_bytes:
            return lines[i + 1:], True
    return lines, more


def read_history(snap: Snapshot, n: int, max_bytes: int = HISTORY_MAX_BYTES) -> tuple[list[bytes], bool]:
    """The last ``n`` lines of the snapshot's files, oldest first, and whether ``max_bytes`` cut
    them short (False when the files simply hold fewer lines). Blocking: run it in a thread.
    Closes the snapshot's descriptor. A rotated file removed meanwhile (retention) ends the
    history there; one compressed meanwhile is read in its ``.gz`` form."""
    found: list[list[bytes]] = []
    have = used = 0
    cut = False
    try:
        sources: list[int | str] = [snap.fd] if snap.fd >= 0 else []
        for source in [*sources, *snap.rotated]:
            try:
                lines, more = _read_one(source, snap.size, n - have, max_bytes - used)
            except FileNotFoundError:
                break
            found.append(lines)
            have += len(lines)
            used += sum(len(x) + 1 for x in lines)
            if have >= n:
                break
            if more:  # lines were left out though fewer than n were found: the bytes ran out
                cut = True
                break
    finally:
        snap.close()
    return [line for lines in reversed(found) for line in lines], cut


def _read_one(source: int | str, size: int, n: int, max_bytes: int) -> tuple[list[bytes], bool]:
    if isinstance(source, int):
        return tail_of(source, size, n, max_bytes)
    if source.endswith(".gz"):
        return _gzip_or_gone(source, n, max_bytes)
    try:
        fd = os.open(source, _OPEN_FLAGS)
    except FileNotFoundError:
        return _gzip_or_gone(source + ".gz", n, max_bytes)  # compressed since it was listed
    try:
        return tail_of(fd, os.fstat(fd).st_size, n, max_bytes)
    finally:
        os.close(fd)


def _gzip_or_gone(path: str, n: int, max_bytes: int) -> tuple[list[bytes], bool]:
    try:
        return tail_of_gzip(path, n, max_bytes)
    except (OSError, EOFError, zlib.error) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        # A damaged archive: what it holds cannot be read back; older files would skip it.
        raise FileNotFoundError(path) from exc
