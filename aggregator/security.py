"""Who may talk to the aggregator: CurveZMQ on every network socket when keys are configured.

* Off (no ``curve_secret_key``): the aggregator runs open, for trusted networks and tests;
  every command is accepted on every control endpoint.
* On: pull, xsub, xpub and the tcp control endpoints require CURVE, and a ZAP handler (here,
  on the event loop) admits only the public keys in ``authorized_keys_dir`` and
  ``admin_keys_dir`` (deny by default). ipc:// control endpoints stay plain, protected by the
  socket file's permissions (0660). Admin commands (rotate, reload) are accepted over ipc:// or
  from a key in ``admin_keys_dir``; read-only ones (status, tail) from any admitted key. SIGHUP
  reloads the key directories.

Refusals (a key not authorised, a client without CURVE, a client holding a stale server key, a
revoked key still talking) are counted per peer address, key and reason (``refusals`` in status
and metrics) and logged once per peer, key and reason. ZAP only runs at the handshake, so a
reload that removes a key also cuts the live connections: every secure endpoint is unbound and
bound again (each client reconnects and shakes hands anew; what was in flight is resent by the
agents), and the control plane refuses messages from a key no longer authorised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio
import zmq.utils.z85

from aggregator.config import AggregatorConfig
from fleetlog import curve

log = logging.getLogger("fleetlog.aggregator.security")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
# Distinct (address, key, reason) kept for status and metrics; the oldest go first.
MAX_REFUSED_PEERS = 1000

REASONS = {
    "unknown_key": "a CURVE key not in authorized_keys_dir or admin_keys_dir",
    "revoked_key": "a key removed from the key directories by a reload",
    "no_curve": "a client without CURVE keys (plain ZeroMQ)",
    "bad_server_key": "a client whose curve_server_key is not this aggregator's public key",
    "protocol": "a ZeroMQ handshake error",
}
_PROTOCOL_REASONS: dict[int, str] = {
    int(zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH): "no_curve",
    int(zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC): "bad_server_key",
}


@dataclass
class Refused:
    address: str
    key: str
    reason: str
    count: int = 0
    first: float = 0.0  # time.time()
    last: float = 0.0


class Refusals:
    """Refusals per (peer address, key, reason): counted, and logged at the first of each."""

    def __init__(self) -> None:
        self.total = 0
        self.by_reason: dict[str, int] = {}
        self.peers: dict[tuple[str, str, str], Refused] = {}

    def add(self, address: str, key: str, reason: str, where: str) -> None:
        self.total += 1
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        now = time.time()
        entry = self.peers.get((address, key, reason))
        if entry is None:
            if len(self.peers) >= MAX_REFUSED_PEERS:
                del self.peers[next(iter(self.peers))]
            entry = self.peers[(address, key, reason)] = Refused(address, key, reason, first=now)
            log.warning("refused %s from %s%s on %s: %s (logged once per peer, key and reason;"
                        " counted in status)", reason.replace("_", " "), address or "an unknown address",
                        f" with key {key}" if key else "", where, REASONS[reason])
        entry.count += 1
        entry.last = now

    def status(self) -> dict[str, Any]:
        recent = sorted(self.peers.values(), key=lambda r: -r.last)[:100]
        return {"total": self.total, "by_reason": dict(self.by_reason),
                "peers": [{"address": r.address, "key": r.key, "reason": r.reason, "count": r.count,
                           "last_s": round(time.time() - r.last, 1)} for r in recent]}


class Guard:
    def __init__(self, cfg: AggregatorConfig) -> None:
        self.keys: curve.KeyPair | None = None
        self.allowed: set[bytes] = set()
        self.admins: set[bytes] = set()
        self.refusals = Refusals()
        self.revoked: set[bytes] = set()  # keys removed by a reload since the start
        self._cfg = cfg
        self._ctx: zmq.asyncio.Context | None = None
        self._zap: zmq.asyncio.Socket | None = None
        self._monitors: list[zmq.asyncio.Socket] = []
        self._tasks: list[asyncio.Task[None]] = []
        # Secure sockets and where they are bound (None: the socket's one bound endpoint).
        self._protected: list[tuple[zmq.Socket, list[str] | None, str]] = []  # type: ignore[type-arg]

    @property
    def enabled(self) -> bool:
        return self.keys is not None

    @property
    def denied(self) -> int:
        return self.refusals.total

    def load(self, cfg: AggregatorConfig) -> None:
        """Read the keys; raises curve.KeyError_ (the daemon refuses to start, or keeps the old
        keys on reload)."""
        if not cfg.curve_secret_key:
            self.keys = None
            return
        keys = curve.load_secret(cfg.curve_secret_key)
        allowed = curve.public_keys_in(cfg.authorized_keys_dir) if cfg.authorized_keys_dir else set()
        admins = curve.public_keys_in(cfg.admin_keys_dir) if cfg.admin_keys_dir else set()
        self.keys, self.allowed, self.admins, self._cfg = keys, allowed, admins, cfg
        log.info("CURVE on: %d authorised keys, %d admin keys", len(allowed), len(admins))

    def start(self, ctx: zmq.asyncio.Context) -> None:
        """Bind the ZAP handler (before any secure socket binds) and serve it on the loop."""
        if self.keys is None:
            return
        self._ctx = ctx
        zap = ctx.socket(zmq.REP)
        zap.setsockopt(zmq.LINGER, 0)
        zap.bind(ZAP_ENDPOINT)
        self._zap = zap
        self._start(self._serve_zap(zap), "zap")

    def admitted(self, key: bytes) -> bool:
        return key in self.allowed or key in self.admins

    async def _serve_zap(self, zap: zmq.asyncio.Socket) -> None:
        """ZAP 1.0 (RFC 27): [version, request id, domain, address, identity, mechanism, creds...]
        -> [version, request id, status code, status text, user id, metadata]."""
        while True:
            try:
                request = await zap.recv_multipart()
            except zmq.Again:
                continue
            version, request_id = [*request, b"", b""][:2]
            ok, user_id, text = False, b"", b"malformed ZAP request"
            if len(request) >= 7 and version == b"1.0" and request[5] == b"CURVE" and len(request[6]) == 32:
                key = zmq.utils.z85.encode(request[6])
                address = request[3].decode(errors="replace")
                ok = self.admitted(key)
                if ok:
                    user_id, text = key, b"OK"
                else:
                    text = b"key not authorised"
                    reason = "revoked_key" if key in self.revoked else "unknown_key"
                    self.refusals.add(address, key.decode(), reason, "the CURVE handshake")
            elif len(request) >= 6 and request[5] == b"NULL":
                text = b"CURVE required"  # a plain socket with our ZAP domain: not ours to admit
            reply = [b"1.0", request_id, b"200" if ok else b"400", text, user_id, b""]
            with contextlib.suppress(zmq.ZMQError):
                await zap.send_multipart(reply)

    def reload(self, cfg: AggregatorConfig) -> None:
        if self.keys is None and cfg.curve_secret_key:
            log.warning("turning CURVE on needs a restart")
            return
        if self.keys is None:
            return
        before = self.allowed | self.admins
        self.load(cfg)
        revoked = before - (self.allowed | self.admins)
        self.revoked = (self.revoked | revoked) - self.allowed - self.admins
        if revoked:
            log.warning("%d keys revoked: closing every CURVE connection so that each shakes hands"
                        " again (agents reconnect and resend what was in flight)", len(revoked))
            self.cut_connections()

    def protect(self, sock: zmq.Socket, endpoints: list[str] | None = None,  # type: ignore[type-arg]
                name: str = "") -> None:
        """Put CURVE on ``sock`` and count the handshakes ZAP never sees (no CURVE, a stale
        server key). ``endpoints``: where it is bound, when more than one; ``name``: how logs
        call it (default: its endpoint)."""
        if self.keys is None:
            return
        curve.as_server(sock, self.keys)
        self._protected.append((sock, endpoints, name))
        if self._ctx is not None:
            address = f"inproc://fleetlog-handshakes-{id(sock):x}"
            sock.monitor(address, int(zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                      | zmq.EVENT_DISCONNECTED))
            monitor = self._ctx.socket(zmq.PAIR)
            monitor.setsockopt(zmq.LINGER, 0)
            monitor.connect(address)
            self._monitors.append(monitor)
            self._start(self._watch(monitor, sock, name), "handshakes")

    def _start(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(_log_failure)
        self._tasks.append(task)

    @staticmethod
    def _endpoint(sock: zmq.Socket) -> str:  # type: ignore[type-arg]
        return bytes(sock.getsockopt(zmq.LAST_ENDPOINT)).decode(errors="replace").rstrip("\0")

    async def _watch(self, monitor: zmq.asyncio.Socket, sock: zmq.Socket, name: str) -> None:  # type: ignore[type-arg]
        """A failed handshake is followed by the disconnection of its descriptor: the address
        is the peer of that descriptor when it was accepted (best effort: a descriptor closed
        before its event is read has no peer any more)."""
        peers: dict[int, str] = {}
        failed: str | None = None
        while True:
            msg = await monitor.recv_multipart()
            if len(msg) != 2 or len(msg[0]) != 6:
                continue
            event, value = struct.unpack("=hi", msg[0])
            if event == zmq.EVENT_ACCEPTED:
                if len(peers) > 10_000:
                    peers.clear()
                peers[value] = _peer_of(value)
            elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                failed = _PROTOCOL_REASONS.get(value, "protocol")
            elif event == zmq.EVENT_DISCONNECTED:
                peer = peers.pop(value, "")
                if failed is not None:
                    self.refusals.add(peer, "", failed, name or self._endpoint(sock))
                    failed = None
            elif event == zmq.EVENT_MONITOR_STOPPED:
                return

    def cut_connections(self) -> None:
        """Unbind and bind again every secure endpoint: ZeroMQ closes the connections accepted
        through an endpoint when it is unbound, and each client reconnects through ZAP."""
        for sock, endpoints, _name in self._protected:
            if sock.closed:
                continue
            for endpoint in endpoints or [self._endpoint(sock)]:
                try:
                    sock.unbind(endpoint)
                except zmq.ZMQError as exc:
                    log.warning("cannot unbind %s to cut revoked connections: %s", endpoint, exc)
                    continue
                for _ in range(50):  # the listener closes in ZeroMQ's I/O thread
                    try:
                        sock.bind(endpoint)
                        break
                    except zmq.ZMQError as exc:
                        if exc.errno != zmq.EADDRINUSE:
                            log.error("cannot bind %s again after cutting revoked connections: %s",
                                      endpoint, exc)
                            break
                        time.sleep(0.01)

    def refuse_revoked(self, address: str, user_id: str, where: str) -> bool:
        """True (and counted) if a message comes with a key no longer admitted."""
        if self.keys is None or not user_id or self.admitted(user_id.encode()):
            return False
        self.refusals.add(address, user_id, "revoked_key", where)
        return True

    def may_admin(self, secure: bool, user_id: str) -> bool:
        """Admin commands: always without CURVE (open mode) or on an ipc:// endpoint."""
        return not secure or user_id.encode() in self.admins

    def stop(self) -> None:
        """Cancel the ZAP and monitor tasks and close their sockets now (the context is
        terminated right after)."""
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        for sock, _endpoints, _name in self._protected:
            if not sock.closed:
                with contextlib.suppress(zmq.ZMQError):
                    sock.disable_monitor()
        for monitor in self._monitors:
            monitor.close(linger=0)
        self._monitors = []
        self._protected = []
        if self._zap is not None:
            self._zap.close(linger=0)
            self._zap = None


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the %s task failed: %r; CURVE clients may go unanswered", task.get_name(),
                  task.exception())


def _peer_of(fd: int) -> str:
    """The remote address of a descriptor ZeroMQ just accepted ("" if it is gone or local)."""
    try:
        dup = os.dup(fd)
    except OSError:
        return ""
    try:
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return ""
    with sock:
        try:
            peer = sock.getpeername()
        except OSError:
            return ""
    return str(peer[0]) if isinstance(peer, tuple) else ""
