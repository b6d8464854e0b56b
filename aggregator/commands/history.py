"""history: a topic's last N lines, read from its files, and where the live feed takes over.

``aggregatorctl tail TOPIC -n N`` first subscribes on XPUB, to the topic and to a probe prefix
of its own (``history.PROBE_PREFIX`` + a random token), then asks for the history with the token. Until
the probe's subscription has reached XPUB the answer is ``{"subscribed": false}`` (ask again):
a client's subscriptions reach XPUB in the order it sent them, so once the probe is there the
topic's subscription is too, and every batch accepted from then on is published to it.

The answer is taken in one step of the event loop, between two batches: ``lines`` holds every
line written before it (the topic's active file up to the length written so far, then its
rotated files, compressed or not, while lines are missing), and ``cut`` holds each of the
topic's streams' end offset at that moment. A published batch whose end is at or before its
stream's cut is in the history already; every later one starts at the cut. So nothing is
missed or doubled at the seam, unless XPUB drops messages of a subscriber that does not keep up
(which tail detects from the offsets and reports).
"""

from __future__ import annotations

import asyncio
import os
import stat
from typing import Any

import orjson

from aggregator import history
from aggregator.files import key_topic
from fleetlog import wire

HELP = "a topic's last N lines (from its files), with each stream's offset where they end"
ADMIN = False
# Read in a thread, answered when done: a long read does not hold up the control socket.
BACKGROUND = True
MAX_LINES = 1_000_000


async def run(agg: Any, args: dict[str, Any], peer: Any) -> dict[str, Any]:
    topic, n, probe = args.get("topic"), args.get("lines"), args.get("probe")
    if not isinstance(topic, str) or not wire.valid_topic(topic):
        raise ValueError(f"not a topic name: {topic!r}")
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_LINES:
        raise ValueError(f"lines must be a whole number from 0 to {MAX_LINES}")
    if probe is not None:
        if not isinstance(probe, str) or not probe.isalnum() or len(probe) > 64:
            raise ValueError("probe must be a token of up to 64 letters and digits")
        if history.PROBE_PREFIX + probe.encode() not in agg.subscriptions:
            return {"subscribed": False}
    # A topic split by agent (or once split): each file of it, the topic's own first, then its
    # agents' in name order; all taken in this one step of the loop.
    keys = sorted({*agg.sink.keys_of(topic), *(k for k in agg.sink.files if key_topic(k) == topic)},
                  key=lambda k: (k != topic, k))
    snaps = [take_snapshot(agg, key) for key in keys]
    cut = streams_cut(agg, topic)
    fmt = agg.cfg.topic_format(topic)
    try:
        lines, truncated = await asyncio.get_running_loop().run_in_executor(None, read_lines, snaps, n, fmt)
    except OSError as exc:
        raise ValueError(f"cannot read {topic}'s files: {exc}") from None
    return {"subscribed": True, "lines": lines, "truncated": truncated, "cut": cut,
            "max_bytes": history.HISTORY_MAX_BYTES}


def take_snapshot(agg: Any, topic: str) -> history.Snapshot:
    """On the loop, between two batches: what the history of one file key reads."""
    snap = history.Snapshot()
    tf = agg.sink.files.get(topic)
    try:
        if tf is not None and tf.fd >= 0 and os.path.isdir("/proc/self/fd"):
            # The file the sink writes to (during a rotation: the renamed one, until retired),
            # opened again for reading (the sink's descriptor is write-only).
            snap.fd, snap.size = os.open(f"/proc/self/fd/{tf.fd}", os.O_RDONLY | os.O_CLOEXEC), tf.size
        else:
            snap.fd = os.open(agg.sink.active_path(topic), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            snap.size = tf.size if tf is not None else os.fstat(snap.fd).st_size
    except OSError:
        snap.close()
    directory = os.path.dirname(agg.sink.active_path(topic))
    rotated = [os.path.join(directory, name) for name in reversed(agg.sink.rotated_files(topic))]
    if rotated and snap.fd >= 0 and not rotated[0].endswith(".gz"):
        # Mid-rotation the sink's descriptor is the newest rotated file already: not twice.
        try:
            st, active = os.stat(rotated[0]), os.fstat(snap.fd)
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (active.st_dev, active.st_ino):
                rotated = rotated[1:]
        except OSError:
            pass
    snap.rotated = rotated
    return snap


def streams_cut(agg: Any, topic: str) -> list[list[Any]]:
    """Each of the topic's streams' accepted end offset, as ``[agent, stream, end]``."""
    cut = []
    for key, file_key in agg.stream_topic.items():
        if key_topic(file_key) == topic and (end := agg.accepted.get(key)) is not None:
            agent, _, stream = key.partition("\x1f")
            cut.append([agent, stream, end])
    return cut


def read_lines(snaps: list[history.Snapshot], n: int, fmt: str) -> tuple[list[str], bool]:
    """Thread: the last ``n`` lines of each snapshot, one after the other, as text (a ``json``
    topic's lines taken out of their objects, as tail shows the live ones)."""
    raw: list[bytes] = []
    truncated = False
    try:
        for snap in snaps:
            if truncated:
                break
            got, truncated = history.read_history(snap, n, history.HISTORY_MAX_BYTES
                                                  - sum(len(x) + 1 for x in raw))
            raw += got
    finally:
        for snap in snaps:
            snap.close()
    if fmt == "json":
        lines: list[str] = []
        for line in raw:
            try:
                obj = orjson.loads(line)
                lines.append(obj["line"] if isinstance(obj, dict) and isinstance(obj.get("line"), str)
                             else line.decode("utf-8", "replace"))
            except orjson.JSONDecodeError:  # written before the topic was switched to json
                lines.append(line.decode("utf-8", "replace"))
        return lines, truncated
    return [line.decode("utf-8", "replace") for line in raw], truncated
