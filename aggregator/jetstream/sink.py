"""``JetStreamSink``: accepted batches queued per subject, published at each group commit with
JetStream's preconditions, and reconciled with the subject's last message when JetStream refuses or
answers "duplicate" (see the package's docstring; the retry rule is ``classify``)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nats.errors

from aggregator.config import JetStreamConfig
from aggregator.jetstream.link import (
    CONNECT_TIMEOUT_S,
    ERR_NO_MESSAGE,
    ERR_STORE_FAILED,
    JetStreamLink,
    JetStreamUnavailable,
    Refused,
)
from aggregator.jetstream.messages import Message, MessageBuilder, Piece, Subject, boundary, rest, take
from aggregator.jetstream.subjects import parse_headers, subject_for
from aggregator.sink import Accepted

log = logging.getLogger("fleetlog.aggregator.jetstream")

PUBLISH_ATTEMPTS = 3           # per message and commit, for timeouts / no responders / 503
BACKOFF_S = (0.1, 0.3, 1.0)    # between those attempts
RECONCILE_ROUNDS = 8           # refusals in a row on one subject in one commit before giving up
SUBJECTS_IN_FLIGHT = 512       # subjects published at once (each one message at a time)

# Nats-Expected-Last-Subject-Sequence did not match: 10071 names the sequence, 10164 ("wrong last
# sequence", no number) is what a clustered stream may answer instead to the loser of two
# aggregators' race (92 of 200 losers on an R3 stream of the pinned nats-server, a review's count).
ERR_WRONG_LAST_SEQUENCE = (10071, 10164)
# The same Nats-Msg-Id is being stored now: a retry that overtook its own first attempt (after a
# publish timeout, during an election). That attempt decides; ask again after a back-off.
ERR_MSG_ID_IN_PROCESS = 10158


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


class _Stuck(Exception):
    """This subject cannot go on in this commit; its batches stay queued. ``str`` says why;
    ``kind`` (full, down, timeout, refused, foreign, race) is what the log says once per change."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def classify(exc: BaseException) -> str:
    """The retry rule: "retry" (same headers, back-off), "full", "down" (no connection: wait for
    the reconnect), or "fail"."""
    if isinstance(exc, nats.errors.NoRespondersError | TimeoutError):
        return "retry"
    if isinstance(exc, Refused):
        if exc.code == ERR_STORE_FAILED or "exceeded" in exc.description:
            return "full"
        if exc.code in (10008, 10023, ERR_MSG_ID_IN_PROCESS) or "temporarily unavailable" in exc.description:
            return "retry"   # JetStream not ready / no quorum yet / our own retry still in flight
        return "fail"
    if isinstance(exc, nats.errors.ConnectionClosedError | nats.errors.OutboundBufferLimitError
                  | nats.errors.ConnectionReconnectingError | nats.errors.StaleConnectionError
                  | JetStreamUnavailable):
        return "down"
    return "fail"


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
        self.link = JetStreamLink(settings, name)
        self._subjects: dict[tuple[str, str, str], Subject] = {}
        # The kind of the last commit's error (full, down, timeout, race, refused, foreign), None
        # when it took everything: what the aggregator tells its agents of a hold.
        self.commit_error_kind: str | None = None
        self.counters = {
            "published": 0, "published_bytes": 0, "published_lines": 0, "duplicates": 0,
            "precondition_refusals": 0,
            "already_in": 0, "already_in_lines": 0, "already_in_bytes": 0, "resyncs": 0,
            "retries": 0, "full_refusals": 0, "split_messages": 0, "cut_lines": 0, "cut_bytes": 0,
            "reads": 0, "errors": 0, "gaps_accepted": 0,
        }
        self.builder = MessageBuilder(self.max_message_bytes, self.counters)

    # -- connection (aggregator/jetstream/link.py) ----------------------------------------------

    async def start(self, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Connect and create (or check) the stream. Never hangs: when no server answers within
        ``connect_timeout_s`` the sink reports "not connected" (``status()``, commits keep
        everything queued) and keeps trying in the background, forever."""
        await self.link.start(connect_timeout_s)

    async def close(self) -> None:
        """Stop reconnecting and close the connection (queued batches are dropped: they were
        never acknowledged, agents send them again)."""
        await self.link.close()

    def max_message_bytes(self) -> int:
        """The largest message (headers + payload, bytes) the connected server and the stream
        take: the server's max_payload, or the stream's max_msg_size when smaller."""
        return self.link.max_message_bytes()

    @property
    def connected(self) -> bool:
        return self.link.connected

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
            sub = self._subjects[key] = Subject(topic, agent, stream, subject_for(
                self.settings.subject_prefix, topic, agent, stream))
        encoded = None if fields is None else [json.dumps(f, separators=(",", ":")) for f in fields]
        if base is not None:
            sub.base = base
        sub.pieces.append(Piece(start, end, data, lines, path, received, encoded,
                                 exact=len(data) == end - start))

    def has_queued(self, topic: str, agent: str, stream: str) -> bool:
        """Whether batches of (agent, stream) in ``topic`` wait to be published (also during a
        commit that publishes them)."""
        sub = self._subjects.get((topic, agent, stream))
        return sub is not None and bool(sub.pieces)

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
        if not self.link.connected:
            return CommitOutcome(error=self.link.last_error or "not connected to NATS")
        if not await self.link.ensure_stream():
            return CommitOutcome(error=self.link.last_error)
        gate = asyncio.Semaphore(SUBJECTS_IN_FLIGHT)
        errors: list[_Stuck] = []

        async def one(sub: Subject, n: int) -> None:
            async with gate:
                try:
                    await self._commit_subject(sub, n, outcome)
                except _Stuck as exc:
                    errors.append(exc)

        await asyncio.gather(*(one(sub, len(sub.pieces)) for sub in subjects))
        if not errors:
            self.link.set_error("commit", None)
            self.commit_error_kind = None
            return outcome
        # The most telling first: a full stream, then lost connection, then the rest.
        errors.sort(key=lambda e: ("full", "down", "timeout", "race", "refused", "foreign").index(e.kind))
        more = f" (and {len(errors) - 1} more subject(s))" if len(errors) > 1 else ""
        self.link.set_error("commit", f"{errors[0]}{more}", errors[0].kind)
        self.commit_error_kind = errors[0].kind
        return CommitOutcome(outcome.acked, outcome.resync, f"{errors[0]}{more}")

    def forget(self, topic: str, agent: str, stream: str) -> None:
        """Drop a stream's cached position (the aggregator forgot the stream: ``stream_ttl_s``);
        its queued batches, if any, are dropped too (never acknowledged)."""
        self._subjects.pop((topic, agent, stream), None)

    async def _commit_subject(self, sub: Subject, n: int, outcome: CommitOutcome) -> None:
        """Publish the first ``n`` pieces of ``sub`` (fewer if pieces were resolved meanwhile)."""
        key = (sub.agent, sub.stream)
        n = min(n, len(sub.pieces))   # forget() may have emptied it while this waited its turn
        if n == 0:
            return
        target = sub.pieces[n - 1].end   # what this commit is about; later adds wait
        rounds = 0
        # Whether sub's view of the subject was read, or confirmed by a publish, in this commit.
        # A view kept from an earlier one is good enough to publish after (the precondition
        # refuses a publish after a stale one), never to resync an agent or accept a gap: another
        # aggregator may have written the subject since (the agent moved there and back).
        fresh = False
        while sub.pieces and sub.pieces[0].start < target:
            if sub.last_seq is None:
                await self._read_last(sub)
                fresh = True
            elif not fresh and not self._continues(sub):
                sub.last_seq = None
                continue
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
            message = self.builder.build(sub, target)
            answer = await self._publish(sub, message)
            if answer is None:   # refused or duplicate: the subject's last message decides
                rounds += 1
                if rounds > RECONCILE_ROUNDS:
                    raise _Stuck("race", f"{sub.name}: refused {rounds} times in a row"
                                 " (other aggregators writing the same stream?)")
                sub.last_seq = None
                continue
            sub.last_seq, sub.last_end = answer, message.end
            fresh = True
            done = take(sub, message)
            if done is not None:   # agents are acknowledged at their batches' ends only
                outcome.acked[key] = done

    @staticmethod
    def _view_end(sub: Subject) -> int | None:
        """Where sub's view of the subject ends: its last End; for an empty subject the stream's
        base (the agent's offset 0, or where it rebased); None without either (any start)."""
        return sub.last_end if sub.last_end is not None else sub.base

    @classmethod
    def _continues(cls, sub: Subject) -> bool:
        """Whether sub's queue begins where its view of the subject ends (publish on)."""
        last = cls._view_end(sub)
        return last is None or not sub.pieces or last == sub.pieces[0].start

    def _reconcile(self, sub: Subject, outcome: CommitOutcome) -> int | None:
        """Fit the queue to the subject's last End ``L``: drop what the stream already holds
        (acknowledged), cut a piece at ``L`` when ``L`` is one of its known boundaries. Returns
        the offset to resync the agent to when the queue cannot continue the subject: ``L`` lies
        before the queue (the stream lacks bytes we were not sent) or inside a piece at an offset
        that is not a known line boundary (a batch cut differently). None: publish on."""
        if self._continues(sub):
            return None
        last = self._view_end(sub)
        assert last is not None  # (_continues is True without one)
        key = (sub.agent, sub.stream)
        first = sub.pieces[0]
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
            self._already_in(done.count, len(done.data), whole=True)
            outcome.acked[key] = done.end
        if not sub.pieces or sub.pieces[0].start == last:
            return None
        piece = sub.pieces[0]
        cut = boundary(piece, last)
        if cut is None:
            return last
        sub.pieces[0] = rest(piece, last, *cut)
        self._already_in(cut[1], cut[0], whole=False)
        return None

    def _already_in(self, lines: int, size: int, whole: bool) -> None:
        """Count what the stream held already (dropped, never published twice): ``already_in``
        counts whole batches, ``already_in_lines``/``already_in_bytes`` every line and byte of
        them and of the fronts of batches cut at the stream's end. The aggregator's status adds
        the lines to its ``duplicates_dropped``."""
        if whole:
            self.counters["already_in"] += 1
        self.counters["already_in_lines"] += lines
        self.counters["already_in_bytes"] += size

    # -- JetStream calls ------------------------------------------------------------------------

    async def _publish(self, sub: Subject, message: Message) -> int | None:
        """Publish ``message``; its stream sequence when stored, None when refused by the
        precondition or answered "duplicate" (the caller rereads the subject). Raises _Stuck
        when it stays unknown (retries exhausted, no connection, stream full, other refusals)."""
        for attempt in range(PUBLISH_ATTEMPTS):
            try:
                if self.link.nc is None:
                    raise JetStreamUnavailable("not connected to NATS")
                reply = await self.link.nc.request(sub.name, message.payload, headers=message.headers,
                                                   timeout=self.settings.publish_timeout_s)
                answer = json.loads(reply.data)
                if "error" in answer:
                    err = answer["error"]
                    raise Refused(int(err.get("err_code", 0)), str(err.get("description", err)))
            except Refused as exc:
                if exc.code in ERR_WRONG_LAST_SEQUENCE:
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
                self.counters["published_lines"] += int(message.headers["Fleetlog-Lines"])
                return int(answer["seq"])
            await asyncio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
            self.counters["retries"] += 1
        raise _Stuck("timeout", f"{sub.name}: no answer from JetStream after {PUBLISH_ATTEMPTS} attempts")

    def _give_up_or_wait(self, sub: Subject, exc: BaseException, attempt: int) -> None:
        kind = classify(exc) if self.link.connected else "down"
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
                self.link.stream_ready = False
            raise _Stuck("timeout", f"{sub.name}: no answer from JetStream ({type(exc).__name__}: {exc})"
                         f" after {PUBLISH_ATTEMPTS} attempts (a leader election?)") from exc

    async def _read_last(self, sub: Subject) -> None:
        """Fill ``sub``'s cache from the subject's last message (a STREAM.MSG.GET by the leader,
        not a direct get from a replica that may lag). Raises _Stuck if it cannot be read."""
        body = json.dumps({"last_by_subj": sub.name}).encode()
        for attempt in range(PUBLISH_ATTEMPTS):
            try:
                answer = await self.link.api(f"STREAM.MSG.GET.{self.settings.stream}", body)
            except Refused as exc:
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
                headers = parse_headers(base64.b64decode(message.get("hdrs") or ""))
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
        sub = self._subjects.get(key) or Subject(topic, agent, stream, subject_for(
            self.settings.subject_prefix, topic, agent, stream))
        if sub.last_seq is None:
            try:
                await self._read_last(sub)
            except _Stuck as exc:
                raise JetStreamUnavailable(str(exc)) from exc
            self._subjects[key] = sub
        return sub.last_end

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The sink's state for the aggregator's status: ``connected`` (server host:port or None),
        ``stream``, ``replicas``, ``max_payload`` (bytes: ``max_message_bytes()``),
        ``queued_batches``, ``queued_bytes``, ``last_error`` (None when healthy) and the counters
        (published (messages), published_bytes, published_lines, duplicates,
        precondition_refusals, already_in (batches),
        already_in_lines, already_in_bytes, resyncs, retries, full_refusals, split_messages,
        cut_lines, cut_bytes, reads, errors, gaps_accepted) and ``reconnects`` (connections
        regained after a loss)."""
        batches, size = self.queued()
        url = self.link.nc.connected_url if self.link.connected and self.link.nc is not None else None
        return {
            "sink": "jetstream",
            "connected": url.netloc if url is not None else None,
            "stream": self.settings.stream,
            "replicas": self.settings.replicas,
            "max_payload": self.max_message_bytes() if self.link.nc is not None else None,
            "queued_batches": batches,
            "queued_bytes": size,
            "last_error": self.link.last_error,
            "reconnects": self.link.reconnects,
            **self.counters,
        }
