"""The output formats: how a batch's lines become bytes of a topic file.

Shared by the aggregator (files sink) and ``fleetlog-writer`` (which rebuilds the same output
from the JetStream stream), so both write byte-for-byte the same lines.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
from typing import Any

import orjson

from fleetlog import wire

FORMATS = ("raw", "raw_agent", "json")
_SAFE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_SAFE_MAX = 200


@functools.lru_cache(maxsize=4096)
def safe_name(name: str) -> str:
    """An agent name as a file name and a one-word prefix: ``[A-Za-z0-9._-]`` kept, every other
    byte of its UTF-8 form as ``%XX``, a leading dot as ``%2E`` (so ``.``, ``..`` and hidden
    names cannot be made), the last dot of a name ending in ``.log``, ``.gz`` or ``.tmp`` too
    (never taken for a topic's file), the empty name as ``%``; past 200 bytes, the first 180 then ``~``
    and 16 hex digits of its SHA-256. Different names give different results (each form can
    be told apart), and a result never holds ``/``, a space or a control character."""
    raw = name.encode("utf-8", "surrogatepass")
    out = "".join(chr(b) if b in _SAFE_BYTES else f"%{b:02X}" for b in raw)
    if not out:
        return "%"
    if out[0] == ".":
        out = "%2E" + out[1:]
    if out.endswith((".log", ".gz", ".tmp")):
        # Not to be taken for a topic's own file (``app.log``, ``app.<stamp>.log.gz``) beside it.
        dot = out.rindex(".")
        out = f"{out[:dot]}%2E{out[dot + 1:]}"
    if len(out) > _SAFE_MAX:
        out = out[:180] + "~" + hashlib.sha256(raw).hexdigest()[:16]
    return out


def format_lines(lines: list[str] | str, fmt: str, *, agent: str, path: str, topic: str,
                 received: float, fields: list[dict[str, Any]] | None = None) -> bytes:
    """``lines`` (a list, or one string in which every line ends in "\\n") as output bytes.

    ``raw``: the lines as written, each ending in a newline. ``raw_agent``: the same, each
    line (each physical line of a multi-line record too) after the agent's name as
    ``safe_name`` gives it and a space: ``web-01 GET /index.html``. ``json``: one object per line with
    ``line``, ``agent``, ``path``, ``topic``, ``received`` (epoch seconds, kept for compatibility)
    and ``time`` (the same instant as RFC 3339 in UTC), plus each line's ``fields`` (journal
    entries) when given. Raises TypeError if a line is not a string.
    """
    if fmt == "raw":
        if isinstance(lines, str):
            return lines.encode()  # version 2: the lines as written, newlines included
        if not lines:
            return b""
        # One join and one encode, the trailing newline included (no third copy).
        lines.append("")
        try:
            return "\n".join(lines).encode()
        finally:
            lines.pop()
    if fmt == "raw_agent":
        text = lines if isinstance(lines, str) else "".join(line + "\n" for line in lines)
        if not text:
            return b""
        prefix = safe_name(agent) + " "
        return (prefix + text[:-1].replace("\n", "\n" + prefix) + "\n").encode()
    when = datetime.datetime.fromtimestamp(received, datetime.UTC).isoformat(timespec="microseconds")
    base = {"agent": agent, "path": path, "topic": topic, "received": received, "time": when}
    if fields is not None:  # a journal batch: each entry's fields beside its line
        return b"".join(
            orjson.dumps({"line": line, **base, **entry}, option=orjson.OPT_APPEND_NEWLINE)
            for line, entry in zip(wire.line_list(lines), fields, strict=True)
        )
    return b"".join(
        orjson.dumps({"line": line, **base}, option=orjson.OPT_APPEND_NEWLINE)
        for line in wire.line_list(lines)
    )
