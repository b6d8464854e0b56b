"""One JetStream message of the fleetlog stream, read back into a batch (JETSTREAM-FORMAT: v1).

Headers name the batch (``Fleetlog-Topic``, ``-Agent``, ``-Stream``, ``-Start``, ``-End``,
``-Lines``, ``-Path``, ``-Received``, optional ``-Fields``); the payload is the lines as the
``raw`` output format writes them. Names are escaped token by token (every UTF-8 byte outside
``[A-Za-z0-9_-]`` as ``~XX``); this module only reads them back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from aggregator import jetstream
from fleetlog import wire

VERSION = "1"
_TOKEN_RE = re.compile(r"^(?:[A-Za-z0-9_-]|~[0-9A-F]{2})*$")


class BadMessage(ValueError):
    """A message this writer cannot apply; ``reason`` is a short counter name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def unescape_token(token: str) -> str:
    """``web~2E01`` -> ``web.01`` (the inverse of the sink's escape; bytes that are not UTF-8 come
    back as surrogate escapes). Raises BadMessage for text that no escape produces."""
    if not _TOKEN_RE.match(token):
        raise BadMessage("bad_escape", f"{token[:80]!r} is not an escaped name")
    return jetstream.unescape_token(token)


@dataclass(frozen=True, slots=True)
class Message:
    """A batch as the stream holds it; ``start``/``end`` are byte offsets of the source stream."""

    topic: str
    agent: str
    stream: str
    start: int
    end: int
    lines: int
    path: str
    received: float
    payload: bytes
    fields: list[dict[str, Any]] | None = None

    @property
    def key(self) -> str:
        """The (agent, stream) key as the commit journal spells it."""
        return f"{self.agent}\x1f{self.stream}"


def _int(headers: Mapping[str, str], name: str) -> int:
    value = headers.get(name)
    if value is None or not value.isdigit():
        raise BadMessage("bad_header", f"{name}: {value!r} is not a decimal number")
    return int(value)


def parse(headers: Mapping[str, str] | None, payload: bytes) -> Message:
    """Read a message of the stream; raises BadMessage for anything not version 1 or inconsistent."""
    if not headers:
        raise BadMessage("no_headers", "a message without fleetlog headers")
    version = headers.get("Fleetlog-Version")
    if version != VERSION:
        raise BadMessage("bad_version", f"Fleetlog-Version {version!r} (this writer reads {VERSION})")
    names = {}
    for name in ("Topic", "Agent", "Stream", "Path"):
        value = headers.get(f"Fleetlog-{name}")
        if value is None:
            raise BadMessage("bad_header", f"Fleetlog-{name} missing")
        names[name] = unescape_token(value)
    if not wire.valid_topic(names["Topic"]):
        raise BadMessage("bad_topic", f"{names['Topic'][:80]!r} is not a valid topic name")
    start, end, lines = _int(headers, "Fleetlog-Start"), _int(headers, "Fleetlog-End"), \
        _int(headers, "Fleetlog-Lines")
    if end < start:
        raise BadMessage("bad_range", f"End {end} before Start {start}")
    try:
        received = float(headers.get("Fleetlog-Received", ""))
    except ValueError:
        raise BadMessage("bad_header", "Fleetlog-Received is not a number") from None
    found = payload.count(b"\n")
    if found != lines or (payload and not payload.endswith(b"\n")):
        raise BadMessage("bad_payload", f"{found} lines in the payload, Fleetlog-Lines says {lines}")
    fields = None
    if (raw_fields := headers.get("Fleetlog-Fields")) is not None:
        try:
            fields = orjson.loads(raw_fields)
        except orjson.JSONDecodeError:
            raise BadMessage("bad_fields", "Fleetlog-Fields is not JSON") from None
        if not isinstance(fields, list) or len(fields) != lines or not all(isinstance(f, dict)
                                                                            for f in fields):
            raise BadMessage("bad_fields", "Fleetlog-Fields is not one object per line")
    return Message(names["Topic"], names["Agent"], names["Stream"], start, end, lines, names["Path"],
                   received, payload, fields)
