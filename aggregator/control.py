"""The control plane: a ROUTER socket on every control endpoint.

Agents say hello, send heartbeats and receive ack/resync events on it; ``aggregatorctl`` sends
requests (``{id, command, args}``) and gets replies (``{id, ok, result|error}``). Each command
lives in ``aggregator/commands/<verb>.py``; the table is ``aggregator.commands.COMMANDS``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

import zmq
import zmq.asyncio

from aggregator.commands import COMMANDS
from aggregator.proxy import bind, detect_dead_links
from fleetlog import wire

if TYPE_CHECKING:
    from aggregator.daemon import Aggregator
    from aggregator.security import Guard

log = logging.getLogger("fleetlog.aggregator.control")

# Requests of BACKGROUND commands (history: a read of files in a thread) running at once.
MAX_BACKGROUND = 8


@dataclass(frozen=True, slots=True)
class Peer:
    routing_id: bytes
    address: str
    sock: zmq.asyncio.Socket
    secure: bool = False   # came in over CURVE (False: open mode or an ipc:// endpoint)
    user_id: str = ""      # the client's public key (z85) when secure


class ControlServer:
    """One ROUTER for all control endpoints; with CURVE on, a second one, plain, for the
    ipc:// endpoints (protected by file permissions instead)."""

    def __init__(self, agg: Aggregator | Any, ctx: zmq.asyncio.Context, endpoints: tuple[str, ...],
                 guard: Guard, commands: dict[str, ModuleType] | None = None) -> None:
        self.agg = agg
        # Another daemon (fleetlog-writer) answers its own subset of the commands.
        self.table = COMMANDS if commands is None else commands
        self.ctx = ctx
        self.endpoints = endpoints
        self.guard = guard
        self.sockets: list[tuple[zmq.asyncio.Socket, bool]] = []
        self.errors = 0
        # Every message taken off a control socket (hello, heartbeat, aggregatorctl...): a fleet in
        # a hello storm shows here first, and the tests' health check reads it.
        self.messages_received = 0
        self.commands: dict[str, int] = {}  # requests taken, by command
        self.background: set[asyncio.Task[None]] = set()
        # The aggregator's commit loop sleeps while idle: a hello may leave it work (an ack owed).
        self.after_message: Callable[[], None] | None = getattr(agg, "poke_commit", None)

    def bind(self) -> None:
        if self.guard.enabled:
            groups = [([e for e in self.endpoints if e.startswith("ipc://")], False),
                      ([e for e in self.endpoints if not e.startswith("ipc://")], True)]
        else:
            groups = [(list(self.endpoints), False)]
        try:
            for endpoints, secure in groups:
                if endpoints:
                    self.sockets.append((self._bind(endpoints, secure), secure))
        except zmq.ZMQError:
            self.close()
            raise

    def _bind(self, endpoints: list[str], secure: bool) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted agent takes its identity back
        sock.setsockopt(zmq.MAXMSGSIZE, 1024 * 1024)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.LINGER, 1000)
        detect_dead_links(sock)
        if secure:
            self.guard.protect(sock, endpoints, "control " + ", ".join(endpoints))
        try:
            for endpoint in endpoints:
                bind(sock, endpoint)
                if endpoint.startswith("ipc://"):
                    os.chmod(endpoint[len("ipc://"):], 0o660)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        return sock

    async def serve(self) -> None:
        await asyncio.gather(*(self._serve(sock, secure) for sock, secure in self.sockets))

    async def _serve(self, sock: zmq.asyncio.Socket, secure: bool) -> None:
        while True:
            try:
                frames = await sock.recv_multipart(copy=False)
            except zmq.Again:
                continue  # woken with nothing to read (seen with CURVE handshakes)
            self.messages_received += 1
            if len(frames) < 2:
                continue
            envelope = [f.bytes for f in frames[:-1]]
            body = frames[-1]
            try:
                address = str(body.get("Peer-Address"))
            except zmq.ZMQError:
                address = ""
            user_id = ""
            if secure:
                try:
                    user_id = str(body.get("User-Id"))
                except zmq.ZMQError:
                    user_id = ""
            peer = Peer(envelope[0], address or "local", sock, secure, user_id)
            if secure and self.guard.refuse_revoked(peer.address, user_id, "control"):
                # Admitted at its handshake, revoked since (the reload also cuts the connection;
                # this covers what arrives before the client reconnects).
                self.refuse(envelope, body.bytes, peer, "this agent's CURVE key is no longer authorised"
                            " (removed from the aggregator's key directories)")
                continue
            await self.handle(envelope, body.bytes, peer)
            if self.after_message is not None:
                self.after_message()

    def refuse(self, envelope: list[bytes], body: bytes, peer: Peer, error: str) -> None:
        """Answer a request with an error and nothing else."""
        try:
            request = wire.decode_control(body)
        except wire.WireError:
            return
        if "command" in request and request.get("id") is not None:
            self.reply(peer.sock, envelope, wire.encode_reply(request.get("id"), error=error))

    async def handle(self, envelope: list[bytes], body: bytes, peer: Peer) -> None:
        try:
            request = wire.decode_control(body)
        except wire.WireError as exc:
            self.agg.malformed(exc.reason, f"control:{peer.address}", str(exc))
            return
        if "command" not in request:
            return  # a stray reply or event; nothing to answer
        req_id = request.get("id")
        command = self.table.get(request["command"])
        if command is not None:
            self.commands[request["command"]] = self.commands.get(request["command"], 0) + 1
        if command is None:
            known = ", ".join(sorted(self.table))
            self.reply(peer.sock, envelope, wire.encode_reply(
                req_id, error=f"unknown command {request['command']!r}; known: {known}"))
            return
        if getattr(command, "ADMIN", False) and not self.guard.may_admin(peer.secure, peer.user_id):
            self.reply(peer.sock, envelope, wire.encode_reply(
                req_id, error=f"{request['command']} is an admin command: use the aggregator's ipc://"
                              " control socket or an admin key"))
            return
        if getattr(command, "BACKGROUND", False):
            # Answered when done, while the socket goes on serving agents; a few at a time.
            if len(self.background) >= MAX_BACKGROUND:
                self.reply(peer.sock, envelope, wire.encode_reply(
                    req_id, error=f"{request['command']}: busy ({MAX_BACKGROUND} such requests running);"
                                  " try again"))
                return
            task = asyncio.create_task(self.run(command, request, envelope, peer))
            self.background.add(task)
            task.add_done_callback(self._background_done)
            return
        await self.run(command, request, envelope, peer)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self.background.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.errors += 1
            log.warning("a control request failed: %r", exc)

    async def run(self, command: Any, request: dict[str, Any], envelope: list[bytes], peer: Peer) -> None:
        req_id = request.get("id")
        try:
            result = await command.run(self.agg, request["args"], peer)
        except (ValueError, KeyError, TypeError) as exc:
            self.errors += 1
            self.reply(peer.sock, envelope, wire.encode_reply(req_id, error=f"{request['command']}: {exc}"))
            return
        if req_id is not None:
            self.reply(peer.sock, envelope, wire.encode_reply(req_id, result))

    @staticmethod
    def reply(sock: zmq.asyncio.Socket, envelope: list[bytes], body: bytes) -> None:
        fut = cast("asyncio.Future[Any]", sock.send_multipart([*envelope, body], flags=zmq.NOBLOCK))
        # A non-blocking send's future is done at once; its error (EAGAIN) must be read here, or
        # asyncio reports "Future exception was never retrieved" with a traceback. (Sending
        # through the asyncio socket, not a shadow: it wakes the receive loop if it must.)
        if fut.done():
            if not fut.cancelled() and fut.exception() is not None:
                log.debug("reply not sent: %s", fut.exception())
        else:
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    def send_to(self, sock: zmq.asyncio.Socket, routing_id: bytes, body: bytes) -> None:
        self.reply(sock, [routing_id], body)

    def close(self) -> None:
        for task in self.background:
            task.cancel()
        for sock, _ in self.sockets:
            sock.close(linger=500)
        self.sockets = []
