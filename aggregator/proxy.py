"""The data sockets: PULL for push-mode agents, and the XSUB/XPUB proxy for pub-mode agents.

Unlike ``zmq.proxy`` this proxy looks at what it forwards: a message from XSUB is decoded,
checked and committed like one from PULL, and only accepted batches (from either socket) are
published on XPUB, so subscribers never see malformed frames nor resent duplicates.
Subscriptions travel the other way, from XPUB subscribers up to the publishers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import zmq
import zmq.asyncio

from aggregator.config import AggregatorConfig
from fleetlog import wire

log = logging.getLogger("fleetlog.aggregator.proxy")

# Enough queued messages to ride out a commit; beyond that PUSH peers block (backpressure)
# and PUB peers drop, which the agents' resending covers.
RCVHWM = 1000
# What a subscriber that does not read (``aggregatorctl tail`` into a pipe nobody reads) may
# cost the aggregator: ZeroMQ's high-water mark counts messages, not bytes, so published
# messages are cut to at most PUBLISH_MAX_BYTES of lines (a single longer line goes whole)
# and XPUB queues SUBSCRIBER_HWM of them per subscriber. Past that, XPUB drops that
# subscriber's messages (only its own); it learns so from the gap in its streams' offsets.
PUBLISH_MAX_BYTES = 256 * 1024
SUBSCRIBER_BUFFER_BYTES = 16 * 1024 * 1024
SUBSCRIBER_HWM = SUBSCRIBER_BUFFER_BYTES // PUBLISH_MAX_BYTES


# The listen queue of every bound socket. libzmq's default (100) overflows when a fleet of
# thousands reconnects at once (an aggregator restart): the kernel drops the SYNs past it, and
# each agent waits out a SYN retransmission (1 s, 3 s, 7 s...) or its own connect timeout and
# tries again, so the reconnection takes tens of seconds instead of one. Linux caps it at
# net.core.somaxconn (4096 since 5.4).
LISTEN_BACKLOG = 4096


def bind(sock: zmq.Socket, endpoint: str) -> None:  # type: ignore[type-arg]
    sock.setsockopt(zmq.BACKLOG, LISTEN_BACKLOG)
    if endpoint.startswith("ipc://"):
        directory = os.path.dirname(endpoint[len("ipc://"):])
        if directory:
            os.makedirs(directory, exist_ok=True)
    sock.bind(endpoint)


def detect_dead_links(sock: zmq.Socket, interval_ms: int = 1000) -> None:  # type: ignore[type-arg]
    """ZMTP heartbeats (libzmq 4.2+): a PING every ``interval_ms``, and a connection whose peer
    has not answered within five intervals is closed, so a link that died without FIN or RST
    (a partition, a host that lost power) is noticed in seconds, not after TCP's retransmissions
    give up (~15 min). Agents reconnect on their side (see agent/transport.py)."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, interval_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5 * interval_ms)
    sock.setsockopt(zmq.HEARTBEAT_TTL, 5 * interval_ms)


def bind_data_sockets(ctx: zmq.asyncio.Context, cfg: AggregatorConfig,
                      protect: Callable[[zmq.Socket], None],  # type: ignore[type-arg]
                      ) -> dict[str, zmq.asyncio.Socket]:
    """Bind pull, xsub and xpub; ``protect`` puts CURVE on each when keys are configured."""
    sockets: dict[str, zmq.asyncio.Socket] = {}
    # MAXMSGSIZE is twice the limit: a message over the limit (from an agent too old to measure
    # its batches) is then received, counted and logged as "oversized" by the decoder, rather than
    # dropping the connection without a word. Only beyond twice the limit does libzmq do that.
    try:
        pull = sockets["pull"] = ctx.socket(zmq.PULL)
        protect(pull)
        pull.setsockopt(zmq.RCVHWM, RCVHWM)
        detect_dead_links(pull)
        pull.setsockopt(zmq.MAXMSGSIZE, 2 * cfg.max_message_bytes + 4096)
        bind(pull, cfg.pull)
        xsub = sockets["xsub"] = ctx.socket(zmq.XSUB)
        protect(xsub)
        xsub.setsockopt(zmq.RCVHWM, RCVHWM)
        detect_dead_links(xsub)
        xsub.setsockopt(zmq.MAXMSGSIZE, 2 * cfg.max_message_bytes + 4096)
        bind(xsub, cfg.xsub)
        # Subscribe to everything: the aggregator writes every topic. XSUB replays this to
        # every publisher that connects later. (Plainly: the receive loop owns XSUB's descriptor.)
        zmq.Socket.shadow(xsub.underlying).send(b"\x01")
        xpub = sockets["xpub"] = ctx.socket(zmq.XPUB)
        protect(xpub)
        xpub.setsockopt(zmq.SNDHWM, SUBSCRIBER_HWM)
        xpub.setsockopt(zmq.MAXMSGSIZE, 4096)
        bind(xpub, cfg.xpub)
    except zmq.ZMQError:
        for sock in sockets.values():
            sock.close(linger=0)
        raise
    return sockets


def publish(xpub: zmq.asyncio.Socket, frames: Sequence[zmq.Frame | bytes], batch: wire.Batch) -> None:
    """Hand an accepted batch (``frames`` as received) to subscribers, as version 1 messages of
    at most PUBLISH_MAX_BYTES of lines; a slow subscriber loses messages, never blocks us."""
    size = sum(len(f.buffer if isinstance(f, zmq.Frame) else f) for f in frames)
    messages: Iterable[Sequence[zmq.Frame | bytes]]
    if size > PUBLISH_MAX_BYTES:
        messages = (wire.encode_batch(part) for part in _parts(batch, PUBLISH_MAX_BYTES))
    elif isinstance(batch.lines, list):
        messages = (frames,)
    else:
        messages = (wire.encode_batch(dataclasses.replace(batch, lines=batch.line_list())),)
    for message in messages:
        try:
            xpub.send_multipart(message, flags=zmq.NOBLOCK)
        except zmq.Again:
            return  # (XPUB drops rather than blocks; kept for a full pipe's other errors)


def _parts(batch: wire.Batch, max_bytes: int) -> Iterator[wire.Batch]:
    """``batch`` as version 1 batches of at most ``max_bytes`` of lines each (one line at least),
    with contiguous offsets that end at the batch's end, so subscribers can tell a gap."""
    if isinstance(batch.lines, str):
        # Version 2: newlines only end lines, so cut the text at the last newline of each part.
        data = batch.lines.encode("utf-8", "surrogatepass")
        pos, start = 0, batch.start
        while pos < len(data):
            cut = len(data) if len(data) - pos <= max_bytes else data.rfind(b"\n", pos, pos + max_bytes) + 1
            if cut <= pos:  # one line longer than max_bytes: it goes whole
                cut = data.index(b"\n", pos) + 1
            end = batch.end if cut == len(data) else min(start + cut - pos, batch.end)
            text = data[pos:cut].decode("utf-8", "surrogatepass")
            yield dataclasses.replace(batch, lines=wire.line_list(text), start=start, end=end)
            pos, start = cut, end
        return
    # Version 1 (multi-line records may hold newlines): line by line.
    lines = batch.lines
    start, first, taken = batch.start, 0, 0
    for i, line in enumerate(lines):
        n = len(line.encode("utf-8", "surrogatepass")) + 1
        if taken and taken + n > max_bytes:
            end = min(start + taken, batch.end)
            yield dataclasses.replace(batch, lines=lines[first:i], start=start, end=end)
            start, first, taken = end, i, 0
        taken += n
    yield dataclasses.replace(batch, lines=lines[first:], start=start, end=batch.end)


async def forward_subscriptions(xpub: zmq.asyncio.Socket, xsub: zmq.asyncio.Socket,
                                subscriptions: set[bytes], sent: Callable[[], None]) -> None:
    """Pass (un)subscriptions from subscribers up to the publishers, and keep the set of
    subscribed prefixes (XPUB reports the first subscription and the last unsubscription of each).

    Never the unsubscription of the empty prefix: publishers keep one subscription set per
    connection, so it would cancel the aggregator's own subscribe-to-everything.

    XSUB is read by the aggregator's receive loop from its descriptor, so it is written here
    through a plain socket (an awaited send would take that descriptor over); ``sent`` tells the
    receive loop to look again, as a send can consume the descriptor's signal.
    """
    raw: zmq.Socket[bytes] = zmq.Socket.shadow(xsub.underlying)
    while True:
        try:
            msg = await xpub.recv()
        except zmq.Again:
            continue
        kind, prefix = msg[:1], msg[1:]
        if kind == b"\x01":
            subscriptions.add(prefix)
        elif kind == b"\x00":
            subscriptions.discard(prefix)
            if not prefix:
                continue
        else:
            continue
        try:
            raw.send(msg, zmq.NOBLOCK)
        except zmq.Again:
            log.warning("could not pass a subscription on to the publishers (queue full)")
        sent()
