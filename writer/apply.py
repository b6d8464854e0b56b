"""The apply stage: one message of the stream into its topic's file, behind the per-(agent,
stream) safety net.

The net works from the headers alone: a message whose End is not past its (agent, stream)'s
recorded end is a duplicate (dropped, counted); one whose Start is past it is a gap in that
source stream (written, counted, ERROR once per stream); one starting before it is cut at the end
already written when that falls on a line of the source, else written whole and counted. What
was applied since the last commit (``pending``: key -> end, ``pending_bytes``) is taken by the
group commit (writer/daemon.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from nats.aio.msg import Msg

from aggregator.config import AggregatorConfig
from aggregator.files import RollingFileSink
from aggregator.formats import format_lines
from writer import message

log = logging.getLogger("fleetlog.writer")


@dataclass
class TopicStats:
    lines: int = 0
    bytes: int = 0


@dataclass
class Totals:
    lines_written: int = 0
    bytes_written: int = 0
    messages_applied: int = 0
    duplicates_dropped: int = 0     # lines of messages already written (End <= the recorded end)
    duplicate_messages: int = 0
    malformed_dropped: int = 0      # messages that are not fleetlog version 1
    stream_gaps: int = 0            # messages whose Start is past their (agent, stream)'s end
    overlaps: int = 0               # messages starting before their stream's end, written whole
    discarded_unwritten: int = 0    # stream messages gone before this writer read them (kept across restarts)
    stream_rewritten: int = 0       # times the stream held other messages where applied ones were
    consumers_made: int = 0
    commits: int = 0
    write_errors: int = 0
    rotations: int = 0
    retention_removed: int = 0
    malformed: dict[str, int] = field(default_factory=dict)


class Applier:
    def __init__(self, sink: RollingFileSink, cfg: AggregatorConfig, totals: Totals) -> None:
        self.sink = sink
        self.cfg = cfg      # the output keys (formats per topic); replaced on reload
        self.totals = totals
        # (agent, stream) key -> end offset of the last message applied (maybe not committed yet).
        self.ends: dict[str, int] = {}
        # Applied since the last commit: key -> end, and the bytes written.
        self.pending: dict[str, int] = {}
        self.pending_bytes = 0
        self.topics: dict[str, TopicStats] = {}
        self._warned: set[str] = set()    # malformed reasons and stream keys already logged

    def malformed(self, reason: str, where: str, detail: str = "") -> None:
        """A message (or a control request) that cannot be used: counted, logged once per reason."""
        self.totals.malformed_dropped += 1
        self.totals.malformed[reason] = self.totals.malformed.get(reason, 0) + 1
        if reason not in self._warned:
            self._warned.add(reason)
            log.error("dropped a malformed message (%s) at %s: %s; its lines are not written (logged"
                      " once per reason, counted in status)", reason, where, detail)

    def apply(self, seq: int, msg: Msg) -> bool:
        """Write stream message ``seq`` to its topic's file; True if lines were written, False if
        it was dropped (malformed, duplicate). Raises SinkError with nothing of it written."""
        try:
            m = message.parse(msg.headers, msg.data)
        except message.BadMessage as exc:
            self.malformed(exc.reason, f"sequence {seq} ({msg.subject[:200]})", str(exc))
            return False
        payload = m.payload
        last = self.ends.get(m.key)
        if last is not None and m.end <= last:
            self.totals.duplicate_messages += 1
            self.totals.duplicates_dropped += m.lines
            log.debug("dropped sequence %d: %s %s %d-%d already written (to %d)", seq, m.agent, m.stream,
                      m.start, m.end, last)
            return False
        if last is not None and m.start != last:
            payload = self.mismatch(m, last)
        fmt = self.cfg.topic_format(m.topic)
        if fmt == "raw":
            data = payload
        else:
            try:
                data = format_lines(payload.decode("utf-8", "surrogateescape"), fmt, agent=m.agent,
                                    path=m.path, topic=m.topic, received=m.received, fields=m.fields)
            except (TypeError, ValueError) as exc:  # orjson's JSONEncodeError is a TypeError
                self.malformed("unformattable", f"sequence {seq} ({m.topic})", f"as {fmt}: {exc}")
                return False
        lines = payload.count(b"\n")
        # Its topic's file, or its agent's under the topic (split_by_agent), as the aggregator's.
        self.sink.append(self.cfg.file_key(m.topic, m.agent), data, lines)
        self.ends[m.key] = m.end
        self.pending[m.key] = m.end
        self.pending_bytes += len(data)
        stats = self.topics.get(m.topic)
        if stats is None:
            stats = self.topics[m.topic] = TopicStats()
        stats.lines += lines
        stats.bytes += len(data)
        self.totals.lines_written += lines
        self.totals.bytes_written += len(data)
        self.totals.messages_applied += 1
        return True

    def mismatch(self, m: message.Message, last: int) -> bytes:
        """A message that does not start where its stream ended: a gap (Start past the end:
        written, counted, ERROR once per stream) or an overlap (its first ``last - start`` bytes
        already written: cut off when they are whole lines of the source, else written whole)."""
        where = f"{m.agent} {m.stream} ({m.path})"
        if m.start > last:
            self.totals.stream_gaps += 1
            if f"gap\x1e{m.key}" not in self._warned:
                self._warned.add(f"gap\x1e{m.key}")
                log.error("gap in %s: bytes %d-%d of the source are not in the stream (this message"
                          " starts at %d); counted as stream_gaps", where, last, m.start, m.start)
            return m.payload
        cut = last - m.start
        if m.fields is None and len(m.payload) == m.end - m.start and m.payload[cut - 1: cut] == b"\n":
            # The front is written already: dropped lines, counted as a whole duplicate's are.
            self.totals.duplicates_dropped += m.payload.count(b"\n", 0, cut)
            return m.payload[cut:]
        self.totals.overlaps += 1
        log.error("%s: a message covers bytes %d-%d, of which %d-%d are already written and cannot be"
                  " cut off at a line; written whole (those lines may appear twice)", where, m.start,
                  m.end, m.start, last)
        return m.payload

    def take_pending(self) -> dict[str, int]:
        """What a commit journals: the ends applied since the last one (and forget them)."""
        pending, self.pending = self.pending, {}
        self.pending_bytes = 0
        return pending

    def restore_pending(self, pending: dict[str, int]) -> None:
        """A commit that failed: its ends are pending again (later ends win)."""
        for key, end in pending.items():
            self.pending[key] = max(end, self.pending.get(key, 0))

    def forget(self, durable: Mapping[str, object]) -> None:
        """Drop the ends the journal has forgotten (idle past stream_ttl_s), so that a
        long-running writer does not grow with every file its agents ever rotated."""
        if len(self.ends) <= len(durable):
            return
        for key in [k for k in self.ends if k not in durable and k not in self.pending]:
            del self.ends[key]
