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
from fleetlog.runtime import Wakeup

if TYPE_CHECKING:
    from aggregator.daemon import Aggregator
    from aggregator.security import Guard

log = logging.getLogger("fleetlog.aggregator.control")

# Requests of BACKGROUND commands (history: a read of files in a thread) running at once.
MAX_BACKGROUND = 8

_NOW = int(zmq.NOBLOCK)
_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)


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
        # Each served socket's plain shadow (for sends and receives) and its readiness.
        self._raw: dict[zmq.asyncio.Socket, tuple[zmq.Socket[bytes], Wakeup]] = {}
        self._look_after_sends = False
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
        """Take everything queued on ``sock`` each time its descriptor says so, through a plain
        (shadow) socket, as the data sockets are read (aggregator/ingest.py): no pyzmq future per
        message. Replies go out on the same shadow (see ``_after_sends``)."""
        raw: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
        readable = Wakeup()
        self._raw[sock] = (raw, readable)
        loop = asyncio.get_running_loop()
        fd = cast(int, raw.getsockopt(zmq.FD))
        loop.add_reader(fd, readable.set)
        try:
            while True:
                readable.clear()
                for _ in range(256):
                    try:
                        frames = raw.recv_multipart(_NOW, copy=False)
                    except zmq.Again:
                        break
                    await self.take(frames, sock, secure)
                else:
                    await asyncio.sleep(0)  # more is waiting: let the rest of the daemon run first
                    continue
                if self.after_message is not None:
                    self.after_message()
                # A second at most: a safety net should a signal be missed (a look costs one
                # empty receive; a heartbeat a second from each agent wakes it sooner anyway).
                await readable.wait(1.0)
        finally:
            loop.remove_reader(fd)
            self._raw.pop(sock, None)

    async def take(self, frames: list[zmq.Frame], sock: zmq.asyncio.Socket, secure: bool) -> None:
        """One control message: a hello, heartbeat or aggregatorctl request, answered."""
        self.messages_received += 1
        if len(frames) < 2:
            return
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
            return
        await self.handle(envelope, body.bytes, peer)

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
        except Exception as exc:
            # A bug in one command (the writer's rotate once raised AttributeError) must not stop
            # the daemon with it: the data path does not depend on it. ERROR: an agent whose
            # hello or heartbeat fails this way cannot ship.
            self.errors += 1
            log.error("control command %r failed (a bug, please report it; the daemon goes on)",
                      request["command"], exc_info=True)
            self.reply(peer.sock, envelope, wire.encode_reply(
                req_id, error=f"{request['command']}: internal error: {exc!r}"))
            return
        if req_id is not None:
            self.reply(peer.sock, envelope, wire.encode_reply(req_id, result))

    def reply(self, sock: zmq.asyncio.Socket, envelope: list[bytes], body: bytes) -> None:
        """Send without waiting; a reply that cannot go now (the peer's queue full) is dropped,
        as before: agents ask again (hello, heartbeat) and resend what was not acknowledged."""
        served = self._raw.get(sock)
        if served is None:  # not served (closing)
            return
        raw = served[0]
        try:
            # Part by part with int flags: send_multipart costs 2.8 us a reply against 1.3
            # (it combines enum flags per part), and a commit sends one ack to every agent.
            for frame in envelope:
                raw.send(frame, _MORE)
            raw.send(body, _NOW)
        except zmq.ZMQError as exc:
            log.debug("reply not sent: %s", exc)
        if not self._look_after_sends:
            self._look_after_sends = True
            asyncio.get_running_loop().call_soon(self._after_sends)

    def _after_sends(self) -> None:
        """A send may take the descriptor's signal of a message that came meanwhile: once after
        a round of sends (a commit's acks), ask each socket whether one is waiting."""
        self._look_after_sends = False
        for raw, readable in self._raw.values():
            if cast(int, raw.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                readable.set()

    def send_to(self, sock: zmq.asyncio.Socket, routing_id: bytes, body: bytes) -> None:
        self.reply(sock, [routing_id], body)

    def close(self) -> None:
        for task in self.background:
            task.cancel()
        for sock, _ in self.sockets:
            sock.close(linger=500)
        self.sockets = []
