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
from typing import Any

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
        self._hello_id: int | None = None
        self.sent_batches = 0
        self.sent_bytes = 0

    def connect(self) -> None:
        kind = zmq.PUSH if self.cfg.mode == "push" else zmq.PUB
        data = self.ctx.socket(kind)
        data.setsockopt(zmq.SNDHWM, PUSH_SNDHWM if kind == zmq.PUSH else PUB_SNDHWM)
        data.setsockopt(zmq.IMMEDIATE, 1)
        data.setsockopt(zmq.LINGER, 0)
        data.setsockopt(zmq.RECONNECT_IVL, 100)
        data.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        control = self.ctx.socket(zmq.DEALER)
        control.setsockopt(zmq.IDENTITY, self.cfg.name.encode()[:255])
        control.setsockopt(zmq.LINGER, 0)
        control.setsockopt(zmq.SNDHWM, 100)
        control.setsockopt(zmq.RECONNECT_IVL, 100)
        control.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        control.setsockopt(zmq.MAXMSGSIZE, 16 * 1024 * 1024)
        if self.cfg.curve_secret_key:
            keys = curve.load_secret(self.cfg.curve_secret_key)
            server = curve.load_public(self.cfg.curve_server_key)
            curve.as_client(data, keys, server)
            curve.as_client(control, keys, server)
        data.connect(self.cfg.data)
        control.connect(self.cfg.control)
        self.data, self.control = data, control
        self._data_raw = zmq.Socket.shadow(data.underlying)

    async def send(self, frames: list[bytes]) -> None:
        """Send now if ZeroMQ has room (no future needed), else wait for room."""
        assert self.data is not None and self._data_raw is not None
        raw = self._data_raw
        try:
            # Plain sends with int flags: send_multipart's loop and enum arithmetic cost more
            # than the sends themselves (2.5 -> 1.3 us a message).
            raw.send(frames[0], _MORE_NOW)
        except zmq.Again:
            await self.data.send_multipart(frames)
        else:
            # ZeroMQ takes a message's later parts once it took its first (the high-water mark
            # counts whole messages), so this never raises Again. Copied even when large: a
            # zero-copy send hands the buffer to pyzmq's garbage-collector thread, which cost
            # more than the copy (backlog: 88% -> 94% of the floor's throughput).
            raw.send(frames[1], _NOW)
        self.sent_batches += 1
        self.sent_bytes += len(frames[1])

    def request(self, command: str, args: dict[str, Any]) -> int:
        assert self.control is not None
        req_id = next(self._ids)
        try:
            self.control.send(wire.encode_request(req_id, command, args), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # not connected yet; the next heartbeat tries again
        return req_id

    def aggregator_alive(self, within_s: float) -> bool:
        """Heard from the aggregator lately (resending to nobody only fills queues)."""
        return asyncio.get_running_loop().time() - self.last_reply < within_s

    def hello(self) -> None:
        self._hello_id = self.request("hello", self.hello_args())

    async def heartbeat_loop(self) -> None:
        interval = self.cfg.heartbeat_interval_ms / 1000
        self.hello()
        while True:
            await asyncio.sleep(interval)
            if self._hello_id is not None and self.instance is None:
                self.hello()  # no answer yet: the aggregator may be down; ask again
            else:
                self.request("heartbeat", self.heartbeat_args())

    async def receive_loop(self) -> None:
        assert self.control is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                body = await self.control.recv()
            except zmq.Again:
                continue  # woken with nothing to read (seen with CURVE handshakes)
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
            result = msg.get("result") or {}
            instance = result.get("instance")
            if msg.get("id") == self._hello_id and instance:
                restarted = self.instance is not None and instance != self.instance
                self.instance = instance
                self._hello_id = None
                self.on_hello(result, restarted)
            elif instance and instance != self.instance:
                log.info("aggregator instance changed (%s -> %s): saying hello again",
                         self.instance, instance)
                self.hello()
                continue
            if "window" in result:
                self.on_window(result["window"])

    def close(self) -> None:
        for sock in (self.data, self.control):
            if sock is not None:
                sock.close(linger=0)
        self.data = self.control = None
