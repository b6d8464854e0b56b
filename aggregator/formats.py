"""The output formats: how a batch's lines become bytes of a topic file.

Shared by the aggregator (files sink) and ``fleetlog-writer`` (which rebuilds the same output
from the JetStream stream), so both write byte-for-byte the same lines.
"""

from __future__ import annotations

import datetime
from typing import Any

import orjson

from fleetlog import wire

FORMATS = ("raw", "json")


def format_lines(lines: list[str] | str, fmt: str, *, agent: str, path: str, topic: str,
                 received: float, fields: list[dict[str, Any]] | None = None) -> bytes:
    """``lines`` (a list, or one string in which every line ends in "\\n") as output bytes.

    ``raw``: the lines as written, each ending in a newline. ``json``: one object per line with
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
