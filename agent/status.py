"""The agent's local control socket: ``fleetlog-agent status`` asks it what is followed."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING

import zmq
import zmq.asyncio

from fleetlog import wire

if TYPE_CHECKING:
    from agent.daemon import Agent

log = logging.getLogger("fleetlog.agent.status")


class StatusServer:
    def __init__(self, agent: Agent, ctx: zmq.asyncio.Context, endpoint: str) -> None:
        self.agent = agent
        self.ctx = ctx
        self.endpoint = endpoint
        self.sock: zmq.asyncio.Socket | None = None

    def bind(self) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, 64 * 1024)
        path = self.endpoint[len("ipc://"):] if self.endpoint.startswith("ipc://") else None
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # left by a killed agent; binding would fail or hijack it
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            log.warning("status socket %s not available (%s); `fleetlog-agent status` will not answer",
                        self.endpoint, exc)
            return
        if path:
            os.chmod(path, 0o660)
        self.sock = sock

    async def serve(self) -> None:
        if self.sock is None:
            return
        while True:
            try:
                frames = await self.sock.recv_multipart()
            except zmq.Again:
                continue
            if len(frames) < 2:
                continue
            try:
                req = wire.decode_control(frames[-1])
            except wire.WireError:
                continue
            if req.get("command") == "status":
                try:
                    reply = wire.encode_reply(req.get("id"), self.agent.status())
                except (TypeError, ValueError) as exc:  # a value JSON cannot carry: a bug, not a stop
                    log.error("status reply failed: %s", exc)
                    reply = wire.encode_reply(req.get("id"), error=f"status failed: {exc}")
            else:
                reply = wire.encode_reply(req.get("id"), error=f"unknown command {req.get('command')!r}")
            with contextlib.suppress(zmq.ZMQError):
                await self.sock.send_multipart([*frames[:-1], reply])

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
