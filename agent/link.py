"""The agent's view of its connections to the aggregator, through ZeroMQ socket monitors.

A ZeroMQ socket says nothing when its connection fails: a refused CURVE key, a stale server
key, or an endpoint of the wrong socket type all look like silence. And libzmq gives up on a
connection whose handshake the peer refused (a ZAP denial, a protocol error, a socket-type
mismatch): it does not reconnect, so an agent refused once stayed silent until restarted, even
after its key was authorised. A ``Link`` watches one socket's monitor, says at WARNING what is
wrong (once per change of problem, not per attempt) and reconnects with back-off itself.

A ``Link`` also notices an endpoint where nothing accepts the connection (the aggregator's
process is down, its port closed, its ipc:// socket file gone): libzmq says so by closing each
connection attempt before it is made (EVENT_CLOSED with no EVENT_CONNECTED, then
EVENT_CONNECT_RETRIED; the errno, ECONNREFUSED or ENOENT, is not in the event). Refused for
``refused_grace_s`` over two attempts or more, it tells ``on_refused`` once: an aggregator that
is back within the grace (a quick restart) is not left. It logs nothing of its own about it
(with a single aggregator, waiting for it is all there is to do, as before).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import struct
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

log = logging.getLogger("fleetlog.agent.link")

# Reconnecting after a refusal: from RETRY_MIN_S, doubling, to RETRY_MAX_S. An agent whose key
# is authorised after it started ships within RETRY_MAX_S of the aggregator's reload.
RETRY_MIN_S = 0.5
RETRY_MAX_S = 5.0
# After a disconnection, ZeroMQ schedules its reconnect at once (EVENT_CONNECT_RETRIED): none
# within this long means it dropped the connection for good.
GAVE_UP_AFTER_S = 1.0
# Nothing accepting the connection for this long (two attempts or more: libzmq retries after
# 0.1, 0.2, 0.4 s...) means the aggregator is not there. A quick restart is back within it.
REFUSED_GRACE_S = 1.0

_MONITORS = itertools.count(1)

_PROTOCOL_ERRORS: dict[int, str] = {
    int(zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH): "mechanism_mismatch",
    int(zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC): "cryptographic",
}


class Link:
    """One socket's connection to one endpoint.

    ``problem`` is what is wrong now (None: nothing known); ``up`` is True between a successful
    handshake and the next disconnection. ``role`` is "control" or "data"; ``hint`` is the
    question to ask the operator when the endpoint looks like the wrong one. ``problem`` is what
    an earlier link to the same endpoint last said (a new link after a move to another
    aggregator and back: not said again); ``on_failure`` is called after each failed handshake
    that leaves a problem known. ``on_refused`` is called once when connection attempts have
    been refused for ``refused_grace_s`` (see the module's docstring), and again only after a
    connection was made in between. ``moves_on``: the agent moves to another aggregator when
    this one fails (its problems say so instead of "retrying").
    """

    def __init__(self, role: str, sock: zmq.asyncio.Socket, endpoint: str, hint: str,
                 curve_public: bytes | None = None, problem: str | None = None,
                 on_failure: Callable[[Link], None] | None = None,
                 on_refused: Callable[[Link], None] | None = None,
                 refused_grace_s: float = REFUSED_GRACE_S, moves_on: bool = False) -> None:
        self.role = role
        self.sock = sock
        self.endpoint = endpoint
        self.hint = hint
        self.curve_public = curve_public
        self.on_failure = on_failure
        self.on_refused = on_refused
        self.refused_grace_s = refused_grace_s
        self.moves_on = moves_on   # the agent has another aggregator to try: said with a problem
        self.problem: str | None = problem
        self.up = False
        self.handshakes = 0
        self.failures = 0          # handshakes failed since the last one that succeeded
        self.reconnects = 0        # reconnections made here after ZeroMQ gave up
        self.connected = False     # a TCP/ipc connection is made (its handshake may still fail)
        self.refused = 0           # connection attempts refused since the last one made
        self.refused_total = 0
        self._refused_since: float | None = None  # loop time of the first of ``refused``
        self.last_refused_at = 0.0                 # loop time of the last of ``refused``
        self._refused_said = False
        self._refused_check: asyncio.TimerHandle | None = None
        self._retry_s = RETRY_MIN_S
        self._retry: asyncio.TimerHandle | None = None
        self._gave_up: asyncio.TimerHandle | None = None
        self._monitor: zmq.asyncio.Socket | None = None

    def monitor(self) -> None:
        """Start the socket's monitor: before connecting, or the first refusal goes unseen.
        Each monitor gets an address of its own: pyzmq's default names it after the socket's
        descriptor, and a monitor closed a moment ago (a move, a trial's end) may still hold
        that name (libzmq frees it asynchronously): EADDRINUSE stopped the agent."""
        self._monitor = self.sock.get_monitor_socket(addr=f"inproc://fleetlog-link-{next(_MONITORS)}")

    async def watch(self) -> None:
        """Read the socket's monitor until cancelled."""
        monitor = self._monitor
        if monitor is None:
            return
        try:
            while True:
                msg = await monitor.recv_multipart()
                if len(msg) == 2 and len(msg[0]) == 6:
                    event, value = struct.unpack("=hi", msg[0])
                    self.on_event(event, value)
        finally:
            for handle in (self._retry, self._gave_up, self._refused_check):
                if handle is not None:
                    handle.cancel()
            # None again: a link watched anew (the aggregator answered during its trial) must
            # be able to schedule them.
            self._retry = self._gave_up = self._refused_check = None
            self.close()

    def close(self) -> None:
        if self._monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None

    def on_event(self, event: int, value: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.up = True
            self.handshakes += 1
            self.failures = 0
            self._retry_s = RETRY_MIN_S
            self._cancel_gave_up()
            self.set_problem(None)
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self.failures += 1
            self.set_problem(self._refused_text(value))
            self._reconnect_later()
            self._failed()
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            self.failures += 1
            self.set_problem(self._protocol_text(value))
            self._reconnect_later()
            self._failed()
        elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            # ZeroMQ reconnects by itself here. One such failure can be an aggregator going down
            # in mid-handshake; every attempt failing is a peer that cannot read our hello.
            self.failures += 1
            if self.failures >= 2 and self.problem is None:
                # Never instead of a refusal already said: a refused client sometimes sees the
                # peer close before it reads the reason, and the log would flip between the two.
                self.set_problem(self._no_detail_text())
            if self.failures >= 2:
                self._failed()
        elif event == zmq.EVENT_CONNECTED:
            self.connected = True
            self._cancel_gave_up()
            self._refusal_over()
        elif event == zmq.EVENT_CLOSED:
            # A connecting socket's attempt closed before a connection was made: refused, the
            # ipc:// path missing, or CONNECT_TIMEOUT over (an established connection that ends
            # says EVENT_DISCONNECTED instead).
            if not self.connected:
                self._on_attempt_refused()
        elif event == zmq.EVENT_DISCONNECTED:
            self.up = False
            self.connected = False
            if self._retry is None and self._gave_up is None:
                loop = asyncio.get_running_loop()
                self._gave_up = loop.call_later(GAVE_UP_AFTER_S, self._check_gave_up)
        elif event in (zmq.EVENT_CONNECT_RETRIED, zmq.EVENT_CONNECT_DELAYED):
            self._cancel_gave_up()

    # -- nothing accepting the connection ---------------------------------------------------------

    def _on_attempt_refused(self) -> None:
        self.refused += 1
        self.refused_total += 1
        loop = asyncio.get_running_loop()
        self.last_refused_at = loop.time()
        if self._refused_since is None:
            self._refused_since = loop.time()
            self._refused_check = loop.call_later(self.refused_grace_s, self._check_refused)
        elif loop.time() - self._refused_since >= self.refused_grace_s:
            self._check_refused()

    def _check_refused(self) -> None:
        """Refused for the grace, twice at least, and nothing connected since: say so, once."""
        self._refused_check = None
        if self.connected or self._refused_said or self.refused < 2:
            return
        self._refused_said = True
        if self.on_refused is not None:
            self.on_refused(self)

    def refused_since(self) -> float | None:
        """Loop time of the first of the attempts refused since the last connection made."""
        return self._refused_since

    def refused_for_s(self) -> float:
        """How long connection attempts have been refused (0: the last one was not)."""
        if self._refused_since is None:
            return 0.0
        return asyncio.get_running_loop().time() - self._refused_since

    def _refusal_over(self) -> None:
        self.refused = 0
        self._refused_since = None
        self._refused_said = False
        if self._refused_check is not None:
            self._refused_check.cancel()
            self._refused_check = None

    def _failed(self) -> None:
        if self.problem is not None and self.on_failure is not None:
            self.on_failure(self)

    def set_problem(self, problem: str | None, retrying: str | None = None) -> None:
        """Log a change of problem once: WARNING when one starts or changes, INFO when it ends.
        ``retrying``: how the connection is tried again, when not by this link's back-off."""
        if problem == self.problem:
            return
        before, self.problem = self.problem, problem
        if problem is not None:
            then = ("trying the next aggregator" if self.moves_on else
                    retrying or f"retrying with back-off up to {RETRY_MAX_S:g}s")
            log.warning("%s (%s)", problem, then)
        elif before is not None:
            log.info("%s connection to %s works again", self.role, self.endpoint)

    # -- reconnecting ---------------------------------------------------------------------------

    def _cancel_gave_up(self) -> None:
        if self._gave_up is not None:
            self._gave_up.cancel()
            self._gave_up = None

    def _check_gave_up(self) -> None:
        self._gave_up = None
        if self.up or self._retry is not None:
            return
        self.failures += 1
        if self.problem is None:
            self.set_problem(f"{self.endpoint} closes the {self.role} connection as soon as it is made, and"
                             f" ZeroMQ gives up on it (a socket of another type answers there): {self.hint}")
        self._reconnect_later()
        self._failed()

    def _reconnect_later(self) -> None:
        if self._retry is not None:
            return
        self._cancel_gave_up()
        delay, self._retry_s = self._retry_s, min(2 * self._retry_s, RETRY_MAX_S)
        self._retry = asyncio.get_running_loop().call_later(delay, self._reconnect)

    def _reconnect(self) -> None:
        self._retry = None
        if self.sock.closed:
            return
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disconnect(self.endpoint)  # ENOENT once ZeroMQ dropped it
        try:
            self.sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            self.set_problem(f"cannot connect the {self.role} socket to {self.endpoint}: {exc}")
            return
        self.reconnects += 1
        # A peer that refuses again says so through the monitor; one that is gone now is
        # ZeroMQ's to retry (it does, for plain connection errors).

    # -- what to tell the operator --------------------------------------------------------------

    def _refused_text(self, status: int) -> str:
        key = f" {self.curve_public.decode()}" if self.curve_public else ""
        return (f"the aggregator at {self.endpoint} refuses this agent's CURVE key{key} on the"
                f" {self.role} connection (ZAP status {status}): add the agent's public key to the"
                " aggregator's authorized_keys_dir and reload the aggregator")

    def _protocol_text(self, code: int) -> str:
        reason = _PROTOCOL_ERRORS.get(code)
        if reason == "mechanism_mismatch":
            if self.curve_public:
                return (f"the aggregator at {self.endpoint} does not use CURVE on the {self.role}"
                        " connection, but this agent has keys (curve_secret_key): remove them, or turn"
                        " CURVE on at the aggregator")
            return (f"the aggregator at {self.endpoint} requires CURVE on the {self.role} connection:"
                    " set curve_secret_key and curve_server_key")
        if reason == "cryptographic":
            return (f"the CURVE handshake with {self.endpoint} fails ({self.role} connection): is"
                    " curve_server_key the aggregator's current public key?")
        return (f"the {self.role} handshake with {self.endpoint} fails (ZeroMQ protocol error"
                f" {code:#x}): {self.hint}")

    def _no_detail_text(self) -> str:
        if self.curve_public:
            return (f"the aggregator at {self.endpoint} closes the {self.role} connection during the"
                    " CURVE handshake: it cannot read our hello, so curve_server_key is probably not"
                    " the aggregator's current public key (a stale server key)")
        return f"the {self.role} handshake with {self.endpoint} fails without detail: {self.hint}"

    def status(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "up": self.up, "problem": self.problem,
                "handshakes": self.handshakes, "reconnects": self.reconnects,
                "refused_attempts": self.refused_total}
