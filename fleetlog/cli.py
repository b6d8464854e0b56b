"""What the command-line clients (``aggregatorctl``, ``fleetlog-agent status``) share, so that
they behave like Unix tools: quiet on a closed pipe, a one-line answer at once when nothing
listens, instead of a traceback or a wait for the full timeout."""

from __future__ import annotations

import contextlib
import os
import signal
import stat

import zmq
from zmq.utils.monitor import recv_monitor_message


def die_quietly_on_closed_pipe() -> None:
    """``aggregatorctl status | head -5``: die of SIGPIPE, as cat(1) does, rather than raising
    BrokenPipeError. Only for the clients: the daemons keep Python's default (ignored)."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)


def nothing_listens(endpoint: str) -> str | None:
    """Why nobody can be listening at ``endpoint`` (seen at once, without connecting), or None.

    Only an ipc:// path is checked here: it does not exist, or is not a socket. A refused tcp://
    connection is seen by the client's socket monitor (see :class:`RefusalWatch`).
    """
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
        return None
    path = endpoint[len("ipc://"):]
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"no socket at {path}"
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if not stat.S_ISSOCK(st.st_mode):
        return f"{path} is not a socket"
    return None


class RefusalWatch:
    """Watches a client socket's connection (a ZeroMQ socket monitor, every event): a connection
    refused before any succeeded means nothing listens, which the client says at once instead of
    waiting out its timeout; ``seen`` keeps the last value of each event, for a client that wants
    to explain a silence (a CURVE handshake refused...). Create it before ``connect``."""

    def __init__(self, sock: zmq.Socket) -> None:  # type: ignore[type-arg]
        self.sock = sock
        self.monitor = sock.get_monitor_socket()
        self.connected = False
        self.seen: dict[int, int] = {}

    def refused(self) -> bool:
        """Read what the monitor has; True once a retry came before any connection."""
        refused = False
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            kind = int(event["event"])
            self.seen[kind] = int(event["value"])
            if kind == zmq.EVENT_CONNECTED:
                self.connected = True
            elif kind == zmq.EVENT_CONNECT_RETRIED and not self.connected:
                refused = True
        return refused

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self.monitor.close(linger=0)
