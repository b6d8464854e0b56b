"""aggregatorctl's connection to a control endpoint (an aggregator's or a fleetlog-writer's):
one DEALER with a deadline on every request, and what the handshakes say when nothing answers."""

from __future__ import annotations

import itertools
import time
from typing import Any

import zmq

from fleetlog import curve, wire
from fleetlog.cli import RefusalWatch

EXIT_UNREACHABLE = 3
EXIT_FELL_BEHIND = 4


class Unreachable(Exception):
    pass


class CommandFailed(Exception):
    pass


def local_endpoint(endpoint: str, host: str = "127.0.0.1") -> str:
    """A bound endpoint as a client reaches it (``tcp://0.0.0.0:5558`` -> ``tcp://127.0.0.1:5558``)."""
    for wildcard in ("tcp://0.0.0.0:", "tcp://*:", "tcp://[::]:"):
        if endpoint.startswith(wildcard):
            return f"tcp://{host}:{endpoint[len(wildcard):]}"
    return endpoint


class Client:
    """One DEALER to the control endpoint; every request has a deadline."""

    def __init__(self, endpoint: str, timeout_s: float,
                 curve_keys: tuple[curve.KeyPair, bytes] | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.curve_keys = curve_keys
        self.ctx = zmq.Context()
        # An aggregator's ipc:// control endpoints never use CURVE (the file's permissions guard
        # them): the keys are then for its CURVE-only XPUB (tail), not for this socket.
        self.sock = self.socket(zmq.DEALER, secure=not endpoint.startswith("ipc://"))
        # Watched from before the connect: a refused connection is said at once, and when
        # nothing answers, what the handshakes did tells "refused" from "not running".
        self.watch = RefusalWatch(self.sock)
        try:
            self.sock.connect(endpoint)
        except zmq.ZMQError:
            self.close()
            raise
        self.ids = itertools.count(1)

    def socket(self, kind: int, secure: bool = True) -> zmq.Socket:  # type: ignore[type-arg]
        """A socket to the aggregator, with CURVE when keys were given (and ``secure``)."""
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve_keys is not None and secure:
            curve.as_client(sock, *self.curve_keys)
        return sock

    def call(self, command: str, **args: Any) -> Any:
        req_id = next(self.ids)
        self.sock.send(wire.encode_request(req_id, command, args))
        deadline = time.monotonic() + self.timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if self.watch.refused():
                raise Unreachable(f"no aggregator at {self.endpoint}: connection refused; is it running?")
            # Short polls: a refusal shows on the monitor, not on this socket.
            if not self.sock.poll(min(100, int(left * 1000) + 1)):
                continue
            reply = wire.decode_control(self.sock.recv())
            if reply.get("id") != req_id:
                continue
            if not reply.get("ok"):
                raise CommandFailed(reply.get("error", "failed"))
            return reply.get("result")
        raise Unreachable(self.why_no_answer())

    def why_no_answer(self) -> str:
        """What the connection's handshakes say about the silence, as a sentence."""
        self.watch.refused()  # reads what the monitor has left
        seen = self.watch.seen
        where, within = f"the aggregator at {self.endpoint}", f"within {self.timeout_s:g}s"
        if zmq.EVENT_HANDSHAKE_FAILED_AUTH in seen:
            return (f"{where} refused this client's CURVE key (it is in neither its authorized_keys_dir"
                    " nor its admin_keys_dir)")
        protocol = seen.get(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        if protocol == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            if self.curve_keys is not None:
                return f"{where} does not use CURVE: leave out --curve-key and --server-key"
            return (f"{where} requires CURVE: give --curve-key and --server-key, or use its ipc://"
                    " control socket")
        if protocol is not None:
            return f"the handshake with {self.endpoint} fails (ZeroMQ protocol error {protocol:#x})"
        if zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL in seen:
            if self.curve_keys is not None:
                return (f"{where} closes the connection during the CURVE handshake: is --server-key"
                        " the aggregator's current public key?")
            return (f"{where} closes the connection during the handshake: it probably requires CURVE"
                    " (give --curve-key and --server-key, or use its ipc:// control socket)")
        if zmq.EVENT_HANDSHAKE_SUCCEEDED in seen:
            return (f"connected to {self.endpoint}, but no answer {within}: is it an aggregator's"
                    " control endpoint, and is that aggregator responsive?")
        return f"no answer from the aggregator at {self.endpoint} {within}; is it running?"

    def close(self) -> None:
        self.watch.close()
        self.sock.close(linger=0)
        self.ctx.term()
