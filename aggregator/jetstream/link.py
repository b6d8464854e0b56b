"""The JetStream sink's link to NATS: the connection (made in the background when no server
answers at start, then kept by the client's reconnects), the stream (created when missing, checked
against the settings when it exists, never changed), JetStream API requests, and the error state
of each part (connect, link, stream, commit), logged once per change."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NatsClient

from aggregator.config import JetStreamConfig

log = logging.getLogger("fleetlog.aggregator.jetstream")

CONNECT_TIMEOUT_S = 2.0        # the first connection attempt in start(); later ones run behind

PING_INTERVAL_S = 5
ERR_STORE_FAILED = 10077          # "maximum messages/bytes exceeded" (discard new), store failures
ERR_NO_MESSAGE = 10037            # STREAM.MSG.GET: the subject has no message
ERR_STREAM_NOT_FOUND = 10059


class JetStreamUnavailable(ConnectionError):
    """No connection to NATS, or JetStream did not answer in time (the message says which)."""


class Refused(Exception):
    """A publish or read answered with a JetStream error (``code`` is JetStream's err_code)."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"{description} (err_code {code})")
        self.code = code
        self.description = description


class JetStreamLink:
    """One connection to NATS and the stream the settings name. ``nc`` is the client (None until
    the first connection); ``last_error`` the first error state still set (None: healthy)."""

    def __init__(self, settings: JetStreamConfig, name: str) -> None:
        self.settings = settings
        self.client_name = name
        self.nc: NatsClient | None = None
        self._connector: asyncio.Task[None] | None = None
        self.stream_ready = False     # checked (or created); False: check again before publishing
        self._stream_seen = False
        self._stream_differs: list[str] = []
        self._stream_max_msg_size = -1
        self.last_error: str | None = None
        self._logged_state: dict[str, str] = {}
        self._errors: dict[str, str] = {}
        self._closing = False
        self.reconnects = 0           # connections regained after a loss (status, metrics)

    async def start(self, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Connect and create (or check) the stream. Never hangs: when no server answers within
        ``connect_timeout_s`` the sink reports "not connected" (``status()``, commits keep
        everything queued) and keeps trying in the background, forever."""
        try:
            await self._connect(connect_timeout_s)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            self.set_error("connect", f"not connected to NATS {', '.join(self.settings.servers)}:"
                           f" {exc or type(exc).__name__}"
                           " (retrying in the background; nothing is acknowledged meanwhile)")
            self._connector = asyncio.create_task(self._connect_forever(), name="jetstream-connect")
            return
        await self.ensure_stream()

    async def _connect(self, timeout_s: float) -> None:
        s = self.settings
        options: dict[str, Any] = {
            "servers": list(s.servers), "name": self.client_name, "connect_timeout": timeout_s,
            "allow_reconnect": True, "max_reconnect_attempts": -1, "reconnect_time_wait": 1,
            # A server that stops answering (a partition, a SIGSTOP) is seen in 15-20 s, not
            # nats-py's 4 minutes: while the link looks connected, this aggregator's agents wait
            # for the stream instead of moving to another aggregator (aggregator/flow.py).
            "ping_interval": PING_INTERVAL_S, "max_outstanding_pings": 3,
            "error_cb": self._on_error, "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        if s.credentials:
            options["user_credentials"] = s.credentials
        # nats-py tries each server once (connect_timeout each) before it gives up; bound it all.
        self.nc = await asyncio.wait_for(nats.connect(**options), timeout_s * (len(s.servers) + 1))
        self.set_error("connect", None)
        log.info("jetstream: connected to %s (max_payload %d bytes)", self.nc.connected_url.netloc
                 if self.nc.connected_url else "?", self.nc.max_payload)

    async def _connect_forever(self) -> None:
        delay = 0.5
        while not self._closing:
            await asyncio.sleep(delay)
            try:
                await self._connect(CONNECT_TIMEOUT_S)
            except (TimeoutError, OSError, nats.errors.Error):
                delay = min(delay * 2, 5.0)
                continue
            await self.ensure_stream()
            return

    async def _on_error(self, exc: Exception) -> None:
        log.debug("jetstream: client error: %s", exc)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            self.set_error("link", "disconnected from NATS (reconnecting)")

    async def _on_reconnected(self) -> None:
        url = self.nc.connected_url.netloc if self.nc and self.nc.connected_url else "?"
        self.reconnects += 1
        self.set_error("link", None)
        log.info("jetstream: reconnected to %s", url)

    def max_message_bytes(self) -> int:
        """The largest message (headers + payload, bytes) the connected server and the stream
        take: the server's max_payload, or the stream's max_msg_size when smaller."""
        limit = self.nc.max_payload if self.nc is not None else 1024 * 1024
        return min(limit, self._stream_max_msg_size) if self._stream_max_msg_size > 0 else limit

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def ensure_stream(self) -> bool:
        """Create the stream when missing; when it exists, WARN about what differs from the
        settings (never change it). False (and the error recorded) when JetStream did not answer."""
        if self.stream_ready:
            return True
        if self.nc is None:
            return False
        s = self.settings
        wanted: dict[str, Any] = {
            "name": s.stream, "subjects": [f"{s.subject_prefix}.>"], "storage": "file",
            "num_replicas": s.replicas, "retention": "limits", "discard": s.discard,
            "duplicate_window": int(s.duplicate_window_s * 1e9),
            "max_bytes": s.max_bytes or -1, "max_age": int(s.max_age_s * 1e9),
        }
        try:
            info = await self.api(f"STREAM.INFO.{s.stream}", b"")
        except Refused as exc:
            if exc.code != ERR_STREAM_NOT_FOUND:
                self.set_error("stream", f"stream {s.stream}: {exc}")
                return False
            if self._stream_seen:
                log.warning("jetstream: stream %s is gone (deleted?): creating it again; what it held"
                            " is lost to the writers", s.stream)
            try:
                info = await self.api(f"STREAM.CREATE.{s.stream}", json.dumps(wanted).encode())
            except (Refused, JetStreamUnavailable, nats.errors.Error, TimeoutError) as exc2:
                self.set_error("stream", f"stream {s.stream} cannot be created: {exc2}")
                return False
            log.info("jetstream: created stream %s (subjects %s, %d replica(s), dedup window %g s,"
                     " discard %s)", s.stream, wanted["subjects"][0], s.replicas, s.duplicate_window_s,
                     s.discard)
        except (JetStreamUnavailable, nats.errors.Error, TimeoutError) as exc:
            self.set_error("stream", f"stream {s.stream} cannot be checked: {exc or type(exc).__name__}")
            return False
        self._check_stream(info.get("config") or {}, wanted)
        # An operator may cap the stream's messages below the servers' max_payload.
        self._stream_max_msg_size = int((info.get("config") or {}).get("max_msg_size") or -1)
        self.set_error("stream", None)
        self.stream_ready = self._stream_seen = True
        return True

    def _check_stream(self, have: dict[str, Any], wanted: dict[str, Any]) -> None:
        differs = []
        if not any(subj in (have.get("subjects") or []) for subj in wanted["subjects"]):
            differs.append(f"subjects {have.get('subjects')} (need {wanted['subjects'][0]})")
        for key in ("num_replicas", "discard", "duplicate_window", "storage"):
            if key in have and have[key] != wanted[key]:
                differs.append(f"{key} {have[key]} (configured {wanted[key]})")
        if differs and differs != self._stream_differs:
            self._stream_differs = differs
            log.warning("jetstream: stream %s exists with other settings, left as it is: %s",
                        self.settings.stream, "; ".join(differs))

    async def api(self, op: str, body: bytes) -> dict[str, Any]:
        """One JetStream API request ``$JS.API.<op>``: its decoded answer; raises Refused with
        JetStream's error, JetStreamUnavailable when not connected, or the client's timeout /
        no-responders errors."""
        if self.nc is None or self.nc.is_closed:
            raise JetStreamUnavailable("not connected to NATS")
        msg = await self.nc.request(f"$JS.API.{op}", body, timeout=self.settings.publish_timeout_s)
        answer: dict[str, Any] = json.loads(msg.data)
        if "error" in answer:
            err = answer["error"]
            raise Refused(int(err.get("err_code", 0)), str(err.get("description", err)))
        return answer

    async def close(self) -> None:
        """Stop reconnecting and close the connection (queued batches are dropped: they were
        never acknowledged, agents send them again)."""
        self._closing = True
        if self._connector is not None:
            self._connector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connector
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                await asyncio.wait_for(self.nc.close(), 5)

    def set_error(self, state: str, message: str | None, kind: str = "") -> None:
        """Record the error of one state (connect, link, stream, commit) and log it once per
        change of its kind: ERROR while batches wait for JetStream (WARNING for the link alone),
        INFO when it is over."""
        if message is None:
            self._errors.pop(state, None)
            if self._logged_state.pop(state, None) is not None:
                log.info("jetstream: %s recovered", state)
        else:
            self._errors[state] = message
            if self._logged_state.get(state) != (kind or message):
                self._logged_state[state] = kind or message
                # A lost link alone is worked around (reconnecting); batches waiting are at risk.
                log.log(logging.WARNING if state == "link" else logging.ERROR, "jetstream: %s", message)
        self.last_error = next(iter(self._errors.values()), None)
