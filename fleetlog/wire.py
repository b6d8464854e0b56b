"""The wire format: the one module both the agent and the aggregator import.

Data messages travel PUSH->PULL or PUB->XSUB->XPUB as two ZeroMQ frames::

    [topic, body]

The topic frame comes first so that SUB prefix filtering works through the proxy. The body is
an orjson object holding one batch of lines from one *stream* (one incarnation of one source
file on one agent)::

    {"v": 2, "agent": "web-01", "stream": "9f2c...", "base": 0, "path": "/var/log/app.log",
     "file": "2049:131077:5d41402a", "seq": 17, "start": 40960, "end": 81920,
     "text": "first line\nsecond line\n"}

Version 2 carries the lines as one string, each line followed by a newline; version 1 carries
them as a list (``"lines": ["first line", "second line"]``). Both are read. The agent sends
version 2 for plain lines: one string per batch is decoded, encoded and written without a
Python object per line (on the benchmark's backlog the agent's CPU per line fell by a fifth).
It sends version 1 for multi-line records, whose lines contain newlines, and to an aggregator
whose hello reply does not list version 2 in ``"wire"`` (one older than this format, during a
rolling upgrade), and until the reply has come. Subscribers on XPUB always receive version 1
(the aggregator converts), so consumers see one shape.

Version 3 carries several streams' batches of one topic in one message, one read cycle's worth
(an agent following 8 files that each got a line sends one message, not 8)::

    {"v": 3, "batches": [{"v": 2, "agent": "web-01", "stream": "9f2c...", ...}, {"v": 1, ...}]}

Each element is a complete version 1 or 2 body (checked as one), all of them for the message's
topic frame. Acceptance, resync and acknowledgement stay per stream: the aggregator takes each
batch on its own. A version 3 message with anything malformed in it is dropped whole and counted
(its agent resends from the resync or ack timeout). The agent sends version 3 only to an
aggregator whose hello reply lists 3 in ``"wire"``, and only when a read cycle has more than one
batch for a topic (a single batch goes as version 2, as before).

A batch may also carry ``"fields"``: a list with one object per line, the structured fields of
a journal entry (``unit``, ``identifier``, ``priority``, ``hostname``, ``pid``, ``realtime_us``;
those the entry has). Journal batches are always version 1 (a message may hold newlines); the
aggregator adds the fields to each line of its ``json`` output format.

``start``/``end`` are the byte offsets in the source file that the batch covers (always on line
boundaries); ``base`` is the offset the stream started at. The aggregator accepts a batch only if
it continues its stream exactly (``start`` equal to the end of the last accepted batch, or to
``base`` for a stream it has never seen), which is what makes delivery exactly-once and ordered.

Control messages (DEALER <-> ROUTER on the control endpoint) are single orjson frames:
requests ``{"id", "command", "args"}``, replies ``{"id", "ok", "result" | "error"}`` and, from the
aggregator to an agent without a request, events ``{"event": "ack" | "resync" | "stopping", ...}``.
``stopping`` (``{"event": "stopping", "instance": ID}``) is sent to every connected agent when
an aggregator stops, after its last acknowledgements: an agent with another aggregator configured
moves to it at once; others (and older agents, which ignore events they do not know) wait.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

import orjson

READS = (1, 2, 3)  # the versions the aggregator reads (its hello reply says so, as "wire")

# Flow control: the aggregator's replies and acks may carry "window", the bytes this agent may
# have shipped and not yet had acknowledged (its share of the aggregator's window_budget_bytes).
# Agents take the smaller of it and their own max_inflight_bytes, and ignore less than this.
MIN_WINDOW = 1024 * 1024
# The least an agent may have in flight (agent.max_inflight_bytes' lower bound): what the
# aggregator assumes of an agent whose hello has not said yet.
MIN_INFLIGHT_BYTES = 64 * 1024

# Topic names: the contract's alphabet, never starting with a dot (no "..", no hidden files).
TOPIC_RE = re.compile(rb"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_NAME_MAX = 256
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# The control event an aggregator sends its agents as it stops (see the module's docstring).
EVENT_STOPPING = "stopping"


class WireError(ValueError):
    """A frame that does not follow the format. ``reason`` is a short counter label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(slots=True)
class Batch:
    topic: str
    agent: str
    stream: str
    base: int
    path: str
    file: str
    seq: int
    start: int
    end: int
    # A list of lines (version 1), or one string in which every line ends with "\n" (version 2).
    lines: list[str] | str
    # One object per line (journal entries' fields), or None.
    fields: list[dict[str, Any]] | None = None

    @property
    def count(self) -> int:
        return line_count(self.lines)

    def line_list(self) -> list[str]:
        return line_list(self.lines)


def line_count(lines: list[str] | str) -> int:
    """How many lines a list or a version 2 string (every line ending in "\n") holds."""
    return lines.count("\n") if isinstance(lines, str) else len(lines)


def line_list(lines: list[str] | str) -> list[str]:
    return lines.split("\n")[:-1] if isinstance(lines, str) else lines


def valid_topic(topic: str) -> bool:
    return TOPIC_RE.fullmatch(topic.encode("utf-8", "replace")) is not None


def batch_frames(topic: bytes, agent: str, stream: str, base: int, path: str, file: str, seq: int,
                 start: int, end: int, lines: list[str] | str,
                 fields: list[dict[str, Any]] | orjson.Fragment | None = None,
                 path_base64: str | None = None) -> list[bytes]:
    """Frames of one data message, from its fields (the agent's hot path: no Batch object).
    ``lines`` as one string (every line ending in a newline) makes a version 2 body; ``fields``
    (one object per line, version 1 only; or that list already encoded, as an
    ``orjson.Fragment``) adds each line's structured fields. ``path_base64``: the exact bytes
    of a file name that is not UTF-8 (``path`` then shows each byte that is not UTF-8 as
    ``\\xNN``); readers that do not know it ignore it."""
    text = type(lines) is str
    doc: dict[str, Any] = {"v": 2 if text else 1, "agent": agent, "stream": stream, "base": base,
                           "path": path, "file": file, "seq": seq, "start": start, "end": end,
                           "text" if text else "lines": lines}
    if fields is not None:
        doc["fields"] = fields
    if path_base64 is not None:
        doc["path_base64"] = path_base64
    return [topic, orjson.dumps(doc)]


def encode_batch(batch: Batch) -> list[bytes]:
    """Frames of one data message."""
    return batch_frames(batch.topic.encode(), batch.agent, batch.stream, batch.base, batch.path,
                        batch.file, batch.seq, batch.start, batch.end, batch.lines, batch.fields)


def _str_field(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key)
    if type(value) is not str or not value or len(value) > _NAME_MAX:
        raise WireError("bad_field", key)
    return value


def _int_field(doc: dict[str, Any], key: str) -> int:
    value = doc.get(key)
    if type(value) is not int or value < 0:
        raise WireError("bad_field", key)
    return value


def decode_batch(frames: list[bytes] | list[memoryview], max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Batch:
    """Parse and check one data message of version 1 or 2; raise WireError for anything not
    trusted (a version 3 message, too: ``decode_batches`` reads every version).

    The lines themselves are checked for type when they are joined for writing (in C),
    not here, so that no per-line Python work happens on the hot path.
    """
    topic, doc = _open(frames, max_bytes)
    return _batch(topic, doc)


def decode_batches(frames: list[bytes] | list[memoryview],
                   max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[Batch]:
    """Parse and check one data message of any version: its batches, one for versions 1 and 2,
    one or more for version 3. Raises WireError (nothing of the message is taken) for anything
    not trusted, in any of its batches."""
    topic, doc = _open(frames, max_bytes)
    if doc.get("v") != 3:
        return [_batch(topic, doc)]
    parts = doc.get("batches")
    if type(parts) is not list or not parts:
        raise WireError("bad_field", "batches")
    out = []
    for part in parts:
        if type(part) is not dict or part.get("v") not in (1, 2):
            raise WireError("bad_field", "batches")
        out.append(_batch(topic, part))
    return out


def _open(frames: list[bytes] | list[memoryview], max_bytes: int) -> tuple[str, dict[str, Any]]:
    """The topic and the parsed body of a data message."""
    if len(frames) != 2:
        raise WireError("bad_frames", f"{len(frames)} frames")
    topic_raw, body = frames
    if len(body) > max_bytes:
        raise WireError("oversized", f"{len(body)} bytes")
    topic_raw = bytes(topic_raw)
    topic = _TOPICS.get(topic_raw)
    if topic is None:
        if TOPIC_RE.fullmatch(topic_raw) is None:
            raise WireError("bad_topic", repr(topic_raw[:64]))
        if len(_TOPICS) >= 4096:
            _TOPICS.clear()
        topic = _TOPICS[topic_raw] = topic_raw.decode()
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise WireError("bad_json", str(exc)[:80]) from None
    if type(doc) is not dict:
        raise WireError("bad_json", "not an object")
    return topic, doc


# Topic frames already checked (a fleet has a few topics; every message names one).
_TOPICS: dict[bytes, str] = {}


def _batch(topic: str, doc: dict[str, Any]) -> Batch:
    """One version 1 or 2 body, checked.

    The common body (version 2, every field well formed, no ``fields``) is read with one
    ``itemgetter`` call, checked in one expression and built with positional arguments: a
    typical node's read cycle is 8 batches a message, 25 messages a second, each arriving to
    cold caches, and the per-field calls of the checked path cost twice as much (2.0 against
    0.9 us a batch, hot). Anything else takes the field-by-field path, which says what is wrong."""
    try:
        version, lines, agent, stream, base, seq, start, end, path, file = _COMMON(doc)
    except KeyError:
        return _batch_checked(topic, doc)
    if (version == 2 and type(lines) is str and (not lines or lines[-1] == "\n")
            and type(agent) is str and 0 < len(agent) <= _NAME_MAX
            and type(stream) is str and 0 < len(stream) <= _NAME_MAX
            and type(base) is int and type(seq) is int and type(start) is int and type(end) is int
            and 0 <= base <= start <= end and seq >= 0
            and type(path) is str and len(path) <= 4096 and type(file) is str and len(file) <= _NAME_MAX
            and "fields" not in doc):
        return Batch(topic, agent, stream, base, path, file, seq, start, end, lines)
    return _batch_checked(topic, doc)


_COMMON = operator.itemgetter("v", "text", "agent", "stream", "base", "seq", "start", "end", "path", "file")


def _batch_checked(topic: str, doc: dict[str, Any]) -> Batch:
    """One version 1 or 2 body, checked field by field (WireError names the first bad one)."""
    version = doc.get("v")
    if version == 2:
        lines = doc.get("text")
        if type(lines) is not str or (lines and lines[-1] != "\n"):
            raise WireError("bad_field", "text")
    elif version == 1:
        lines = doc.get("lines")
        if type(lines) is not list:
            raise WireError("bad_field", "lines")
    else:
        raise WireError("bad_version", repr(version)[:20])
    fields = doc.get("fields")
    if fields is not None and (type(fields) is not list or type(lines) is not list
                               or len(fields) != len(lines) or not all(type(f) is dict for f in fields)):
        raise WireError("bad_field", "fields")
    batch = Batch(
        topic=topic,
        agent=_str_field(doc, "agent"),
        stream=_str_field(doc, "stream"),
        base=_int_field(doc, "base"),
        path=str(doc.get("path", ""))[:4096],
        file=str(doc.get("file", ""))[:_NAME_MAX],
        seq=_int_field(doc, "seq"),
        start=_int_field(doc, "start"),
        end=_int_field(doc, "end"),
        lines=lines,
        fields=fields,
    )
    if batch.end < batch.start or batch.start < batch.base:
        raise WireError("bad_offsets", f"{batch.base}/{batch.start}/{batch.end}")
    return batch


def multi_frames(topic: bytes, bodies: list[bytes]) -> list[bytes]:
    """A version 3 message from the bodies of several version 1 or 2 messages of ``topic`` (as
    ``batch_frames`` made them): spliced, not decoded again."""
    return [topic, b'{"v":3,"batches":[' + b",".join(bodies) + b"]}"]


# ---- control plane ---------------------------------------------------------------------------


def encode_request(req_id: int | str, command: str, args: dict[str, Any] | None = None) -> bytes:
    return orjson.dumps({"id": req_id, "command": command, "args": args or {}})


def encode_reply(req_id: Any, result: Any = None, error: str | None = None) -> bytes:
    if error is not None:
        return orjson.dumps({"id": req_id, "ok": False, "error": error})
    return orjson.dumps({"id": req_id, "ok": True, "result": result})


def encode_event(event: str, **fields: Any) -> bytes:
    return orjson.dumps({"event": event, **fields})


def decode_control(body: bytes, max_bytes: int = 1024 * 1024) -> dict[str, Any]:
    """Parse one control frame (request, reply or event); raise WireError if it is not one."""
    if len(body) > max_bytes:
        raise WireError("oversized", f"{len(body)} bytes")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise WireError("bad_json", str(exc)[:80]) from None
    if type(doc) is not dict:
        raise WireError("bad_json", "not an object")
    if "command" in doc:
        if type(doc["command"]) is not str or type(doc.get("args", {})) is not dict:
            raise WireError("bad_request")
        doc.setdefault("args", {})
    elif "event" not in doc and "ok" not in doc:
        raise WireError("bad_control", "neither request, reply nor event")
    return doc
