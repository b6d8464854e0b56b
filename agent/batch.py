"""Turning what a tailer read into a wire batch, and when to read a busy file again.

One read of up to ``batch_max_bytes`` / ``batch_max_lines`` is one batch: lines are never
copied into a second buffer. A file that is idle ships as soon as its change is seen; a file
that keeps changing is read again no sooner than ``batch_max_delay_ms`` after its last read, so
busy files make big batches and quiet ones small, prompt ones.
"""

from __future__ import annotations

from collections.abc import Iterator

from agent.tail import Chunk, Tailer, name_base64, shown
from fleetlog import wire


def frames_for(agent: str, tailer: Tailer, chunk: Chunk, v2: bool) -> list[bytes]:
    """The batch's frames: version 2 if ``v2`` (the aggregator reads it), else version 1."""
    lines = chunk.lines if v2 or type(chunk.lines) is list else chunk.line_list()
    path = tailer.path
    shown_path = shown(path)
    return wire.batch_frames(tailer.source.topic_bytes, agent, tailer.stream, tailer.base, shown_path,
                             tailer.identity, tailer.seq, chunk.start, chunk.end, lines,
                             path_base64=None if shown_path is path else name_base64(path))


def next_read_at(now: float, delay_s: float, read_full: bool) -> float:
    """When this file may be read again: at once if the last read was cut short by the batch
    limits (more is waiting), else after the batching delay. A file idle for longer than the
    delay is therefore read as soon as its next change is seen."""
    return now if read_full else now + delay_s


def combine(cycle: list[tuple[Tailer, list[bytes]]], max_message_bytes: int) -> Iterator[list[bytes]]:
    """One read cycle's messages for an aggregator that reads wire version 3: per topic, the
    batches' bodies spliced into as few messages as fit within ``max_message_bytes`` (each body
    fits alone: read_batch made sure). A topic with one batch keeps its own message."""
    by_topic: dict[bytes, list[bytes]] = {}
    for _, frames in cycle:
        by_topic.setdefault(frames[0], []).append(frames[1])
    limit = max_message_bytes - 64  # the version 3 envelope
    for topic, bodies in by_topic.items():
        group: list[bytes] = []
        size = 0
        for body in bodies:
            if group and size + len(body) + 1 > limit:
                yield _message(topic, group)
                group, size = [], 0
            group.append(body)
            size += len(body) + 1
        if group:
            yield _message(topic, group)


def _message(topic: bytes, bodies: list[bytes]) -> list[bytes]:
    return [topic, bodies[0]] if len(bodies) == 1 else wire.multi_frames(topic, bodies)
