"""The agent's local control socket: ``fleetlog-agent status`` asks it what is followed."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
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
        if path and path.startswith("@"):
            path = None  # Linux's abstract namespace: no file to clear or protect
        if path:
            directory = os.path.dirname(path) or "."
            os.makedirs(directory, mode=0o750, exist_ok=True)
            if (problem := unsafe_directory(directory)) is not None:
                sock.close(linger=0)
                log.warning("status socket %s not bound: %s; `fleetlog-agent status` will not answer "
                            "(set agent.status_socket)", self.endpoint, problem)
                return
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


def unsafe_directory(directory: str) -> str | None:
    """Why a socket must not go into ``directory`` (under a shared /tmp: owned by someone else,
    a symlink, or writable by others), or None."""
    try:
        st = os.lstat(directory)
    except OSError as exc:
        return f"{directory}: {exc.strerror}"
    if not directory.startswith("/tmp/"):
        return None  # the operator's own choice of place (state_dir, status_socket)
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        return f"{directory} is not this user's own directory"
    return None
