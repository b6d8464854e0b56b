"""Ingest: data messages off the PULL and XSUB sockets, decoded, admitted, formatted and handed to
the sink; the malformed are counted and dropped."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

import zmq
import zmq.asyncio

from aggregator import proxy
from aggregator.agents import AgentInfo
from aggregator.files import SinkError
from aggregator.formats import format_lines
from aggregator.journal import stream_key
from aggregator.sink import Accepted
from aggregator.stages import Stages
from aggregator.status import TopicStats
from fleetlog import wire
from fleetlog.runtime import Wakeup

log = logging.getLogger("fleetlog.aggregator")

_NOW = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)

class Ingest(Stages):
    """Receiving and taking batches (the first stage a batch visits)."""

    async def receive_loop(self, sock: zmq.asyncio.Socket, via: str) -> None:
        """Take everything queued on ``sock`` each time its descriptor says so.

        The socket is read through a plain (shadow) socket, with no pyzmq future per message or
        per wake-up: the loop watches ``ZMQ_FD`` and each wake-up receives until ZeroMQ has
        nothing more (the descriptor only signals again after that). After a wake-up's first
        message ``ZMQ_EVENTS`` says whether another is queued: at a typical node's rate a
        wake-up brings one message, and asking (3.4 us) costs less than the ``zmq.Again``
        raised by a receive that finds nothing (8 us). When more are queued they are received
        until that exception, once per wake-up, which costs less per message than asking
        before each (2.7 against 4.2 us).
        """
        raw: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
        loop = asyncio.get_running_loop()
        readable = self.readable[via] = Wakeup()
        fd = cast(int, raw.getsockopt(zmq.FD))
        loop.add_reader(fd, readable.set)
        recv, get, ingest = raw.recv, raw.get, self.ingest
        try:
            while True:
                readable.clear()
                for i in range(256):
                    try:
                        frames = [recv(_NOW, copy=False)]
                    except zmq.Again:
                        break
                    # A message's later parts are there once its first is; Frame.more spares
                    # recv_multipart's getsockopt(RCVMORE) and its enum per part.
                    while frames[-1].more:
                        frames.append(recv(_NOW, copy=False))
                    ingest(frames, via)
                    if i == 0 and not cast(int, get(_EVENTS)) & _POLLIN:
                        break
                else:
                    await asyncio.sleep(0)  # more is waiting: let the rest of the daemon run first
                    continue
                if self.pending_bytes >= self.cfg.commit_max_bytes:
                    self.commit_wake.set()
                elif self.commit_idle:
                    self.poke_commit()
                await readable.wait(None)  # (the ticker sets it once a second too: see there)
        finally:
            loop.remove_reader(fd)

    def malformed(self, reason: str, peer: str, detail: str = "") -> None:
        t = self.totals
        t.malformed_dropped += 1
        t.malformed[reason] = t.malformed.get(reason, 0) + 1
        if (peer, reason) not in self._warned_peers and len(self._warned_peers) < 10_000:
            self._warned_peers.add((peer, reason))
            log.warning("dropped a malformed message from %s: %s %s (logged once per peer and reason)",
                        peer, reason, detail)

    def ingest(self, frames: list[zmq.Frame], via: str) -> None:
        """One data message: its batch, or (wire version 3) each of its batches in order, through
        acceptance and the sink as if each had come alone. A malformed message is dropped whole."""
        try:
            batches = wire.decode_batches([f.buffer for f in frames], self.cfg.max_message_bytes)
        except wire.WireError as exc:
            self.malformed(exc.reason, f"{via}:{peer_address(frames[-1])}", str(exc))
            return
        if self.stream_sink is not None or (self.subscriptions and len(batches) == 1):
            # (XPUB subscribers get a message that came alone as it came, not encoded again.)
            alone = len(batches) == 1
            for batch in batches:
                self.take(batch, frames, alone, via)
        else:
            self.take_together(batches, frames, via)  # the files sink: one batch or several

    def take(self, batch: wire.Batch, frames: list[zmq.Frame], alone: bool, via: str) -> None:
        """One decoded batch: admitted, formatted and handed to the sink, or not taken.
        ``frames``: the message it came in, ``alone`` in it or with others (version 3)."""
        key = stream_key(batch.agent, batch.stream)
        topic = self.file_key(batch)  # the sink's key: <topic>/<agent> when split by agent
        expected = self.admit(batch, key, topic)
        if expected is None:
            return
        # JetStream carries the lines as written; fleetlog-writer applies the topic's format.
        fmt = self.cfg.topic_format(batch.topic) if self.stream_sink is None else "raw"
        received = self.clock()
        data = self.formatted(batch, fmt, received, frames, via)
        if data is None:
            return
        n = batch.count
        try:
            self.out.add(Accepted(topic, batch.agent, batch.stream, batch.start, batch.end, n,
                                  data, batch.path, received, batch.fields, batch.base))
        except SinkError as exc:
            self.refused[key] = (batch.agent, batch.stream, batch.seq, topic, expected)
            self.on_write_error(topic, exc, len(data))
            return
        self.record(batch, key, frames, alone)
        self.count(batch.agent, batch.topic, n, len(data), 1, via)

    def take_together(self, batches: list[wire.Batch], frames: list[zmq.Frame], via: str) -> None:
        """A message's batches with the files sink (one, or several: version 3): each admitted
        and formatted as if it came alone, and those in a row for the same file written in one
        ``write()`` (an
        agent's read cycle is one message of a batch per file, mostly for one topic: one system
        call instead of one per batch). A group whose write fails is refused whole, as its
        batches would have been one after the other once the first had held its topic back.
        A stream met twice in one message starts a new group: its second batch is admitted
        only after its first is recorded.

        What is the same for every batch of the message is found once (all are of the topic
        frame's topic: its format, whether it is split by agent, when it was received), and the
        counters move once per group: a typical node's message is 8 batches of 2 or 3 lines."""
        topic = batches[0].topic
        cfg = self.cfg
        fmt = cfg.topic_format(topic)
        split = cfg.topic_split(topic)
        received = self.clock()
        admit = self.admit
        # admit()'s common case, inline: taking batches, the stream where the batch starts, and
        # already for this file.
        accepted = None if self.refusing else self.accepted
        stream_topic = self.stream_topic
        group: list[tuple[wire.Batch, str, int, bytes]] = []
        group_file = ""
        keys: set[str] = set()
        for batch in batches:
            agent = batch.agent
            key = stream_key(agent, batch.stream)
            if key in keys:
                self.write_group(group, group_file, frames, via)
                group, keys = [], set()
            file_key = cfg.file_key(topic, agent) if split else topic
            start = batch.start
            if (accepted is None or accepted.get(key) != start or batch.end == start
                    or stream_topic.get(key) != file_key):
                expected = admit(batch, key, file_key)
                if expected is None:
                    continue
            else:
                expected = start
            data = self.formatted(batch, fmt, received, frames, via)
            if data is None:
                continue
            if group and file_key != group_file:
                self.write_group(group, group_file, frames, via)
                group, keys = [], set()
            group.append((batch, key, expected, data))
            keys.add(key)
            group_file = file_key
        if group:
            self.write_group(group, group_file, frames, via)

    def write_group(self, group: list[tuple[wire.Batch, str, int, bytes]], file_key: str,
                    frames: list[zmq.Frame], via: str) -> None:
        """Append the admitted ``group`` (batch, stream key, expected offset, formatted text) to
        ``file_key``'s file in one write, then record each batch; if the write fails nothing of
        it is taken."""
        if not group:
            return
        data = group[0][3] if len(group) == 1 else b"".join([text for _, _, _, text in group])
        n = sum(batch.count for batch, _, _, _ in group)
        try:
            self.sink.append(file_key, data, n)
        except SinkError as exc:
            for batch, key, expected, _ in group:
                self.refused[key] = (batch.agent, batch.stream, batch.seq, file_key, expected)
            self.on_write_error(file_key, exc, len(data))
            return
        first = group[0][0]
        if not self.subscriptions and all(batch.agent == first.agent for batch, _, _, _ in group):
            for batch, key, _, _ in group:
                self.record(batch, key, frames, False)
            self.count(first.agent, first.topic, n, len(data), len(group), via)
            return
        for batch, key, _, text in group:  # subscribers, or batches of several agents in one message
            self.record(batch, key, frames, False)
            self.count(batch.agent, batch.topic, batch.count, len(text), 1, via)

    def formatted(self, batch: wire.Batch, fmt: str, received: float, frames: list[zmq.Frame],
                  via: str) -> bytes | None:
        """``batch``'s lines in output format ``fmt``, or None (dropped as malformed) when a line
        is not a string."""
        try:
            return format_lines(batch.lines, fmt, agent=batch.agent, path=batch.path, topic=batch.topic,
                                received=received, fields=batch.fields)
        except TypeError:
            self.malformed("bad_lines", f"{via}:{peer_address(frames[-1])}", "lines must be strings")
            return None

    def record(self, batch: wire.Batch, key: str, frames: list[zmq.Frame], alone: bool) -> None:
        """A batch of stream ``key`` is in the sink: its stream moves on, and XPUB subscribers
        get it."""
        self.accepted[key] = batch.end
        self.pending[key] = batch.end
        if self.subscriptions:
            # Subscribers always get version 1 (a list of lines), one batch a message: one shape
            # for consumers.
            proxy.publish(self.sockets["xpub"], frames if alone else wire.encode_batch(batch), batch)

    def count(self, agent_name: str, topic: str, n: int, size: int, batches: int, via: str) -> None:
        """``batches`` batches of ``agent_name`` for ``topic`` are in the sink, ``n`` lines and
        ``size`` bytes: the pending bytes, the counters and the agent move on."""
        self.pending_bytes += size
        stats = self.topics.get(topic)
        if stats is None:
            stats = self.topics[topic] = TopicStats()
        stats.lines += n
        stats.bytes += size
        t = self.totals
        t.lines_written += n
        t.bytes_written += size
        t.batches += batches
        agent = self.agents.get(agent_name)
        if agent is None:
            agent = self.agents[agent_name] = AgentInfo(agent_name, mode="push" if via == "pull" else "pub")
        agent.lines += n
        agent.bytes += size
        agent.last_seen = time.monotonic()
        agent.heard = True
        # The agent counts these as in flight until their ack: commit now, not at the interval,
        # once they are half of what it may have in flight (its max_inflight_bytes, or the
        # window granted if less; before its hello says, the least an agent may have), so that
        # a fast agent never stops at its window to wait for a commit (the other half covers
        # the commit's fsyncs).
        uncommitted = self.uncommitted_bytes.get(agent_name, 0) + size
        self.uncommitted_bytes[agent_name] = uncommitted
        window = agent.max_window or wire.MIN_INFLIGHT_BYTES
        if agent.window and agent.window < window:
            window = agent.window
        if 2 * uncommitted >= window and not self.commit_soon:
            self.commit_soon = True
            self.commit_wake.set()


def peer_address(frame: zmq.Frame) -> str:
    try:
        return str(frame.get("Peer-Address"))
    except zmq.ZMQError:
        return "local"
