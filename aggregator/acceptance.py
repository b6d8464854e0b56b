"""Per-stream acceptance: a batch is taken only where its stream has reached, exactly once.

Offsets accepted (maybe not yet durable) per stream, batches held back while their topic or the
journal cannot be written, and the resyncs that ask agents to resend."""

from __future__ import annotations

import logging
import time

from aggregator.files import SinkError
from aggregator.journal import stream_key
from aggregator.stages import Stages
from fleetlog import wire

log = logging.getLogger("fleetlog.aggregator")


class Acceptance(Stages):
    """Which batches are taken (the second stage a batch visits)."""

    def admit(self, batch: wire.Batch, key: str, file_key: str) -> int | None:
        """Whether ``batch`` (of stream ``key``, ``stream_key``; for the sink's ``file_key``, as
        ``file_key()`` gives it) is taken: the offset its stream has reached (``batch.start``) when
        it continues the stream exactly; None when it is not taken: held back (its topic or the
        journal cannot be written; asked again later), empty, a duplicate (dropped, and
        acknowledged again when already durable) or not where the stream is (its agent is asked
        to resend from there)."""
        if self.refusing and self.refuse(batch):
            return None  # not taken, not acknowledged: agents are asked to resend once it can be written
        expected = self.accepted.get(key)
        if expected is None:
            # A stream we have not seen: with the files sink the journal knows every stream it
            # ever committed, so it starts at its base. With JetStream the stream is the table
            # (another aggregator, or this one before a restart, may have taken its beginning):
            # take it where the agent stands, and let the publish precondition decide.
            expected = batch.base if self.stream_sink is None else batch.start
        if batch.start == batch.end:
            return None
        if expected < batch.base:
            expected = self.take_agents_base(key, batch, expected)
        if (batch.start != expected and self.stream_sink is not None and key not in self.pending
                and not self.stream_sink.has_queued(batch.topic, batch.agent, batch.stream)):
            # JetStream: the stream is the table, and our view of this stream may be old: its
            # agent may have shipped it on through another aggregator and come back (ahead of
            # us), or been sent back by one whose stream lost its tail (behind us). Asking it for
            # ``expected`` below what it had acknowledged made it begin its stream again past
            # bytes it could then never send, should the stream lose them; dropping its batch as
            # a duplicate by our view acknowledged what the stream may no longer hold. Take it
            # where the agent stands, as a stream not seen yet; the sink checks the subject, read
            # afresh, before it publishes (what it holds already is dropped and acknowledged, a
            # true gap is resynced from the stream's end). While it has batches of the stream
            # queued, our view is this session's, and the usual rules hold.
            expected = batch.start
        if batch.end <= expected:
            self.totals.duplicates_dropped += batch.count
            durable = self.journal.state.streams.get(key)
            if durable is not None and durable[0] >= batch.end:
                self.owe_ack(batch.agent, batch.stream, int(durable[0]))
            elif key in self.pending and not self.commit_soon:
                # Sent again before its commit: its agent waited for the ack past its
                # ack_timeout_ms. Commit now rather than at the interval.
                self.commit_soon = True
                self.commit_wake.set()
            return None
        if batch.start != expected:
            self.totals.resyncs += 1
            self.send_event(batch.agent, wire.encode_event(
                "resync", stream=batch.stream, offset=expected, seq=batch.seq))
            return None
        if self.stream_topic.get(key) != file_key and \
                not self.set_stream_topic(key, batch, expected, file_key):
            return None
        return expected

    def file_key(self, batch: wire.Batch) -> str:
        """The sink's key of the file ``batch`` goes to: its topic, or ``<topic>/<agent>`` when
        the topic is split by agent (aggregator/files.py; with sink = "jetstream" always the
        topic: fleetlog-writer makes the files). Streams and holds go by this key."""
        if self.stream_sink is None:
            return self.cfg.file_key(batch.topic, batch.agent)
        return batch.topic

    def refuse(self, batch: wire.Batch) -> bool:
        """Whether ``batch`` is held back: the journal cannot be written, or its topic cannot.
        Its stream is remembered, and its agent asked to resend once that has changed."""
        hold = self.state_error
        if hold is None:
            hold = self.sink.held.get(self.file_key(batch))
            if hold is None or hold.retrying:
                return False
        key = stream_key(batch.agent, batch.stream)
        self.refused[key] = (batch.agent, batch.stream, batch.seq, self.file_key(batch),
                             max(self.accepted.get(key, batch.base), batch.base))
        hold.refused_batches += 1
        return True

    def set_stream_topic(self, key: str, batch: wire.Batch, expected: int, file_key: str) -> bool:
        """Record a stream's topic; False (the batch waits) while batches of it for another topic
        are uncommitted: one topic's failure must be able to take back all of a stream's."""
        if key in self.pending:
            self.refused[key] = (batch.agent, batch.stream, batch.seq, file_key, expected)
            self.commit_wake.set()
            return False
        self.stream_topic[key] = file_key
        if len(self.stream_topic) > 2 * len(self.accepted) + 1024:
            self.stream_topic = {k: t for k, t in self.stream_topic.items() if k in self.accepted}
        return True

    def take_agents_base(self, key: str, batch: wire.Batch, expected: int) -> int:
        """The agent says its stream starts at ``batch.base``, past where our state has it: it
        rebased after we asked for an offset it had seen acknowledged (our journal was damaged,
        state_dir restored, or the JetStream stream no longer holds the stream). Its
        acknowledgements were real, so its word wins: both sides agree on one offset at once
        instead of asking each other forever."""
        self.totals.rebased_streams += 1
        info = self.agents.get(batch.agent)
        if info is not None and info.aggregators > 1:
            # Another aggregator acknowledged it while this one was not in use: expected.
            log.debug("agent %s, %s: continuing its stream at %d, acknowledged by another aggregator"
                      " (we had %d)", batch.agent, batch.path, batch.base, expected)
            self.accepted[key] = batch.base
            return batch.base
        log.warning("agent %s, %s: continuing its stream at %d, where the agent's acknowledged"
                    " offset stands; our state had it at %d (that state was lost: journal damaged,"
                    " state_dir restored, or the JetStream stream no longer holds it)",
                    batch.agent, batch.path, batch.base, expected)
        self.accepted[key] = batch.base
        return batch.base

    def resync_refused(self) -> None:
        """Ask the agents of batches refused meanwhile to resend them now, where they can be taken."""
        if self.state_error is not None:
            return
        held = self.sink.held
        for key, (agent, stream, seq, topic, offset) in list(self.refused.items()):
            hold = held.get(topic)
            if hold is not None and not hold.retrying:
                continue
            del self.refused[key]
            self.send_event(agent, wire.encode_event(
                "resync", stream=stream, offset=max(self.accepted.get(key, offset), offset), seq=seq))

    def take_back(self, topic: str, *windows: dict[str, int]) -> None:
        """A topic's fsync failed: cut its file back to its last commit and take back every batch
        of its streams since (not acknowledged; their agents are asked to resend)."""
        durable_size = self.journal.state.topics.get(topic)
        try:
            self.sink.cut_back(topic, durable_size)
        except SinkError as exc:
            log.error("%s (cut again before its next write)", exc)
        durable = self.journal.state.streams
        for window in windows:
            for key in [k for k in window if self.stream_topic.get(k) == topic]:
                del window[key]
                committed = durable.get(key)
                if committed is None:
                    self.accepted.pop(key, None)
                else:
                    self.accepted[key] = int(committed[0])
                agent, _, stream = key.partition("\x1f")
                self.refused[key] = (agent, stream, None, topic, self.accepted.get(key, 0))

    def forget_old_streams(self) -> None:
        """Drop in-memory offsets of streams the journal has forgotten (idle past stream_ttl_s),
        so a long-running aggregator does not grow with every file its agents ever rotated."""
        durable = self.journal.state.streams
        if self.stream_sink is not None:
            # No journal compaction forgets them here: streams JetStream acknowledged last more
            # than stream_ttl_s ago (the stream keeps them; a return reads the subject again).
            horizon = time.time() - self.cfg.stream_ttl_s
            for key in [k for k, (_, t) in durable.items() if t < horizon and k not in self.pending]:
                del durable[key]
                agent, _, stream = key.partition("\x1f")
                self.stream_sink.forget(self.stream_topic.get(key, ""), agent, stream)
        stale = [k for k in self.accepted if k not in durable and k not in self.pending]
        for key in stale:
            del self.accepted[key]
