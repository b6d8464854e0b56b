"""The JetStream sink's queue and the messages built from it: each (topic, agent, stream) is a
subject with its queue of accepted batches (pieces); a message takes contiguous pieces of one path,
within the largest message the server and the stream take (headers included), splitting a piece
too large at line boundaries and cutting a single line too large."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from aggregator.jetstream.subjects import escape_token, header_bytes, msg_id

log = logging.getLogger("fleetlog.aggregator.jetstream")

SIZE_MARGIN_BYTES = 256       # the server's own framing beside headers + payload, with room to spare


@dataclass(slots=True)
class Piece:
    """One accepted batch (or what is left of it): source bytes [start, end)."""

    start: int
    end: int
    data: bytes                       # the lines, each ending in b"\n"
    count: int                        # lines in data
    path: str
    received: float
    fields: list[str] | None          # one JSON object (ASCII) per line, or None
    # data's length equals end - start: every line boundary is a source offset. Otherwise (bytes
    # replaced, lines cut by the agent) only the ends and the cuts this sink made are known.
    exact: bool
    cuts: dict[int, tuple[int, int]] = field(default_factory=dict)   # offset -> (data bytes, lines)


@dataclass(slots=True)
class Subject:
    topic: str
    agent: str
    stream: str
    name: str
    pieces: list[Piece] = field(default_factory=list)
    last_seq: int | None = None       # None: not read from the stream yet (or no longer trusted)
    last_end: int | None = None       # Fleetlog-End of the subject's last message; None: empty
    base: int | None = None           # where the agent says the stream began (None: not said)


@dataclass(slots=True)
class Message:
    start: int
    end: int
    headers: dict[str, str]
    payload: bytes
    pieces: int                       # whole pieces it takes from the front
    part: tuple[int, int] | None      # or: (data bytes, lines) of the first piece


def boundary(piece: Piece, offset: int) -> tuple[int, int] | None:
    """(data bytes, lines) before source ``offset`` inside ``piece``, if it is a line boundary
    we know; else None."""
    if offset in piece.cuts:
        return piece.cuts[offset]
    if not piece.exact or not piece.start < offset < piece.end:
        return None
    size = offset - piece.start
    if piece.data[size - 1:size] != b"\n":
        return None
    return size, piece.data.count(b"\n", 0, size)


def rest(piece: Piece, offset: int, size: int, count: int) -> Piece:
    """What is left of ``piece`` from source ``offset`` on (``size`` data bytes and ``count``
    lines before it)."""
    fields = None if piece.fields is None else piece.fields[count:]
    cuts = {o: (b - size, n - count) for o, (b, n) in piece.cuts.items() if o > offset}
    return Piece(offset, piece.end, piece.data[size:], piece.count - count, piece.path,
                 piece.received, fields, piece.exact, cuts)


def take(sub: Subject, message: Message) -> int | None:
    """Drop what ``message`` carried from the queue; the end of the last whole batch it
    completed, or None (a first part of a split batch)."""
    if message.part is not None:
        sub.pieces[0] = rest(sub.pieces[0], message.end, *message.part)
        return None
    done = sub.pieces[message.pieces - 1].end
    del sub.pieces[:message.pieces]
    return done


class MessageBuilder:
    """Builds each subject's next message. ``limit()``: the largest message (headers + payload,
    bytes) the server and the stream take now; ``counters``: the sink's, where splits and cuts
    are counted (split_messages, cut_lines, cut_bytes)."""

    def __init__(self, limit: Callable[[], int], counters: dict[str, int]) -> None:
        self.limit = limit
        self.counters = counters

    def headers(self, sub: Subject, piece: Piece, start: int, end: int, lines: int,
                fields: Iterable[str] | None) -> dict[str, str]:
        headers = {
            "Nats-Msg-Id": msg_id(sub.agent, sub.stream, start, end),
            "Nats-Expected-Last-Subject-Sequence": str(sub.last_seq or 0),
            "Fleetlog-Version": "1",
            "Fleetlog-Topic": escape_token(sub.topic),
            "Fleetlog-Agent": escape_token(sub.agent),
            "Fleetlog-Stream": escape_token(sub.stream),
            "Fleetlog-Start": str(start),
            "Fleetlog-End": str(end),
            "Fleetlog-Lines": str(lines),
            "Fleetlog-Path": escape_token(piece.path),
            "Fleetlog-Received": f"{piece.received:.6f}",
        }
        if fields is not None:
            headers["Fleetlog-Fields"] = "[" + ",".join(fields) + "]"
        return headers

    def build(self, sub: Subject, target: int) -> Message:
        """The next message from the front of ``sub``'s queue (no piece ending after ``target``:
        batches added during this commit wait for the next), at most the server's max_payload
        with its headers: contiguous pieces of one path merged, a piece too large split at line
        boundaries, a single line too large cut (the agent's ``max_line_bytes`` rule: the rest of
        the line is dropped, counted, said once)."""
        limit = self.limit() - SIZE_MARGIN_BYTES
        first = sub.pieces[0]
        # Headers with the longest numbers they can take: the budget never depends on the digits.
        base = header_bytes(self.headers(sub, first, 10**19, 10**19, 10**19, None)) + len(
            "Fleetlog-Fields: []\r\n")
        budget = limit - base
        cost = len(first.data) + (0 if first.fields is None else sum(len(f) + 1 for f in first.fields))
        if cost > budget:
            return self._build_part(sub, first, budget)
        take = [first]
        for piece in sub.pieces[1:]:
            more = len(piece.data) + (0 if piece.fields is None else sum(len(f) + 1 for f in piece.fields))
            if (piece.start != take[-1].end or piece.end > target or piece.path != first.path
                    or (piece.fields is None) != (first.fields is None) or cost + more > budget):
                break
            take.append(piece)
            cost += more
        fields = None if first.fields is None else [f for p in take for f in p.fields or ()]
        payload = b"".join(p.data for p in take)
        count = sum(p.count for p in take)
        headers = self.headers(sub, first, first.start, take[-1].end, count, fields)
        return Message(first.start, take[-1].end, headers, payload, len(take), None)

    def _build_part(self, sub: Subject, piece: Piece, budget: int) -> Message:
        """The longest run of ``piece``'s first lines within ``budget`` bytes (payload + fields),
        at least one line (cut if it alone does not fit)."""
        size = lines = used = 0
        data = piece.data
        while size < len(data):
            nl = data.find(b"\n", size)
            nl = len(data) - 1 if nl < 0 else nl
            more = nl + 1 - size + (0 if piece.fields is None else len(piece.fields[lines]) + 1)
            if used + more > budget:
                break
            used += more
            size = nl + 1
            lines += 1
        if lines == 0:
            self._cut_line(sub, piece, budget)
            return self.build(sub, piece.end)
        end = self._split_offset(piece, size, lines)
        piece.cuts[end] = (size, lines)
        self.counters["split_messages"] += 1
        fields = None if piece.fields is None else piece.fields[:lines]
        headers = self.headers(sub, piece, piece.start, end, lines, fields)
        return Message(piece.start, end, headers, data[:size], 0, (size, lines))

    @staticmethod
    def _split_offset(piece: Piece, size: int, lines: int) -> int:
        """The source offset after the first ``size`` bytes (``lines`` lines) of ``piece``: exact
        when the piece's text is its source bytes; otherwise an estimate kept strictly inside the
        piece (README: what that means if the aggregator dies between the parts)."""
        if piece.exact:
            return piece.start + size
        return max(piece.start + 1, min(piece.start + size, piece.end - (piece.count - lines)))

    def _cut_line(self, sub: Subject, piece: Piece, budget: int) -> None:
        """Cut ``piece``'s first line so that it fits ``budget`` (its source range is unchanged:
        the rest of the line is dropped, as the agent drops what is past ``max_line_bytes``)."""
        nl = piece.data.find(b"\n")
        nl = len(piece.data) - 1 if nl < 0 else nl
        room = budget - 1 - (0 if piece.fields is None else len(piece.fields[0]) + 1)
        if piece.fields is not None and room < 1024:
            piece.fields[0] = "{}"   # fields that alone exceed the budget: the line goes without them
            room = budget - 1 - 3
        keep = max(room, 0)
        while keep and (piece.data[keep] & 0xC0) == 0x80:   # not inside a UTF-8 sequence
            keep -= 1
        self.counters["cut_lines"] += 1
        self.counters["cut_bytes"] += nl - keep
        if self.counters["cut_lines"] == 1:
            log.warning("jetstream: %s: a line of %d bytes does not fit the server's max_payload (%d"
                        " bytes with headers): cut to %d bytes (counted as cut_lines; said once)",
                        sub.name, nl + 1, self.limit(), keep + 1)
        piece.data = piece.data[:keep] + piece.data[nl:]
        piece.exact = False
        piece.cuts = {}

