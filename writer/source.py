"""Reading the JetStream stream: the connection, a fresh ephemeral consumer, and what the stream
still holds.

The writer owns its position (the commit journal), so the server keeps none for it: every start,
reconnect or detected gap makes a new ephemeral pull consumer that delivers from a given stream
sequence with no acknowledgements (``AckPolicy.NONE``). A durable consumer with acks would
redeliver, after a kill -9, what was not acknowledged *after* messages it had delivered since,
and per-subject order is the product's promise. The consumer is in memory, one replica, and the
server removes it ``INACTIVE_THRESHOLD_S`` after this writer stops pulling.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

log = logging.getLogger("fleetlog.writer.source")

INACTIVE_THRESHOLD_S = 30.0
# The errors a request to the server can end with while it, or the route to it, is away.
NATS_ERRORS: tuple[type[BaseException], ...] = (nats.errors.Error, nats.js.errors.Error, TimeoutError,
                                                OSError)


@dataclass
class StreamState:
    first_seq: int = 0
    last_seq: int = 0
    messages: int = 0
    bytes: int = 0
    created: str = ""   # the stream's creation time: another value means it was made anew


class Source:
    """The NATS connection and the current consumer of one stream."""

    def __init__(self, servers: tuple[str, ...], stream: str, subject_prefix: str,
                 credentials: str = "") -> None:
        self.servers = servers
        self.stream = stream
        self.subjects = f"{subject_prefix}.>"
        self.credentials = credentials
        self.nc: Client | None = None
        self.sub: Any = None           # the PullSubscription of the current consumer
        self.consumer: str | None = None
        self.connected = False
        self.error: str | None = None  # why we cannot read now (for status), None when we can
        self.consumers_made = 0
        self.closing = False  # our own close: its disconnect is no news

    async def connect(self) -> None:
        """Connect (raises one of NATS_ERRORS when no server answers); the client reconnects by
        itself afterwards, and the callbacks say so once per change."""
        async def disconnected() -> None:
            if self.connected and not self.closing:
                log.warning("lost the NATS connection; reconnecting (nothing is lost: reading"
                            " resumes after the last applied message)")
            self.connected = False

        async def reconnected() -> None:
            self.connected = True
            url = self.nc.connected_url.netloc if self.nc and self.nc.connected_url else "?"
            log.info("reconnected to NATS at %s", url)

        async def error(exc: Exception) -> None:
            log.debug("NATS client: %s", exc)

        self.closing = False
        options: dict[str, Any] = {}
        if self.credentials:
            options["user_credentials"] = self.credentials
        # A bounded first connect (each server twice), so that "no server answers" reaches the
        # log and status; once connected, the client reconnects for ever by itself.
        nc = await nats.connect(
            servers=list(self.servers), name="fleetlog-writer", allow_reconnect=True,
            max_reconnect_attempts=1, reconnect_time_wait=1, connect_timeout=2,
            disconnected_cb=disconnected, reconnected_cb=reconnected, error_cb=error, **options)
        nc.options["max_reconnect_attempts"] = -1
        self.nc = nc
        self.connected = True

    async def stream_state(self) -> StreamState:
        """The stream's sequences now (raises nats.js.errors.NotFoundError if it does not exist)."""
        assert self.nc is not None
        info = await self.nc.jetstream().stream_info(self.stream)
        state = info.state
        created = getattr(info, "created", None)
        return StreamState(first_seq=state.first_seq, last_seq=state.last_seq, messages=state.messages,
                           bytes=state.bytes, created=str(created or ""))

    async def open_consumer(self, start_seq: int) -> None:
        """A new ephemeral consumer delivering from ``start_seq`` (the old one is dropped)."""
        assert self.nc is not None
        await self.close_consumer()
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, start_seq),
            ack_policy=api.AckPolicy.NONE, mem_storage=True, num_replicas=1,
            inactive_threshold=INACTIVE_THRESHOLD_S, max_waiting=16)
        self.sub = await self.nc.jetstream().pull_subscribe(self.subjects, stream=self.stream, config=config)
        self.consumer = config.name
        self.consumers_made += 1
        log.debug("consumer %s reads %s from sequence %d", self.consumer, self.stream, start_seq)

    async def fetch(self, batch: int, timeout_s: float) -> list[Msg]:
        """Up to ``batch`` messages in stream order; [] when none came within ``timeout_s``."""
        assert self.sub is not None
        try:
            msgs: list[Msg] = await self.sub.fetch(batch, timeout=timeout_s)
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        return msgs

    async def pending(self) -> int | None:
        """Messages under the prefix after those delivered to this writer (the consumer's count)
        plus those delivered and still buffered here; None without a consumer (or if it is gone:
        raises nats.js.errors.NotFoundError then)."""
        if self.nc is None or self.sub is None or self.consumer is None:
            return None
        info = await self.nc.jetstream().consumer_info(self.stream, self.consumer, timeout=2)
        return int(info.num_pending or 0) + int(self.sub.pending_msgs)

    async def holds(self, seq: int) -> str | None:
        """What the stream holds at ``seq``: "ours" (a message under the subject prefix), "other"
        (another subject: the consumer's filter skips it), "gone" (removed); None: could not tell."""
        assert self.nc is not None
        try:
            msg = await self.nc.jetstream().get_msg(self.stream, seq)
        except nats.js.errors.NotFoundError:
            return "gone"
        except NATS_ERRORS:
            return None
        return "ours" if (msg.subject or "").startswith(self.subjects[:-1]) else "other"

    async def msg_id_at(self, seq: int) -> str | None:
        """The Nats-Msg-Id of the message the stream holds at ``seq`` ("" if it has none), or None
        when it holds none there or cannot say now."""
        assert self.nc is not None
        try:
            msg = await self.nc.jetstream().get_msg(self.stream, seq)
        except NATS_ERRORS:
            return None
        return str((msg.headers or {}).get("Nats-Msg-Id", ""))

    async def received_at(self, seq: int) -> float | None:
        """When the stream stored the first message at or after ``seq`` (epoch seconds), or None."""
        assert self.nc is not None
        try:
            msg = await self.nc.jetstream().get_msg(self.stream, seq, subject=self.subjects, next=True)
        except NATS_ERRORS:
            return None
        when = getattr(msg, "time", None)
        return when.timestamp() if when is not None else None

    async def close_consumer(self) -> None:
        sub, self.sub, self.consumer = self.sub, None, None
        if sub is not None:
            with contextlib.suppress(*NATS_ERRORS):
                await sub.unsubscribe()

    async def close(self) -> None:
        await self.close_consumer()
        nc, self.nc = self.nc, None
        self.closing = True
        if nc is not None:
            with contextlib.suppress(*NATS_ERRORS):
                await nc.close()
        self.connected = False
