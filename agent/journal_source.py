"""``[[journal]]`` sources: journal entries as streams, shipped and acknowledged like files.

A ``JournalSource`` reads one machine's journal (the system journal, or one machine of a
directory of several: journal_sources.py runs one per machine found there).

The aggregator accepts batches per (agent, stream) by offsets, so a journal source maps its
entries onto streams with byte offsets: one stream per journal writer incarnation (a seqnum id
and a boot id, the ``epoch``: a new boot or a journal started afresh begins a new stream), whose
offset grows by each entry's message size plus one (what the line takes in the output). Offsets
are a function of the entries alone, so reading again from a cursor gives the same offsets, and
acceptance, duplicates and resync work unchanged.

Everything read and not yet acknowledged stays in memory (``ring``), bounded by the in-flight
window: a resync or a resend ships from there, and journalctl keeps its place. The checkpoint is
the cursor of the last entry of the acknowledged prefix of the ring, with each stream's offset at
that cursor and its acknowledged end (a stream may be acknowledged past the cursor while an older
stream's batch is not). It moves only on acknowledgements; a stream is saved before its first
batch ships, so a crash can never ship the same entries under a second stream id.

One reader normally sees one writer lineage after another (a new boot, a journal started afresh),
and a newer stream ships only once the older one is acknowledged. Two writers with one machine
id (cloned machines, systemd issue 31368) interleave entry by entry instead: once a lineage comes
back after another's entries, the source is ``interleaved``; from then on each read cycle keeps
a batch open per lineage and every stream ships on its own (the aggregator accepts and
acknowledges per stream), so no lineage waits for another's acknowledgements. The cursor is one
per reader, so it follows ``runs`` (the entries in reader order, a run per stretch of one
lineage): it moves only to the last entry of the acknowledged prefix of that order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from agent.config import JournalConfig
from agent.journal import (
    Entry,
    Reader,
    last_cursor,
    machine_match,
    missing_between,
    probe,
    realtime_of,
    same_entry,
    seqnum_distance,
)
from agent.tail import new_stream_id
from fleetlog import wire
from fleetlog.runtime import Wakeup

if TYPE_CHECKING:
    from agent.daemon import Agent

log = logging.getLogger("fleetlog.agent.journal")

MAX_STREAMS = 64          # streams remembered per source (one per boot or journal writer)
RESTART_MAX_S = 30.0      # the longest wait before journalctl is started again after it exited
TAIL_PROBE_S = 5.0        # while entries flow, how often the journal's newest entry is looked up
INTERLEAVED_WARN_RETURNS = 4  # lineages coming back this often: two writers, said at WARNING


@dataclass(eq=False)
class JStream:
    epoch: str
    stream: str
    base: int = 0
    offset: int = 0       # end of what has been read
    acked: int = 0        # end of what the aggregator has made durable
    seq: int = 0
    ship_pos: int = field(init=False)
    rewind_seq: int = 0

    def __post_init__(self) -> None:
        self.ship_pos = self.acked


@dataclass(eq=False, slots=True)
class Run:
    """Consecutive entries of one stream in the reader's order, from ``start`` to ``end``."""
    stream: JStream
    start: int
    end: int
    cursor: str                # of its last entry
    entries: int


@dataclass(eq=False, slots=True)
class _Filling:
    """A batch being made in one read cycle."""
    stream: JStream
    start: int
    lines: list[str] = field(default_factory=list)
    fields: list[dict[str, Any]] = field(default_factory=list)
    nbytes: int = 0
    cursor: str = ""


@dataclass(eq=False)
class Shipped:
    """A batch read from the journal, shipped or about to be, not yet acknowledged."""
    stream: JStream
    start: int
    end: int
    lines: list[str]
    fields_json: bytes         # the entries' fields as one JSON array: a dict per entry costs 5x
    cursor: str                # of its last entry
    first_realtime_us: int | None


class JournalSource:
    def __init__(self, agent: Agent, cfg: JournalConfig, machine: str = "") -> None:
        self.agent = agent
        self.cfg = cfg
        self.machine = machine                    # "": every entry the config matches
        self.name = cfg.topic + (f" machine {machine}" if machine else "")
        self.path = f"journal:{cfg.directory or 'system'}"
        self.reader = Reader(cfg, machine)
        self.streams: dict[str, JStream] = {}     # by epoch
        self.by_id: dict[str, JStream] = {}
        self.ring: deque[Shipped] = deque()
        self.runs: deque[Run] = deque()           # read and not acknowledged, in reader order
        self.unsent = 0                           # index in ring of the first batch maybe not shipped
        # Index in ring of the first batch of another stream than ring[0]'s, or None. It ships
        # only once everything before it is acknowledged: streams of one source are written in
        # journal order (a resync of the older stream would otherwise land after the newer one).
        self.switch_at: int | None = None
        self.cursor: str | None = None            # the checkpoint: last entry of the acknowledged prefix
        self.read_cursor: str | None = None       # last entry read from journalctl
        self.expect_first: str | None = None      # the cursor journalctl was started at
        self.known = False                        # a checkpoint of this source was loaded
        self.last_epoch: str | None = None        # of the last entry read
        self.left_epochs: dict[str, None] = {}    # lineages the reader went on from (bounded)
        self.returns = 0                          # a left lineage came back: writers interleave
        self.interleaved = False
        self.unsaved = False
        self.wake = Wakeup()
        self.entries_read = 0
        self.entries_acked = 0
        self.entries_missing = 0
        self.entries_cut = 0
        self.restarts = 0
        self.newest_realtime_us: int | None = None
        self.bytes_read = 0
        # While the agent is behind: the newest matching entry in the journal (for the lag).
        self.tail_cursor: str | None = None
        self._tail_probed = 0.0
        self._tail_task: asyncio.Task[None] | None = None
        # lag() as last computed on the event loop (heartbeats, status): for the metrics thread.
        self.last_lag: tuple[int, float] = (0, 0.0)

    # -- checkpoints ---------------------------------------------------------------------------

    def restore(self, doc: dict[str, Any]) -> None:
        cursor = doc.get("cursor")
        self.cursor = cursor if isinstance(cursor, str) and cursor else None
        streams = doc.get("streams")
        for s in streams if isinstance(streams, list) else []:
            try:
                st = JStream(epoch=str(s["epoch"]), stream=str(s["stream"]), base=int(s["base"]),
                             offset=int(s["offset"]), acked=int(s["acked"]), seq=int(s["seq"]))
            except (KeyError, TypeError, ValueError):
                log.warning("journal %s: skipping a malformed stream in the checkpoint: %r",
                            self.name, s)
                continue
            st.ship_pos = max(st.acked, st.offset)
            self.add_stream(st)
        acked = doc.get("entries_acked")
        self.entries_acked = acked if type(acked) is int else 0
        self.known = True

    def checkpoint(self) -> dict[str, Any]:
        first_start: dict[str, int] = {}
        for r in self.runs:
            first_start.setdefault(r.stream.stream, r.start)
        streams = [{"epoch": s.epoch, "stream": s.stream, "base": s.base, "seq": s.seq, "acked": s.acked,
                    "offset": first_start.get(s.stream, s.offset)} for s in self.streams.values()]
        return {"key": self.cfg.key, "machine": self.machine, "topic": self.cfg.topic, "cursor": self.cursor,
                "realtime_us": realtime_of(self.cursor) if self.cursor else None,
                "entries_acked": self.entries_acked, "streams": streams}

    def add_stream(self, st: JStream) -> None:
        self.streams.pop(st.epoch, None)
        self.streams[st.epoch] = st
        self.by_id[st.stream] = st
        if len(self.streams) > MAX_STREAMS:
            busy = {b.stream.stream for b in self.ring}
            for old in list(self.streams.values())[:-MAX_STREAMS]:
                if old.stream not in busy:
                    del self.streams[old.epoch]
                    self.by_id.pop(old.stream, None)

    # -- reading -------------------------------------------------------------------------------

    async def start_reader(self) -> None:
        start = self.read_cursor or self.cursor
        if start is None and not self.known and self.cfg.start_at == "end":
            start = await last_cursor(self.cfg, self.machine)
            if start is not None:
                log.info("journal %s: starting at its end (start_at = \"end\")", self.name)
                self.cursor = start
        self.known = True
        self.agent.checkpoints_dirty = True
        if start is not None:
            exists, after = await probe(self.cfg, start, self.machine)
            if not exists:
                self.saved_entry_gone(start, after)
        self.expect_first = start
        await self.reader.start(start)

    async def run(self) -> None:
        """Read, batch and ship until cancelled; start journalctl again if it exits."""
        backoff = 1.0
        await self.start_reader()
        read_task: asyncio.Task[list[Entry] | None] | None = None
        try:
            while True:
                if self.inflight_bytes():
                    # The file read loop sleeps while no file waits for an ack: look here too.
                    self.agent.check_ack_timeout(time.monotonic())
                await self.ship_ready()
                if self.agent.inflight >= self.agent.window and self.inflight_bytes() > 0:
                    self.wake.clear()
                    await self.wake.wait(0.1)
                    continue
                if read_task is None:
                    read_task = asyncio.create_task(self.reader.read(), name=f"journal-read-{self.name}")
                self.wake.clear()
                if not read_task.done():
                    waker = asyncio.ensure_future(self.wake.wait(0.1 if self.inflight_bytes() else None))
                    await asyncio.wait((read_task, waker), return_when=asyncio.FIRST_COMPLETED)
                    waker.cancel()
                if not read_task.done():
                    continue  # woken to ship (an ack, a resync): the read goes on
                entries = read_task.result()
                read_task = None
                if entries is None:
                    code = await self.reader.stop()
                    self.restarts += 1
                    # Once per outage at WARNING (an empty directory makes it exit at once).
                    log.log(logging.WARNING if backoff == 1.0 else logging.DEBUG,
                            "journal %s: journalctl exited (status %s); starting it again in %.0fs"
                            " (doubling up to %.0fs while it keeps exiting)",
                            self.name, code, backoff, RESTART_MAX_S)
                    await asyncio.sleep(backoff)
                    backoff = min(2 * backoff, RESTART_MAX_S)
                    await self.start_reader()
                    continue
                if backoff > 1.0 and entries:
                    log.info("journal %s: journalctl reads again", self.name)
                    backoff = 1.0
                self.take(entries)
                self.watch_tail()
        finally:
            if read_task is not None:
                read_task.cancel()
            if self._tail_task is not None:
                self._tail_task.cancel()

    def watch_tail(self) -> None:
        """While entries flow, look up the journal's newest entry every TAIL_PROBE_S, so the lag
        counts what journalctl has not handed over yet (an idle source spawns nothing)."""
        now = time.monotonic()
        busy = self._tail_task is not None and not self._tail_task.done()
        if busy or now - self._tail_probed < TAIL_PROBE_S:
            return
        self._tail_probed = now

        async def probe_tail() -> None:
            self.tail_cursor = await last_cursor(self.cfg, self.machine)
            self.lag()
        self._tail_task = asyncio.create_task(probe_tail(), name=f"journal-tail-{self.name}")

    def take(self, entries: list[Entry]) -> None:
        """Entries read: skip the one journalctl was started at, batch the rest into the ring."""
        if self.expect_first is not None and entries:
            # journalctl --follow --cursor starts at the cursor's entry or after it
            if same_entry(entries[0].cursor, self.expect_first):
                entries = entries[1:]
            self.expect_first = None
        if not entries:
            return
        self.batch(entries)
        self.entries_read += len(entries)
        cut = sum(1 for e in entries if e.cut)
        if cut:
            if not self.entries_cut:
                log.warning("journal %s: a message longer than max_line_bytes (%d) was cut there"
                            " (counted in fleetlog-agent status as entries_cut; said once)",
                            self.name, self.cfg.max_line_bytes)
            self.entries_cut += cut
        self.bytes_read += sum(e.size for e in entries)
        self.read_cursor = entries[-1].cursor
        self.newest_realtime_us = entries[-1].fields.get("realtime_us", self.newest_realtime_us)
        self.pop_acked()
        self.lag()

    def batch(self, entries: list[Entry]) -> None:
        """Entries onto their streams: runs (the reader's order, for the cursor) and batches in
        the ring. Batches being filled, by epoch: one at a time while lineages follow one
        another (a run is a batch, as journal order across a reboot needs), one per lineage
        once interleaved."""
        cfg = self.agent.cfg
        filling: dict[str, _Filling] = {}
        runs = self.runs
        prev = self.last_epoch
        for e in entries:
            epoch = e.epoch
            if epoch != prev:
                if prev is not None:
                    self.lineage_left(prev, epoch)
                if not self.interleaved:
                    for other in list(filling):
                        self.close_batch(filling.pop(other))
                prev = epoch
            st = self.streams.get(epoch)
            if st is None:
                st = self.new_stream(epoch)
            start = st.offset
            st.offset += e.size
            last = runs[-1] if runs else None
            if last is not None and last.stream is st and last.end == start:
                last.end, last.cursor, last.entries = st.offset, e.cursor, last.entries + 1
            else:
                runs.append(Run(st, start, st.offset, e.cursor, 1))
            f = filling.get(epoch)
            if f is None:
                f = filling[epoch] = _Filling(st, start)
            f.lines.append(e.line)
            f.fields.append(e.fields)
            f.nbytes += e.size
            f.cursor = e.cursor
            if len(f.lines) >= cfg.batch_max_lines or f.nbytes >= cfg.batch_max_bytes:
                self.close_batch(filling.pop(epoch))
        for f in filling.values():
            self.close_batch(f)
        self.last_epoch = prev

    def close_batch(self, f: _Filling) -> None:
        st, ring = f.stream, self.ring
        if not self.interleaved and self.switch_at is None and ring and ring[0].stream is not st:
            self.switch_at = len(ring)
        ring.append(Shipped(st, f.start, f.start + f.nbytes, f.lines, orjson.dumps(f.fields), f.cursor,
                            f.fields[0].get("realtime_us")))

    def lineage_left(self, epoch: str, to: str) -> None:
        """The reader went on from lineage ``epoch`` to ``to``: if ``to`` was left before, two
        writers interleave in this one reader (cloned machines with one machine id)."""
        left = self.left_epochs
        left.pop(epoch, None)
        left[epoch] = None
        if len(left) > MAX_STREAMS:
            del left[next(iter(left))]
        if to not in left:
            return
        self.returns += 1
        if not self.interleaved:
            # Each lineage ships on its own from here (journal order between writers that run at
            # once means nothing; each one's own order is kept by its stream).
            self.interleaved = True
            self.switch_at = None
            self.wake.set()
        if self.returns == INTERLEAVED_WARN_RETURNS:  # not a clock step at a reboot: said once
            where = f"journal directory {self.cfg.directory}" if self.cfg.directory else "system journal"
            log.warning("%s: machine id %s has two writers interleaved (cloned machines with one"
                        " /etc/machine-id?); topic %s ships each one's entries as a stream of its own,"
                        " in its own order; give each machine its own id (systemd-machine-id-setup)",
                        where, self.machine_id(), self.cfg.topic)

    def machine_id(self) -> str:
        if self.machine:
            return self.machine
        for m in (*self.cfg.field_matches, *machine_match(self.cfg, "")):
            if m.startswith("_MACHINE_ID="):
                return m.partition("=")[2]
        return "(none)"

    def new_stream(self, epoch: str) -> JStream:
        st = JStream(epoch=epoch, stream=new_stream_id())
        if self.streams:
            log.info("journal %s: a new boot or journal writer (%s); new stream %s",
                     self.name, epoch, st.stream)
        self.add_stream(st)
        self.unsaved = True
        return st

    def saved_entry_gone(self, saved: str, after: str | None) -> None:
        """The entry journalctl is to start at is not in the journal any more: vacuumed or rotated
        away while the agent was down. Reading resumes at the oldest entry after it."""
        missing = missing_between(saved, after) if after is not None else None
        t0, t1 = realtime_of(saved), realtime_of(after) if after is not None else None
        when = f"between {_utc(t0)} and {_utc(t1)}" if t1 is not None else f"after {_utc(t0)}"
        if missing is None:
            log.warning("journal %s: the saved position is no longer in the journal (vacuumed or rotated"
                        " away); resuming at the oldest entry after it; entries written %s may be missing"
                        " (how many cannot be known: the journal's writer changed)", self.name, when)
        elif missing:
            self.entries_missing += missing
            log.warning("journal %s: the saved position is no longer in the journal (vacuumed or rotated"
                        " away); resuming at the oldest entry after it; up to %d entries %s may be missing",
                        self.name, missing, when)
        else:
            log.info("journal %s: the saved position is gone, and nothing after it", self.name)
        # Offsets counted from here on cannot be matched with what the aggregator holds of the
        # old streams: new streams ship what follows (twice at worst, never lost). Streams with
        # batches in flight stay known to their acknowledgements.
        self.streams.clear()
        busy = {b.stream.stream for b in self.ring}
        self.by_id = {k: v for k, v in self.by_id.items() if k in busy}

    # -- shipping ------------------------------------------------------------------------------

    def inflight_bytes(self) -> int:
        return sum(max(0, s.ship_pos - s.acked) for s in self.streams.values())

    def unread(self) -> int:
        """Entries in the journal after the last one read (an estimate from sequence numbers, of
        every entry, matching or not; 0 when caught up or when it cannot be known)."""
        tail, read = self.tail_cursor, self.read_cursor
        if tail is None or read is None:
            return 0
        return max(0, seqnum_distance(read, tail) or 0)

    def lag_bytes(self) -> int:
        """Read and not acknowledged, and an estimate of what is not read yet (for the
        aggregator's flow control, which shares its window among agents catching up)."""
        average = self.bytes_read // self.entries_read if self.entries_read else 0
        return sum(b.end - b.start for b in self.ring) + self.unread() * average

    async def ship_ready(self) -> None:
        """Ship the ring's batches not shipped yet (new ones, or again after a resync or a
        resend), while the window has room."""
        agent = self.agent
        if self.unsaved:
            agent.save_checkpoints()
            if agent.checkpoints_dirty:
                return  # not on disk: shipping would risk a second stream id after a crash
            self.unsaved = False
        ring = self.ring
        transport = agent.transport
        assert transport is not None
        while self.unsent < len(ring):
            inflight = self.inflight_bytes()
            if agent.inflight >= agent.window and inflight > 0:
                return
            if self.switch_at is not None and self.unsent >= self.switch_at:
                return  # the older stream's batches first (see switch_at)
            b = ring[self.unsent]
            self.unsent += 1
            st = b.stream
            if b.end <= st.ship_pos:
                continue
            lines, fields, start = b.lines, orjson.Fragment(b.fields_json), b.start
            if start < st.ship_pos:
                skip, start = _entries_before(lines, b.start, st.ship_pos)
                lines, fields = lines[skip:], orjson.loads(b.fields_json)[skip:]
            frames = wire.batch_frames(self.cfg.topic_bytes, agent.cfg.name, st.stream, st.base, self.path,
                                       st.epoch, st.seq, start, b.end, lines, fields)
            st.seq += 1
            agent.inflight += b.end - max(start, st.acked)
            st.ship_pos = b.end
            agent.lines_sent += len(lines)
            agent.batches_shipped += 1
            if inflight == 0:
                agent.last_ack_progress = time.monotonic()  # the journals' ack timeout counts from here
            await transport.send(frames)

    # -- acknowledgements ----------------------------------------------------------------------

    def ack(self, st: JStream, end: int) -> bool:
        if end <= st.acked:
            return False
        st.acked = end
        st.ship_pos = max(st.ship_pos, end)
        self.pop_acked()
        self.wake.set()  # room in the window again
        return True

    def pop_acked(self) -> None:
        ring = self.ring
        while ring and ring[0].end <= ring[0].stream.acked:
            ring.popleft()
            self.unsent = max(0, self.unsent - 1)
            if self.switch_at is not None:
                self.switch_at -= 1
                if self.switch_at == 0:
                    self.switch_at = self._next_switch()
        # The cursor: the last entry whose every predecessor in the reader's order is
        # acknowledged (another lineage may be acknowledged further, see restore()).
        runs = self.runs
        moved = False
        while runs and runs[0].end <= runs[0].stream.acked:
            r = runs.popleft()
            self.cursor = r.cursor
            self.entries_acked += r.entries
            moved = True
        if moved:
            self.agent.checkpoints_dirty = True
            self.lag()

    def _next_switch(self) -> int | None:
        first = self.ring[0].stream if self.ring else None
        return next((i for i, b in enumerate(self.ring) if b.stream is not first), None)

    def rewind(self, st: JStream, offset: int) -> None:
        st.ship_pos = offset
        st.rewind_seq = st.seq
        self.unsent = 0
        self.wake.set()

    def resync(self, st: JStream, offset: int, seq: int) -> None:
        if seq < st.rewind_seq:
            return  # sent before our last rewind
        if offset < st.acked:
            log.warning("journal %s: aggregator asks for stream %s from %d but acknowledged %d before;"
                        " rebasing", self.name, st.stream, offset, st.acked)
            st.base = offset = st.acked
            self.unsaved = True
        self.agent.resends += 1
        self.rewind(st, offset)

    def rewind_unacked(self) -> None:
        for st in self.streams.values():
            if st.ship_pos > st.acked:
                self.rewind(st, st.acked)

    # -- status --------------------------------------------------------------------------------

    def lag(self) -> tuple[int, float]:
        """Entries read and not acknowledged, and the seconds between the newest entry read and
        the last one acknowledged."""
        unread = self.unread()
        entries = sum(r.entries for r in self.runs) + unread
        newest = realtime_of(self.tail_cursor) if unread and self.tail_cursor else self.newest_realtime_us
        seconds = 0.0
        if entries and newest is not None:
            acked = realtime_of(self.cursor) if self.cursor else None
            first = self.ring[0].first_realtime_us if self.ring else None
            since = acked if acked is not None else first
            seconds = round(max(0, newest - since) / 1e6, 3) if since else 0.0
        self.last_lag = (entries, seconds)
        return self.last_lag

    def status(self) -> dict[str, Any]:
        lag_entries, lag_s = self.lag()
        current = next(reversed(self.streams.values()), None)
        return {"topic": self.cfg.topic, "machine": self.machine, "path": self.path,
                "matches": list(self.cfg.field_matches),
                "priority": self.cfg.priority, "stream": current.stream if current else None,
                "offset": current.acked if current else 0, "shipped": current.ship_pos if current else 0,
                "cursor": self.cursor, "entries_read": self.entries_read, "entries_acked": self.entries_acked,
                "entries_missing": self.entries_missing, "entries_cut": self.entries_cut,
                "lag_entries": lag_entries, "lag_s": lag_s,
                "reader_running": self.reader.proc is not None and self.reader.proc.returncode is None,
                "reader_restarts": self.restarts}


def _entries_before(lines: list[str], start: int, offset: int) -> tuple[int, int]:
    """How many entries of a batch starting at ``start`` end at or before ``offset``, and where
    the rest starts (an offset inside an entry skips that entry: it was delivered)."""
    n = 0
    while n < len(lines) and start < offset:
        start += len(lines[n].encode()) + 1
        n += 1
    return n, start


def _utc(us: int | None) -> str:
    if us is None:
        return "?"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(us / 1e6))
