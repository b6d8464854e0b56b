"""Subject names, message ids and header sizes of the JetStream sink (JETSTREAM-FORMAT.md)."""

from __future__ import annotations

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
# NATS/1.0 line, "Key: value\r\n" per header, and the blank line: what a header block costs.
_HDR_LINE_BYTES = len(b"NATS/1.0\r\n") + 2


def escape_token(value: str) -> str:
    """``value`` as one subject token: every UTF-8 byte outside ``[A-Za-z0-9_-]`` becomes ``~``
    and two upper-case hex digits (``.`` is ``~2E``). Lone surrogates (bytes that were not UTF-8,
    kept by ``surrogateescape``) come back as their original bytes."""
    raw = value.encode("utf-8", "surrogateescape")
    return "".join(chr(b) if b in _SAFE else f"~{b:02X}" for b in raw)


def unescape_token(token: str) -> str:
    """The inverse of ``escape_token``; raises ValueError on a ``~`` not followed by two hex digits."""
    out = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "~":
            digits = token[i + 1:i + 3]
            if len(digits) != 2 or not all(c in "0123456789ABCDEFabcdef" for c in digits):
                raise ValueError(f"bad escape at {i} in subject token {token!r}")
            out.append(int(digits, 16))
            i += 3
        else:
            out.extend(token[i].encode())
            i += 1
    return out.decode("utf-8", "surrogateescape")


def subject_for(prefix: str, topic: str, agent: str, stream: str) -> str:
    """``<prefix>.<topic>.<agent>.<stream>``, each name escaped."""
    return f"{prefix}.{escape_token(topic)}.{escape_token(agent)}.{escape_token(stream)}"


def msg_id(agent: str, stream: str, start: int, end: int) -> str:
    """The ``Nats-Msg-Id`` of the message covering [start, end) of (agent, stream)."""
    return f"{escape_token(agent)}.{escape_token(stream)}.{start}.{end}"


def parse_headers(block: bytes) -> dict[str, str]:
    """The headers of a NATS header block (``NATS/1.0\\r\\nKey: value\\r\\n...``)."""
    lines = block.decode("ascii", "replace").split("\r\n")[1:]
    headers = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip()] = value.strip()
    return headers


def header_bytes(headers: dict[str, str]) -> int:
    """What ``headers`` cost on the wire, in bytes."""
    return _HDR_LINE_BYTES + sum(len(k) + len(v) + 4 for k, v in headers.items())
