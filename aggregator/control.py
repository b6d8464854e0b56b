"""The control plane: a ROUTER socket on every control endpoint.

Agents say hello, send heartbeats and receive ack/resync events on it; ``aggregatorctl`` sends
requests (``{id, command, args}``) and gets replies (``{id, ok, result|error}``). Each command
lives in ``aggregator/commands/<verb>.py``; the table is ``aggregator.commands.COMMANDS``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zmq
import zmq.asyncio

from aggregator.commands import COMMANDS
from aggregator.proxy import bind
from fleetlog import wire

if TYPE_CHECKING:
    from aggregator.daemon import Aggregator

log = logging.getLogger("fleetlog.aggregator.control")


@dataclass(frozen=True, slots=True)
class Peer:
    routing_id: bytes
    address: str


class ControlServer:
    def __init__(self, agg: Aggregator, ctx: zmq.asyncio.Context, endpoints: tuple[str, ...]) -> None:
        self.agg = agg
        self.ctx = ctx
        self.endpoints = endpoints
        self.sock: zmq.asyncio.Socket | None = None
        self.errors = 0

    def bind(self) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted agent takes its identity back
        sock.setsockopt(zmq.MAXMSGSIZE, 1024 * 1024)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.LINGER, 1000)
        try:
            for endpoint in self.endpoints:
                bind(sock, endpoint)
                if endpoint.startswith("ipc://"):
                    os.chmod(endpoint[len("ipc://"):], 0o660)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        self.sock = sock

    async def serve(self) -> None:
        assert self.sock is not None
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            if len(frames) < 2:
                continue
            envelope = [f.bytes for f in frames[:-1]]
            body = frames[-1]
            try:
                address = body.get("Peer-Address")
            except zmq.ZMQError:
                address = ""
            peer = Peer(envelope[0], address or "local")
            await self.handle(envelope, body.bytes, peer)

    async def handle(self, envelope: list[bytes], body: bytes, peer: Peer) -> None:
        try:
            request = wire.decode_control(body)
        except wire.WireError as exc:
            self.agg.malformed(exc.reason, f"control:{peer.address}", str(exc))
            return
        if "command" not in request:
            return  # a stray reply or event; nothing to answer
        req_id = request.get("id")
        command = COMMANDS.get(request["command"])
        if command is None:
            known = ", ".join(sorted(COMMANDS))
            self.reply(envelope, wire.encode_reply(
                req_id, error=f"unknown command {request['command']!r}; known: {known}"))
            return
        try:
            result = await command.run(self.agg, request["args"], peer)
        except (ValueError, KeyError, TypeError) as exc:
            self.errors += 1
            self.reply(envelope, wire.encode_reply(req_id, error=f"{request['command']}: {exc}"))
            return
        if req_id is not None:
            self.reply(envelope, wire.encode_reply(req_id, result))

    def reply(self, envelope: list[bytes], body: bytes) -> None:
        assert self.sock is not None
        try:
            self.sock.send_multipart([*envelope, body], flags=zmq.NOBLOCK)
        except (zmq.Again, zmq.ZMQError) as exc:
            log.debug("reply not sent: %s", exc)

    def send_to(self, routing_id: bytes, body: bytes) -> None:
        self.reply([routing_id], body)

    async def flush(self) -> None:
        """Replies are queued in ZeroMQ; closing with linger sends them."""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=500)
            self.sock = None
