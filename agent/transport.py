"""Talking to the aggregator: the data socket (PUSH or PUB) and the control DEALER.

The control channel carries hello (on start and whenever the aggregator's instance id
changes, i.e. it restarted), heartbeats with this agent's lag, and the aggregator's events:
``ack`` (these streams are durable up to these offsets) and ``resync`` (this stream continues at
this offset; ship from there).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Any, cast

import zmq
import zmq.asyncio

from agent.config import AgentConfig
from fleetlog import curve, wire

log = logging.getLogger("fleetlog.agent.transport")

_MORE_NOW = int(zmq.SNDMORE | zmq.NOBLOCK)
_NOW = int(zmq.NOBLOCK)

# Messages queued in ZeroMQ per connection. The data socket queues only on a live connection
# (IMMEDIATE): with the aggregator down a send waits instead of piling up batches. PUSH waits
# for room at its high-water mark: 32 lets a burst of 32 files' batches go out without waiting
# (with 8, a tenth of the sends of 8 busy files waited, through a pyzmq future) and keeps a
# catch-up's queue in the agent small (45 MiB peak RSS catching up 15M lines; 62 MiB with 64).
# PUB drops at the mark instead, which costs a resync and a reread: it queues up to 64.
PUSH_SNDHWM = 32
HELLO_FIRST_RETRY_S = 0.02
PUB_SNDHWM = 64


class Transport:
    def __init__(self, ctx: zmq.asyncio.Context, cfg: AgentConfig,
                 on_event: Callable[[dict[str, Any]], None],
                 on_hello: Callable[[dict[str, Any], bool], None],
                 on_window: Callable[[Any], None],
                 hello_args: Callable[[], dict[str, Any]],
                 heartbeat_args: Callable[[], dict[str, Any]]) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.on_event = on_event
        self.on_hello = on_hello
        self.on_window = on_window
        self.hello_args = hello_args
        self.heartbeat_args = heartbeat_args
        self.data: zmq.asyncio.Socket | None = None
        self._data_raw: zmq.Socket | None = None  # type: ignore[type-arg]
        self.control: zmq.asyncio.Socket | None = None
        self.instance: str | None = None
        self.last_reply = 0.0  # loop.time() of the aggregator's last message
        self._ids = itertools.count(1)
        self._hellos: set[int] = set()  # ids of the hellos sent since the last answered one
        self._hello_sent_at = 0.0
        self._hello_backoff_s = HELLO_FIRST_RETRY_S
        self._goodbye_sent = False
        self.sent_batches = 0
        self.sent_bytes = 0
        # Control messages each way: steady at one heartbeat and its reply a beat (plus acks).
        self.control_sent = 0
        self.control_received = 0

    def connect(self) -> None:
        kind = zmq.PUSH if self.cfg.mode == "push" else zmq.PUB
        # Kept at once, so that close() closes them when a setting below fails (an open socket
        # would hold ctx.term(), and with it the exit, for ever).
        data = self.data = self.ctx.socket(kind)
        data.setsockopt(zmq.SNDHWM, PUSH_SNDHWM if kind == zmq.PUSH else PUB_SNDHWM)
        data.setsockopt(zmq.IMMEDIATE, 1)
        data.setsockopt(zmq.LINGER, 0)
        data.setsockopt(zmq.RECONNECT_IVL, 100)
        data.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        control = self.control = self.ctx.socket(zmq.DEALER)
        control.setsockopt(zmq.IDENTITY, self.cfg.name.encode()[:255])
        control.setsockopt(zmq.LINGER, 0)
        control.setsockopt(zmq.SNDHWM, 100)
        control.setsockopt(zmq.RECONNECT_IVL, 100)
        control.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        control.setsockopt(zmq.MAXMSGSIZE, 16 * 1024 * 1024)
        # Nothing queues while disconnected: heartbeats sent during an outage would otherwise all
        # reach the restarted aggregator at once, and all their replies name a new instance.
        control.setsockopt(zmq.IMMEDIATE, 1)
        if self.cfg.curve_secret_key:
            keys = curve.load_secret(self.cfg.curve_secret_key)
            server = curve.load_public(self.cfg.curve_server_key)
            curve.as_client(data, keys, server)
            curve.as_client(control, keys, server)
        beat = self.cfg.heartbeat_interval_ms
        ttl = min(3 * beat, 6_553_500)  # libzmq's HEARTBEAT_TTL is at most 6553.5 s
        for sock in (data, control):
            # A link that dies without FIN or RST (a partition) is noticed within three beats by
            # ZMTP heartbeats, and each reconnect attempt gives up after 2 s instead of waiting
            # out TCP's SYN back-off: shipping resumes within seconds of the network healing.
            sock.setsockopt(zmq.HEARTBEAT_IVL, beat)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * beat)
            sock.setsockopt(zmq.HEARTBEAT_TTL, ttl)
            sock.setsockopt(zmq.CONNECT_TIMEOUT, 2000)
        data.connect(self.cfg.data)
        control.connect(self.cfg.control)
        self._data_raw = zmq.Socket.shadow(data.underlying)

    async def send(self, frames: list[bytes]) -> None:
        """Send now if ZeroMQ has room (no future needed), else wait for room."""
        assert self.data is not None and self._data_raw is not None
        raw = self._data_raw
        while True:
            try:
                # Plain sends with int flags: send_multipart's loop and enum arithmetic cost more
                # than the sends themselves (2.5 -> 1.3 us a message).
                raw.send(frames[0], _MORE_NOW)
                break
            except zmq.Again:
                # No room (or no connection: IMMEDIATE): wait until there is, with a poll
                # rather than a send future, which, cancelled at shutdown, would be left
                # holding an exception nobody retrieves.
                await self.data.poll(1000, zmq.POLLOUT)  # type: ignore[call-arg]
        # ZeroMQ takes a message's later parts once it took its first (the high-water mark
        # counts whole messages), so this never raises Again. Copied even when large: a
        # zero-copy send hands the buffer to pyzmq's garbage-collector thread, which cost
        # more than the copy (backlog: 88% -> 94% of the floor's throughput).
        raw.send(frames[1], _NOW)
        self.sent_batches += 1
        self.sent_bytes += len(frames[1])

    def request(self, command: str, args: dict[str, Any]) -> int | None:
        """Send a request now; its id, or None when it could not go (not connected: the
        control socket queues nothing then, and the caller tries again later)."""
        assert self.control is not None
        req_id = next(self._ids)
        # The asyncio socket answers a send with a future, even with NOBLOCK: settled at once,
        # holding Again when the message could not go. Its exception is read here, so none is
        # ever left unretrieved (asyncio would log a traceback for each).
        sent = cast("asyncio.Future[Any]",
                    self.control.send(wire.encode_request(req_id, command, args), flags=zmq.NOBLOCK))
        if not sent.done():
            sent.add_done_callback(_retrieve)
        elif sent.exception() is not None:
            return None
        self.control_sent += 1
        return req_id

    def aggregator_alive(self, within_s: float) -> bool:
        """Heard from the aggregator lately (resending to nobody only fills queues)."""
        return asyncio.get_running_loop().time() - self.last_reply < within_s

    def last_reply_age_s(self) -> float | None:
        """Seconds since the aggregator last said anything (None: never): over a few heartbeat
        intervals, the link is down."""
        if not self.last_reply:
            return None
        return round(asyncio.get_running_loop().time() - self.last_reply, 1)

    def hello(self) -> None:
        """Introduce ourselves. Every hello sent since the last one answered is remembered: a
        reply to any of them is the answer (the aggregator may answer an older one first)."""
        req_id = self.request("hello", self.hello_args())
        if req_id is not None:
            self._hellos.add(req_id)
            self._hello_sent_at = asyncio.get_running_loop().time()

    def hello_in_flight(self) -> bool:
        """A hello went out and may still be answered: within the current back-off, which
        doubles from 20 ms to the heartbeat interval while hellos go unanswered."""
        return bool(self._hellos) and (asyncio.get_running_loop().time() - self._hello_sent_at
                                       < self._hello_backoff_s)

    def ask_hello(self) -> None:
        """Say hello unless one is in flight."""
        if not self.hello_in_flight():
            self.hello()

    async def heartbeat_loop(self) -> None:
        interval = self.cfg.heartbeat_interval_ms / 1000
        while True:
            if self.instance is None:
                # Until the first hello is answered, ask again with back-off from 20 ms (the
                # connection is usually up within a few) to the heartbeat interval (the
                # aggregator may be starting, or down).
                self.ask_hello()
                await asyncio.sleep(self._hello_backoff_s)
                self._hello_backoff_s = min(2 * self._hello_backoff_s, interval)
                continue
            await asyncio.sleep(interval)
            self.request("heartbeat", self.heartbeat_args())

    async def receive_loop(self) -> None:
        assert self.control is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                body = await self.control.recv()
            except zmq.Again:
                continue  # woken with nothing to read (seen with CURVE handshakes)
            self.control_received += 1
            try:
                msg = wire.decode_control(body)
            except wire.WireError as exc:
                log.warning("ignoring a malformed control message from the aggregator: %s", exc)
                continue
            self.last_reply = loop.time()
            if "event" in msg:
                self.on_event(msg)
                continue
            if not msg.get("ok"):
                log.warning("aggregator refused a request: %s", msg.get("error"))
                continue
            self.on_reply(msg.get("id"), msg.get("result") or {})

    def on_reply(self, req_id: Any, result: dict[str, Any]) -> None:
        """A hello or heartbeat reply. The state machine, which never loops on stale replies:

        * a reply to one of the hellos in flight is the answer: the instance it names is the
          aggregator we talk to (a restart if it differs from the one before);
        * any other reply naming another instance (a heartbeat answered by a restarted
          aggregator, or a stale hello reply) asks for one hello, unless one is in flight;
          replies queued during an outage therefore cost one hello, not one each.
        """
        instance = result.get("instance")
        if not isinstance(instance, str) or not instance:
            return
        if req_id in self._hellos:
            self._hellos.clear()
            self._hello_backoff_s = HELLO_FIRST_RETRY_S
            if instance == self.instance:
                pass  # an answer to a hello we sent again while the first was on its way
            else:
                restarted = self.instance is not None
                self.instance = instance
                self.on_hello(result, restarted)
        elif instance != self.instance:
            if not self.hello_in_flight():
                log.info("aggregator instance changed (%s -> %s): saying hello again",
                         self.instance, instance)
                self.ask_hello()
            return
        if "window" in result:
            self.on_window(result["window"])

    def goodbye(self) -> None:
        """Tell the aggregator we stop cleanly (best effort: the control socket lingers a
        moment on close so that it goes out)."""
        if self.control is not None and self.request("goodbye", {"agent": self.cfg.name}) is not None:
            self._goodbye_sent = True

    def close(self) -> None:
        if self.control is not None and self._goodbye_sent:
            self.control.close(linger=300)
            self.control = None
        for sock in (self.data, self.control):
            if sock is not None:
                sock.close(linger=0)
        self.data = self.control = None


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
