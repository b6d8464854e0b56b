"""The JetStream sink (``sink = "jetstream"``): accepted batches published into a NATS stream.

The stream is the acceptance table every aggregator shares. Each (topic, agent, stream) has its own
subject, and every message carries a ``Nats-Msg-Id`` built from (agent, stream, start, end) and a
``Nats-Expected-Last-Subject-Sequence`` precondition, so a subject only ever grows by the message
that continues it: a second copy is refused whoever sends it and whenever. When JetStream refuses
(wrong last sequence) or answers "duplicate", the sink reads the subject's last message and decides
from its ``Fleetlog-End`` (see ``JetStreamSink._reconcile``): already in (acknowledge), continue
after it, or resync the agent there. The message format is JETSTREAM-FORMAT.md; the README's
"NATS JetStream" section is the manual.

Retry rule (one place: ``_classify``): a timeout, "no responders" (no stream leader: an election)
and JetStream's 503 "temporarily unavailable" are retried with the same headers and a back-off,
a bounded number of times, then the batch stays queued for the next commit. A full stream (discard
new) keeps everything queued and says so, like a full disk. Anything else is an error of that
subject alone (logged once per state change), its batches stay queued.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NatsClient

from aggregator.config import JetStreamConfig
from aggregator.sink import Accepted

log = logging.getLogger("fleetlog.aggregator.jetstream")

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
# NATS/1.0 line, "Key: value\r\n" per header, and the blank line: what a header block costs.
_HDR_LINE_BYTES = len(b"NATS/1.0\r\n") + 2
_SIZE_MARGIN_BYTES = 256       # the server's own framing beside headers + payload, with room to spare
PUBLISH_ATTEMPTS = 3           # per message and commit, for timeouts / no responders / 503
BACKOFF_S = (0.1, 0.3, 1.0)    # between those attempts
RECONCILE_ROUNDS = 8           # refusals in a row on one subject in one commit before giving up
SUBJECTS_IN_FLIGHT = 512       # subjects published at once (each one message at a time)
CONNECT_TIMEOUT_S = 2.0        # the first connection attempt in start(); later ones run behind

ERR_WRONG_LAST_SEQUENCE = 10071   # Nats-Expected-Last-Subject-Sequence did not match
ERR_STORE_FAILED = 10077          # "maximum messages/bytes exceeded" (discard new), store failures
ERR_NO_MESSAGE = 10037            # STREAM.MSG.GET: the subject has no message
ERR_STREAM_NOT_FOUND = 10059


def escape_token(value: str) -> str:
    """``value`` as one subject token: every UTF-8 byte outside ``[A-Za-z0-9_-]`` becomes ``~``
    and two upper-case hex digits (``.`` is ``~2E``). Lone surrogates (bytes that were not UTF-8,
    kept by ``surrogateescape``) come back as their original bytes."""
    raw = value.encode("utf-8", "surrogateescape")
    return "".join(chr(b) if b in _SAFE else f"~{b:02X}" for b in raw)


def unescape_token(token: str) -> str:
    """The inverse of ``escape_token``; raises ValueError on a ``~`` not followed by two hex digits."""
    out = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "~":
            digits = token[i + 1:i + 3]
            if len(digits) != 2 or not all(c in "0123456789ABCDEFabcdef" for c in digits):
                raise ValueError(f"bad escape at {i} in subject token {token!r}")
            out.append(int(digits, 16))
            i += 3
        else:
            out.extend(token[i].encode())
            i += 1
    return out.decode("utf-8", "surrogateescape")


def subject_for(prefix: str, topic: str, agent: str, stream: str) -> str:
    """``<prefix>.<topic>.<agent>.<stream>``, each name escaped."""
    return f"{prefix}.{escape_token(topic)}.{escape_token(agent)}.{escape_token(stream)}"


def msg_id(agent: str, stream: str, start: int, end: int) -> str:
    """The ``Nats-Msg-Id`` of the message covering [start, end) of (agent, stream)."""
    return f"{escape_token(agent)}.{escape_token(stream)}.{start}.{end}"


class JetStreamUnavailable(ConnectionError):
    """No connection to NATS, or JetStream did not answer in time (the message says which)."""


@dataclass(frozen=True, slots=True)
class CommitOutcome:
    """What one ``commit()`` achieved.

    ``acked``: (agent, stream) -> end offset (bytes) up to which JetStream holds every batch that
    was queued: acknowledge the agent up to there. ``resync``: (agent, stream) -> offset from which
    the agent must send again (the stream holds exactly everything before it); that stream's queued
    batches were dropped. ``error``: why some batches are still queued (disconnected, timeouts,
    stream full, a refusal), or None when nothing is left of what was queued at the call.
    """

    acked: dict[tuple[str, str], int] = field(default_factory=dict)
    resync: dict[tuple[str, str], int] = field(default_factory=dict)
    error: str | None = None


@dataclass(slots=True)
class _Piece:
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
class _Subject:
    topic: str
    agent: str
    stream: str
    name: str
    pieces: list[_Piece] = field(default_factory=list)
    last_seq: int | None = None       # None: not read from the stream yet (or no longer trusted)
    last_end: int | None = None       # Fleetlog-End of the subject's last message; None: empty
    base: int | None = None           # where the agent says the stream began (None: not said)


@dataclass(slots=True)
class _Message:
    start: int
    end: int
    headers: dict[str, str]
    payload: bytes
    pieces: int                       # whole pieces it takes from the front
    part: tuple[int, int] | None      # or: (data bytes, lines) of the first piece


class _Refused(Exception):
    """A publish or read answered with a JetStream error (``code`` is JetStream's err_code)."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"{description} (err_code {code})")
        self.code = code
        self.description = description


class _Stuck(Exception):
    """This subject cannot go on in this commit; its batches stay queued. ``str`` says why;
    ``kind`` (full, down, timeout, refused, foreign, race) is what the log says once per change."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _classify(exc: BaseException) -> str:
    """The retry rule: "retry" (same headers, back-off), "full", "down" (no connection: wait for
    the reconnect), or "fail"."""
    if isinstance(exc, nats.errors.NoRespondersError | TimeoutError):
        return "retry"
    if isinstance(exc, _Refused):
        if exc.code == ERR_STORE_FAILED or "exceeded" in exc.description:
            return "full"
        if exc.code in (10008, 10023) or "temporarily unavailable" in exc.description:
            return "retry"   # JetStream not ready / no quorum yet
        return "fail"
    if isinstance(exc, nats.errors.ConnectionClosedError | nats.errors.OutboundBufferLimitError
                  | nats.errors.ConnectionReconnectingError | nats.errors.StaleConnectionError
                  | JetStreamUnavailable):
        return "down"
    return "fail"


def _parse_headers(block: bytes) -> dict[str, str]:
    lines = block.decode("ascii", "replace").split("\r\n")[1:]
    headers = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip()] = value.strip()
    return headers


def _header_bytes(headers: dict[str, str]) -> int:
    return _HDR_LINE_BYTES + sum(len(k) + len(v) + 4 for k, v in headers.items())


class JetStreamSink:
    """Publishes accepted batches into one JetStream stream, exactly once per source range.

    Use from one event loop: ``await start()``, then ``add(...)`` as batches are accepted and
    ``await commit()`` per group commit (never two commits at once; ``add`` may run while a commit
    waits), ``await close()`` at the end. Batches are acknowledged to agents only from a commit's
    ``CommitOutcome.acked``.
    """

    def __init__(self, settings: JetStreamConfig, clock: Callable[[], float] = time.time,
                 name: str = "fleetlog-aggregator") -> None:
        self.settings = settings
        self.clock = clock
        self.client_name = name
        self.nc: NatsClient | None = None
        self._connector: asyncio.Task[None] | None = None
        self._stream_ready = False
        self._stream_seen = False
        self._stream_differs: list[str] = []
        self._stream_max_msg_size = -1
        self._subjects: dict[tuple[str, str, str], _Subject] = {}
        self._last_error: str | None = None
        self._logged_state: dict[str, str] = {}
        self._errors: dict[str, str] = {}
        self._closing = False
        self.counters = {
            "published": 0, "published_bytes": 0, "duplicates": 0, "precondition_refusals": 0,
            "already_in": 0, "resyncs": 0, "retries": 0, "full_refusals": 0, "split_messages": 0,
            "cut_lines": 0, "cut_bytes": 0, "reads": 0, "errors": 0, "gaps_accepted": 0,
        }

    # -- connection -----------------------------------------------------------------------------

    async def start(self, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Connect and create (or check) the stream. Never hangs: when no server answers within
        ``connect_timeout_s`` the sink reports "not connected" (``status()``, commits keep
        everything queued) and keeps trying in the background, forever."""
        try:
            await self._connect(connect_timeout_s)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            self._set_error("connect", f"not connected to NATS {', '.join(self.settings.servers)}:"
                            f" {exc or type(exc).__name__}"
                            " (retrying in the background; nothing is acknowledged meanwhile)")
            self._connector = asyncio.create_task(self._connect_forever(), name="jetstream-connect")
            return
        await self._ensure_stream()

    async def _connect(self, timeout_s: float) -> None:
        s = self.settings
        options: dict[str, Any] = {
            "servers": list(s.servers), "name": self.client_name, "connect_timeout": timeout_s,
            "allow_reconnect": True, "max_reconnect_attempts": -1, "reconnect_time_wait": 1,
            "error_cb": self._on_error, "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        if s.credentials:
            options["user_credentials"] = s.credentials
        # nats-py tries each server once (connect_timeout each) before it gives up; bound it all.
        self.nc = await asyncio.wait_for(nats.connect(**options), timeout_s * (len(s.servers) + 1))
        self._set_error("connect", None)
        log.info("jetstream: connected to %s (max_payload %d bytes)", self.nc.connected_url.netloc
                 if self.nc.connected_url else "?", self.nc.max_payload)

    async def _connect_forever(self) -> None:
        delay = 0.5
        while not self._closing:
            await asyncio.sleep(delay)
            try:
                await self._connect(CONNECT_TIMEOUT_S)
            except (TimeoutError, OSError, nats.errors.Error):
                delay = min(delay * 2, 5.0)
                continue
            await self._ensure_stream()
            return

    async def _on_error(self, exc: Exception) -> None:
        log.debug("jetstream: client error: %s", exc)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            self._set_error("link", "disconnected from NATS (reconnecting)")

    async def _on_reconnected(self) -> None:
        url = self.nc.connected_url.netloc if self.nc and self.nc.connected_url else "?"
        self._set_error("link", None)
        log.info("jetstream: reconnected to %s", url)

    def max_message_bytes(self) -> int:
        """The largest message (headers + payload, bytes) the connected server and the stream
        take: the server's max_payload, or the stream's max_msg_size when smaller."""
        limit = self.nc.max_payload if self.nc is not None else 1024 * 1024
        return min(limit, self._stream_max_msg_size) if self._stream_max_msg_size > 0 else limit

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def _ensure_stream(self) -> bool:
        """Create the stream when missing; when it exists, WARN about what differs from the
        settings (never change it). False (and the error recorded) when JetStream did not answer."""
        if self._stream_ready:
            return True
        if self.nc is None:
            return False
        s = self.settings
        wanted: dict[str, Any] = {
            "name": s.stream, "subjects": [f"{s.subject_prefix}.>"], "storage": "file",
            "num_replicas": s.replicas, "retention": "limits", "discard": s.discard,
            "duplicate_window": int(s.duplicate_window_s * 1e9),
            "max_bytes": s.max_bytes or -1, "max_age": int(s.max_age_s * 1e9),
        }
        try:
            info = await self._api(f"STREAM.INFO.{s.stream}", b"")
        except _Refused as exc:
            if exc.code != ERR_STREAM_NOT_FOUND:
                self._set_error("stream", f"stream {s.stream}: {exc}")
                return False
            if self._stream_seen:
                log.warning("jetstream: stream %s is gone (deleted?): creating it again; what it held"
                            " is lost to the writers", s.stream)
            try:
                info = await self._api(f"STREAM.CREATE.{s.stream}", json.dumps(wanted).encode())
            except (_Refused, JetStreamUnavailable, nats.errors.Error, TimeoutError) as exc2:
                self._set_error("stream", f"stream {s.stream} cannot be created: {exc2}")
                return False
            log.info("jetstream: created stream %s (subjects %s, %d replica(s), dedup window %g s,"
                     " discard %s)", s.stream, wanted["subjects"][0], s.replicas, s.duplicate_window_s,
                     s.discard)
        except (JetStreamUnavailable, nats.errors.Error, TimeoutError) as exc:
            self._set_error("stream", f"stream {s.stream} cannot be checked: {exc or type(exc).__name__}")
            return False
        self._check_stream(info.get("config") or {}, wanted)
        # An operator may cap the stream's messages below the servers' max_payload.
        self._stream_max_msg_size = int((info.get("config") or {}).get("max_msg_size") or -1)
        self._set_error("stream", None)
        self._stream_ready = self._stream_seen = True
        return True

    def _check_stream(self, have: dict[str, Any], wanted: dict[str, Any]) -> None:
        differs = []
        if not any(subj in (have.get("subjects") or []) for subj in wanted["subjects"]):
            differs.append(f"subjects {have.get('subjects')} (need {wanted['subjects'][0]})")
        for key in ("num_replicas", "discard", "duplicate_window", "storage"):
            if key in have and have[key] != wanted[key]:
                differs.append(f"{key} {have[key]} (configured {wanted[key]})")
        if differs and differs != self._stream_differs:
            self._stream_differs = differs
            log.warning("jetstream: stream %s exists with other settings, left as it is: %s",
                        self.settings.stream, "; ".join(differs))

    async def _api(self, op: str, body: bytes) -> dict[str, Any]:
        """One JetStream API request ``$JS.API.<op>``: its decoded answer; raises _Refused with
        JetStream's error, JetStreamUnavailable when not connected, or the client's timeout /
        no-responders errors."""
        if self.nc is None or self.nc.is_closed:
            raise JetStreamUnavailable("not connected to NATS")
        msg = await self.nc.request(f"$JS.API.{op}", body, timeout=self.settings.publish_timeout_s)
        answer: dict[str, Any] = json.loads(msg.data)
        if "error" in answer:
            err = answer["error"]
            raise _Refused(int(err.get("err_code", 0)), str(err.get("description", err)))
        return answer

    async def close(self) -> None:
        """Stop reconnecting and close the connection (queued batches are dropped: they were
        never acknowledged, agents send them again)."""
        self._closing = True
        if self._connector is not None:
            self._connector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connector
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                await asyncio.wait_for(self.nc.close(), 5)

    # -- queueing -------------------------------------------------------------------------------

    def add(self, batch: Accepted) -> None:
        """The sink interface (aggregator/sink.py): queue one accepted batch (``queue``)."""
        self.queue(batch.topic, batch.agent, batch.stream, batch.start, batch.end, batch.lines,
                   batch.text, batch.path, batch.received, batch.fields, base=batch.base)

    def queue(self, topic: str, agent: str, stream: str, start: int, end: int, lines: int,
            text: str | bytes, path: str, received: float,
            fields: list[dict[str, Any]] | None = None, base: int | None = None) -> None:
        """Queue one accepted batch: source bytes [start, end) of (agent, stream) in ``topic``,
        ``lines`` lines in ``text`` (each ending in "\\n"; a str is encoded as UTF-8 with
        surrogateescape), read from ``path``, accepted at ``received`` (epoch seconds), with one
        fields object per line for journal entries. ``base``: where the stream began (the agent
        says; an empty subject must start there, else the agent resyncs to it: a first batch lost
        on the way, e.g. by a PUB socket before it connected, is never skipped; None: any start).
        Contiguous batches of one stream are sent in
        one message when they fit. Raises ValueError if ``fields`` does not match ``lines``."""
        data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
        if fields is not None and len(fields) != lines:
            raise ValueError(f"{len(fields)} fields objects for {lines} lines")
        key = (topic, agent, stream)
        sub = self._subjects.get(key)
        if sub is None:
            sub = self._subjects[key] = _Subject(topic, agent, stream, subject_for(
                self.settings.subject_prefix, topic, agent, stream))
        encoded = None if fields is None else [json.dumps(f, separators=(",", ":")) for f in fields]
        if base is not None:
            sub.base = base
        sub.pieces.append(_Piece(start, end, data, lines, path, received, encoded,
                                 exact=len(data) == end - start))

    def queued(self) -> tuple[int, int]:
        """(batches, bytes) queued and not yet in JetStream."""
        pieces = [p for sub in self._subjects.values() for p in sub.pieces]
        return len(pieces), sum(len(p.data) for p in pieces)

    # -- commit ---------------------------------------------------------------------------------

    async def commit(self) -> CommitOutcome:
        """Publish every batch queued at the call: all subjects at once, each subject's messages
        one after the other. Returns what JetStream acknowledged (``CommitOutcome``); what it did
        not stays queued for the next commit. Never raises for NATS trouble: ``error`` says it."""
        outcome = CommitOutcome()
        subjects = [sub for sub in self._subjects.values() if sub.pieces]
        if not subjects:
            return outcome
        if not self.connected:
            return CommitOutcome(error=self._last_error or "not connected to NATS")
        if not await self._ensure_stream():
            return CommitOutcome(error=self._last_error)
        gate = asyncio.Semaphore(SUBJECTS_IN_FLIGHT)
        errors: list[_Stuck] = []

        async def one(sub: _Subject, n: int) -> None:
            async with gate:
                try:
                    await self._commit_subject(sub, n, outcome)
                except _Stuck as exc:
                    errors.append(exc)

        await asyncio.gather(*(one(sub, len(sub.pieces)) for sub in subjects))
        if not errors:
            self._set_error("commit", None)
            return outcome
        # The most telling first: a full stream, then lost connection, then the rest.
        errors.sort(key=lambda e: ("full", "down", "timeout", "race", "refused", "foreign").index(e.kind))
        more = f" (and {len(errors) - 1} more subject(s))" if len(errors) > 1 else ""
        self._set_error("commit", f"{errors[0]}{more}", errors[0].kind)
        return CommitOutcome(outcome.acked, outcome.resync, f"{errors[0]}{more}")

    def forget(self, topic: str, agent: str, stream: str) -> None:
        """Drop a stream's cached position (the aggregator forgot the stream: ``stream_ttl_s``);
        its queued batches, if any, are dropped too (never acknowledged)."""
        self._subjects.pop((topic, agent, stream), None)

    async def _commit_subject(self, sub: _Subject, n: int, outcome: CommitOutcome) -> None:
        """Publish the first ``n`` pieces of ``sub`` (fewer if pieces were resolved meanwhile)."""
        key = (sub.agent, sub.stream)
        n = min(n, len(sub.pieces))   # forget() may have emptied it while this waited its turn
        if n == 0:
            return
        target = sub.pieces[n - 1].end   # what this commit is about; later adds wait
        rounds = 0
        while sub.pieces and sub.pieces[0].start < target:
            if sub.last_seq is None:
                await self._read_last(sub)
            resync = self._reconcile(sub, outcome)
            if resync is not None:
                self.counters["resyncs"] += 1
                log.warning("jetstream: %s: the stream holds %s up to %d, not what %s sent from %d;"
                            " %s resyncs there", sub.name, sub.stream, resync, sub.agent,
                            sub.pieces[0].start if sub.pieces else -1, sub.agent)
                sub.pieces.clear()
                outcome.resync[key] = resync
                outcome.acked.pop(key, None)
                return
            if not sub.pieces or sub.pieces[0].start >= target:
                return
            message = self._build(sub, target)
            answer = await self._publish(sub, message)
            if answer is None:   # refused or duplicate: the subject's last message decides
                rounds += 1
                if rounds > RECONCILE_ROUNDS:
                    raise _Stuck("race", f"{sub.name}: refused {rounds} times in a row"
                                 " (other aggregators writing the same stream?)")
                sub.last_seq = None
                continue
            sub.last_seq, sub.last_end = answer, message.end
            done = self._take(sub, message)
            if done is not None:   # agents are acknowledged at their batches' ends only
                outcome.acked[key] = done

    def _reconcile(self, sub: _Subject, outcome: CommitOutcome) -> int | None:
        """Fit the queue to the subject's last End ``L``: drop what the stream already holds
        (acknowledged), cut a piece at ``L`` when ``L`` is one of its known boundaries. Returns
        the offset to resync the agent to when the queue cannot continue the subject: ``L`` lies
        before the queue (the stream lacks bytes we were not sent) or inside a piece at an offset
        that is not a known line boundary (a batch cut differently). None: publish on."""
        # An empty subject continues from the stream's base (the agent's offset 0, or where it
        # rebased); without one it takes any start.
        last = sub.last_end if sub.last_end is not None else sub.base
        if last is None or not sub.pieces:
            return None
        key = (sub.agent, sub.stream)
        first = sub.pieces[0]
        if last == first.start:
            return None
        if last < first.start:
            if sub.last_end is not None and first.start == sub.base:
                # The agent's stream begins here now: it rebased because it cannot send what is
                # before (acknowledged, and the stream lost it: a crash with JetStream's default
                # sync_interval, or aged out). Asking again would loop; the gap stays, said.
                self.counters["gaps_accepted"] += 1
                log.error("jetstream: %s: the stream lacks bytes %d-%d of %s that %s had acknowledged"
                          " and can no longer send (lost by the stream); going on from %d", sub.name,
                          last, first.start, sub.stream, sub.agent, first.start)
                return None
            return last
        while sub.pieces and sub.pieces[0].end <= last:
            done = sub.pieces.pop(0)
            self.counters["already_in"] += 1
            outcome.acked[key] = done.end
        if not sub.pieces or sub.pieces[0].start == last:
            return None
        piece = sub.pieces[0]
        cut = self._boundary(piece, last)
        if cut is None:
            return last
        sub.pieces[0] = self._rest(piece, last, *cut)
        return None

    @staticmethod
    def _boundary(piece: _Piece, offset: int) -> tuple[int, int] | None:
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

    @staticmethod
    def _rest(piece: _Piece, offset: int, size: int, count: int) -> _Piece:
        fields = None if piece.fields is None else piece.fields[count:]
        cuts = {o: (b - size, n - count) for o, (b, n) in piece.cuts.items() if o > offset}
        return _Piece(offset, piece.end, piece.data[size:], piece.count - count, piece.path,
                      piece.received, fields, piece.exact, cuts)

    def _take(self, sub: _Subject, message: _Message) -> int | None:
        """Drop what ``message`` carried from the queue; the end of the last whole batch it
        completed, or None (a first part of a split batch)."""
        if message.part is not None:
            sub.pieces[0] = self._rest(sub.pieces[0], message.end, *message.part)
            return None
        done = sub.pieces[message.pieces - 1].end
        del sub.pieces[:message.pieces]
        return done

    # -- building messages ----------------------------------------------------------------------

    def _headers(self, sub: _Subject, piece: _Piece, start: int, end: int, lines: int,
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

    def _build(self, sub: _Subject, target: int) -> _Message:
        """The next message from the front of ``sub``'s queue (no piece ending after ``target``:
        batches added during this commit wait for the next), at most the server's max_payload
        with its headers: contiguous pieces of one path merged, a piece too large split at line
        boundaries, a single line too large cut (the agent's ``max_line_bytes`` rule: the rest of
        the line is dropped, counted, said once)."""
        assert self.nc is not None
        limit = self.max_message_bytes() - _SIZE_MARGIN_BYTES
        first = sub.pieces[0]
        # Headers with the longest numbers they can take: the budget never depends on the digits.
        base = _header_bytes(self._headers(sub, first, 10**19, 10**19, 10**19, None)) + len(
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
        headers = self._headers(sub, first, first.start, take[-1].end, count, fields)
        return _Message(first.start, take[-1].end, headers, payload, len(take), None)

    def _build_part(self, sub: _Subject, piece: _Piece, budget: int) -> _Message:
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
            return self._build(sub, piece.end)
        end = self._split_offset(piece, size, lines)
        piece.cuts[end] = (size, lines)
        self.counters["split_messages"] += 1
        fields = None if piece.fields is None else piece.fields[:lines]
        headers = self._headers(sub, piece, piece.start, end, lines, fields)
        return _Message(piece.start, end, headers, data[:size], 0, (size, lines))

    @staticmethod
    def _split_offset(piece: _Piece, size: int, lines: int) -> int:
        """The source offset after the first ``size`` bytes (``lines`` lines) of ``piece``: exact
        when the piece's text is its source bytes; otherwise an estimate kept strictly inside the
        piece (README: what that means if the aggregator dies between the parts)."""
        if piece.exact:
            return piece.start + size
        return max(piece.start + 1, min(piece.start + size, piece.end - (piece.count - lines)))

    def _cut_line(self, sub: _Subject, piece: _Piece, budget: int) -> None:
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
                        sub.name, nl + 1, self.max_message_bytes(), keep + 1)
        piece.data = piece.data[:keep] + piece.data[nl:]
        piece.exact = False
        piece.cuts = {}

    # -- JetStream calls ------------------------------------------------------------------------

    async def _publish(self, sub: _Subject, message: _Message) -> int | None:
        """Publish ``message``; its stream sequence when stored, None when refused by the
        precondition or answered "duplicate" (the caller rereads the subject). Raises _Stuck
        when it stays unknown (retries exhausted, no connection, stream full, other refusals)."""
        for attempt in range(PUBLISH_ATTEMPTS):
            try:
                if self.nc is None:
                    raise JetStreamUnavailable("not connected to NATS")
                reply = await self.nc.request(sub.name, message.payload, headers=message.headers,
                                              timeout=self.settings.publish_timeout_s)
                answer = json.loads(reply.data)
                if "error" in answer:
                    err = answer["error"]
                    raise _Refused(int(err.get("err_code", 0)), str(err.get("description", err)))
            except _Refused as exc:
                if exc.code == ERR_WRONG_LAST_SEQUENCE:
                    self.counters["precondition_refusals"] += 1
                    return None
                self._give_up_or_wait(sub, exc, attempt)
            except (TimeoutError, nats.errors.Error, JetStreamUnavailable, ValueError) as exc:
                self._give_up_or_wait(sub, exc, attempt)
            else:
                if answer.get("duplicate"):
                    # In already. The sequence it names is not trusted (2.10.14-2.10.29 answer 0
                    # after a leader change), so the caller rereads the subject's last message.
                    self.counters["duplicates"] += 1
                    return None
                self.counters["published"] += 1
                self.counters["published_bytes"] += len(message.payload)
                return int(answer["seq"])
            await asyncio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
            self.counters["retries"] += 1
        raise _Stuck("timeout", f"{sub.name}: no answer from JetStream after {PUBLISH_ATTEMPTS} attempts")

    def _give_up_or_wait(self, sub: _Subject, exc: BaseException, attempt: int) -> None:
        kind = _classify(exc) if self.connected else "down"
        if kind == "full":
            self.counters["full_refusals"] += 1
            raise _Stuck("full", f"stream full: {self.settings.stream} refuses new messages ({exc});"
                         " not acknowledging until there is room") from exc
        if kind == "down":
            raise _Stuck("down", f"not connected to NATS ({type(exc).__name__}: {exc})") from exc
        if kind == "fail":
            self.counters["errors"] += 1
            raise _Stuck("refused", f"{sub.name}: JetStream refused: {exc}") from exc
        if attempt == PUBLISH_ATTEMPTS - 1:
            if isinstance(exc, nats.errors.NoRespondersError):
                # Nobody takes the subject: an election, or the stream is gone (deleted). The
                # next commit checks the stream again and creates it when it is missing.
                self._stream_ready = False
            raise _Stuck("timeout", f"{sub.name}: no answer from JetStream ({type(exc).__name__}: {exc})"
                         f" after {PUBLISH_ATTEMPTS} attempts (a leader election?)") from exc

    async def _read_last(self, sub: _Subject) -> None:
        """Fill ``sub``'s cache from the subject's last message (a STREAM.MSG.GET by the leader,
        not a direct get from a replica that may lag). Raises _Stuck if it cannot be read."""
        body = json.dumps({"last_by_subj": sub.name}).encode()
        for attempt in range(PUBLISH_ATTEMPTS):
            try:
                answer = await self._api(f"STREAM.MSG.GET.{self.settings.stream}", body)
            except _Refused as exc:
                if exc.code == ERR_NO_MESSAGE:
                    sub.last_seq, sub.last_end = 0, None
                    self.counters["reads"] += 1
                    return
                self._give_up_or_wait(sub, exc, attempt)
            except (TimeoutError, nats.errors.Error, JetStreamUnavailable) as exc:
                self._give_up_or_wait(sub, exc, attempt)
            else:
                self.counters["reads"] += 1
                message = answer["message"]
                headers = _parse_headers(base64.b64decode(message.get("hdrs") or ""))
                if "Fleetlog-End" not in headers or not headers["Fleetlog-End"].isdigit():
                    self.counters["errors"] += 1
                    raise _Stuck("foreign", f"{sub.name}: its last message (sequence"
                                 f" {message.get('seq')}) has no Fleetlog-End header: not fleetlog's;"
                                 " not publishing after it")
                sub.last_seq, sub.last_end = int(message["seq"]), int(headers["Fleetlog-End"])
                return
            await asyncio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
            self.counters["retries"] += 1

    async def last_end(self, topic: str, agent: str, stream: str) -> int | None:
        """The end offset of what the stream holds for (agent, stream) in ``topic`` (the
        ``Fleetlog-End`` of its subject's last message), None if nothing. Raises
        JetStreamUnavailable when it cannot be read now."""
        key = (topic, agent, stream)
        sub = self._subjects.get(key) or _Subject(topic, agent, stream, subject_for(
            self.settings.subject_prefix, topic, agent, stream))
        if sub.last_seq is None:
            try:
                await self._read_last(sub)
            except _Stuck as exc:
                raise JetStreamUnavailable(str(exc)) from exc
            self._subjects[key] = sub
        return sub.last_end

    # -- status ---------------------------------------------------------------------------------

    def _set_error(self, state: str, message: str | None, kind: str = "") -> None:
        """Record the error of one state (connect, link, stream, commit) and log it once per
        change of its kind: ERROR while batches wait for JetStream (WARNING for the link alone),
        INFO when it is over."""
        if message is None:
            self._errors.pop(state, None)
            if self._logged_state.pop(state, None) is not None:
                log.info("jetstream: %s recovered", state)
        else:
            self._errors[state] = message
            if self._logged_state.get(state) != (kind or message):
                self._logged_state[state] = kind or message
                # A lost link alone is worked around (reconnecting); batches waiting are at risk.
                log.log(logging.WARNING if state == "link" else logging.ERROR, "jetstream: %s", message)
        self._last_error = next(iter(self._errors.values()), None)

    def status(self) -> dict[str, Any]:
        """The sink's state for the aggregator's status: ``connected`` (server host:port or None),
        ``stream``, ``replicas``, ``max_payload`` (bytes: ``max_message_bytes()``),
        ``queued_batches``, ``queued_bytes``, ``last_error`` (None when healthy) and the counters
        (published, published_bytes, duplicates, precondition_refusals, already_in, resyncs,
        retries, full_refusals, split_messages, cut_lines, cut_bytes, reads, errors)."""
        batches, size = self.queued()
        url = self.nc.connected_url if self.connected and self.nc is not None else None
        return {
            "sink": "jetstream",
            "connected": url.netloc if url is not None else None,
            "stream": self.settings.stream,
            "replicas": self.settings.replicas,
            "max_payload": self.max_message_bytes() if self.nc is not None else None,
            "queued_batches": batches,
            "queued_bytes": size,
            "last_error": self._last_error,
            **self.counters,
        }
