"""The JetStream sink (``sink = "jetstream"``): accepted batches published into a NATS stream.

The stream is the acceptance table every aggregator shares. Each (topic, agent, stream) has its own
subject, and every message carries a ``Nats-Msg-Id`` built from (agent, stream, start, end) and a
``Nats-Expected-Last-Subject-Sequence`` precondition, so a subject only ever grows by the message
that continues it: a second copy is refused whoever sends it and whenever. When JetStream refuses
(wrong last sequence) or answers "duplicate", the sink reads the subject's last message and decides
from its ``Fleetlog-End`` (see ``sink.JetStreamSink._reconcile``): already in (acknowledge), continue
after it, or resync the agent there. The message format is JETSTREAM-FORMAT.md; the README's
"NATS JetStream" section is the manual.

Retry rule (one place: ``sink.classify``): a timeout, "no responders" (no stream leader: an election)
and JetStream's 503 "temporarily unavailable" are retried with the same headers and a back-off,
a bounded number of times, then the batch stays queued for the next commit. A full stream (discard
new) keeps everything queued and says so, like a full disk. Anything else is an error of that
subject alone (logged once per state change), its batches stay queued.

The modules: ``subjects`` (subject names, message ids, header sizes), ``link`` (the connection,
the stream's creation and check, JetStream API calls, the error states), ``messages`` (the queue's
pieces and the messages built from them within the size limit), ``sink`` (``JetStreamSink``:
queueing, publishing with preconditions, reconciling with the subject's last message, resyncs).
"""

from aggregator.jetstream.link import JetStreamUnavailable
from aggregator.jetstream.sink import CommitOutcome, JetStreamSink
from aggregator.jetstream.subjects import escape_token, msg_id, subject_for, unescape_token

__all__ = ["CommitOutcome", "JetStreamSink", "JetStreamUnavailable", "escape_token", "msg_id",
           "subject_for", "unescape_token"]
